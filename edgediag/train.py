"""`python -m edgediag.train`: train any registered model on a data folder.

Writes to --out: ``last.pt`` (resumable), ``best.pt`` (best validation metric) and
``model.pt`` (best weights + fitted normal statistics + calibrated threshold: the file
every later stage takes), plus ``train.json`` with the history and test metrics.
Distributed: ``torchrun --nproc_per_node=2 -m edgediag.train ...`` (gloo on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from edgediag import cli
from edgediag.config import from_dict, load_tree, to_dict
from edgediag.data import DataConfig, build_data
from edgediag.engine.fit import finalize
from edgediag.engine.trainer import TrainConfig, Trainer, distributed_env
from edgediag.models import build_config, get_model_class, instantiate
from edgediag.utils import seed_everything, write_json

log = logging.getLogger("edgediag.train")


def parser():
    p = cli.make_parser("train", "Train a model on a data folder (one engine for every model).")
    p.add_argument("--model", metavar="NAME",
                   help="registered model name (python -c 'import edgediag.models as m; print(m.list_models())')")
    p.add_argument("--data", metavar="DIR", help="data folder (DCASE layout, labels.csv, image folders, ...)")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder for checkpoints and logs")
    cli.add_config_args(p)
    p.add_argument("--epochs", type=int,
                   help="training epochs (train.epochs; default: --config's, else the model's recipe, else 10); "
                        "an explicit length also drops the recipe's floor of optimiser steps (train.min_steps)")
    p.add_argument("--batch-size", type=int,
                   help="items per batch (train.batch_size; default: --config's, else the model's recipe, else 32)")
    p.add_argument("--lr", type=float,
                   help="learning rate (train.lr; default: --config's, else the model's recipe, else 1e-3)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="seed of the data splits, weight init and shuffling (train.seed; default 0)")
    p.add_argument("--target-far", type=float,
                   help="false-alarm rate the decision threshold is calibrated for, on normal items the "
                        "model's statistics did not fit (default 0.1)")
    p.add_argument("--device", help="auto | cpu | cuda (train.device; default auto: cuda where there is one)")
    cli.add_threads_arg(p, None, "torch CPU threads for training (train.threads; default: --config's, else 0 = "
                                 "torch's default)")
    p.add_argument("--resume", action="store_true", help="continue from --out/last.pt")
    p.add_argument("--force", action="store_true", help="overwrite an earlier run in --out")
    cli.add_json_arg(p)
    return p


def resolve_configs(args):
    """(model name, model class, model config, train config, data config) from YAML + flags."""
    tree = load_tree(args.config, args.overrides, {"model", "train", "data"})
    model_tree = dict(tree.get("model") or {})
    name = args.model or model_tree.pop("name", None)
    model_tree.pop("name", None)
    if not name:
        raise cli.UserError("no model given (--model NAME or model.name in --config)")
    cls, _ = get_model_class(name)
    model_cfg = build_config(name, model_tree)
    flags = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "device": args.device, "target_far": args.target_far, "threads": args.threads}
    given = {**(tree.get("train") or {}), **{k: v for k, v in flags.items() if v is not None}}
    if "epochs" in given:  # an explicit length replaces the recipe's step floor
        given.setdefault("min_steps", 0)
    train_cfg = from_dict(TrainConfig, {**cls.train_defaults, **given}, "train.")
    train_cfg.validate()
    data_values = dict(tree.get("data") or {})
    if args.data:
        data_values["root"] = args.data
    data_cfg = from_dict(DataConfig, data_values, "data.")
    return name, cls, model_cfg, train_cfg, data_cfg


def needs_calibration_holdout(model, bundle, data_cfg: DataConfig, train_cfg: TrainConfig) -> bool:
    """No validation split, and a score that cross-fitting cannot make out-of-sample."""
    return (train_cfg.calibration_holdout > 0 and not data_cfg.val_fraction and not (bundle.val and len(bundle.val))
            and not model.score_uses_normal_statistics)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    name, cls, model_cfg, train_cfg, data_cfg = resolve_configs(args)
    out_dir = cli.output_folder(args.out)
    if (out_dir / "last.pt").exists() and not (args.resume or args.force):
        raise cli.UserError(f"{out_dir} already holds a run: pass --resume to continue it or --force to overwrite")
    # one run per folder (torchrun: rank 0 holds it for all); a failed run keeps what it wrote (last.pt resumes)
    lock = cli.locked_output(out_dir, keep_on_failure=True) if distributed_env()[0] == 0 else contextlib.nullcontext()
    with cli.json_stdout(args.json), lock:
        return _train(args, name, cls, model_cfg, train_cfg, data_cfg, out_dir)


def _train(args, name, cls, model_cfg, train_cfg, data_cfg, out_dir) -> int:
    seed_everything(train_cfg.seed)  # data splits and weight init are part of the run's identity
    bundle = build_data(cls.data_kind, data_cfg, model_cfg)
    model = instantiate(cls, cls.config_for_data(model_cfg, bundle))
    holdout = needs_calibration_holdout(model, bundle, data_cfg, train_cfg)
    if holdout:
        data_cfg = dataclasses.replace(data_cfg, val_fraction=train_cfg.calibration_holdout)
        log.info("the %s score is the trained network's own (no normal statistics to cross-fit): %.0f %% of the "
                 "training data is held out to calibrate the threshold (train.calibration_holdout)",
                 name, 100 * train_cfg.calibration_holdout)
        seed_everything(train_cfg.seed)
        bundle = build_data(cls.data_kind, data_cfg, model_cfg)
        model = instantiate(cls, cls.config_for_data(model_cfg, bundle))
    rank, world, _ = distributed_env()
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.3f M params | data %s: %d train, %d val, %d test items, classes %s",
                 name, n_params / 1e6, data_cfg.root, len(bundle.train), len(bundle.val or []),
                 len(bundle.test or []), bundle.classes)
    checkpoint_data = {"kind": cls.data_kind, "config": to_dict(data_cfg), "classes": list(bundle.classes),
                       "normal_classes": list(bundle.normal_classes), "info": bundle.info}
    trainer = Trainer(model, train_cfg, out_dir, checkpoint_data=checkpoint_data)
    try:
        # A calibration holdout is for the threshold only: its normals alone give no
        # validation metric to select epochs by, so training does not score it every epoch.
        model = trainer.fit(bundle.train, None if holdout else bundle.val, resume=args.resume)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    best = out_dir / "best.pt"
    if best.exists() and bundle.val is not None and not holdout:
        from edgediag.engine.checkpoint import load_model
        model = load_model(best)[0].to(trainer.device)
    metrics = finalize(model, bundle, train_cfg, trainer.device, out_dir, checkpoint_data)
    write_json(out_dir / "train.json", {"model": name, "model_config": to_dict(model.config),
                                        "train_config": dataclasses.asdict(train_cfg),
                                        "history": trainer.history, "test_metrics": metrics,
                                        "threshold": float(model.threshold)})
    from edgediag.measure.report import METRIC_COLUMNS, metric_rows, metrics_text

    cli.show(cli.table_report(metric_rows(metrics or {}), METRIC_COLUMNS, verb="train", model=name,
                      checkpoint=str(out_dir / "model.pt"), threshold=float(model.threshold),
                      groups=(metrics or {}).get("table") or []),
         "\n".join(([metrics_text(metrics)] if metrics else []) + [f"checkpoint: {out_dir / 'model.pt'}"]))
    return 0


if __name__ == "__main__":
    cli.entry(main)
