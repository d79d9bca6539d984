"""Score a data set item by item with any artifact and write one row per item. Torch-free:
items are arrays (or CPU tensors, read through numpy), scoring goes through a
:class:`~edgediag.runtime.predictor.Predictor`."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edgediag.utils import atomic_path

COLUMNS = ("key", "score", "anomalous", "threshold", "label", "true_anomaly")


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
    """One row per item: its key, score, decision at the artifact's calibrated threshold
    (empty where it has none) and, where the data carries them, its label and anomaly flag."""
    threshold = predictor.threshold
    rows = []
    for items in _batches(dataset, max(1, batch_size)):
        x = np.stack([np.asarray(it["x"], dtype=np.float32) for it in items])
        scores = predictor.score(x)
        for it, s in zip(items, scores):
            y = it.get("y")
            anomaly = it.get("anomaly")
            rows.append({"key": str(it.get("key", len(rows))), "score": float(s),
                         "anomalous": (int(s > threshold) if math.isfinite(threshold) else ""),
                         "threshold": threshold if math.isfinite(threshold) else "",
                         "label": (classes[int(y)] if classes and y is not None and 0 <= int(y) < len(classes)
                                   else ("" if y is None else int(y))),
                         "true_anomaly": "" if anomaly is None or int(anomaly) < 0 else int(anomaly)})
    return rows


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """``rows`` as CSV at ``path``, written under a temporary name and renamed."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return path


def summary(rows: list[dict]) -> dict:
    """Counts of the decisions, and of errors where the true anomaly flag is known."""
    decided = [r for r in rows if r["anomalous"] != ""]
    out = {"items": len(rows), "flagged": sum(int(r["anomalous"]) for r in decided)}
    known = [r for r in decided if r["true_anomaly"] != ""]
    if known:
        out["false_alarms"] = sum(1 for r in known if r["anomalous"] == 1 and r["true_anomaly"] == 0)
        out["missed"] = sum(1 for r in known if r["anomalous"] == 0 and r["true_anomaly"] == 1)
        out["normal_items"] = sum(1 for r in known if r["true_anomaly"] == 0)
        out["anomalous_items"] = len(known) - out["normal_items"]
    return out
