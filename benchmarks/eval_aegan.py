"""AEGAN-AD held-out score selection: train, choose the score on one half of the test
set, report every score on the other half.

The audio builder's validation split comes from the training folder, which for DCASE sets
(and with data.train_normal_only) holds normal clips only, so AUC cannot choose among the
28 detection scores there. This script does what a labelled validation split would:

1. train on the training split with the shared engine (in-process Trainer, the model's
   train_defaults plus --set train.KEY=VALUE), then fit_normal on the training clips;
2. score every test clip once with all scores (AEGANAD.collect_scores);
3. split the test clips in two halves, stratified by (label, anomaly, domain), with a
   seeded permutation; fold 1 chooses the score by AUC on half A
   (edgediag.models.aegan_ad.choose_score, the rule AEGANAD.calibrate applies to a
   validation set) and reports on half B, fold 2 the other way round;
4. print each score's AUC/pAUC on each half, the chosen one and its held-out AUC, the
   configured default's, and the issue-4 baseline's (benchmarks/audio_baseline.py) on the
   same half; then the same over --repeats seeded splits (mean +- std), since one split of
   a few dozen clips is noisy. Everything goes to --out/eval_aegan.json, the per-clip
   scores to --out/scores.json (--reuse re-reports from them without training).

    python benchmarks/eval_aegan.py ../shared/data/dcase2023_valve --model aegan_ad_small
    python benchmarks/eval_aegan.py ../shared/data/fan_sensiml --normal ON --set train.epochs=10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # audio_baseline, the issue-4 baseline

from edgediag import cli  # noqa: E402
from edgediag.config import apply_overrides, from_dict, to_dict  # noqa: E402
from edgediag.data import DataConfig, build_data  # noqa: E402
from edgediag.engine.checkpoint import load_model  # noqa: E402
from edgediag.engine.trainer import TrainConfig, Trainer  # noqa: E402
from edgediag.models import build_config, get_model_class  # noqa: E402
from edgediag.models.aegan_ad.model import choose_score, score_rows  # noqa: E402
from edgediag.utils import seed_everything, write_json  # noqa: E402

log = logging.getLogger("eval_aegan")


def stratified_halves(keys: list, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of halves A and B: each stratum's items permuted (seeded) and dealt
    alternately, starting each stratum on the half that is currently smaller."""
    rng = np.random.default_rng(seed)
    strata = defaultdict(list)
    for i, k in enumerate(keys):
        strata[k].append(i)
    a, b = [], []
    for k in sorted(strata, key=str):
        items = [strata[k][j] for j in rng.permutation(len(strata[k]))]
        first, second = (a, b) if len(a) <= len(b) else (b, a)
        first.extend(items[0::2])
        second.extend(items[1::2])
    return np.sort(np.asarray(a, dtype=int)), np.sort(np.asarray(b, dtype=int))


def subset(scores: dict, meta: dict, idx: np.ndarray) -> tuple[dict, dict]:
    return ({n: s[idx] for n, s in scores.items()}, {k: [v[i] for i in idx] for k, v in meta.items()})


def train_and_score(args) -> dict:
    """Train, fit_normal, score every test clip with every score (and the issue-4 baseline)."""
    tree = apply_overrides({"model": {}, "train": {}}, args.overrides)
    cls, _ = get_model_class(args.model)
    model_cfg = build_config(args.model, tree.get("model") or {})
    train_cfg = from_dict(TrainConfig, {**cls.train_defaults, "device": "cpu", "threads": args.threads,
                                        **(tree.get("train") or {})}, "train.")
    train_cfg.validate()
    data_cfg = DataConfig(root=args.data, normal_labels=list(args.normal), val_fraction=0.0)
    seed_everything(train_cfg.seed)
    bundle = build_data(cls.data_kind, data_cfg, model_cfg)
    if bundle.test is None:
        raise cli.UserError(f"{args.data} has no test clips")
    model_cfg = cls.config_for_data(model_cfg, bundle)
    model = cls(model_cfg)
    n_params = {"generator": sum(p.numel() for p in model.generator.parameters()),
                "discriminator": sum(p.numel() for p in model.discriminator.parameters())}
    print(f"{args.model}: G {n_params['generator'] / 1e6:.3f} M, D {n_params['discriminator'] / 1e6:.3f} M params; "
          f"{len(bundle.train)} training clips, {len(bundle.test)} test clips; "
          f"input range [{model_cfg.input_min:.1f}, {model_cfg.input_max:.1f}] dB", flush=True)

    last = Path(args.out) / "run" / "last.pt"
    if args.reuse and last.is_file():
        # The trained weights of an earlier run (its scores were not saved): no retraining.
        model, payload = load_model(last)
        if to_dict(model.config) != to_dict(model_cfg):
            log.warning("%s was trained with another config than this command line gives", last)
        model_cfg = model.config
        state = payload.get("train_state") or {}
        history, steps = state.get("history", []), state.get("step", 0)
        train_s = float(sum(rec.get("seconds", 0.0) for rec in history))
        print(f"reusing the trained weights of {last} ({steps} steps)")
    else:
        t0 = time.perf_counter()
        trainer = Trainer(model, train_cfg, Path(args.out) / "run", progress=not args.quiet)
        model = trainer.fit(bundle.train)
        train_s = time.perf_counter() - t0
        history, steps = trainer.history, trainer.step
    t0 = time.perf_counter()
    model.eval()
    model.fit_normal(DataLoader(bundle.train, batch_size=train_cfg.batch_size))
    scores, meta = model.collect_scores(DataLoader(bundle.test, batch_size=train_cfg.batch_size))
    score_s = time.perf_counter() - t0
    print(f"training {train_s:.0f} s ({steps} steps); fit_normal + scoring "
          f"{len(bundle.test)} test clips {score_s:.0f} s", flush=True)
    return {"model": args.model, "data": args.data, "model_config": to_dict(model_cfg),
            "train_config": dataclasses.asdict(train_cfg), "params": n_params, "train_seconds": train_s,
            "train_steps": steps, "score_seconds": score_s, "history": history,
            "default_score": model_cfg.score, "scores": {n: v.tolist() for n, v in scores.items()}, "meta": meta,
            "baseline": baseline_scores(bundle).tolist()}


def baseline_scores(bundle) -> np.ndarray:
    """The issue-4 baseline (benchmarks/audio_baseline.py: nearest training clip by
    standardised log-mel mean/std) on the same clips, to compare on the same halves."""
    from audio_baseline import clip_features
    from sklearn.neighbors import NearestNeighbors

    sr = bundle.info["sample_rate"]
    train = np.stack([clip_features(bundle.train.clips[i], sr) for i in range(len(bundle.train))])
    test = np.stack([clip_features(bundle.test.clips[i], sr) for i in range(len(bundle.test))])
    mu, sd = train.mean(axis=0), train.std(axis=0) + 1e-6
    return NearestNeighbors(n_neighbors=1).fit((train - mu) / sd).kneighbors((test - mu) / sd)[0][:, 0]


def held_out(scores: dict, meta: dict, baseline: np.ndarray, default: str, seed: int) -> tuple[list, dict, dict]:
    """Both folds of one seeded split: (folds, rows per half, halves' clip counts)."""
    keys = [(lab, a, d) for lab, a, d in zip(meta["label"], meta["anomaly"], meta["domain"])]
    idx = dict(zip("AB", stratified_halves(keys, seed)))
    halves = {h: subset(scores, meta, i) for h, i in idx.items()}
    rows = {h: {r["score"]: r for r in score_rows(*halves[h])} for h in halves}
    base = {h: score_rows({"baseline": baseline[idx[h]]}, halves[h][1])[0] for h in halves}
    folds = []
    for pick, held in (("A", "B"), ("B", "A")):
        chosen = choose_score(halves[pick][0], halves[pick][1]["anomaly"], default)
        r = rows[held][chosen["score"]]
        folds.append({"choose_on": pick, "report_on": held, **chosen, "held_out_auc": r["auc"],
                      "held_out_pauc": r["pauc"], "held_out_official_score": r.get("official_score"),
                      "default_held_out_auc": rows[held][default]["auc"], "baseline_held_out_auc": base[held]["auc"],
                      "baseline_held_out_official_score": base[held].get("official_score")})
    counts = {h: [int(np.sum(np.asarray(m["anomaly"]) == v)) for v in (0, 1)] for h, (_, m) in halves.items()}
    for h in rows:
        rows[h]["baseline (issue 4)"] = base[h]
    return folds, rows, counts


def report(res: dict, split_seed: int, repeats: int) -> dict:
    scores = {n: np.asarray(v) for n, v in res["scores"].items()}
    meta, baseline, default = res["meta"], np.asarray(res["baseline"]), res["default_score"]
    folds, rows, counts = held_out(scores, meta, baseline, default, split_seed)
    print(f"\nhalf A: {counts['A'][0]} normal + {counts['A'][1]} anomalous clips; half B: {counts['B'][0]} + "
          f"{counts['B'][1]} (split seed {split_seed})")
    has_official = "official_score" in rows["A"][default]
    print(f"{'score':<18} {'AUC A':>6} {'pAUC A':>6} {'AUC B':>6} {'pAUC B':>6}"
          + ("  official A / B" if has_official else ""))
    for name in rows["A"]:
        ra, rb = rows["A"][name], rows["B"][name]
        mark = "".join(f" <- chosen on {f['choose_on']}" for f in folds if f["score"] == name)
        mark += " (default)" if name == default else ""
        line = f"{name:<18} {ra['auc']:6.3f} {ra['pauc']:6.3f} {rb['auc']:6.3f} {rb['pauc']:6.3f}"
        if has_official:
            line += f"  {ra['official_score']:.3f} / {rb['official_score']:.3f}"
        print(line + mark)
    print()
    for f in folds:
        print(f"chosen on {f['choose_on']}: {f['score']} (AUC {f.get('val_auc', float('nan')):.3f} there) -> "
              f"held-out {f['report_on']}: AUC {f['held_out_auc']:.3f} pAUC {f['held_out_pauc']:.3f}"
              + (f" official {f['held_out_official_score']:.3f}" if f["held_out_official_score"] is not None else "")
              + f" | default {default}: {f['default_held_out_auc']:.3f} | baseline: {f['baseline_held_out_auc']:.3f}")
    # One split of a few dozen clips is noisy: repeat the selection over more seeded splits.
    runs = [f for seed in range(split_seed, split_seed + repeats)
            for f in held_out(scores, meta, baseline, default, seed)[0]]
    summary = {}
    for key, label in (("held_out_auc", "chosen on the other half"), ("default_held_out_auc", f"default {default}"),
                       ("baseline_held_out_auc", "baseline (issue 4)")):
        v = np.asarray([f[key] for f in runs], dtype=float)
        summary[key] = {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)), "n": int(np.isfinite(v).sum())}
        print(f"held-out AUC over {repeats} splits x 2 folds, {label}: {summary[key]['mean']:.3f} "
              f"+- {summary[key]['std']:.3f}")
    wins = np.mean([f["held_out_auc"] > f["baseline_held_out_auc"] for f in runs])
    ties = np.mean([f["held_out_auc"] == f["baseline_held_out_auc"] for f in runs])
    picks = sorted({f["score"] for f in runs})
    print(f"on the same held-out half the chosen score beats the baseline in {wins:.0%} of folds, ties in "
          f"{ties:.0%}; scores chosen: {', '.join(picks)}")
    return {"split_seed": split_seed, "halves": counts, "folds": folds, "rows": {h: list(r.values()) for h, r in
                                                                              rows.items()},
            "repeats": repeats, "repeated": summary, "win_rate_vs_baseline": float(wins),
            "tie_rate_vs_baseline": float(ties), "chosen_scores": picks}


def run(args) -> dict:
    out = Path(args.out)
    saved = out / "scores.json"
    if args.reuse and saved.is_file():
        res = json.loads(saved.read_text())
        print(f"reusing the scores of {saved} ({res['model']}, {res['train_steps']} steps, "
              f"{res['train_seconds']:.0f} s of training)")
    else:
        res = train_and_score(args)
        write_json(saved, res)
    result = {k: v for k, v in res.items() if k not in ("scores", "meta", "baseline")}
    result.update(report(res, args.split_seed, args.repeats))
    write_json(out / "eval_aegan.json", result)
    print(f"results: {out / 'eval_aegan.json'} (per-clip scores: {saved})")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="DCASE machine folder or labelled folder")
    p.add_argument("--normal", action="append", default=[], help="normal label (labelled folders), repeatable")
    p.add_argument("--model", default="aegan_ad", help="aegan_ad or aegan_ad_small")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="model.* or train.* setting, e.g. --set train.epochs=20 --set model.window_hop=16")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the stratified test halves")
    p.add_argument("--repeats", type=int, default=10, help="seeded splits averaged in the summary")
    p.add_argument("--reuse", action="store_true",
                   help="no training: reuse --out/scores.json, else the weights in --out/run/last.pt")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default="/tmp/eval_aegan", help="folder for checkpoints and eval_aegan.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    cli.entry(main)
