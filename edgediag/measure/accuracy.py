"""Accuracy of a bench artifact: every item scored through its runner (AUC, pAUC, decision
accuracy at the calibrated threshold), and for a checkpoint the model's own metric."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from edgediag.engine.metrics import auc_pauc, decision_report, save_roc_png
from edgediag.engine.trainer import DeviceLoader
from edgediag.utils import write_json


def _batches(dataset, static_batch: int | None):
    """(input batch, its items) over the dataset; a static graph's last batch is padded."""
    n = len(dataset)
    step = static_batch or 32
    for start in range(0, n, step):
        items = [dataset[i] for i in range(start, min(start + step, n))]
        x = torch.stack([torch.as_tensor(it["x"]) for it in items]).float()
        if static_batch and len(items) < static_batch:
            x = torch.cat([x, x[-1:].expand(static_batch - len(items), *x.shape[1:])])
        yield x, items


def score_dataset(run: Callable, dataset, static_batch: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every item by the runner; labels = the items' anomaly flags."""
    scores, labels = [], []
    for x, items in _batches(dataset, static_batch):
        scores.append(run(x)[: len(items)])
        labels += [int(it["anomaly"]) for it in items]
    return np.concatenate(scores), np.asarray(labels)


def class_accuracy(run: Callable, dataset, static_batch: int | None) -> float | None:
    """Accuracy of a classifier graph from its ``probs`` output (argmax vs the items' class),
    so a graph reports the same metric as its checkpoint; None when it has no such output."""
    pred = getattr(run, "predictor", None)
    if pred is None or "probs" not in getattr(pred, "output_names", ()):
        return None
    hits = total = 0
    for x, items in _batches(dataset, static_batch):
        probs = pred.outputs(x)["probs"][: len(items)]
        hits += int((probs.argmax(-1) == np.asarray([int(it["y"]) for it in items])).sum())
        total += len(items)
    return hits / total if total else None


def accuracy(art, run: Callable, static_batch: int | None, dataset, plot_dir: Path) -> dict:
    """The model's own metric (model.evaluate) for a checkpoint; for a graph, the metrics its
    scores give (AUC, pAUC, decision accuracy at the calibrated threshold)."""
    from edgediag.models import get_model_class

    scores, labels = score_dataset(run, dataset, static_batch)
    auc, pauc = auc_pauc(labels, scores)
    result = {"auc": auc, "pauc": pauc}
    if math.isfinite(art.threshold):
        result["decision_accuracy"] = decision_report(labels, scores, art.threshold)["accuracy"]
    if len(np.unique(labels)) > 1:
        save_roc_png(plot_dir / "roc.png", {art.backend: (labels, scores)}, title=f"{art.model_name} ({art.backend})")
    try:
        primary = get_model_class(art.model_name)[0].primary_metric
    except Exception:  # noqa: BLE001 - an unknown model still has score metrics
        primary = "auc"
    if art.backend == "eager":
        loader = DeviceLoader(DataLoader(dataset, batch_size=32, shuffle=False), torch.device("cpu"))
        art.model.to("cpu")
        metrics = art.model.evaluate(loader, out_dir=plot_dir)
        write_json(plot_dir / "metrics.json", metrics)
        result["metric_name"], result["metric"] = primary, metrics.get(primary)
        if "auc" in metrics:
            result["auc"] = metrics["auc"]
        result["metric_source"] = "model.evaluate"
    elif primary in result:
        result["metric_name"], result["metric"] = primary, result[primary]
        result["metric_source"] = f"{art.backend} scores"
    elif primary == "acc" and (acc := class_accuracy(run, dataset, static_batch)) is not None:
        result["metric_name"], result["metric"] = "acc", acc
        result["metric_source"] = f"{art.backend} probs output"
    else:  # e.g. a classifier's accuracy needs its class outputs; the graph gives the score
        name = "decision_accuracy" if result.get("decision_accuracy") is not None else "auc"
        result["metric_name"], result["metric"] = name, result[name]
        result["metric_source"] = f"{art.backend} scores (the graph outputs scores, not {primary})"
    return result
