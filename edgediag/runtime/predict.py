"""Score a data set item by item with any artifact; write ``predictions.csv`` and, for DCASE
data, the challenge's submission files. Torch-free: items are arrays (or CPU tensors, read
through numpy), scoring goes through a :class:`~edgediag.runtime.predictor.Predictor`."""

from __future__ import annotations

import collections
import csv
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edgediag.utils import atomic_path

COLUMNS = ("item", "score", "threshold", "decision", "label", "true_anomaly", "machine", "section", "domain")


def _batches(dataset, batch_size: int) -> Iterator[list[dict]]:
    items: list[dict] = []
    for i in range(len(dataset)):
        items.append(dataset[i])
        if len(items) == batch_size:
            yield items
            items = []
    if items:
        yield items


def score_items(predictor, dataset, batch_size: int = 32, classes: Sequence[str] = ()) -> list[dict]:
    """One row per item: its name, score, decision at the artifact's calibrated threshold
    (its section × domain's where the calibration made one; empty where there is none) and,
    where the data carries them, its label, anomaly flag, machine, section and domain."""
    decided = math.isfinite(predictor.threshold)
    rows = []
    for items in _batches(dataset, max(1, batch_size)):
        x = np.stack([np.asarray(it["x"], dtype=np.float32) for it in items])
        for it, s in zip(items, predictor.score(x)):
            y, anomaly = it.get("y"), it.get("anomaly")
            label = it.get("label") or (classes[int(y)] if classes and y is not None and 0 <= int(y) < len(classes)
                                        else "")
            threshold = predictor.threshold_for(it.get("section", ""), it.get("domain", ""))
            rows.append({"item": str(it.get("key", len(rows))), "score": float(s),
                         "threshold": threshold if decided else "", "decision": int(s > threshold) if decided else "",
                         "label": label, "true_anomaly": "" if anomaly is None or int(anomaly) < 0 else int(anomaly),
                         "machine": it.get("machine", ""), "section": it.get("section", ""),
                         "domain": it.get("domain", "")})
    return rows


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """``rows`` as CSV at ``path``, written under a temporary name and renamed."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_dcase_submission(out_dir: str | Path, rows: list[dict]) -> list[Path]:
    """The DCASE Task 2 submission files for rows that carry a machine and section:
    ``anomaly_score_<machine>_<section>_test.csv`` (``file,score``) and
    ``decision_result_<machine>_<section>_test.csv`` (``file,0|1``), no header, one line per
    clip (a clip scored as several segments, keys ``file#k``, gets their mean score)."""
    clips: dict[tuple[str, str], dict[str, list[float]]] = collections.defaultdict(dict)
    thresholds = {}  # a clip's threshold (its domain's, where thresholds are per domain)
    for r in rows:
        if not (r["machine"] and r["section"]):
            continue
        name = Path(r["item"].split("#", 1)[0]).name
        clips[(r["machine"], r["section"])].setdefault(name, []).append(r["score"])
        thresholds[(r["machine"], r["section"], name)] = r["threshold"]
    written = []
    for (machine, section), by_file in sorted(clips.items()):
        scores = {f: float(np.mean(s)) for f, s in by_file.items()}
        files = [("anomaly_score", {f: f"{s:.6f}" for f, s in scores.items()})]
        t = {f: thresholds[(machine, section, f)] for f in scores}
        if all(v != "" for v in t.values()):
            files.append(("decision_result", {f: str(int(s > t[f])) for f, s in scores.items()}))
        for kind, values in files:
            path = Path(out_dir) / f"{kind}_{machine}_{section}_test.csv"
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
                csv.writer(fh).writerows(sorted(values.items()))
            written.append(path)
    return written


def summary(rows: list[dict]) -> dict:
    """Counts of the decisions; where the true anomaly flags are known, false alarms, misses
    and the false/true positive rates at the artifact's threshold."""
    decided = [r for r in rows if r["decision"] != ""]
    out = {"items": len(rows), "flagged": sum(int(r["decision"]) for r in decided)}
    known = [r for r in decided if r["true_anomaly"] != ""]
    if known:
        normal = [r for r in known if r["true_anomaly"] == 0]
        anomalous = [r for r in known if r["true_anomaly"] == 1]
        out["false_alarms"] = sum(r["decision"] for r in normal)
        out["missed"] = sum(1 - r["decision"] for r in anomalous)
        out["normal_items"], out["anomalous_items"] = len(normal), len(anomalous)
        if normal:
            out["fpr"] = round(out["false_alarms"] / len(normal), 4)
        if anomalous:
            out["tpr"] = round(1 - out["missed"] / len(anomalous), 4)
    return out
