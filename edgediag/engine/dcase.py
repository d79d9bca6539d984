"""DCASE Task 2 scoring, independent of any model.

File names (the label source of the DCASE development sets) are parsed by
:func:`edgediag.data.dcase_names.parse_name`, re-exported here as ``parse_name``.

Scores, as the official evaluators compute them (scikit-learn ``roc_auc_score``; pAUC with
``max_fpr=0.1``, McClish-standardised as sklearn returns it):

* DCASE 2022/2023 (domains present): per machine type and section, AUC(source) = source
  normals vs ALL anomalies of the section, AUC(target) likewise, pAUC over every clip of
  the section; the official score is the harmonic mean of all these AUC(source),
  AUC(target) and pAUC values over machine types and sections (each floored at float eps,
  as ``dcase2023_task2_evaluator.py`` does). Precision/recall/F1 per domain use only that
  domain's clips.
* DCASE 2020 (no domains): AUC and pAUC per machine type and id; per machine the
  arithmetic means and mAUC (the minimum AUC over its ids, as STgram-MFN reports it).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from edgediag.data.dcase_names import parse_name  # noqa: F401 - re-exported: the file-name half of DCASE
from edgediag.engine.metrics import auc_pauc, decision_report, save_roc_png

MAX_FPR = 0.1


def _hmean(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return float(stats.hmean(np.maximum(v, sys.float_info.epsilon))) if v.size else float("nan")


def _mean(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return float(v.mean()) if v.size else float("nan")


def _prf(labels: np.ndarray, decisions: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall, F1 of the anomaly class as the official evaluator computes them
    (zero denominators floored at eps, so an empty class gives 0, not NaN)."""
    tp = float(np.sum((decisions == 1) & (labels == 1)))
    fp = float(np.sum((decisions == 1) & (labels == 0)))
    fn = float(np.sum((decisions == 0) & (labels == 1)))
    eps = sys.float_info.epsilon
    p, r = tp / max(tp + fp, eps), tp / max(tp + fn, eps)
    return p, r, 2 * p * r / max(p + r, eps)


def section_scores(anomaly: Sequence[int], scores: Sequence[float], domains: Sequence[str],
                   decisions: Sequence[int] | None = None) -> dict:
    """DCASE 2022/23 scores of one machine type and section (labels 0/1 only)."""
    a, s, d = np.asarray(anomaly), np.asarray(scores, dtype=np.float64), np.asarray(domains)
    out = {"n_normal": int(np.sum(a == 0)), "n_anomaly": int(np.sum(a == 1))}
    out["auc_all"], out["pauc"] = auc_pauc(a, s, MAX_FPR)
    for dom in ("source", "target"):
        pick = (d == dom) | (a == 1)  # this domain's normals vs all anomalies of the section
        out[f"auc_{dom}"] = auc_pauc(a[pick], s[pick], MAX_FPR)[0] if np.any((d == dom) & (a == 0)) else float("nan")
        if decisions is not None:
            mine = d == dom
            dec = np.asarray(decisions)[mine]
            out[f"precision_{dom}"], out[f"recall_{dom}"], out[f"f1_{dom}"] = _prf(a[mine], dec)
    return out


def dcase_scores(machines: Sequence[str], sections: Sequence[str], domains: Sequence[str],
                 anomaly: Sequence[int], scores: Sequence[float], threshold=None,
                 decision_scores: Sequence[float] | None = None) -> dict:
    """Per machine × section scores and the summary of a whole test set.

    Items with anomaly -1 (unknown) are ignored. Uses the 2022/23 protocol when any item
    has a source/target domain, the 2020 one otherwise. With a finite ``threshold`` (one
    value, or one per item),
    decisions are ``decision_scores > threshold`` (``scores`` by default) and
    precision/recall/F1 are added per row and as means (``*_hmean`` / ``*_mean``).

    Returns ``{"official_score", "auc_source", "auc_target", "pauc", ..., "table": rows}``
    (2022/23) or ``{"mauc", "auc_mean", "pauc_mean", "table": rows}`` (2020).
    """
    m, sec, dom = np.asarray(machines), np.asarray(sections), np.asarray(domains)
    a, s = np.asarray(anomaly, dtype=int), np.asarray(scores, dtype=np.float64)
    ds = np.asarray(decision_scores if decision_scores is not None else s, dtype=np.float64)
    keep = a >= 0
    m, sec, dom, a, s, ds = m[keep], sec[keep], dom[keep], a[keep], s[keep], ds[keep]
    thr = per_item(threshold, len(keep))
    dec = (ds > thr[keep]).astype(int) if thr is not None else None
    with_domains = bool(np.isin(dom, ["source", "target"]).any())
    rows = []
    for machine in sorted(set(m.tolist())):
        for section in sorted(set(sec[m == machine].tolist())):
            pick = (m == machine) & (sec == section)
            if with_domains:
                row = section_scores(a[pick], s[pick], dom[pick], None if dec is None else dec[pick])
            else:
                auc, pauc = auc_pauc(a[pick], s[pick], MAX_FPR)
                row = {"n_normal": int(np.sum(a[pick] == 0)), "n_anomaly": int(np.sum(a[pick] == 1)),
                       "auc": auc, "pauc": pauc}
                if dec is not None:
                    row["precision"], row["recall"], row["f1"] = _prf(a[pick], dec[pick])
            rows.append({"machine": machine, "section": section, **row})

    out: dict = {}
    if with_domains:
        src = [r["auc_source"] for r in rows]
        tgt = [r["auc_target"] for r in rows]
        pauc = [r["pauc"] for r in rows]
        out["official_score"] = _hmean(src + tgt + pauc)
        out["hmean_source"] = _hmean(src + pauc)
        out["hmean_target"] = _hmean(tgt + pauc)
        out["auc_source"], out["auc_target"], out["pauc"] = _hmean(src), _hmean(tgt), _hmean(pauc)
        if dec is not None:
            for key in ("precision", "recall", "f1"):
                out[f"{key}_hmean"] = _hmean([r[f"{key}_{d}"] for r in rows for d in ("source", "target")])
    else:
        per_machine = defaultdict(list)
        for r in rows:
            per_machine[r["machine"]].append(r)
        # mAUC: the worst id of each machine type, then averaged over machine types.
        out["mauc"] = _mean([min(r["auc"] for r in rs) for rs in per_machine.values()])
        out["auc_mean"] = _mean([r["auc"] for r in rows])
        out["pauc_mean"] = _mean([r["pauc"] for r in rows])
        if dec is not None:
            for key in ("precision", "recall", "f1"):
                out[f"{key}_mean"] = _mean([r[key] for r in rows])
    out["table"] = rows
    return out


# Per-item metadata an audio loader yields (edgediag.data.audio) that anomaly_report groups by.
ITEM_FIELDS = ("domain", "machine", "section", "label", "key")


def report_groups(meta: dict[str, list]) -> dict[str, list | None]:
    """anomaly_report's grouping arguments from per-item metadata lists (ITEM_FIELDS)."""
    return dict(machines=meta["machine"], sections=meta["section"], domains=meta["domain"], labels=meta["label"],
                keys=meta.get("key"))


def per_item(threshold, n: int) -> np.ndarray | None:
    """``threshold`` (one value or one per item) as n values; None when absent or not finite."""
    if threshold is None:
        return None
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n,))
    return t if np.all(np.isfinite(t)) else None


def anomaly_report(scores: Sequence[float], anomaly: Sequence[int], *, machines: Sequence[str] | None = None,
                   sections: Sequence[str] | None = None, domains: Sequence[str] | None = None,
                   labels: Sequence[str] | None = None, threshold=None,
                   decision_scores: Sequence[float] | None = None, out_dir: str | Path | None = None,
                   title: str = "ROC", keys: Sequence[str] | None = None) -> dict:
    """Everything an anomaly-detection evaluation reports, for any model.

    * ``auc``/``pauc``: over all items with a known label (anomaly 0/1);
    * DCASE per machine × section × domain scores and the official score when sections
      are given (:func:`dcase_scores`), rows under ``table``;
    * otherwise, with ``labels``, one row per label: its count, AUC of the normal items
      vs that label, and the fraction flagged at ``threshold``. Labels whose anomaly is
      -1 (e.g. a stopped machine, neither normal nor a fault) only appear here;
    * precision/recall/F1/accuracy, FPR/TPR at ``threshold`` (one value, or one per item:
      thresholds per section × domain; ``decision_scores`` if the threshold was calibrated
      on another score, else ``scores``);
    * ``roc.png`` in ``out_dir`` (all items, and per domain when there are domains);
    * ``auc_file``/``pauc_file`` when ``keys`` name segments of files (``file#k``,
      ``data.segments``): each file scored by its segments' mean, as a monitor averages
      over time.
    """
    s = np.asarray(scores, dtype=np.float64)
    a = np.asarray(anomaly, dtype=int)
    n = len(s)
    dom = np.asarray(domains if domains is not None else [""] * n)
    dscores = np.asarray(decision_scores if decision_scores is not None else s, dtype=np.float64)
    known = a >= 0
    out: dict = {"n_items": int(n), "n_normal": int(np.sum(a == 0)), "n_anomaly": int(np.sum(a == 1))}
    out["auc"], out["pauc"] = auc_pauc(a[known], s[known], MAX_FPR)
    thr = per_item(threshold, n)
    use_threshold = thr is not None
    if use_threshold and np.any(known):
        out.update(decision_report(a[known], dscores[known], thr[known]))
    files, index = np.unique([str(k).rsplit("#", 1)[0] for k in keys or []], return_inverse=True)
    if 0 < len(files) < n:  # segments of files (data.segments)
        file_score = np.bincount(index, weights=s) / np.bincount(index)
        file_anomaly = np.zeros(len(files), dtype=int)
        file_anomaly[index] = a  # a file's segments share its label
        pick = file_anomaly >= 0
        out["n_files"] = int(len(files))
        out["auc_file"], out["pauc_file"] = auc_pauc(file_anomaly[pick], file_score[pick], MAX_FPR)
    if sections is not None and any(sections):
        sec = np.asarray(sections)
        mach = np.asarray(machines if machines is not None else [""] * n)
        has = sec != ""
        dc = dcase_scores(mach[has], sec[has], dom[has], a[has], s[has],
                          threshold=thr[has] if use_threshold else None, decision_scores=dscores[has])
        out.update({k: v for k, v in dc.items() if k != "table"})
        out["table"] = dc["table"]
        for d in ("source", "target"):
            pick = (dom == d) & known
            if np.any(pick):
                out[f"auc_{d}_only"], out[f"pauc_{d}_only"] = auc_pauc(a[pick], s[pick], MAX_FPR)
    elif labels is not None:
        lab = np.asarray(labels)
        rows = []
        normal = a == 0
        for name in sorted(set(lab.tolist())):
            pick = lab == name
            row = {"label": name, "n": int(pick.sum()),
                   "role": "normal" if np.all(a[pick] == 0) else "anomaly" if np.all(a[pick] == 1) else "excluded"}
            if row["role"] != "normal" and np.any(normal):
                both = normal | pick
                row["auc_vs_normal"] = auc_pauc((~normal[both]).astype(int), s[both], MAX_FPR)[0]
            if use_threshold:
                row["flagged"] = float(np.mean(dscores[pick] > thr[pick]))
            rows.append(row)
        out["table"] = rows
    if out_dir is not None:
        curves = {"all": (a[known], s[known])}
        for d in ("source", "target"):
            pick = ((dom == d) | (a == 1)) & known
            if np.any((dom == d) & (a == 0)):
                curves[f"{d} normals vs all anomalies"] = (a[pick], s[pick])
        save_roc_png(Path(out_dir) / "roc.png", curves, title=title)
    return out
