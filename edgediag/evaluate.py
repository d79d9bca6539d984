"""`python -m edgediag.evaluate`: score a checkpoint on a data folder.

Prints a metrics table, writes ``metrics.json`` and the model's plots (ROC curves,
confusion matrix) to --out (default: ``<checkpoint folder>/eval``).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from edgediag import cli
from edgediag.data import build_data, resolve_data_config
from edgediag.engine.checkpoint import load_model
from edgediag.engine.trainer import DeviceLoader
from edgediag.measure.report import METRIC_COLUMNS, metric_rows, metrics_text
from edgediag.measure.timing import torch_threads
from edgediag.utils import select_device, write_json


def parser():
    p = cli.make_parser("evaluate", "Score a checkpoint on a data folder; print and save metrics.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a model.pt written by train or prune")
    cli.add_data_args(p)
    p.add_argument("--out", metavar="DIR", help="folder for metrics.json and plots")
    p.add_argument("--batch-size", type=int, default=32, help="items scored per batch (default 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: cuda where there is one)")
    cli.add_threads_arg(p, None, "torch CPU threads for scoring (default: torch's)")
    cli.add_json_arg(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.out:
        cli.output_folder(args.out)  # before the data is read and scored
    if args.batch_size < 1:
        raise cli.UserError("--batch-size must be at least 1")
    with cli.json_stdout(args.json):
        return _evaluate(args)


def _evaluate(args) -> int:
    model, ckpt = load_model(args.checkpoint)
    with cli.locked_output(args.out or Path(args.checkpoint).resolve().parent / "eval") as out_dir:
        data = ckpt.get("data") or {}
        data_cfg = resolve_data_config(data.get("config"), args.data, args.overrides, source=str(args.checkpoint))
        # a test-only folder is fine: the checkpoint carries its fitted statistics and threshold
        bundle = build_data(data.get("kind") or model.data_kind, data_cfg, model.config, need_train=False)
        dataset = getattr(bundle, args.split)
        if dataset is None or len(dataset) == 0:
            raise cli.UserError(f"{data_cfg.root} has no {args.split} split to evaluate")
        device = select_device(args.device)
        model.to(device)
        loader = DeviceLoader(DataLoader(dataset, batch_size=args.batch_size, shuffle=False), device)
        with torch_threads(args.threads):
            metrics = model.evaluate(loader, out_dir=out_dir)
        write_json(out_dir / "metrics.json", {"checkpoint": str(args.checkpoint), "data": str(data_cfg.root),
                                              "split": args.split, "items": len(dataset), **metrics})
    head = f"{ckpt['model_name']} on {data_cfg.root} ({args.split}, {len(dataset)} items)"
    cli.show(cli.table_report(metric_rows(metrics), METRIC_COLUMNS, verb="evaluate", model=ckpt["model_name"],
                      checkpoint=str(args.checkpoint), data=str(data_cfg.root), split=args.split, items=len(dataset),
                      groups=metrics.get("table") or [], metrics_json=str(out_dir / "metrics.json")),
         "\n".join([head, "", metrics_text(metrics), "", f"metrics: {out_dir / 'metrics.json'}"]))
    return 0


if __name__ == "__main__":
    cli.entry(main)
