"""`python -m edgediag.predict`: score a data folder with any artifact (a ``.pt`` checkpoint,
an exported ``.onnx`` graph or a TensorRT ``.engine``) and write one row per item:
key, score, the decision at the artifact's calibrated threshold, and the item's label
where the data has one.

    python -m edgediag.predict --model export/out/model.onnx --data DIR --out predictions.csv
"""

from __future__ import annotations

from pathlib import Path

from edgediag import cli, runtime
from edgediag.config import apply_overrides, from_dict
from edgediag.data import DataConfig, build_data
from edgediag.engine.registry import build_config
from edgediag.runtime.predict import score_items, summary, write_csv


def parser():
    p = cli.make_parser("predict", "Score every item of a data folder with a checkpoint or an exported model.")
    p.add_argument("--model", required=True, help="model.pt, model.onnx or a TensorRT .engine")
    p.add_argument("--data", help="data folder (default: the one a checkpoint was trained on)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"], help="which split to score")
    p.add_argument("--out", help="CSV file (default: predictions.csv beside the model)")
    p.add_argument("--batch-size", type=int, default=32)
    cli.add_threads_arg(p, None, "CPU threads for inference (default: the runtime's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                   help="override a data setting, e.g. --set data.segments=true")
    return p


def data_description(predictor) -> tuple[str, dict]:
    """(data kind, data config values) the artifact records: a checkpoint keeps both, a
    graph its data kind (the folder then comes from --data)."""
    meta = predictor.metadata
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    return str(data.get("kind") or meta.get("data_kind") or ""), dict(data.get("config") or {})


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.batch_size < 1:
        raise cli.UserError("--batch-size must be at least 1")
    predictor = runtime.load(args.model, threads=args.threads)
    kind, values = data_description(predictor)
    values = apply_overrides({"data": values}, args.overrides)["data"]
    if args.data:
        values["root"] = args.data
    if not values.get("root"):
        raise cli.UserError(f"{args.model}: no data folder recorded; pass --data")
    if not kind:
        raise cli.UserError(f"{args.model}: the artifact does not say which data reader it needs (data_kind)")
    data_cfg = from_dict(DataConfig, values, "data.")
    model_cfg = build_config(predictor.model_name, dict(predictor.metadata.get("model_config") or {}))
    bundle = build_data(kind, data_cfg, model_cfg)
    dataset = getattr(bundle, args.split)
    if dataset is None or len(dataset) == 0:
        raise cli.UserError(f"{data_cfg.root} has no {args.split} split to score")
    rows = score_items(predictor, dataset, args.batch_size, list(bundle.classes or ()))
    out = Path(args.out) if args.out else Path(args.model).resolve().parent / "predictions.csv"
    write_csv(out, rows)
    counts = summary(rows)
    print(f"{predictor.model_name} ({predictor.backend}) on {data_cfg.root} ({args.split}): "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"predictions: {out}")
    return 0


if __name__ == "__main__":
    cli.entry(main)
