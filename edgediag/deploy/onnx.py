"""Graph export: a module traced to ONNX with the project's settings (:func:`export_graph`
under :func:`tracing_context`), ONNX Runtime sessions and runners, and the ORT-vs-eager
latency comparison. The export flow of ``python -m edgediag.export`` is
:mod:`edgediag.deploy.pipeline`; compression reuses what is here."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgediag.measure.timing import WARMUP, protocol, time_functions
from edgediag.ops.scan_onnx_op import OPSET as SCAN_OPSET
from edgediag.runtime.custom_ops import open_session


# --- tracing ---------------------------------------------------------------------------------
def _layer_norm_decomposed(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm as mean/variance reductions: ReduceMean/Sub/Mul/Sqrt/Div in ONNX, which
    every TensorRT parser reads (LayerNormalization needs 8.6)."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    centred = input - mean
    out = centred / torch.sqrt((centred * centred).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


SCAN_OPS = {"graph": "chunked", "custom": "onnx_op"}  # --scan-op -> the scan backend traced


@contextlib.contextmanager
def tracing_context(decompose_layernorm: bool = False, scan_op: str = "graph"):
    """What every export runs under: an exportable scan backend (``graph``: the chunked scan
    in standard ops; ``custom``: one edgediag::SelectiveScan node for ONNX Runtime), no
    autograd, tracer warnings silenced (they flag shapes baked in, which static export
    wants), and optionally LayerNorm decomposed (nn.LayerNorm calls F.layer_norm at run time)."""
    from edgediag.ops import scan_backend

    original = torch.nn.functional.layer_norm
    with scan_backend(SCAN_OPS[scan_op]), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if decompose_layernorm:
            torch.nn.functional.layer_norm = _layer_norm_decomposed
        try:
            yield
        finally:
            torch.nn.functional.layer_norm = original


@contextlib.contextmanager
def _plain_state_dict(module: nn.Module):
    """The TorchScript exporter reads ``state_dict()`` and calls ``.detach()`` on every
    value; models keep fitted statistics as dicts in ``get_extra_state`` (kNN banks...).
    Those are used as tensors in forward and so become graph constants anyway: hide the
    dict entries from the exporter's state dict only."""
    def drop_non_tensors(mod, state_dict, prefix, local_metadata):
        for key in [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]:
            del state_dict[key]

    handle = module.register_state_dict_post_hook(drop_non_tensors)
    try:
        yield
    finally:
        handle.remove()


def export_graph(module: nn.Module, args: tuple, path: Path, input_names: Sequence[str],
                 output_names: Sequence[str], opset: int, dynamic_batch: bool, exporter: str) -> None:
    """torch.onnx.export with the project's settings (see the module docstring)."""
    from edgediag.ops import forced_backend

    dynamic_axes = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
    with _plain_state_dict(module):
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes, do_constant_folding=True,
                              custom_opsets=SCAN_OPSET if forced_backend() == "onnx_op" else None)
        else:  # its passes log and print progress: keep the verb's output to its own lines
            logging.disable(logging.WARNING)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset, verbose=False,
                                      input_names=list(input_names), output_names=list(output_names),
                                      dynamic_axes=dynamic_axes, external_data=False)
            finally:
                logging.disable(logging.NOTSET)


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# --- ONNX Runtime --------------------------------------------------------------------------------
def ort_session(model: onnx.ModelProto | bytes | str, threads: int = 0):
    """A CPU session (with the edgediag::SelectiveScan library when the graph uses it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures are reported by the export, in one line
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return open_session(payload, opts)


def run_chunks(fn: Callable[[list[np.ndarray]], list[np.ndarray]], inputs: list[np.ndarray], batch: int | None):
    """Run ``fn`` over the inputs in chunks of ``batch`` (the static batch; None: at once)
    and concatenate each output."""
    n = len(inputs[0])
    step = batch or n
    parts = [fn([a[i:i + step] for a in inputs]) for i in range(0, n, step)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def torch_runner(module: nn.Module) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    def run(arrays):
        with torch.inference_mode():
            out = as_tuple(module(*[torch.from_numpy(a) for a in arrays]))
        return [o.float().numpy() for o in out]
    return run


def ort_runner(session) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    names = [i.name for i in session.get_inputs()]
    return lambda arrays: session.run(None, dict(zip(names, arrays)))


# --- latency -----------------------------------------------------------------------------------------
def graph_latency(graphs: dict[str, onnx.ModelProto], args: list[np.ndarray], threads: int, runs: int,
                  warmup: int = WARMUP) -> dict[str, float]:
    """Median ONNX Runtime latency (ms) of each graph on the same batch and threads, by the
    timing protocol (edgediag.measure.timing: runs in turn, so every graph sees the same
    machine load; fp32 against fp16/int8)."""
    sessions = [ort_session(g, threads) for g in graphs.values()]
    calls = []
    for sess in sessions:
        feeds = dict(zip([i.name for i in sess.get_inputs()], args))
        calls.append(lambda sess=sess, feeds=feeds: sess.run(None, feeds))
    stats = time_functions(calls, threads, warmup, runs)
    return {name: s["wall_p50_ms"] for name, s in zip(graphs, stats)}


def latency(module: nn.Module, model_proto: onnx.ModelProto, args: list[np.ndarray], threads: int,
            runs: int, warmup: int = WARMUP) -> dict[str, Any]:
    """Median (and min) latency of eager PyTorch (default scan backend: what a PyTorch user
    runs) and ONNX Runtime on the same batch, both with ``threads`` CPU threads, by the
    timing protocol (edgediag.measure.timing)."""
    sess = ort_session(model_proto, threads)
    feeds = dict(zip([i.name for i in sess.get_inputs()], args))
    tensors = [torch.from_numpy(a) for a in args]
    ort_s, eager_s = time_functions([lambda: sess.run(None, feeds), lambda: module(*tensors)], threads, warmup, runs)
    ort_ms, eager_ms = ort_s["wall_p50_ms"], eager_s["wall_p50_ms"]
    result = {"batch": int(len(args[0])), **protocol(threads, warmup, runs), "onnxruntime_ms": ort_ms,
              "pytorch_eager_ms": eager_ms, "ratio": ort_ms / eager_ms if eager_ms > 0 else None,
              "onnxruntime_min_ms": ort_s["latency_ms"]["min"], "pytorch_eager_min_ms": eager_s["latency_ms"]["min"]}
    if threads == 1:
        # One thread's CPU time is its latency minus what others took from it: the steadier
        # figure on a shared machine (docs/benchmarks.md). With more threads it is not the latency.
        ort_cpu, eager_cpu = ort_s["cpu_p50_ms"], eager_s["cpu_p50_ms"]
        result.update(onnxruntime_cpu_ms=ort_cpu, pytorch_eager_cpu_ms=eager_cpu,
                      ratio_cpu=ort_cpu / eager_cpu if eager_cpu > 0 else None)
    # Layers mark themselves (uses_selective_scan) so this stage names no layer class.
    if any(getattr(m, "uses_selective_scan", False) for m in module.modules()):
        from edgediag.ops import resolve_backend

        result["pytorch_scan_backend"] = resolve_backend("auto", tensors[0])
    return result
