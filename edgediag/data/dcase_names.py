"""DCASE Task 2 file names -> labels (section, domain, split, anomaly, attributes).

Reading the labels a file name carries is part of reading a DCASE folder, so it lives with
the data readers; :mod:`edgediag.engine.dcase` (the scoring) imports it from here.

* DCASE 2020: ``{normal,anomaly}_id_00_00000000.wav``
* DCASE 2021-2025: ``section_00_{source,target}_{train,test}_{normal,anomaly}_0000_<attributes>.wav``
  (evaluation sets without labels: ``section_00_0000.wav`` or ``section_00_test_0000.wav``)
"""

from __future__ import annotations

import re
from pathlib import Path

_NAME_2020 = re.compile(r"^(?P<state>normal|anomaly)_(?P<section>id_\d+)_(?P<index>\d+)$")
_NAME_2021 = re.compile(r"^(?P<section>section_\d+)_(?P<domain>source|target)_(?P<split>train|test)_"
                        r"(?P<state>normal|anomaly)_(?P<index>\d+)(?:_(?P<attributes>.+))?$")
# Evaluation sets hide domain and label: "section_00_0000" (2021+) or "section_00_test_0000".
_NAME_EVAL = re.compile(r"^(?P<section>section_\d+)_(?:(?P<split>train|test)_)?(?P<index>\d+)(?:_(?P<attributes>.+))?$")


def parse_name(filename: str | Path) -> dict | None:
    """Labels encoded in a DCASE file name, or None if the name is not a DCASE one.

    Returns ``{"section", "domain" ('' if unknown), "split" ('' if unknown), "anomaly"
    (0/1, -1 unknown), "attributes" ('' if none), "index", "format" ('2020'|'2021+')}``.
    """
    stem = Path(str(filename)).stem
    m = _NAME_2020.match(stem)
    if m:
        return {"section": m["section"], "domain": "", "split": "", "anomaly": int(m["state"] == "anomaly"),
                "attributes": "", "index": m["index"], "format": "2020"}
    m = _NAME_2021.match(stem)
    if m:
        return {"section": m["section"], "domain": m["domain"], "split": m["split"],
                "anomaly": int(m["state"] == "anomaly"), "attributes": m["attributes"] or "",
                "index": m["index"], "format": "2021+"}
    m = _NAME_EVAL.match(stem)
    if m:
        return {"section": m["section"], "domain": "", "split": m["split"] or "", "anomaly": -1,
                "attributes": m["attributes"] or "", "index": m["index"], "format": "2021+"}
    return None
