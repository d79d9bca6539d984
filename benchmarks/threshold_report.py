"""Do the calibrated thresholds keep their promise on data the models never saw?

For each data set and model: train with the default recipe (the train verb, several seeds),
then score the test split with the predict verb at the threshold the checkpoint carries,
and report AUC, pAUC and the false/true positive rates at that threshold (FPR should sit
near --target-far), mean ± std over the seeds, beside the clip-statistics kNN baseline
(benchmarks/audio_baseline.py: clip statistics, frame kNN and band maxima, each with a
threshold calibrated on leave-one-out distances of the training clips).

    python benchmarks/threshold_report.py --out runs/thresholds            # valve + fan, 3 seeds
    python benchmarks/threshold_report.py --sets valve --models aegan_ad --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgediag import cli, predict, train  # noqa: E402
from edgediag.engine.metrics import auc_pauc  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SETS = {  # name: (folder, train --set overrides, baseline normal labels)
    "valve": (SHARED / "dcase2023_valve", [], []),
    "fan": (SHARED / "fan_sensiml", ["data.normal_labels=[ON]"], ["ON"]),
}


def one_run(model: str, data: Path, overrides: list[str], seed: int, out: Path, target_far: float) -> dict:
    args = ["--model", model, "--data", str(data), "--out", str(out), "--force", "--seed", str(seed),
            "--target-far", str(target_far), *[x for o in overrides for x in ("--set", o)]]
    started = time.perf_counter()
    if cli.run(train.main, args):
        raise SystemExit(f"training {model} on {data} failed")
    seconds = time.perf_counter() - started
    if cli.run(predict.main, ["--checkpoint", str(out / "model.pt"), "--out", str(out / "predictions"), "--threads", "2"]):
        raise SystemExit(f"predict {model} failed")
    with open(out / "predictions" / "predictions.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["true_anomaly"] != ""]
    y = np.array([int(r["true_anomaly"]) for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    d = np.array([int(r["decision"]) for r in rows])
    auc, pauc = auc_pauc(y, s)
    import torch
    meta = torch.load(out / "model.pt", weights_only=True)["meta"]
    return {"auc": auc, "pauc": pauc, "fpr": float(d[y == 0].mean()), "tpr": float(d[y == 1].mean()),
            "n_normal": int((y == 0).sum()), "n_anomalous": int((y == 1).sum()), "train_seconds": seconds,
            "calibration": meta.get("threshold_calibration")}


def fmt(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/thresholds")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--models", nargs="+", default=["tastgram_mfn", "aegan_ad"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--target-far", type=float, default=0.1)
    args = p.parse_args(argv)
    results: dict = {}
    lines = [f"target FAR {args.target_far}", "",
             "| data | model | AUC | pAUC | FPR at threshold | TPR at threshold | calibrated on |",
             "|---|---|---|---|---|---|---|"]
    for name in args.sets:
        folder, overrides, normal = SETS[name]
        if not folder.exists():
            print(f"skip {name}: {folder} not present")
            continue
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import audio_baseline
        for features, title in (("meanstd", "clip-stat kNN"), ("frames", "frame kNN"), ("max", "band-max kNN")):
            base = audio_baseline.run(str(folder), normal, features=features, target_far=args.target_far)
            results[f"{name}/baseline-{features}"] = [{k: base[k] for k in ("auc", "pauc", "fpr", "tpr")}]
            lines.append(f"| {name} | {title} baseline | {base['auc']:.3f} | {base['pauc']:.3f} | {base['fpr']:.3f} | "
                         f"{base['tpr']:.3f} | training clips, leave-one-out |")
        for model in args.models:
            runs = [one_run(model, folder, overrides, seed, Path(args.out) / f"{name}-{model}-s{seed}", args.target_far)
                    for seed in args.seeds]
            results[f"{name}/{model}"] = runs
            cal = runs[0]["calibration"] or {}
            lines.append(f"| {name} | {model} | {fmt([r['auc'] for r in runs])} | {fmt([r['pauc'] for r in runs])} | "
                         f"{fmt([r['fpr'] for r in runs])} | {fmt([r['tpr'] for r in runs])} | "
                         f"{cal.get('n_normals', '?')} normals, {cal.get('source', '?')} |")
            print("\n".join(lines), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "thresholds.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
