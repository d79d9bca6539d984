"""After the training loop: fit the normal statistics, calibrate the decision threshold,
evaluate. One definition, used by the train verb (which then writes ``model.pt``) and by
compression (a pruned model is refitted exactly like a trained one)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from edgediag.config import to_dict
from edgediag.engine.checkpoint import make_checkpoint, save_checkpoint
from edgediag.engine.metrics import calibrate_threshold
from edgediag.engine.trainer import DeviceLoader, TrainConfig

log = logging.getLogger("edgediag.engine")


def normal_subset(dataset):
    """Indices of the items known to be normal (anomaly == 0)."""
    keep = [i for i in range(len(dataset)) if int(dataset[i].get("anomaly", 0)) == 0]
    return Subset(dataset, keep)


@torch.no_grad()
def scores_of(model, dataset, device, batch_size=32) -> np.ndarray:
    model.eval()
    out = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        out.append(model.score(batch["x"].to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def scalars(metrics: dict) -> dict:
    """The scalar entries of a metrics dict (what a checkpoint or a JSON summary keeps)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def refit(model, bundle, train_cfg: TrainConfig, device) -> dict:
    """fit_normal on the training set, the model's own calibration on the validation set
    (where there is one), then the decision threshold from the normal items of the
    calibration set. Returns what to record: ``{"calibration": ..., "threshold_from": ...}``."""
    loader = DataLoader(bundle.train, batch_size=train_cfg.batch_size, shuffle=False)
    model.eval()
    model.fit_normal(DeviceLoader(loader, device))
    calib = bundle.val if bundle.val is not None and len(bundle.val) else bundle.train
    chosen = {}
    if calib is bundle.val:
        val_loader = DataLoader(bundle.val, batch_size=train_cfg.batch_size, shuffle=False)
        chosen = model.calibrate(DeviceLoader(val_loader, device)) or {}
        if chosen:
            log.info("calibrated on the validation set: %s", chosen)
    scores = scores_of(model, normal_subset(calib), device, train_cfg.batch_size)
    if len(scores):
        model.threshold.fill_(calibrate_threshold(scores, train_cfg.threshold_method, train_cfg.threshold_quantile))
    where = "validation" if calib is bundle.val else "training"
    return {"calibration": chosen, "threshold_from": f"{len(scores)} normal items of the {where} set"}


def evaluate_test(model, bundle, batch_size: int, device, out_dir=None) -> dict:
    """The model's own evaluation on the test split ({} without one)."""
    if bundle.test is None or not len(bundle.test):
        return {}
    loader = DeviceLoader(DataLoader(bundle.test, batch_size=batch_size, shuffle=False), device)
    return model.evaluate(loader, out_dir=out_dir) if out_dir is not None else model.evaluate(loader)


def finalize(model, bundle, train_cfg: TrainConfig, device, out_dir, checkpoint_data: dict) -> dict:
    """Best weights -> fit normal statistics -> calibrate the threshold -> evaluate -> ``model.pt``.
    What every run ends with: a pruned model is measured and saved like a trained one."""
    out_dir = Path(out_dir)
    fitted = refit(model, bundle, train_cfg, device)
    metrics = evaluate_test(model, bundle, train_cfg.batch_size, device, out_dir=out_dir / "eval")
    payload = make_checkpoint(model, data=checkpoint_data,
                              meta={"train_config": to_dict(train_cfg), "test_metrics": scalars(metrics), **fitted})
    save_checkpoint(out_dir / "model.pt", payload)
    return metrics
