"""`python -m edgediag.predict`: score new data with any artifact (a ``.pt`` checkpoint, an
exported ``.onnx`` graph or a TensorRT ``.engine``) at the threshold it carries.

Writes to --out: ``predictions.csv`` (item, score, threshold, decision, label and true
anomaly flag where known, machine/section/domain for DCASE data) and, for DCASE folders
(test-only ones too), the challenge's ``anomaly_score_<machine>_section_<XX>_test.csv`` and
``decision_result_<machine>_section_<XX>_test.csv``. Prints items, flagged and, where the
labels are known, AUC, pAUC, FPR and TPR.

    python -m edgediag.predict --checkpoint export/out/model.onnx --data DIR --out predictions/
"""

from __future__ import annotations

from pathlib import Path

from edgediag import cli, runtime
from edgediag.data import build_data, resolve_data_config
from edgediag.engine.metrics import auc_pauc
from edgediag.engine.registry import build_config
from edgediag.runtime.predict import score_items, summary, write_csv, write_dcase_submission


def parser():
    p = cli.make_parser("predict", "Score new data with a checkpoint or an exported model.")
    artifact = p.add_argument("--checkpoint", required=True, metavar="PATH",
                              help="the artifact to score with: a model.pt checkpoint, an exported model.onnx "
                                   "or a TensorRT .engine")
    cli.add_alias(p, artifact, "--model")  # the old spelling
    cli.add_data_args(p)
    p.add_argument("--out", metavar="DIR", help="output folder (default: predictions/ beside the artifact)")
    p.add_argument("--batch-size", type=int, default=32, help="items scored per call (default 32)")
    cli.add_threads_arg(p, None, "CPU threads for inference (default: the runtime's)")
    cli.add_json_arg(p)
    return p


COLUMNS = (cli.Column("items"), cli.Column("flagged"), cli.Column("false_alarms", "false alarms"),
           cli.Column("missed"), cli.Column("fpr", "FPR", ".4f"), cli.Column("tpr", "TPR", ".4f"), cli.Column("auc", "AUC", ".4f"),
           cli.Column("pauc", "pAUC", ".4f"))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.batch_size < 1:
        raise cli.UserError("--batch-size must be at least 1")
    out = cli.output_folder(args.out if args.out else Path(args.checkpoint).resolve().parent / "predictions")
    with cli.json_stdout(args.json):
        return _predict(args, out)


def _predict(args, out: Path) -> int:
    predictor = runtime.load(args.checkpoint, threads=args.threads)
    with cli.locked_output(out):
        meta = predictor.metadata
        data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
        kind = str(data.get("kind") or meta.get("data_kind") or "")
        if not kind:
            raise cli.UserError(f"{args.checkpoint}: the artifact does not say which data reader it needs (data_kind)")
        data_cfg = resolve_data_config(data.get("config"), args.data, args.overrides, source=str(args.checkpoint))
        model_cfg = build_config(predictor.model_name, dict(meta.get("model_config") or {}))
        bundle = build_data(kind, data_cfg, model_cfg, need_train=False)
        dataset = getattr(bundle, args.split)
        if dataset is None or len(dataset) == 0:
            raise cli.UserError(f"{data_cfg.root} has no {args.split} split to score")
        rows = score_items(predictor, dataset, args.batch_size, list(bundle.classes or ()))
        write_csv(out / "predictions.csv", rows)
        dcase = write_dcase_submission(out, rows)
    counts = summary(rows)
    known = [r for r in rows if r["true_anomaly"] != ""]
    auc, pauc = auc_pauc([r["true_anomaly"] for r in known], [r["score"] for r in known])
    if auc == auc:  # both classes present
        counts.update(auc=auc, pauc=pauc)
    head = f"{predictor.model_name} ({predictor.backend}) on {data_cfg.root} ({args.split})"
    files = f"predictions: {out / 'predictions.csv'}" + (f" (+ {len(dcase)} DCASE submission files)" if dcase else "")
    cli.show(cli.table_report([counts], COLUMNS, verb="predict", model=predictor.model_name, backend=predictor.backend,
                      checkpoint=str(args.checkpoint), data=str(data_cfg.root), split=args.split,
                      predictions=str(out / "predictions.csv"), dcase_files=[str(p) for p in dcase]),
         "\n".join([head, cli.format_table([counts], COLUMNS), files]))
    return 0


if __name__ == "__main__":
    cli.entry(main)
