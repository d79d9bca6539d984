"""The ratio-0.5 table of issue 8 ("Measured by"): for each of the four model families,
prune a trained checkpoint to half its parameters (``python -m edgediag.prune --ratio 0.5``),
fine-tune it briefly, export the result (``python -m edgediag.export``: ONNX parity) and
check that the checkpoint loads with ``torch.load(weights_only=True)``; print the markdown
table (and write it with the raw figures to --out).

    PYTHONPATH=. python benchmarks/prune_report.py --out /tmp/prune_report \
        --checkpoint tastgram_mfn=runs/tg/model.pt --checkpoint ldmamba=runs/ld/model.pt ...

A family without --checkpoint is first trained with the train verb (a small variant, a
few epochs, on the real data set of its issue) - slow on a CPU; pass checkpoints to skip.
Each stage runs as a subprocess, one at a time (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# family -> (variant to train when no checkpoint is given, data folder, train flags, fine-tune epochs)
SPECS = {
    # the published width on 1 s segments of the 5 s fan recordings (what the monitor scores)
    "tastgram_mfn": ("tastgram_mfn", "fan_sensiml", ["--set", "model.clip_seconds=1.0", "--set", "data.segments=true",
                                                      "--set", "data.normal_labels=[ON]", "--epochs", "30"], 10),
    "aegan_ad": ("aegan_ad_small", "dcase2023_valve", ["--epochs", "4"], 2),
    "memorymamba": ("memorymamba_nano", "magnetic_tile", ["--set", "model.image_size=64", "--epochs", "4"], 2),
    "ldmamba": ("ldmamba_small", "fan_sensiml", ["--epochs", "10"], 3),
}


def run(cmd: list[str], log: Path) -> int:
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    print(f"  {' '.join(cmd[2:5])} ... -> exit {rc} in {time.time() - t0:.0f} s (log {log})", file=sys.stderr)
    return rc


def weights_only_loads(path: Path) -> bool:
    try:
        from edgediag.engine.checkpoint import load_model

        torch.load(path, map_location="cpu", weights_only=True)
        load_model(path)
        return True
    except Exception:  # noqa: BLE001 - reported as a failed check
        return False


def row(family: str, out: Path) -> dict:
    prune = json.loads((out / "prune.json").read_text())
    exp_path = out / "export" / "export.json"
    export = json.loads(exp_path.read_text()) if exp_path.exists() else {}
    pm = prune["primary_metric"]
    m = prune["metrics"]
    return {"model": family, "variant": prune["model"], "metric": pm,
            "params": (prune["before"]["params"], prune["after_finetune"]["params"]),
            "params_cut": prune["reduction"]["params"], "flops_cut": prune["reduction"]["flops"],
            "flops_network_cut": prune["reduction"].get("flops_network"),
            # both from the verb's interleaved timing loop of the unpruned and pruned models
            "eager_ms": (prune["latency_paired"].get("before_eager_ms"), prune["latency_paired"].get("after_eager_ms")),
            "ort_ms": (prune["latency_paired"].get("before_onnxruntime_ms"),
                       prune["latency_paired"].get("after_onnxruntime_ms")),
            "speedup_eager": prune["speedup"].get("eager_ms"), "speedup_ort": prune["speedup"].get("onnxruntime_ms"),
            "before": m["before"].get(pm), "pruned": m["after_pruning"].get(pm), "tuned": m["after_finetune"].get(pm),
            "weights_only": weights_only_loads(out / "model.pt"),
            "parity": bool((export.get("parity") or {}).get("passed")), "seconds": prune.get("seconds")}


def markdown(rows: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f} %"

    def ms(pair):
        a, b = pair
        return "-" if a is None or b is None else f"{a:.1f} → {b:.1f}"

    def num(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| model | params | params cut | FLOPs cut (total / network) | eager ms (x) | ONNX Runtime ms (x) "
             "| metric: before → pruned → fine-tuned | weights_only | ONNX parity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'][0]:,} → {r['params'][1]:,} | {pct(r['params_cut'])} "
            f"| {pct(r['flops_cut'])} / {pct(r['flops_network_cut'])} "
            f"| {ms(r['eager_ms'])} (x{r['speedup_eager'] or float('nan'):.2f}) "
            f"| {ms(r['ort_ms'])} (x{r['speedup_ort'] or float('nan'):.2f}) "
            f"| {r['metric']}: {num(r['before'])} → {num(r['pruned'])} → {num(r['tuned'])} "
            f"| {'yes' if r['weights_only'] else 'NO'} | {'passed' if r['parity'] else 'FAILED'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="working folder (runs, logs, report.md, report.json)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="FAMILY=PATH")
    p.add_argument("--models", default=",".join(SPECS), help="comma-separated families")
    p.add_argument("--finetune-epochs", type=int, help="override every family's fine-tune epochs")
    p.add_argument("--max-steps-per-epoch", type=int, default=0)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--extra", default="", help="more flags for the prune verb, e.g. '--round-to 8 --global'")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    given = dict(c.split("=", 1) for c in args.checkpoint)
    py = sys.executable
    rows = []
    for family in [m for m in args.models.split(",") if m]:
        variant, data, train_flags, epochs = SPECS[family]
        data_dir = DATA / data
        print(f"{family}:", file=sys.stderr)
        ckpt = given.get(family)
        if ckpt is None:
            run_dir = out / f"{family}_train"
            if not (run_dir / "model.pt").exists():
                run([py, "-m", "edgediag.train", "--model", variant, "--data", str(data_dir), "--out", str(run_dir),
                     "--force", *train_flags], out / f"{family}_train.log")
            ckpt = str(run_dir / "model.pt")
        pruned = out / family
        cmd = [py, "-m", "edgediag.prune", "--checkpoint", ckpt, "--data", str(data_dir), "--out", str(pruned),
               "--ratio", str(args.ratio), "--force",
               "--finetune-epochs", str(args.finetune_epochs if args.finetune_epochs is not None else epochs),
               "--max-steps-per-epoch", str(args.max_steps_per_epoch), *args.extra.split()]
        if run(cmd, out / f"{family}_prune.log") != 0:
            continue
        run([py, "-m", "edgediag.export", "--checkpoint", str(pruned / "model.pt"), "--out", str(pruned / "export")],
            out / f"{family}_export.log")
        rows.append(row(family, pruned))
    table = markdown(rows)
    (out / "report.md").write_text(table + "\n")
    (out / "report.json").write_text(json.dumps(rows, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
