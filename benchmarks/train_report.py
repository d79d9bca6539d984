"""Training throughput of each family's default recipe, before and after issue 24's changes.

    python benchmarks/train_report.py                          # all families, both paths
    python benchmarks/train_report.py --families memorymamba --threads 2 --steps 40

Each family trains its demo variant on its demo data through the real engine (Trainer.fit,
as the train verb builds it), for one warm-up epoch and then whole epochs until at least
--steps optimiser steps are measured, each measurement in a fresh process (the allocator
settings of ``train.keep_freed_memory`` are process-wide and would carry over from one path
to the next). Two paths, interleaved round by round so a change of
load on a shared machine hits both alike:

* ``before``: the recipe and engine as they were (the old batch size and image size, log-mel
  recomputed every step, the unfused optimiser, glibc's default allocator behaviour, autograd
  through the chunked scan);
* ``after``: today's defaults (``train_defaults``, feature cache, fused optimiser, freed memory
  kept in the process, and
  whatever scan backend ``auto`` picks for CPU training).

Columns: items/s (clips, images or sequences per wall-clock second of the measured epochs),
items per CPU-s (per second of the process's CPU time: on a machine shared with other jobs
the steadier figure, and with --threads 1 the idle-machine rate), each with its ratio
after/before; ``cache s`` the one-off feature cache built before the first epoch; then where
an epoch's wall time goes: data (loading, augmentation, collation), features (log-mel computed
in the step, split out of forward by hooks), forward (the rest), backward, optimizer (clipping
and the step), other (logging, the progress bar).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from edgediag.data import build_data  # noqa: E402
from edgediag.data.synthetic import generate_once  # noqa: E402
from edgediag.engine.trainer import Trainer  # noqa: E402
from edgediag.models import instantiate  # noqa: E402
from edgediag.nn.features import LogMel  # noqa: E402
from edgediag.ops import scan_backend  # noqa: E402
from edgediag.train import needs_calibration_holdout, resolve_configs  # noqa: E402
from edgediag.train import parser as train_parser  # noqa: E402
from edgediag.utils import seed_everything  # noqa: E402


@dataclasses.dataclass
class Family:
    model: str  # the demo's variant
    dataset: str  # a synthetic set of edgediag.data.synthetic
    model_sets: list[str]  # --set overrides both paths share (the demo's)
    before: list[str]  # --set overrides that restore the recipe as it was before issue 24


# The engine's switches that did not exist before: off in the "before" path.
OLD_ENGINE = ["train.cache_features=false", "train.fused_optimizer=false", "train.keep_freed_memory=false"]
FAMILIES = {
    "tastgram_mfn": Family("tastgram_mfn_small", "machine_sound", ["model.clip_seconds=4.5"],
                           ["train.batch_size=16"]),
    "aegan_ad": Family("aegan_ad_small", "machine_sound", ["model.clip_seconds=4.5"], ["train.batch_size=8"]),
    "ldmamba": Family("ldmamba_small", "furnace", [], ["train.batch_size=32"]),
    "memorymamba": Family("memorymamba_nano", "neu_like", [], ["train.batch_size=16", "model.image_size=128",
                                                                "model.stem_blocks=0", "model.stem_width=0"]),
}
PARTS = ("data", "features", "forward", "backward", "optimizer", "other")


class Probe:
    """Trainer callback: the timings of each epoch after the first (the warm-up), plus the
    time spent in LogMel modules (forward hooks), which the report splits out of forward."""

    def __init__(self, model: torch.nn.Module):
        self.epochs: list[dict] = []
        self.feature_seconds = 0.0
        self._started: dict[int, float] = {}
        self._cpu = time.process_time()
        for module in model.modules():
            if isinstance(module, LogMel):
                module.register_forward_pre_hook(self._pre)
                module.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._started[id(module)] = time.perf_counter()

    def _post(self, module, args, out):
        self.feature_seconds += time.perf_counter() - self._started.pop(id(module))

    def on_epoch_end(self, trainer, epoch):
        record = trainer.history[-1]
        cpu, self._cpu = time.process_time() - self._cpu, time.process_time()
        if epoch > 0:
            self.epochs.append({"seconds": record["seconds"], "items": record["samples_per_s"] * record["seconds"],
                                "features": self.feature_seconds, "cpu": cpu, **trainer.timings})
        self.feature_seconds = 0.0


def build(family: Family, path: str, data_root: Path, threads: int, seed: int, after_sets=()):
    """Model, training set and train config the train verb would build for this path."""
    data = generate_once(family.dataset, data_root, seed)
    sets = family.model_sets + (OLD_ENGINE + family.before if path == "before" else list(after_sets))
    argv = ["--model", family.model, "--data", str(data), "--out", "unused", "--seed", str(seed),
            "--threads", str(threads), *[x for s in sets for x in ("--set", s)]]
    _, cls, model_cfg, train_cfg, data_cfg = resolve_configs(train_parser().parse_args(argv))
    seed_everything(seed)
    bundle = build_data(cls.data_kind, data_cfg, model_cfg)
    model = instantiate(cls, cls.config_for_data(model_cfg, bundle))
    if needs_calibration_holdout(model, bundle, data_cfg, train_cfg):  # as the train verb: fewer training items
        data_cfg = dataclasses.replace(data_cfg, val_fraction=train_cfg.calibration_holdout)
        seed_everything(seed)
        bundle = build_data(cls.data_kind, data_cfg, model_cfg)
        model = instantiate(cls, cls.config_for_data(model_cfg, bundle))
    return model, bundle.train, train_cfg


def measure(family: Family, path: str, data_root: Path, threads: int, steps: int, seed: int, after_sets=()) -> dict:
    model, train_set, cfg = build(family, path, data_root, threads, seed, after_sets)
    per_epoch = max(1, len(train_set) // cfg.batch_size)
    cfg = dataclasses.replace(cfg, epochs=1 + -(-steps // per_epoch), min_steps=0)
    probe = Probe(model)
    trainer = Trainer(model, cfg, out_dir=None, callbacks=[probe], progress=False)
    # "before" trained through autograd of the chunked scan; "after" takes what auto picks.
    forced = scan_backend("chunked") if path == "before" else contextlib.nullcontext()
    with forced:
        trainer.fit(train_set)
    total = {k: sum(e.get(k, 0.0) for e in probe.epochs) for k in ("seconds", "items", "cpu", *PARTS[:-1])}
    split = {"data": total["data"], "features": total["features"], "forward": total["forward"] - total["features"],
             "backward": total["backward"], "optimizer": total["optimizer"]}
    split["other"] = max(0.0, total["seconds"] - sum(split.values()))
    return {"items_per_s": total["items"] / total["seconds"], "items_per_cpu_s": total["items"] / total["cpu"],
            "seconds": total["seconds"],
            "items": int(total["items"]), "steps": per_epoch * len(probe.epochs), "batch_size": cfg.batch_size,
            "image_size": getattr(model.config, "image_size", None), "cache_s": trainer.cache_seconds,
            "share": {k: v / total["seconds"] for k, v in split.items()}}


RESULT = "RESULT "  # the child's result line on stdout


def measure_isolated(family: str, path: str, args) -> dict:
    """measure() in a fresh Python process."""
    cmd = [sys.executable, __file__, "--one", family, path, "--data", args.data, "--threads", str(args.threads),
           "--steps", str(args.steps), "--seed", str(args.seed), *[x for s in args.after_set for x in ("--after-set", s)]]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if out.returncode or not lines:
        raise SystemExit(f"{family} {path}: the measuring process failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len(RESULT):])


def table(results: dict) -> str:
    head = (f"| family | path | batch | items/s | x | items per CPU-s | x | cache s | "
            f"{' | '.join(PARTS)} |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, paths in results.items():
        base = paths.get("before")
        for path, r in paths.items():
            ratios = [f"{r[k] / base[k]:.2f}" if base else "-" for k in ("items_per_s", "items_per_cpu_s")]
            size = f" ({r['image_size']} px)" if r.get("image_size") else ""
            shares = " | ".join(f"{100 * r['share'][p]:.0f} %" for p in PARTS)
            lines.append(f"| {name} | {path} | {r['batch_size']}{size} | {r['items_per_s']:.1f} | {ratios[0]} | "
                         f"{r['items_per_cpu_s']:.1f} | {ratios[1]} | {r['cache_s']:.2f} | {shares} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--paths", nargs="+", default=["before", "after"], choices=["before", "after"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (default: all)")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps measured per run, at least (default 30)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each path, interleaved; the median is shown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="export/train_report/data", help="where the synthetic sets are generated")
    p.add_argument("--after-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a --set override for the after path only, e.g. model.image_size=128 (the engine's gain "
                        "at the old image size)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", nargs=2, metavar=("FAMILY", "PATH"), help=argparse.SUPPRESS)  # measure_isolated's child
    args = p.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        r = measure(FAMILIES[args.one[0]], args.one[1], Path(args.data), args.threads, args.steps, args.seed,
                    args.after_set)
        print(RESULT + json.dumps(r), flush=True)
        return 0
    print(f"# training throughput: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, dict] = {}
    for name in args.families:
        runs: dict[str, list[dict]] = {path: [] for path in args.paths}
        for _ in range(args.rounds):
            for path in args.paths:
                r = measure_isolated(name, path, args)
                runs[path].append(r)
                print(f"{name:13s} {path:6s} {r['items_per_s']:8.1f} items/s, {r['items_per_cpu_s']:8.1f} items per "
                      f"CPU-s ({r['steps']} steps, {r['seconds']:.1f} s, load {os.getloadavg()[0]:.1f})", flush=True)
        results[name] = {path: sorted(rs, key=lambda r: r["items_per_s"])[len(rs) // 2] for path, rs in runs.items()}
        for path, rs in runs.items():
            results[name][path]["all_items_per_s"] = [round(r["items_per_s"], 1) for r in rs]
    print()
    print(table(results))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"threads": args.threads, "steps": args.steps, "results": results},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
