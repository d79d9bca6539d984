"""What `python -m edgediag.export` prints when it is done: the parameters, FLOPs and latency
of each runtime as one table (:mod:`edgediag.measure.report`), then the checks in a few lines;
with ``--json`` the whole export report (export.json) with that table, as one JSON object."""

from __future__ import annotations

from edgediag.cli import Column, format_table, show, table_report
from edgediag.deploy import presets as trt_compat
from edgediag.deploy.parity import parity_line
from edgediag.deploy.quantize import check_line
from edgediag.measure.timing import protocol_line

COLUMNS = (Column("runtime"), Column("precision"), Column("params", fmt=",d"),
           Column("mflops_per_item", "MFLOPs/item"), Column("p50_ms", "p50 ms", ".3f"),
           Column("min_ms", "min ms", ".3f"), Column("cpu_p50_ms", "CPU p50 ms", ".3f"))


def runtime_rows(report: dict) -> list[dict]:
    """One row per runtime timed: PyTorch eager and ONNX Runtime (fp32), and the fp16/int8
    graph on ONNX Runtime where there is one."""
    lat, counts = report["latency"], report["counts"]
    same = {"params": counts["params"]["total"], "mflops_per_item": counts["flops_per_item"] / 1e6}
    rows = [{"runtime": "pytorch eager", "precision": "fp32", **same, "p50_ms": lat["pytorch_eager_ms"],
             "min_ms": lat["pytorch_eager_min_ms"], "cpu_p50_ms": lat.get("pytorch_eager_cpu_ms")},
            {"runtime": "onnxruntime", "precision": "fp32", **same, "p50_ms": lat["onnxruntime_ms"],
             "min_ms": lat["onnxruntime_min_ms"], "cpu_p50_ms": lat.get("onnxruntime_cpu_ms")}]
    reduced = report.get("reduced_precision")
    if reduced:
        precision = report["precision"]
        rows.append({"runtime": "onnxruntime", "precision": precision, **same,
                     "p50_ms": reduced["onnxruntime_latency"][f"{precision}_ms"], "min_ms": None, "cpu_p50_ms": None})
    return rows


def show_summary(report: dict, out, preset, parity_source: str) -> None:
    """The table, then what happened, in a few lines (or the JSON report)."""
    lat, onnx_info, parity, precision = report["latency"], report["onnx"], report["parity"], report["precision"]
    lines = [f"onnx: {out / 'model.onnx'} (opset {onnx_info['opset']}, {onnx_info['nodes']} nodes"
                 f"{', simplified' if onnx_info['simplified'] else ''})"]
    lines.append(f"parity vs PyTorch on {parity_source}: {parity_line(parity)}")
    reduced = report.get("reduced_precision")
    if reduced:
        check = reduced["check"]
        lines.append(f"{precision}: {out / reduced['file']} ({reduced['tool']}"
                     + (f", {reduced['quantized_nodes']} layers quantized, {reduced['calibration']} ranges from "
                        f"{reduced['calibration_data']}" if precision == "int8" else "") + ")")
        lines.append(f"  vs PyTorch fp32 on {check['data']}: {check_line(check)}")
        speed = reduced["onnxruntime_latency"]
        lines.append(f"  its latency was timed beside the fp32 graph's ({speed['fp32_ms']:.3f} ms in those rounds)")
    rows = runtime_rows(report)
    ratio = f"{lat['ratio']:.2f}x" if lat["ratio"] is not None else "n/a"
    lines += ["", format_table(rows, COLUMNS),
              f"latency: batch {lat['batch']}, {protocol_line(lat)}; onnxruntime / eager {ratio}"
              + (f" ({lat['ratio_cpu']:.2f}x on the thread's CPU clock)" if lat.get("ratio_cpu") is not None else ""),
              f"params: {report['counts']['params_definition']}", ""]
    compat = "; ".join(trt_compat.summary_line([trt_compat.Issue(**i) for i in r["issues"]], v, r["board"] or "")
                       for v, r in report["trt_compat"].items())
    lines.append(f"TensorRT parser check (onnx-tensorrt tables, not verified on a device): {compat}")
    trt_info = report["tensorrt"]
    if trt_info and trt_info["status"] == "build_on_board":
        where = f" on the {preset.board}" if preset else " on the board"
        extra = " + calibrate_int8.py + calib_data.npy" if precision == "int8" else ""
        lines.append(f"tensorrt: {trt_info['reason']}: wrote model.onnx + build_engine.sh{extra} to {out}; run "
                     f"`bash build_engine.sh` there{where} to build the {precision} engine (exit code 3)")
    elif trt_info:
        lines.append(f"tensorrt: {out / 'model.engine'} ({precision}, TensorRT {trt_info.get('tensorrt')}), parity: "
                     + (parity_line(trt_info["parity"]) if trt_info.get("parity") else "not checked (streaming)"))
    lines.append(f"report: {out / 'export.json'}")
    show(table_report(rows, COLUMNS, verb="export", out=str(out), **report), "\n".join(lines),
         [f"warning: {w}" for w in report["warnings"]])
