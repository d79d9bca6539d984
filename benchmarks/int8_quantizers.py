"""Which INT8 quantizer to ship: ONNX Runtime's static Q/DQ quantizer (what export uses) against
NVIDIA Model Optimizer's ONNX PTQ, on the same fp32 graph, calibration items and check items.

    python benchmarks/int8_quantizers.py --checkpoint runs/fan/model.pt --export export/fan
    # modelopt is not a dependency: its [onnx] extra pulls onnxruntime-gpu and cupy. For the
    # comparison: pip install --target /tmp/mo --no-deps nvidia-modelopt onnx-graphsurgeon
    # polygraphy onnxscript onnx_ir ml_dtypes pulp nvidia-ml-py pydantic ... and PYTHONPATH=/tmp/mo

Both quantize the same layers (edgediag.deploy.quantize.nodes_to_quantize: weighted layers
outside the float front end); both graphs are judged like export's check (precision_check on
the test items, decisions at the checkpoint's thresholds). ``--export`` is an export folder of
the checkpoint (its model.onnx is the fp32 graph).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgediag.deploy import pipeline  # noqa: E402
from edgediag.deploy.onnx import ort_runner, ort_session, run_chunks, torch_runner  # noqa: E402
from edgediag.deploy.quantize import MIN_AGREEMENT, check_line, nodes_to_quantize, precision_check, quantize_int8  # noqa: E402
from edgediag.engine.checkpoint import load_model  # noqa: E402


def modelopt_int8(graph_path: Path, calib: np.ndarray, exclude: list[str], out: Path):
    from modelopt.onnx.quantization import quantize

    quantize(str(graph_path), quantize_mode="int8", calibration_data=calib, calibration_method="max",
             calibration_eps=["cpu"], nodes_to_exclude=exclude, high_precision_dtype="fp32", output_path=str(out),
             log_level="WARNING")
    return onnx.load(str(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--export", required=True, help="export folder of the checkpoint (model.onnx)")
    p.add_argument("--calib-items", type=int, default=512)
    p.add_argument("--check-items", type=int, default=256)
    args = p.parse_args(argv)
    model, ckpt = load_model(args.checkpoint)
    module = model.export_module().eval()
    meta: dict = {}
    x, source = pipeline.data_items(model, ckpt, None, args.check_items, ("test", "train"), meta)
    calib, calib_source = pipeline.calibration_items(model, ckpt, SimpleNamespace(calib_data=None,
                                                                                  calib_items=args.calib_items), 1, [])
    graph_path = Path(args.export) / "model.onnx"
    graph = onnx.load(str(graph_path))
    name = graph.graph.input[0].name
    ref = run_chunks(torch_runner(module), [x.numpy()], 1)[0]
    thresholds = model.decision_thresholds(meta["section"], meta["domain"])
    prefixes = pipeline.float_prefixes(model, module)
    chosen = set(nodes_to_quantize(graph, prefixes))
    exclude = [n.name for n in graph.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
               and n.name not in chosen]
    print(f"{model.model_name}: check on {source}; calibration on {calib_source}; {len(chosen)} layers quantized")
    candidates = {"onnxruntime": lambda: quantize_int8(graph, calib, name, 1, prefixes, "minmax")[0]}
    try:
        import modelopt.onnx.quantization  # noqa: F401

        tmp = Path(tempfile.mkdtemp())
        candidates["modelopt"] = lambda: modelopt_int8(graph_path, calib, exclude, tmp / "int8.onnx")
    except ImportError as exc:
        print(f"modelopt: not importable here ({exc}); see the module docstring")
    for label, make in candidates.items():
        started = time.perf_counter()
        q = make()
        seconds = time.perf_counter() - started
        got = run_chunks(ort_runner(ort_session(q)), [x.numpy()], 1)[0]
        check = precision_check(ref, got, thresholds, meta["anomaly"], MIN_AGREEMENT)
        n_q = sum(n.op_type == "QuantizeLinear" for n in q.graph.node)
        print(f"  {label:11s} {seconds:5.1f} s, {n_q:3d} QuantizeLinear: {check_line(check)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
