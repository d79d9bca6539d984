"""AEGAN-AD's detection scores: names, torch distances and LOF (ONNX-exportable), and the
rule that ranks the scores on a labelled validation set."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edgediag.engine.dcase import anomaly_report, report_groups
from edgediag.engine.metrics import auc_pauc

D_SCORES = ("D-maha", "D-KNN", "D-LOF", "D-cos")
G_SCORES = tuple(f"G-{space}-{dist}-{agg}" for space in ("x", "z") for dist in ("L1", "L2", "cos")
                 for agg in ("mean", "min", "max", "sum"))
SCORE_NAMES = D_SCORES + G_SCORES


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (A, B) with plain matmuls (torch.cdist has no ONNX export)."""
    sq = (a * a).sum(1, keepdim=True) - 2 * a @ b.t() + (b * b).sum(1).unsqueeze(0)
    return sq.clamp_min(0).sqrt()


def lof_fit(bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k-distance, local reachability density) of each training point, excluding itself
    from its neighbours, as scikit-learn's LocalOutlierFactor fit does."""
    d = pairwise_distances(bank, bank)
    d.fill_diagonal_(float("inf"))
    dk, idx = d.topk(k, dim=1, largest=False)
    kdist = dk[:, -1]
    reach = torch.maximum(dk, kdist[idx])
    return kdist, 1.0 / (reach.mean(1) + 1e-10)


def lof_score(emb: torch.Tensor, bank: torch.Tensor, kdist: torch.Tensor, lrd: torch.Tensor, k: int) -> torch.Tensor:
    """Local outlier factor of new points (= -LocalOutlierFactor(novelty=True).score_samples)."""
    dk, idx = pairwise_distances(emb, bank).topk(k, dim=1, largest=False)
    lrd_q = 1.0 / (torch.maximum(dk, kdist[idx]).mean(1) + 1e-10)
    return lrd[idx].mean(1) / lrd_q


def score_parts(names) -> tuple[bool, bool, bool]:
    """(needs G in x space, needs G in z space, needs D) for a set of score names."""
    names = set(names)
    return (any(n.startswith("G-x-") for n in names), any(n.startswith("G-z-") for n in names),
            any(n.startswith("D-") for n in names))


def score_rows(scores: dict[str, np.ndarray], meta: dict[str, list], chosen: str = "") -> list[dict]:
    """One row per score: AUC, pAUC (and the DCASE official score when there are sections)."""
    rows = []
    for name, s in scores.items():
        r = anomaly_report(s, meta["anomaly"], **report_groups(meta))
        row = {"score": name, "auc": r["auc"], "pauc": r["pauc"]}
        if "official_score" in r:
            row["official_score"] = r["official_score"]
        row["chosen"] = "*" if name == chosen else ""
        rows.append(row)
    return rows


def choose_score(scores: dict[str, np.ndarray], anomaly, default: str) -> dict[str, Any]:
    """The score with the highest AUC (ties: higher pAUC, then the earlier name) on clips
    with labels ``anomaly``; ``default`` when they do not hold both normal and anomalous
    clips (AUC is undefined). Returns what was chosen and why."""
    a = np.asarray(anomaly)
    if not (np.any(a == 0) and np.any(a == 1)):
        missing = "anomalous" if np.any(a == 0) else "normal"
        return {"score": default, "selected_by": f"configured default: the validation clips hold no {missing} "
                                                 "clips, so AUC cannot rank the scores"}
    known = a >= 0
    ranked = []
    for i, (name, s) in enumerate(scores.items()):
        auc, pauc = auc_pauc(a[known], np.asarray(s)[known])
        if np.isfinite(auc):
            ranked.append((auc, pauc if np.isfinite(pauc) else -1.0, -i, name))
    if not ranked:
        return {"score": default, "selected_by": "configured default: no score has a finite validation AUC"}
    auc, pauc, _, best = max(ranked)
    return {"score": best, "selected_by": f"validation AUC over {len(ranked)} scores ({int(np.sum(a == 0))} normal, "
                                          f"{int(np.sum(a == 1))} anomalous clips)",
            "val_auc": float(auc), "val_pauc": float(pauc), "default": default}
