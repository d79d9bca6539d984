"""Reduced-precision graphs checked here before they leave for a board (export/README.md,
"INT8 and FP16").

* INT8: an explicit Q/DQ graph (QuantizeLinear/DequantizeLinear pairs) from ONNX Runtime's
  static quantizer, symmetric int8 activations and per-channel int8 weights, the form
  TensorRT builds as written (explicit quantization). What is quantized: the layers with a
  constant weight (Conv, ConvTranspose, Gemm, MatMul by a weight matrix). What stays float:
  the signal front end (a log-mel's DFT and dB lose too much in 8 bits), products of two
  activations (the selective scan's, attention's) and the score arithmetic at the top of the
  graph. NVIDIA's Model Optimizer ONNX PTQ was the other candidate; its ONNX extra needs
  onnxruntime-gpu and cupy (CUDA) on x86 Linux and pins onnx 1.21, so it cannot run on the
  CPU machines this check runs on.
* FP16: ONNX Runtime's float16 converter (onnxconverter-common's, maintained in onnxruntime),
  float32 inputs and outputs.

Either graph is then run by ONNX Runtime on CPU beside the FP32 reference on the same items:
score error, AUC/accuracy delta where labels exist, and the fraction of items whose
normal/anomaly decision at the calibrated threshold is unchanged (``decision_agreement``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from edgediag.deploy.presets import constant_names
from edgediag.errors import UserError

QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
MIN_AGREEMENT = 0.95  # below this the export refuses, unless --allow-drift
FEW_CALIBRATION_ITEMS = 100  # fewer than this: ranges rest on little data, warn


def nodes_to_quantize(model: onnx.ModelProto, float_prefixes: Sequence[str]) -> list[str]:
    """Names of the nodes the INT8 graph quantizes: weighted layers outside the
    ``float_prefixes`` modules (ONNX node names carry the module path, "/backbone/conv1/Conv")."""
    constants = constant_names(model.graph)
    prefixes = tuple(f"/{p.strip('/')}/" for p in float_prefixes)
    chosen = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2:
            continue
        if node.name.count("/") < 2 or node.name.startswith(prefixes):  # top-level score ops, front end
            continue
        if node.input[1] in constants:  # a weight, not the product of two activations
            chosen.append(node.name)
    return chosen


def quantize_int8(model: onnx.ModelProto, calib: np.ndarray, input_name: str, batch: int | None,
                  float_prefixes: Sequence[str], method: str = "minmax") -> tuple[onnx.ModelProto, dict]:
    """(Q/DQ graph, what was done) calibrated on ``calib`` items, run in chunks of ``batch``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise UserError(f"--int8-calibration {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    names = nodes_to_quantize(model, float_prefixes)
    if not names:
        raise UserError("INT8: the graph has no weighted layer outside the float front end to quantize")
    step = batch or 1

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.chunks = iter([np.ascontiguousarray(calib[i:i + step], dtype=np.float32)
                                for i in range(0, len(calib) - step + 1, step)])

        def get_next(self):
            x = next(self.chunks, None)
            return None if x is None else {input_name: x}

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}

    def run(how: str) -> onnx.ModelProto:
        with tempfile.TemporaryDirectory(prefix="edgediag-int8-") as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            onnx.save(model, str(src))
            cwd = os.getcwd()
            os.chdir(tmp)  # the calibrator writes its augmented graph into the working folder
            logging.disable(logging.WARNING)  # its advice to pre-process, once per call
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
                    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                                    nodes_to_quantize=names, calibrate_method=methods[how],
                                    # TensorRT's int8 is symmetric (zero point 0) for activations and weights
                                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                                   "CalibPercentile": 99.999, "CalibMovingAverage": False})
            finally:
                os.chdir(cwd)
                logging.disable(logging.NOTSET)
            return onnx.load(str(dst))

    used = method
    try:
        quantized = run(method)
    except ValueError as exc:
        # histogram methods fail on a tensor of (nearly) one value ("Too many bins for data
        # range"); min/max ranges are always defined
        if method == "minmax" or "bins" not in str(exc):
            raise
        used = f"minmax (the {method} histogram failed: {exc})"
        quantized = run("minmax")
    info = {"tool": "onnxruntime.quantization.quantize_static (QDQ)", "calibration": used,
            "calibration_items": int(len(calib)), "quantized_nodes": len(names),
            "weighted_nodes_left_float": _weighted_count(model) - len(names),
            "activations": "int8 symmetric per tensor", "weights": "int8 symmetric per channel"}
    return quantized, info


def _weighted_count(model: onnx.ModelProto) -> int:
    constants = constant_names(model.graph)
    return sum(1 for n in model.graph.node
               if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in constants)


def convert_fp16(model: onnx.ModelProto, float_prefixes: Sequence[str] = ()) -> tuple[onnx.ModelProto, dict]:
    """(FP16 graph with float32 inputs/outputs, what was done). ONNX Runtime's copy of the
    float16 converter: onnxconverter-common 1.16's left TASTgram-MFN's graph untypable
    (ReduceL2, then Div, bound to float and float16 after blocking ReduceL2). The nodes of
    the ``float_prefixes`` modules stay fp32: a log-mel's power overflows fp16 (65504) and its
    dB epsilon underflows, which gave NaN scores."""
    prefixes = tuple(f"/{p.strip('/')}/" for p in float_prefixes)
    float_nodes = [n.name for n in model.graph.node if prefixes and n.name.startswith(prefixes)]
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():  # "the float32 number 1e-10 will be truncated": the checks below judge
        warnings.simplefilter("ignore", UserWarning)
        half = convert_float_to_float16(onnx.ModelProto.FromString(model.SerializeToString()), keep_io_types=True,
                                        node_block_list=float_nodes)
    from onnxruntime.transformers.onnx_model import OnnxModel

    _skip_fp16_round_trips(half)
    graph = OnnxModel(half)
    graph.prune_graph()  # the casts nothing reads any more
    graph.topological_sort()  # the converter appends its casts last; onnx.checker and TensorRT want order
    half = graph.model
    return half, {"tool": "onnxruntime.transformers.float16 (keep_io_types)", "float_nodes": len(float_nodes)}


def _skip_fp16_round_trips(model: onnx.ModelProto) -> None:
    """The converter stores every tensor between two blocked (fp32) nodes in fp16: a Cast to
    fp16 after the first and back to fp32 before the second, so a log-mel's power spectrum
    still overflowed. Consumers of such a round trip read the fp32 tensor directly."""
    producer = {o: n for n in model.graph.node for o in n.output}
    to = {n.output[0]: next((a.i for a in n.attribute if a.name == "to"), None)
          for n in model.graph.node if n.op_type == "Cast"}
    direct = {}
    for node in model.graph.node:
        if node.op_type != "Cast" or to.get(node.output[0]) != onnx.TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is not None and first.op_type == "Cast" and to.get(first.output[0]) == onnx.TensorProto.FLOAT16:
            source = producer.get(first.input[0])
            if source is not None and source.op_type != "Cast":  # a blocked node's own fp32 output
                direct[node.output[0]] = first.input[0]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in direct:
                node.input[i] = direct[name]


def precision_check(ref_scores: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | float,
                    labels: np.ndarray | None, min_agreement: float) -> dict:
    """How a reduced-precision graph's scores differ from the FP32 reference on the same
    items: error in units of the reference scores' std, decision agreement at the calibrated
    threshold(s), and AUC / accuracy of both where labels (0 normal, 1 anomalous) exist."""
    from edgediag.engine.metrics import auc_pauc

    ref = np.asarray(ref_scores, dtype=np.float64).reshape(-1)
    got = np.asarray(scores, dtype=np.float64).reshape(-1)
    scale = float(ref.std()) or max(float(np.abs(ref).max()), 1e-12)
    finite = bool(np.isfinite(got).all())
    err = np.abs(np.nan_to_num(got, nan=np.inf) - ref)
    result = {"items": int(len(ref)), "max_abs_error_std": float(err.max() / scale),
              "mean_abs_error_std": float(err.mean() / scale), "finite": finite}
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), ref.shape)
    if np.isfinite(thr).all():
        ref_dec, dec = ref > thr, got > thr
        result.update(decision_agreement=float((ref_dec == dec).mean()), decisions_changed=int((ref_dec != dec).sum()),
                      flagged_fp32=int(ref_dec.sum()), flagged=int(dec.sum()))
    else:
        result.update(decision_agreement=None, note="no calibrated threshold: decisions not compared")
    if labels is not None and result["finite"]:
        y = np.asarray(labels).reshape(-1)
        known = (y == 0) | (y == 1)
        if known.any() and len(set(y[known].tolist())) == 2:
            auc_ref, _ = auc_pauc(y[known], ref[known])
            auc_got, _ = auc_pauc(y[known], got[known])
            result.update(auc_fp32=float(auc_ref), auc=float(auc_got), auc_delta=float(auc_got - auc_ref))
        if known.any() and "decision_agreement" in result and result["decision_agreement"] is not None:
            acc_ref = float(((ref > thr)[known] == (y[known] == 1)).mean())
            acc = float(((got > thr)[known] == (y[known] == 1)).mean())
            result.update(accuracy_fp32=acc_ref, accuracy=acc, accuracy_delta=acc - acc_ref)
    agreement = result.get("decision_agreement")
    result["min_agreement"] = min_agreement
    result["passed"] = bool(result["finite"] and (agreement is None or agreement >= min_agreement))
    return result


def check_line(p: dict) -> str:
    parts = [f"{p['items']} items", f"max |diff|/std {p['max_abs_error_std']:.3f}"]
    if not p["finite"]:
        parts.append("NON-FINITE scores")
    if p.get("decision_agreement") is not None:
        parts.append(f"decision agreement {p['decision_agreement']:.3f} (min {p['min_agreement']:.2f})")
    if "auc" in p:
        parts.append(f"AUC {p['auc_fp32']:.3f} -> {p['auc']:.3f}")
    if "accuracy" in p:
        parts.append(f"accuracy {p['accuracy_fp32']:.3f} -> {p['accuracy']:.3f}")
    return ", ".join(parts)
