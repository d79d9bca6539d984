"""`python -m edgediag.demo`: the whole pipeline on synthetic data the project generates.

For each model: generate a small synthetic set that resembles its real signals (machine
sound with harmonics and bearing impulses, steel-like textures with defects, furnace
electrode currents), train a small configuration, prune it to half its size and fine-tune
it, export both to ONNX (checked against PyTorch), then benchmark the four artifacts of
each model (checkpoint in eager PyTorch, graph in ONNX Runtime; original and pruned) on
the held-out items. Every stage runs through the same verb a user would call; the
equivalent command is printed before it runs. Outputs go to ``export/demo/``: the bench
report (``bench/report.md``, ``report.json``, ``pareto.png``), runs, graphs and data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from edgediag import cli
from edgediag.data.synthetic import generate_once
from edgediag.measure import report as report_lib
from edgediag.utils import write_json

log = logging.getLogger("edgediag.demo")


@dataclasses.dataclass
class DemoRun:
    model: str  # registered name (a small variant)
    dataset: str  # a synthetic set of edgediag.data.synthetic
    train: list[str]  # --set overrides for a CPU-minutes run
    prune: list[str]  # prune verb arguments (method, ratio, fine-tuning)


_PRUNE = ["--method", "structured", "--ratio", "0.5", "--round-to", "8", "--steps", "6"]
RUNS = [
    DemoRun("tastgram_mfn_small", "machine_sound", ["train.epochs=20", "model.clip_seconds=4.5"],
            [*_PRUNE, "--finetune-epochs", "8", "--distill", "1.0"]),
    DemoRun("aegan_ad_small", "machine_sound", ["train.epochs=4", "model.clip_seconds=4.5"],
            [*_PRUNE, "--finetune-epochs", "2"]),
    # The Mamba models also lose whole blocks (--remove-blocks): at batch 1, eager time is
    # mostly per-operator cost, which narrower channels do not cut.
    # batches of 16 on the demo's 144 training images, hence half the recipe's lr (it is for 64)
    DemoRun("memorymamba_nano", "defects", ["train.epochs=40", "train.batch_size=16", "train.lr=1e-3",
                                            "model.image_size=64", "data.test_fraction=0.25"],
            [*_PRUNE, "--remove-blocks", "2", "--finetune-epochs", "2"]),
    DemoRun("ldmamba_small", "furnace", ["train.epochs=12"],
            [*_PRUNE, "--remove-blocks", "1", "--finetune-epochs", "8", "--lr", "5e-4"]),
]
STAGES = ("train", "prune", "export", "bench")


def parser():
    p = cli.make_parser("demo", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--out", metavar="DIR", default="export/demo", help="output folder (default: export/demo)")
    p.add_argument("--models", nargs="+", help=f"subset of: {', '.join(r.model for r in RUNS)}")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated stages to run, in pipeline order (default: all: train,prune,export,bench)")
    p.add_argument("--seed", type=int, metavar="N", default=0,
                   help="seed of the synthetic data and of training (default 0)")
    # One thread by default: at batch 1 these small models gain nothing from a second thread
    # and their eager timings get noisier (2 threads on 2 cores: ldmamba_small 19.7 ms
    # against 10.3 ms with one; pruned models timing slower than the originals).
    cli.add_threads_arg(p, 1, "CPU threads for the bench (default 1)")
    return p


def _verb(verb: str, args: list[str]) -> None:
    import importlib
    import shlex

    print(f"$ python -m edgediag.{verb} {' '.join(shlex.quote(str(a)) for a in args)}", flush=True)
    rc = importlib.import_module(f"edgediag.{verb}").main([str(a) for a in args])
    if rc:
        raise cli.UserError(f"demo stage {verb} failed with exit code {rc}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    runs = [r for r in RUNS if not args.models or r.model in args.models]
    if args.models and len(runs) != len(args.models):
        known = {r.model for r in RUNS}
        raise cli.UserError(f"unknown demo model(s) {sorted(set(args.models) - known)} (known: {', '.join(sorted(known))})")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or any(s not in STAGES for s in stages) or stages != sorted(stages, key=STAGES.index):
        raise cli.UserError(f"--stages must be a subset of {','.join(STAGES)} in that order, not {args.stages!r}")
    t0 = time.perf_counter()
    seconds: dict[str, dict[str, float]] = {}
    artifacts: list[Path] = []
    for run in runs:
        data = generate_once(run.dataset, out / "data", args.seed)
        run_dir, pruned_dir = out / "runs" / run.model, out / "runs" / f"{run.model}-pruned"
        took = seconds.setdefault(run.model, {})
        if "train" in stages:
            started = time.perf_counter()
            _verb("train", ["--model", run.model, "--data", data, "--out", run_dir, "--force", "--seed", args.seed,
                            *[x for o in run.train for x in ("--set", o)]])
            took["train"] = time.perf_counter() - started
        if "prune" in stages:
            started = time.perf_counter()
            _verb("prune", ["--checkpoint", run_dir / "model.pt", "--data", data, "--out", pruned_dir, "--force",
                            "--latency-runs", "5", *run.prune])
            took["prune"] = time.perf_counter() - started
        for ckpt_dir in (run_dir, pruned_dir):
            if not (ckpt_dir / "model.pt").exists():
                continue
            graph_dir = out / "onnx" / ckpt_dir.name
            if "export" in stages:
                started = time.perf_counter()
                _verb("export", ["--checkpoint", ckpt_dir / "model.pt", "--out", graph_dir, "--latency-runs", "5"])
                took["export"] = took.get("export", 0.0) + time.perf_counter() - started
            artifacts += [p for p in (ckpt_dir / "model.pt", graph_dir / "model.onnx") if p.exists()]
    report = out / "bench"
    if "bench" in stages:
        if not artifacts:
            raise cli.UserError(f"nothing to benchmark under {out}: run the train (and export) stages first")
        started = time.perf_counter()
        _verb("bench", ["--checkpoint", *artifacts, "--out", report, "--backends", "eager,onnxruntime",
                        "--threads", args.threads, "--warmup", "3", "--latency-runs", "20", "--rounds", "4"])
        seconds["bench"] = {"bench": time.perf_counter() - started}
    total = time.perf_counter() - t0
    summary = {"runs": report_lib.headline_rows(report / "report.json") if (report / "report.json").exists() else [],
               "seconds": seconds, "total_seconds": round(total, 1), "stages": stages}
    write_json(out / "summary.json", summary)
    print()
    if summary["runs"]:
        print(report_lib.headline_table(summary["runs"]))
    print(f"\ndemo finished in {total:.0f} s")
    if (report / "report.md").exists():
        print(f"report: {report / 'report.md'} (all figures: {report / 'report.json'}); plot: {report / 'pareto.png'}")
    print(f"summary: {out / 'summary.json'}; checkpoints: {out / 'runs'}/; graphs: {out / 'onnx'}/")
    return 0


if __name__ == "__main__":
    cli.entry(main)
