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
from edgediag.utils import group_key, group_thresholds

log = logging.getLogger("edgediag.engine")


def normal_subset(dataset):
    """Indices of the items known to be normal (anomaly == 0)."""
    keep = [i for i in range(len(dataset)) if int(dataset[i].get("anomaly", 0)) == 0]
    return Subset(dataset, keep)


@torch.no_grad()
def scores_of(model, dataset, device, batch_size=32) -> tuple[np.ndarray, list[str]]:
    """The items' scores and their section × domain (``group_key``; "/" for data without
    them), read in the same pass."""
    model.eval()
    out, groups = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        n = len(batch["x"])
        out.append(model.score(batch["x"].to(device)).float().cpu())
        groups += [group_key(str(s or ""), str(d or ""))
                   for s, d in zip(batch.get("section", [""] * n), batch.get("domain", [""] * n))]
    return (torch.cat(out).numpy() if out else np.zeros(0)), groups


def scalars(metrics: dict) -> dict:
    """The scalar entries of a metrics dict (what a checkpoint or a JSON summary keeps)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def _fit_normal(model, dataset, batch_size: int, device) -> None:
    model.eval()
    model.fit_normal(DeviceLoader(DataLoader(dataset, batch_size=batch_size, shuffle=False), device))


def crossfit_normal_scores(model, dataset, train_cfg: TrainConfig, device) -> tuple[np.ndarray, list[str]]:
    """Scores of the training set's normal items, each from normal statistics fitted on the
    other folds (k = ``train.calibration_folds``); the model is refitted on all items after.
    The network's weights did see every item: the scores are out-of-fold for the statistics
    (a kNN bank's distance of a clip to itself, a Gaussian fitted on it), not for training.
    Returns (scores, their items' groups) as :func:`scores_of`."""
    normal = set(normal_subset(dataset).indices)
    order = np.random.default_rng(train_cfg.seed).permutation(len(dataset))
    scores, groups = [], []
    for part in np.array_split(order, train_cfg.calibration_folds):
        held = set(int(i) for i in part)
        _fit_normal(model, Subset(dataset, [i for i in range(len(dataset)) if i not in held]),
                    train_cfg.batch_size, device)
        s, g = scores_of(model, Subset(dataset, sorted(held & normal)), device, train_cfg.batch_size)
        scores.append(s)
        groups += g
    _fit_normal(model, dataset, train_cfg.batch_size, device)
    return (np.concatenate(scores) if scores else np.zeros(0)), groups


def far_estimate(normal_scores: np.ndarray, threshold: float) -> dict:
    """The false-alarm rate the calibration normals show at ``threshold``, with its 95 %
    Clopper-Pearson interval: how far the promise can be trusted on this many normals."""
    from scipy import stats

    n = int(len(normal_scores))
    k = int(np.sum(normal_scores > threshold))
    lo = float(stats.beta.ppf(0.025, k, n - k + 1)) if k > 0 else 0.0
    hi = float(stats.beta.ppf(0.975, k + 1, n - k)) if k < n else 1.0
    return {"n_normals": n, "far_on_calibration": k / n if n else float("nan"), "far_ci95": [lo, hi]}


def calibrate_groups(scores: np.ndarray, groups: list[str], train_cfg: TrainConfig, quantile: float) -> dict:
    """A threshold per section × domain with at least ``train.group_min_normals`` calibration
    normals, each with its own FAR estimate; {} for data without several groups."""
    names = sorted(set(groups))
    if train_cfg.group_min_normals <= 0 or len(names) < 2 or names == ["/"]:
        return {}
    g = np.asarray(groups)
    out = {}
    for name in names:
        mine = scores[g == name]
        if len(mine) < train_cfg.group_min_normals:
            out[name] = {"threshold": None, "n_normals": int(len(mine)),
                         "note": f"fewer than {train_cfg.group_min_normals} normals: the global threshold applies"}
            continue
        t = calibrate_threshold(mine, train_cfg.threshold_method, quantile)
        out[name] = {"threshold": float(t), **far_estimate(mine, t)}
    return out


def refit(model, bundle, train_cfg: TrainConfig, device) -> dict:
    """Fit the normal statistics, let the model calibrate itself on the validation set (where
    there is one), then set the decision threshold for ``train.target_far`` on normal scores
    that the statistics did not fit: the validation split's normals, else out-of-fold scores
    of the training normals (:func:`crossfit_normal_scores`). Returns what a checkpoint
    records: ``{"calibration", "threshold_from", "threshold_calibration"}``."""
    _fit_normal(model, bundle.train, train_cfg.batch_size, device)
    chosen = {}
    if bundle.val is not None and len(bundle.val):
        val_loader = DataLoader(bundle.val, batch_size=train_cfg.batch_size, shuffle=False)
        chosen = model.calibrate(DeviceLoader(val_loader, device)) or {}
        if chosen:
            log.info("calibrated on the validation set: %s", chosen)
        scores, groups = scores_of(model, normal_subset(bundle.val), device, train_cfg.batch_size)
        where = "normal items of the validation set"
    elif (train_cfg.calibration_folds >= 2 and len(bundle.train) >= train_cfg.calibration_folds
          and model.score_uses_normal_statistics):
        scores, groups = crossfit_normal_scores(model, bundle.train, train_cfg, device)
        where = f"normal items of the training set, scored out-of-fold ({train_cfg.calibration_folds}-fold cross-fit)"
    else:
        scores, groups = scores_of(model, normal_subset(bundle.train), device, train_cfg.batch_size)
        where = "normal items of the training set (in-sample: optimistic, alarms will exceed the target)"
        log.warning("the %s score was trained on the clips that calibrate its threshold: on unseen normals it "
                    "will raise more alarms than --target-far; hold out normals (train.calibration_holdout, "
                    "data.val_fraction) or use a score fitted on normal statistics", model.model_name)
    quantile = train_cfg.threshold_quantile or 1.0 - train_cfg.target_far
    report = {"target_far": round(1.0 - quantile, 6), "method": train_cfg.threshold_method, "source": where}
    if len(scores):
        threshold = calibrate_threshold(scores, train_cfg.threshold_method, quantile)
        model.threshold.fill_(threshold)
        report.update(far_estimate(scores, float(model.threshold)))
        group_report = calibrate_groups(scores, groups, train_cfg, quantile)
        if group_report:
            report["groups"] = group_report
    else:
        report["n_normals"] = 0
    model.group_thresholds = group_thresholds(report)
    log.info("threshold %.5g for a %.0f %% false-alarm rate from %d %s", float(model.threshold),
             100 * report["target_far"], report["n_normals"], where)
    for name, g in report.get("groups", {}).items():
        own = f"threshold {g['threshold']:.5g}" if g["threshold"] is not None else "the global threshold"
        log.info("  %s: %s (%d calibration normals)", name, own, g["n_normals"])
    return {"calibration": chosen, "threshold_from": f"{report['n_normals']} {where}",
            "threshold_calibration": report}


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
