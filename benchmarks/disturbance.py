"""Accuracy under disturbance: LDMamba vs plain Mamba vs the 1-D CNN.

Each model's test items are rebuilt from their raw signals with a disturbance applied
before the front end (white noise at 20/10/0 dB SNR, impulses, sensor dropout; see
:func:`edgediag.data.synth_sequences.disturb`), then scored; models are trained on clean
data. Prints one table (accuracy and macro-F1 per model and condition) and writes JSON.

Either score trained checkpoints::

    python benchmarks/disturbance.py --checkpoint ldmamba=RUN1/model.pt \\
        --checkpoint ldmamba_plain=RUN2/model.pt --checkpoint seq_cnn=RUN3/model.pt --out dist.json

or train the three first (the train verb, same data and seed for each)::

    python benchmarks/disturbance.py --data ../shared/data/cwru_bearing --work /tmp/dist \\
        --epochs 10 --set model.seq_len=32 --out dist.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgediag import cli  # noqa: E402
from edgediag.utils import write_json  # noqa: E402

CONDITIONS = [("clean", None, 0.0), ("noise 20 dB", "noise", 20.0), ("noise 10 dB", "noise", 10.0),
              ("noise 0 dB", "noise", 0.0), ("impulses 1%", "impulses", 0.01), ("dropout 20%", "dropout", 0.2)]
DEFAULT_MODELS = ("ldmamba", "ldmamba_plain", "seq_cnn")


def disturbed_set(dataset, kind: str | None, level: float, seed: int):
    """The test set rebuilt from disturbed raw signals (one generator per item: the same
    disturbance for every model)."""
    from edgediag.data.synth_sequences import disturb

    if kind is None:
        return dataset
    raws = [disturb(r, kind, level, np.random.default_rng([seed, i])) for i, r in enumerate(dataset.raws)]
    return dataset.with_raws(raws)


def evaluate_checkpoint(path: str | Path, data_root: str | None, seed: int, batch_size: int = 32) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from edgediag.config import from_dict
    from edgediag.data import DataConfig, build_data
    from edgediag.engine.checkpoint import load_model

    model, ckpt = load_model(path)
    model.eval()
    data = ckpt.get("data") or {}
    values = dict(data.get("config") or {})
    if data_root:
        values["root"] = data_root
    bundle = build_data(data.get("kind") or model.data_kind, from_dict(DataConfig, values, "data."), model.config)
    if bundle.test is None or not len(bundle.test):
        raise cli.UserError(f"{values.get('root')} has no test split")
    if not hasattr(bundle.test, "with_raws"):
        raise cli.UserError(f"{path}: the disturbance benchmark needs sequence data (kind 'sequence')")
    rows = {}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name, kind, level in CONDITIONS:
        ds = disturbed_set(bundle.test, kind, level, seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = model.evaluate(DataLoader(ds, batch_size=batch_size, shuffle=False))
        rows[name] = {"acc": metrics["acc"], "macro_f1": metrics["macro_f1"], "auc": metrics.get("auc"),
                      "items": metrics["items"], "seconds": time.perf_counter() - t0}
    n_params = sum(p.numel() for p in model.parameters())
    return {"checkpoint": str(path), "model": ckpt["model_name"], "params": n_params, "conditions": rows}


def train_models(models, data_root: str, work: Path, epochs: int, seed: int, overrides: list[str]) -> dict[str, Path]:
    from edgediag.train import main as train_main

    out = {}
    for name in models:
        run = work / name
        args = ["--model", name, "--data", data_root, "--out", str(run), "--force", "--epochs", str(epochs),
                "--seed", str(seed)]
        for o in overrides:
            # model.* settings that a family does not have (e.g. the CNN's) are skipped for it.
            if o.startswith("model.") and not _model_has(name, o.split("=", 1)[0].split(".", 1)[1]):
                continue
            args += ["--set", o]
        code = cli.run(train_main, args)
        if code:
            raise cli.UserError(f"training {name} failed (exit {code})")
        out[name] = run / "model.pt"
    return out


def _model_has(name: str, key: str) -> bool:
    import dataclasses

    from edgediag.models import get_model_class

    cls, _ = get_model_class(name)
    return key in {f.name for f in dataclasses.fields(cls.Config)}


def format_table(results: dict) -> str:
    conds = [c for c, _, _ in CONDITIONS]
    w = max(5, *(len(label) for label in results))
    head = f"{'model':<{w}} {'params':>8}  " + "  ".join(f"{c:>13}" for c in conds)
    lines = [head, "-" * len(head)]
    for label, res in results.items():
        cells = [f"{res['conditions'][c]['acc']:.3f}/{res['conditions'][c]['macro_f1']:.3f}" for c in conds]
        lines.append(f"{label:<{w}} {res['params'] / 1e3:>7.0f}K  " + "  ".join(f"{v:>13}" for v in cells))
    lines.append("cells: accuracy/macro-F1 on the test split")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/disturbance.py", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                   help="a trained model.pt to score (repeatable)")
    p.add_argument("--data", help="data folder (default: each checkpoint's own); with --work: the folder to train on")
    p.add_argument("--work", help="train the models into this folder first")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="models to train with --work")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="train-verb override for every model, e.g. train.threads=2 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="training seed and disturbance seed")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)

    checkpoints = {}
    for item in args.checkpoint:
        label, sep, path = item.partition("=")
        if not sep:
            raise cli.UserError(f"--checkpoint expects LABEL=PATH, got {item!r}")
        checkpoints[label] = Path(path)
    if args.work:
        if not args.data:
            raise cli.UserError("--work needs --data (the folder to train on)")
        checkpoints.update(train_models(args.models, args.data, Path(args.work), args.epochs, args.seed,
                                        args.overrides))
    if not checkpoints:
        raise cli.UserError("nothing to benchmark: give --checkpoint LABEL=PATH or --work DIR --data DIR")
    results = {label: evaluate_checkpoint(path, args.data, args.seed) for label, path in checkpoints.items()}
    print(format_table(results))
    if args.out:
        write_json(args.out, {"conditions": [{"name": c, "kind": k, "level": lv} for c, k, lv in CONDITIONS],
                              "results": results})
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
