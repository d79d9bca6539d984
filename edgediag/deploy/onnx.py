"""`python -m edgediag.export`: a checkpoint to ONNX (and TensorRT) with parity checks.

    python -m edgediag.export --checkpoint runs/x/model.pt --target onnx --out export/out
    python -m edgediag.export --checkpoint runs/x/model.pt --target trt \\
        --preset export/presets/orin-nano.yaml [--precision fp16|int8] --out export/orin

What it does, in order, writing into a hidden staging folder beside --out that replaces
--out only when every check passed (a failed export leaves nothing behind):

1. load the checkpoint; take ``model.export_module()`` (raw input -> score (B,) first,
   pre-processing inside) or, with ``--streaming``, ``model.streaming_module()``;
2. trace it to ONNX with the TorchScript exporter (``dynamo=False``, opset 17; the
   selective scans use the exportable ``chunked`` backend), static shapes unless
   ``--dynamic-batch``; LayerNorm is decomposed into plain ops for TensorRT < 8.6;
3. ``onnx.checker``; parity of ONNX Runtime against PyTorch on real inputs (test items of
   ``--calib-data`` or of the checkpoint's data folder); then ``onnxslim`` and parity
   again (the unsimplified graph is kept, with a warning, if simplification breaks it);
4. metadata (the contract in export/README.md), latency of ORT vs eager PyTorch at
   batch 1, the TensorRT parser compatibility check (edgediag.deploy.presets);
5. ``--target trt``: with ``tensorrt`` and a CUDA GPU here, build the engine (FP16/INT8,
   entropy calibrator), run and parity-check it; otherwise write ``build_engine.sh``
   (trtexec), ``calibrate_int8.py`` + ``calib_data.npy`` for INT8, and a README for the board.

Exit codes: 0 every requested artifact built; 2 bad input (one ``error:`` line);
3 ``--target trt`` without TensorRT/GPU here: ONNX + build script written, build the
engine on the board; 4 parity beyond tolerance (or ONNX Runtime cannot run the graph):
nothing written; 1 internal error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgediag import __version__, cli
from edgediag.config import from_dict, load_yaml
from edgediag.deploy import presets as trt_compat
from edgediag.measure.timing import timed_alternately, torch_threads

EXIT_OK = 0
EXIT_BUILD_ON_BOARD = 3
EXIT_PARITY = 4

PRESET_DIR = Path(__file__).resolve().parents[1] / "export" / "presets"
PRECISIONS = ("fp32", "fp16", "int8")
# Without a preset the compatibility check covers both JetPack lines (5.1 and 6.x).
DEFAULT_TRT_VERSIONS = {"8.5": "JetPack 5.1", "10.3": "JetPack 6.1"}
# Default TensorRT parity tolerances (standardised max abs error) per precision: reduced
# precision moves scores by more than fp32 rounding. Not verified on a device.
TRT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 2e-1}


# --- board presets -------------------------------------------------------------------------
@dataclasses.dataclass
class ExportPreset:
    """A target board (export/presets/<board>.yaml); unknown keys are errors."""

    board: str
    tensorrt: str  # the TensorRT version of the board's JetPack, e.g. "10.3"
    description: str = ""
    jetpack: str = ""
    cuda: str = ""
    cuda_arch: str = ""  # e.g. sm_87
    dla_cores: int = 0
    memory_gb: float = 0.0
    default_precision: str = "fp16"
    workspace_mb: int = 1024  # TensorRT builder workspace (memory pool) limit
    batch: int = 1

    def validate(self, where: str) -> None:
        if self.default_precision not in PRECISIONS:
            raise cli.UserError(f"{where}: default_precision must be one of {', '.join(PRECISIONS)}, "
                                f"not {self.default_precision!r}")
        if self.workspace_mb < 1 or self.batch < 1 or self.dla_cores < 0:
            raise cli.UserError(f"{where}: workspace_mb and batch must be >= 1, dla_cores >= 0")
        trt_compat.table_version(self.tensorrt)  # a readable, known version


def load_preset(spec: str) -> tuple[ExportPreset, Path]:
    """A preset from a YAML path or a bare board name (export/presets/<name>.yaml)."""
    path = Path(spec)
    if not path.is_file() and not path.suffix and (PRESET_DIR / f"{spec}.yaml").is_file():
        path = PRESET_DIR / f"{spec}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise cli.UserError(f"preset not found: {spec} (known boards: {known or 'none'})")
    values = {k: (str(v) if k in ("tensorrt", "jetpack", "cuda") and v is not None else v)
              for k, v in load_yaml(path).items()}
    for key in ("board", "tensorrt"):
        if key not in values:
            raise cli.UserError(f"preset {path} lacks the required key {key!r}")
    preset = from_dict(ExportPreset, values, where="preset.")
    preset.validate(f"preset {path}")
    return preset, path


# --- command line --------------------------------------------------------------------------
def parser():
    p = cli.make_parser(
        "export",
        "Export a checkpoint to ONNX or TensorRT with parity checks. Exit codes: 0 all requested artifacts built; "
        "2 bad input; 3 --target trt without TensorRT/GPU here (ONNX + build_engine.sh written: build the engine "
        "on the board); 4 parity beyond tolerance (nothing written); 1 internal error.")
    p.add_argument("--checkpoint", required=True, help="model.pt written by train or prune")
    p.add_argument("--target", choices=["onnx", "trt"], default="onnx")
    p.add_argument("--out", required=True, help="output folder (replaced as a whole when the export succeeds)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="TensorRT precision (default: the preset's, else fp16); ONNX graphs are fp32")
    p.add_argument("--preset", help="board preset: export/presets/<board>.yaml or a board name (orin-nano, ...)")
    p.add_argument("--calib-data", help="data folder for parity inputs and INT8 calibration "
                                        "(default: the checkpoint's data folder)")
    p.add_argument("--calib-items", type=int, default=32, help="INT8 calibration items (default 32)")
    p.add_argument("--parity-items", type=int, default=16, help="items for the parity check (default 16)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, help="static batch size of the graph (default: the preset's, else 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis instead of a static one")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of a dynamic TensorRT profile (default 8)")
    p.add_argument("--streaming", action="store_true",
                   help="export model.streaming_module(): one time step with its states as inputs and outputs")
    p.add_argument("--stream-steps", type=int, default=64, help="steps of the streaming parity check (default 64)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed max |ORT - PyTorch| / std(PyTorch scores) (default 1e-4)")
    p.add_argument("--trt-tolerance", type=float,
                   help="the same for a TensorRT engine (default by precision: fp32 1e-3, fp16 5e-2, int8 2e-1)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx exporter (default torchscript: dynamo=True lands on opset 18 for these models)")
    p.add_argument("--layernorm", choices=["auto", "op", "decompose"], default="auto",
                   help="LayerNormalization as one ONNX op or decomposed into reductions "
                        "(auto: decompose when the target TensorRT is older than 8.6)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument("--dla", action="store_true", help="build for DLA core 0 (with GPU fallback) if the preset has DLA")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of both runtimes in the latency comparison (default: torch's)")
    p.add_argument("--latency-runs", type=int, default=30, help="timed runs per runtime (median reported)")
    return p


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


@contextlib.contextmanager
def tracing_context(decompose_layernorm: bool = False):
    """What every export runs under: the exportable scan backend, no autograd, tracer
    warnings silenced (they flag shapes baked in, which static export wants), and
    optionally LayerNorm decomposed (nn.LayerNorm calls F.layer_norm at run time)."""
    from edgediag.ops import scan_backend

    original = torch.nn.functional.layer_norm
    with scan_backend("chunked"), torch.no_grad(), warnings.catch_warnings():
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
    dynamic_axes = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
    with _plain_state_dict(module):
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        else:  # its passes log and print progress: keep the verb's output to its own lines
            logging.disable(logging.WARNING)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset, verbose=False,
                                      input_names=list(input_names), output_names=list(output_names),
                                      dynamic_axes=dynamic_axes, external_data=False)
            finally:
                logging.disable(logging.NOTSET)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# --- inputs ------------------------------------------------------------------------------------
_BUNDLES: dict[str, Any] = {}


def data_items(model, ckpt: dict, calib_data: str | None, n: int, splits: Sequence[str]) -> tuple[torch.Tensor, str]:
    """``n`` items spread evenly over the first non-empty split of the data folder: the
    ``x`` of each stacked, and where they came from. (None, reason) without data."""
    from edgediag.data import DataConfig, build_data

    data = ckpt.get("data") or {}
    values = dict(data.get("config") or {})
    if calib_data:
        values["root"] = str(calib_data)
    root = values.get("root") or ""
    if not root or not Path(root).exists():
        return None, (f"the checkpoint's data folder {root!r} is not here" if root else "the checkpoint records no data")
    kind = data.get("kind") or model.data_kind
    key = json.dumps([kind, values], sort_keys=True, default=str)
    if key not in _BUNDLES:  # parity and INT8 calibration read the same folder: decode it once
        _BUNDLES[key] = build_data(kind, from_dict(DataConfig, values, where="data."), model.config)
    bundle = _BUNDLES[key]
    for split in splits:
        ds = getattr(bundle, split, None)
        if ds is not None and len(ds):
            idx = sorted({int(round(i)) for i in np.linspace(0, len(ds) - 1, min(n, len(ds)))})
            x = torch.stack([torch.as_tensor(ds[i]["x"]).float() for i in idx])
            return x, f"{len(idx)} {split} items of {root}"
    return None, f"{root} has no {' or '.join(splits)} items"


def _repeat_to(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if len(x) >= n else x[torch.arange(n) % len(x)]


# --- ONNX Runtime --------------------------------------------------------------------------------
def ort_session(model: onnx.ModelProto | bytes | str, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures are reported by the export, in one line
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(payload, sess_options=opts, providers=["CPUExecutionProvider"])


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
            out = _as_tuple(module(*[torch.from_numpy(a) for a in arrays]))
        return [o.float().numpy() for o in out]
    return run


def ort_runner(session) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    names = [i.name for i in session.get_inputs()]
    return lambda arrays: session.run(None, dict(zip(names, arrays)))


# --- parity ------------------------------------------------------------------------------------------
def parity_metrics(ref: list[np.ndarray], test: list[np.ndarray], names: Sequence[str], threshold: float,
                   tolerance: float, score_index: int = 0) -> dict[str, Any]:
    """How far ``test`` outputs are from the PyTorch ``ref`` ones.

    The acceptance metric: max |test - ref| of the score output divided by the std of the
    reference scores over the batch (``max_abs_error_std``), plus identical normal/anomaly
    decisions (score > threshold) when the threshold is calibrated. Every output gets max
    abs and relative errors (relative to max(|ref|, 1e-8) elementwise) for the record.
    """
    outputs = {}
    for name, r, t in zip(names, ref, test):
        r64, t64 = r.astype(np.float64), np.asarray(t).astype(np.float64)
        if r64.shape != t64.shape:
            raise cli.UserError(f"output {name}: shape {t64.shape} differs from PyTorch's {r64.shape}")
        err = np.abs(r64 - t64)
        finite = bool(np.isfinite(t64).all() == np.isfinite(r64).all())
        scale = float(r64.std())
        outputs[name] = {"max_abs_error": float(err.max()) if err.size else 0.0,
                         "max_rel_error": float((err / np.maximum(np.abs(r64), 1e-8)).max()) if err.size else 0.0,
                         "std": scale, "max_abs_error_std": float(err.max() / scale) if scale > 0 and err.size else None,
                         "nan_match": finite}
    score_name = names[score_index]
    r, t = ref[score_index].astype(np.float64).reshape(-1), np.asarray(test[score_index]).astype(np.float64).reshape(-1)
    scale, scale_kind = float(r.std()), "std of the PyTorch scores over the batch"
    if not scale > 1e-12:  # one item or constant scores: fall back to their magnitude
        scale, scale_kind = max(float(np.abs(r).max()), 1e-12), "max |PyTorch score| (std is 0)"
    std_err = float(np.abs(r - t).max() / scale)
    result: dict[str, Any] = {
        "score_output": score_name, "items": int(len(r)),
        "max_abs_error": outputs[score_name]["max_abs_error"], "max_rel_error": outputs[score_name]["max_rel_error"],
        "max_abs_error_std": std_err, "score_std": scale, "scale": scale_kind, "tolerance": tolerance,
        "threshold": threshold if math.isfinite(threshold) else None, "outputs": outputs}
    ok = std_err <= tolerance and bool(np.isfinite(t).all() or not np.isfinite(r).all())
    if math.isfinite(threshold):
        flipped = (r > threshold) != (t > threshold)
        mismatched = int(flipped.sum())
        result.update(decisions_identical=mismatched == 0, decision_mismatches=mismatched,
                      anomalies_flagged=int((r > threshold).sum()))
        if mismatched:  # how close to the threshold those items sat (numerical ties show here)
            result["mismatch_max_distance_to_threshold"] = float(np.abs(r[flipped] - threshold).max())
        ok = ok and mismatched == 0
    else:
        result.update(decisions_identical=None, decision_mismatches=None,
                      note="no calibrated threshold in the checkpoint: decisions not compared")
    result["passed"] = bool(ok)
    return result


def parity_line(p: dict) -> str:
    dec = ""
    if p.get("decisions_identical") is not None:
        dec = f", decisions {p['items'] - p['decision_mismatches']}/{p['items']} identical"
        if p["decision_mismatches"]:
            dec += f" (the others within {p['mismatch_max_distance_to_threshold']:.1e} of the threshold)"
    return (f"max |diff|/std {p['max_abs_error_std']:.2e} (tolerance {p['tolerance']:.0e}), "
            f"max |diff| {p['max_abs_error']:.2e}{dec}")


# --- latency -----------------------------------------------------------------------------------------
def latency(module: nn.Module, model_proto: onnx.ModelProto, args: list[np.ndarray], threads: int,
            runs: int) -> dict[str, Any]:
    """Median (and min) latency of eager PyTorch (default scan backend: what a PyTorch user
    runs) and ONNX Runtime on the same batch, both with ``threads`` CPU threads."""
    sess = ort_session(model_proto, threads)
    feeds = dict(zip([i.name for i in sess.get_inputs()], args))
    tensors = [torch.from_numpy(a) for a in args]
    with torch_threads(threads), torch.inference_mode():
        times = timed_alternately([lambda: sess.run(None, feeds), lambda: module(*tensors)], runs)
    ort_t, eager_t = times["wall"]
    ort_ms, eager_ms = statistics.median(ort_t), statistics.median(eager_t)
    result = {"batch": int(len(args[0])), "runs": runs, "threads": threads, "onnxruntime_ms": ort_ms,
              "pytorch_eager_ms": eager_ms, "ratio": ort_ms / eager_ms if eager_ms > 0 else None,
              "onnxruntime_min_ms": min(ort_t), "pytorch_eager_min_ms": min(eager_t)}
    if threads == 1:
        # One thread's CPU time is its latency minus what others took from it: the steadier
        # figure on a shared machine (docs/benchmarks.md). With more threads it is not the latency.
        ort_cpu, eager_cpu = (statistics.median(t) for t in times["cpu"])
        result.update(onnxruntime_cpu_ms=ort_cpu, pytorch_eager_cpu_ms=eager_cpu,
                      ratio_cpu=ort_cpu / eager_cpu if eager_cpu > 0 else None)
    if any(type(m).__name__ in ("MambaMixer", "BiMambaMixer", "SS2D") for m in module.modules()):
        from edgediag.ops import resolve_backend

        result["pytorch_scan_backend"] = resolve_backend("auto", tensors[0])
    return result


# --- metadata (the contract: export/README.md) ---------------------------------------------------
_NORMALISATION = re.compile(r"^(pixel|in|input|feature)_(mean|std|min|max)$")


def _io(values: Sequence[onnx.ValueInfoProto]) -> list[dict]:
    out = []
    for v in values:
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]
        out.append({"name": v.name, "shape": dims,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name})
    return out


def normalisation_stats(model: nn.Module) -> dict[str, list[float]]:
    """Input statistics the model holds as buffers (pixel/in/input/feature mean/std/min/max)."""
    stats = {}
    for name, buf in model.named_buffers():
        if _NORMALISATION.match(name.rsplit(".", 1)[-1]) and buf.numel() <= 4096:
            stats[name] = [float(v) for v in buf.detach().float().reshape(-1)]
    return stats


def build_metadata(model, ckpt: dict, graph: onnx.ModelProto, export_info: dict,
                   streaming: dict | None) -> dict[str, str]:
    data = ckpt.get("data") or {}
    spec = dict(model.input_spec())
    spec.update(inputs=_io(graph.graph.input), outputs=_io(graph.graph.output),
                score_output=graph.graph.output[0].name)
    threshold = float(ckpt.get("threshold", float(model.threshold)))
    meta = {
        "edgediag_version": __version__,
        "model_name": str(ckpt.get("model_name", model.model_name)),
        "model_config": json.dumps(ckpt.get("model_config") or {}),
        "input_spec": json.dumps(spec),
        "threshold": repr(threshold) if math.isfinite(threshold) else "nan",
        "classes": json.dumps(list(data.get("classes") or [])),
        "normal_classes": json.dumps(list(data.get("normal_classes") or [])),
        "data_kind": str(data.get("kind") or model.data_kind),
        "export": json.dumps(export_info),
    }
    stats = normalisation_stats(model)
    if stats:
        meta["normalisation"] = json.dumps(stats)
    if streaming:
        meta["streaming"] = json.dumps(streaming)
    return meta


def set_metadata(graph: onnx.ModelProto, meta: dict[str, str]) -> None:
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name = "edgediag"
    graph.producer_version = __version__


def read_metadata(path: str | Path) -> dict[str, str]:
    """metadata_props of an exported graph as a dict (values are strings, several JSON)."""
    graph = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in graph.metadata_props}


# --- TensorRT -------------------------------------------------------------------------------------------
# One implementation of the TensorRT side (edgediag/trt_tool.py, torch-free), used twice:
# imported here when tensorrt and a GPU are present, and copied to the output folder as
# calibrate_int8.py for the board.
TRT_TOOL = Path(__file__).with_name("trt_tool.py")


def trt_here() -> tuple[bool, str]:
    """(can build engines here, why not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "tensorrt is not installed here"
    except Exception as exc:  # noqa: BLE001 - a broken install is the same answer
        return False, f"tensorrt does not import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU here"
    return True, ""


def trtexec_command(input_shapes: dict[str, list], precision: str, workspace_mb: int, dynamic: bool,
                    opt_batch: int, max_batch: int, dla_core: int) -> list[str]:
    cmd = ["\"$TRTEXEC\"", "--onnx=model.onnx", "--saveEngine=model.engine"]
    if precision in ("fp16", "int8"):
        cmd.append("--fp16")
    if precision == "int8":
        cmd += ["--int8", "--calib=calib.cache"]
    cmd += [f"--memPoolSize=workspace:{int(workspace_mb)}", "--timingCacheFile=timing.cache"]
    if dynamic:  # trtexec refuses shape flags for static graphs
        def spec(b):
            return ",".join(f"{n}:{'x'.join(str(d) for d in [b, *s[1:]])}" for n, s in input_shapes.items())
        cmd += [f"--minShapes={spec(1)}", f"--optShapes={spec(opt_batch)}", f"--maxShapes={spec(max_batch)}"]
    if dla_core >= 0:
        cmd += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    return cmd


def write_board_files(stage: Path, preset: ExportPreset | None, precision: str, input_shapes: dict[str, list],
                      dynamic: bool, batch: int, max_batch: int, dla_core: int, calib: np.ndarray | None,
                      summary: dict) -> list[str]:
    """build_engine.sh (+ calibrate_int8.py, calib_data.npy for INT8) and README.md."""
    workspace = preset.workspace_mb if preset else 1024
    board = f"{preset.board} (JetPack {preset.jetpack}, TensorRT {preset.tensorrt})" if preset else "the board"
    lines = ["#!/usr/bin/env bash",
             f"# Written by `python -m edgediag.export` (edgediag {__version__}) for {board}.",
             "# Run on the board, in this folder: bash build_engine.sh [extra trtexec flags]",
             "set -euo pipefail", 'cd "$(dirname "$0")"',
             'TRTEXEC=${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}',
             'if [ ! -x "$TRTEXEC" ]; then TRTEXEC=trtexec; fi']
    files = ["build_engine.sh", "README.md"]
    if precision == "int8":
        lines += ["# INT8 scales: an entropy calibrator over real items (calib_data.npy) writes calib.cache",
                  "if [ ! -f calib.cache ]; then",
                  f"  python3 calibrate_int8.py --onnx model.onnx --calib calib_data.npy --cache calib.cache "
                  f"--batch {batch} --workspace-mb {workspace}" + (f" --dla-core {dla_core}" if dla_core >= 0 else ""),
                  "fi"]
        (stage / "calibrate_int8.py").write_text(TRT_TOOL.read_text())
        np.save(stage / "calib_data.npy", calib.astype(np.float32))
        files += ["calibrate_int8.py", "calib_data.npy"]
    cmd = trtexec_command(input_shapes, precision, workspace, dynamic, batch, max_batch, dla_core)
    lines.append(" \\\n  ".join(cmd) + ' "$@"')
    script = stage / "build_engine.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    (stage / "README.md").write_text(board_readme(preset, precision, summary))
    return files


def board_readme(preset: ExportPreset | None, precision: str, summary: dict) -> str:
    board = (preset.description or preset.board) if preset else "a Jetson board"
    compat = summary.get("trt_compat_line", "")
    lines = [f"# {summary['model_name']} for {board}", "",
             f"Exported by edgediag {__version__} on {summary['created']} from `{summary['checkpoint']}`.", "",
             "| file | what |", "|---|---|",
             "| `model.onnx` | the graph: raw input -> anomaly score first (pre-processing inside), metadata in "
             "`metadata_props` (see edgediag's export/README.md) |",
             "| `export.json` | parity, latency and compatibility report of this export |",
             "| `build_engine.sh` | the trtexec command that builds `model.engine` on the board |"]
    if precision == "int8":
        lines += ["| `calibrate_int8.py` | writes `calib.cache` (INT8 scales) with the TensorRT Python API |",
                  "| `calib_data.npy` | real calibration items, float32 (N, *input shape) |"]
    lines += ["", "## On the board", "", "```bash", "bash build_engine.sh        # -> model.engine, timing.cache"
              + (" (runs calibrate_int8.py first: needs numpy and torch/cuda-python/pycuda)" if precision == "int8" else ""),
              "/usr/src/tensorrt/bin/trtexec --loadEngine=model.engine   # a quick latency check", "```", "",
              f"Precision: {precision}. The ONNX graph matched PyTorch where it was exported "
              f"({summary.get('parity_line', 'see export.json')}). The engine itself is built on the board and was "
              "not checked: before trusting its decisions, compare a few of its scores with model.onnx run in "
              "onnxruntime on the same inputs."]
    if compat:
        lines += ["", "TensorRT parser check (static, from the onnx-tensorrt tables, not verified on a device): "
                  + compat]
    return "\n".join(lines) + "\n"


def build_trt_here(stage: Path, graph_path: Path, preset: ExportPreset | None, precision: str, batch: int,
                   max_batch: int, dla_core: int, calib: np.ndarray | None) -> dict:
    """Engine, timing cache (and calibration cache) built in this process."""
    from edgediag.deploy.tensorrt import build_engine  # imports tensorrt: only where it is installed

    info = build_engine(str(graph_path), str(stage / "model.engine"), precision,
                        preset.workspace_mb if preset else 1024, calib, batch,
                        str(stage / "calib.cache") if precision == "int8" else None,
                        str(stage / "timing.cache"), dla_core, batch, max_batch)
    return {"status": "built", **info}


# --- streaming ---------------------------------------------------------------------------------------------
def stream_sequence(model, ckpt, calib_data, example: tuple, steps: int, batch: int) -> tuple[torch.Tensor, str]:
    """(B, T, *x_t shape) sequence to stream: real items whose x is (T, *x_t shape), else
    the example step with a slow drift and noise."""
    step_shape = tuple(example[0].shape[1:])
    x, source = data_items(model, ckpt, calib_data, batch, ("test", "train"))
    if x is not None and tuple(x.shape[2:]) == step_shape:
        x = _repeat_to(x, batch)[:batch]
        return x[:, :steps].contiguous(), f"{source} (first {min(steps, x.shape[1])} steps)"
    g = torch.Generator().manual_seed(0)
    base = example[0].float().unsqueeze(1)
    drift = torch.linspace(-1, 1, steps).view(1, steps, *([1] * len(step_shape)))
    seq = base + 0.5 * drift + torch.randn(batch, steps, *step_shape, generator=g)
    why = source if x is None else f"{source} do not have the step shape {list(step_shape)}"
    return seq, f"synthetic sequence ({why})"


def stream_outputs(step_fn, seq: np.ndarray, states: list[np.ndarray], n_out: int) -> tuple[list, list]:
    """Step through ``seq`` (B, T, ...): per-step outputs stacked on axis 1, final states."""
    per_step = []
    for t in range(seq.shape[1]):
        res = step_fn([np.ascontiguousarray(seq[:, t]), *states])
        per_step.append(res[:n_out])
        states = list(res[n_out:])
    return [np.stack([s[k] for s in per_step], axis=1) for k in range(n_out)], states


# --- main ---------------------------------------------------------------------------------------------------
def _swap_into_place(stage: Path, out: Path) -> None:
    """Replace ``out`` by the staged folder (two renames on the same filesystem)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(stage, out)


@dataclasses.dataclass
class Settings:
    """The command line resolved against the preset."""

    preset: ExportPreset | None
    preset_path: Path | None
    precision: str
    batch: int
    dla_core: int  # -1: GPU only
    trt_versions: dict[str, str]  # TensorRT version -> board (or JetPack line) checked
    decompose_layernorm: bool
    out: Path


def resolve_settings(args) -> Settings:
    if args.parity_items < 1 or args.calib_items < 1 or args.latency_runs < 1 or args.stream_steps < 1:
        raise cli.UserError("--parity-items, --calib-items, --latency-runs and --stream-steps must be >= 1")
    if args.tolerance < 0:
        raise cli.UserError("--tolerance must be >= 0")
    preset, preset_path = load_preset(args.preset) if args.preset else (None, None)
    precision = args.precision or (preset.default_precision if preset and args.target == "trt" else
                                   "fp16" if args.target == "trt" else "fp32")
    if args.target == "onnx" and precision != "fp32":
        raise cli.UserError(f"--precision {precision} is a TensorRT precision: use --target trt "
                            "(ONNX graphs are exported in fp32)")
    batch = args.batch or (preset.batch if preset else 1)
    if batch < 1 or args.max_batch < batch:
        raise cli.UserError("--batch must be >= 1 and --max-batch >= the batch")
    dla_core = -1
    if args.dla:
        if args.target != "trt" or not preset or preset.dla_cores < 1:
            raise cli.UserError("--dla needs --target trt and a preset with DLA cores "
                                f"({preset.board if preset else 'no preset'} has none)")
        dla_core = 0
    trt_versions = {preset.tensorrt: preset.board} if preset else dict(DEFAULT_TRT_VERSIONS)
    decompose = args.layernorm == "decompose" or (
        args.layernorm == "auto" and preset is not None and trt_compat.parse_version(preset.tensorrt) < (8, 6))
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "export.json").exists())):
        raise cli.UserError(f"--out {out} exists and is not an earlier export folder: choose a new or empty folder")
    return Settings(preset, preset_path, precision, batch, dla_core, trt_versions, decompose, out)


@dataclasses.dataclass
class Target:
    """The module to trace and how to call it."""

    module: nn.Module
    example: tuple  # trace inputs
    input_names: list[str]
    output_names: list[str]
    n_out: int  # outputs before the carried states (streaming); all of them otherwise


def export_target(model, args, batch: int, decompose: bool, warn: list[str]) -> Target:
    """export_module() (or streaming_module()) checked against the contract of base.py."""
    kind = "streaming_module" if args.streaming else "export_module"
    if args.streaming:
        module = model.streaming_module().eval()
        example = tuple(module.example_inputs(batch))
        input_names = list(getattr(module, "input_names", []))
        output_names = list(getattr(module, "output_names", []))
        n_states = len(example) - 1
        if len(input_names) != len(example) or len(output_names) <= n_states:
            raise cli.UserError(f"{model.model_name}: streaming_module() needs input_names for (x_t, *states) and "
                                f"output_names for (outputs..., *new_states) (got {input_names}, {output_names})")
        n_out = len(output_names) - n_states
    else:
        module = model.export_module().eval()
        example = (model.example_input(2 if args.dynamic_batch else batch).float(),)
        input_names = list(getattr(module, "input_names", None) or ["input"])
        output_names = list(getattr(module, "output_names", None) or ["score"])
        n_out = len(output_names)
    with tracing_context(decompose):
        probe = _as_tuple(module(*example))
    if len(probe) != len(output_names):
        raise cli.UserError(f"{model.model_name}: {kind}() returns {len(probe)} outputs (shapes "
                            f"{[tuple(p.shape) for p in probe]}) but names {len(output_names)} ({output_names}); "
                            "the model's owner must set output_names (the score (B,) first)")
    if not args.streaming and tuple(probe[0].shape) != (len(example[0]),):
        raise cli.UserError(f"{model.model_name}: export_module() must return the anomaly score (B,) first; its "
                            f"first output {output_names[0]!r} has shape {tuple(probe[0].shape)} (the model's owner "
                            "must put the score first)")
    return Target(module, example, input_names, output_names, n_out)


def calibration_items(model, ckpt, args, batch: int) -> np.ndarray:
    """INT8 calibration items (training split first), a whole number of batches."""
    if args.streaming:
        raise cli.UserError("INT8 calibration of streaming graphs (several inputs) is not supported")
    x, source = data_items(model, ckpt, args.calib_data, math.ceil(args.calib_items / batch) * batch,
                           ("train", "test"))
    if x is None:
        raise cli.UserError(f"INT8 needs real calibration data: {source}; pass --calib-data DIR")
    return _repeat_to(x, math.ceil(len(x) / batch) * batch).numpy()


def trace_and_check(target: Target, args, decompose: bool, check, stage: Path, model_name: str, warn: list[str]):
    """Trace, onnx.checker, parity, onnxslim, parity again. Returns (graph, parity of the
    graph kept, parity of the unsimplified graph, simplified?, note, opset)."""
    raw_path = stage / "raw.onnx"
    with tracing_context(decompose):
        try:
            export_graph(target.module, target.example, raw_path, target.input_names, target.output_names,
                         args.opset, args.dynamic_batch, args.exporter)
        except (torch.onnx.errors.UnsupportedOperatorError, torch.onnx.errors.SymbolicValueError) as exc:
            raise cli.UserError(f"{model_name}: torch.onnx cannot export an op of the model: "
                                f"{_first_line(exc)}") from None
    raw = onnx.load(str(raw_path))
    raw_path.unlink()
    try:
        onnx.checker.check_model(raw, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise cli.UserError(f"onnx.checker rejects the exported graph of {model_name}: {_first_line(exc)}") from None
    opset = next((o.version for o in raw.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset != args.opset:
        warn.append(f"the {args.exporter} exporter wrote opset {opset}, not {args.opset}")
    raw_parity = check(raw)
    if args.no_simplify:
        return raw, raw_parity, raw_parity, False, "skipped (--no-simplify)", opset
    import onnxslim

    try:
        slim = onnxslim.slim(onnx.ModelProto.FromString(raw.SerializeToString()))
    except Exception as exc:  # noqa: BLE001 - simplification is optional
        note = f"onnxslim failed ({type(exc).__name__}: {_first_line(exc)[:120]})"
        warn.append(f"{note}: kept the unsimplified graph")
        return raw, raw_parity, raw_parity, False, note, opset
    slim_parity = check(slim)
    if slim_parity.get("passed"):
        return (slim, slim_parity, raw_parity, True,
                f"onnxslim: {len(raw.graph.node)} -> {len(slim.graph.node)} nodes, parity re-checked", opset)
    note = f"onnxslim broke parity ({slim_parity.get('error') or parity_line(slim_parity)})"
    if raw_parity.get("passed"):
        warn.append(f"{note}: kept the unsimplified graph")
    return raw, raw_parity, raw_parity, False, note, opset


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    cfg = resolve_settings(args)
    from edgediag.engine.checkpoint import load_model

    model, ckpt = load_model(args.checkpoint)
    threshold = float(ckpt.get("threshold", float(model.threshold)))
    threads = args.threads or torch.get_num_threads()
    warn: list[str] = []
    if not math.isfinite(threshold):
        warn.append("the checkpoint has no calibrated threshold: decisions are not compared, metadata threshold is nan")
    target = export_target(model, args, cfg.batch, cfg.decompose_layernorm, warn)
    static = None if args.dynamic_batch else cfg.batch  # the chunk size graphs are run with

    # --- parity inputs (real data when there is any) and the PyTorch reference ---
    ref = parity_x = None
    if args.streaming:
        seq, parity_source = stream_sequence(model, ckpt, args.calib_data, target.example, args.stream_steps,
                                             cfg.batch)
        check = _streaming_parity(target.module, seq, target.example, target.n_out, target.output_names,
                                  threshold, args.tolerance)
    else:
        n_parity = args.parity_items if args.dynamic_batch else math.ceil(args.parity_items / cfg.batch) * cfg.batch
        parity_x, parity_source = data_items(model, ckpt, args.calib_data, n_parity, ("test", "train"))
        if parity_x is None:
            warn.append(f"parity on the model's example inputs: {parity_source} (pass --calib-data DIR for real data)")
            parity_source = f"model.example_input ({parity_source})"
            parity_x = model.example_input(n_parity).float()
        parity_x = _repeat_to(parity_x, n_parity)
        ref = run_chunks(torch_runner(target.module), [parity_x.numpy()], static)
        check = _graph_parity(ref, [parity_x.numpy()], target.output_names, threshold, args.tolerance, static)
    calib = calibration_items(model, ckpt, args, cfg.batch) if cfg.precision == "int8" else None

    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.", suffix=".tmp", dir=cfg.out.parent))
    stage.chmod(0o755)  # mkdtemp's 0700 would become the output folder's mode
    try:
        graph, parity, raw_parity, simplified, simplify_note, opset = trace_and_check(
            target, args, cfg.decompose_layernorm, check, stage, model.model_name, warn)
        loose = [n for n, o in parity.get("outputs", {}).items()
                 if o["max_abs_error_std"] is not None and o["max_abs_error_std"] > args.tolerance]
        if loose and parity.get("passed"):  # extra outputs are reported, the score decides
            warn.append(f"outputs {', '.join(loose)} differ by more than the tolerance (in their own std units); "
                        "the score passed")
        if not parity.get("passed"):
            reason = parity.get("error") or parity_line(parity)
            if args.dynamic_batch and parity.get("error"):
                reason += " (traced at batch 2, run at another batch: the model fixes the batch size somewhere; " \
                          "export with a static --batch)"
            print(f"parity failed for {model.model_name} ({parity_source}): {reason}; nothing written",
                  file=sys.stderr)
            return EXIT_PARITY

        # latency at batch 1 (the static batch if larger), compatibility, metadata
        if args.streaming:
            lat_args = [a.float().numpy() for a in target.module.example_inputs(static or 1)]
        else:
            lat_args = [parity_x[: static or 1].numpy()]
        lat = latency(target.module, graph, lat_args, threads, args.latency_runs)
        compat = {v: trt_compat.report(graph, v, board) for v, board in cfg.trt_versions.items()}
        compat_line = "; ".join(trt_compat.summary_line(trt_compat.check_model(graph, v), v, b)
                                for v, b in cfg.trt_versions.items())
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        export_info = {"opset": opset, "precision": cfg.precision, "preset": cfg.preset.board if cfg.preset else None,
                       "tensorrt": cfg.preset.tensorrt if cfg.preset else None, "created": created,
                       "exporter": args.exporter, "torch": str(torch.__version__), "onnx": onnx.__version__,
                       "batch": "dynamic" if args.dynamic_batch else cfg.batch, "streaming": bool(args.streaming),
                       "simplified": simplified, "layernorm": "decomposed" if cfg.decompose_layernorm else "op",
                       "scan_backend": "chunked", "checkpoint": str(args.checkpoint)}
        streaming_info = None
        if args.streaming:
            names, n_out = target.input_names, target.n_out
            streaming_info = {"step_input": names[0], "state_inputs": names[1:],
                              "step_outputs": target.output_names[:n_out], "state_outputs": target.output_names[n_out:],
                              "initial_states": "zeros",
                              "state_shapes": {n: list(t.shape) for n, t in zip(names[1:], target.example[1:])}}
        set_metadata(graph, build_metadata(model, ckpt, graph, export_info, streaming_info))
        graph_path = stage / "model.onnx"
        onnx.save(graph, str(graph_path))

        # --- TensorRT: build here, or leave the build to the board ---
        exit_code, trt_info = EXIT_OK, None
        if args.target == "trt":
            ok, why = trt_here()
            if ok:
                trt_info = build_trt_here(stage, graph_path, cfg.preset, cfg.precision, cfg.batch, args.max_batch,
                                          cfg.dla_core, calib)
                if not args.streaming:
                    trt_info["parity"] = _trt_parity(stage / "model.engine", [parity_x.numpy()], ref,
                                                     target.output_names, threshold,
                                                     args.trt_tolerance or TRT_TOLERANCE[cfg.precision], static)
                    if not trt_info["parity"]["passed"]:
                        print(f"TensorRT parity failed for {model.model_name}: {parity_line(trt_info['parity'])}; "
                              "nothing written", file=sys.stderr)
                        return EXIT_PARITY
            else:
                summary = {"model_name": model.model_name, "created": created, "checkpoint": str(args.checkpoint),
                           "trt_compat_line": compat_line, "parity_line": parity_line(parity)}
                files = write_board_files(stage, cfg.preset, cfg.precision,
                                          {i["name"]: i["shape"] for i in _io(graph.graph.input)}, args.dynamic_batch,
                                          cfg.batch, args.max_batch, cfg.dla_core, calib, summary)
                trt_info = {"status": "build_on_board", "reason": why, "files": files}
                exit_code = EXIT_BUILD_ON_BOARD
            trt_info.update(precision=cfg.precision, dla_core=cfg.dla_core if cfg.dla_core >= 0 else None)

        report = {
            "checkpoint": str(args.checkpoint), "model_name": model.model_name, "target": args.target,
            "precision": cfg.precision, "created": created, "edgediag_version": __version__,
            "preset": dataclasses.asdict(cfg.preset) if cfg.preset else None,
            "preset_file": str(cfg.preset_path) if cfg.preset_path else None,
            "onnx": {"file": "model.onnx", "opset": opset, "nodes": len(graph.graph.node),
                     "ops": dict(sorted(_op_counts(graph).items())), "size_bytes": graph_path.stat().st_size,
                     "inputs": _io(graph.graph.input), "outputs": _io(graph.graph.output),
                     "simplified": simplified, "simplify": simplify_note, "exporter": args.exporter,
                     "layernorm": export_info["layernorm"]},
            "parity": {"data": parity_source, **parity},
            "parity_unsimplified": raw_parity if simplified else None,
            "latency": lat, "trt_compat": compat, "tensorrt": trt_info, "warnings": warn, "exit_code": exit_code,
            "exit_codes": EXIT_CODES,
        }
        from edgediag.utils import write_json

        write_json(stage / "export.json", report)
        (stage / "export.json").chmod(0o644)
        _swap_into_place(stage, cfg.out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print_summary(report, cfg, parity_source, threads)
    return exit_code


EXIT_CODES = {"0": "all requested artifacts built", "1": "internal error", "2": "bad input",
              "3": "--target trt without TensorRT/GPU here: ONNX + build script written, build the engine on the board",
              "4": "parity beyond tolerance (or ONNX Runtime cannot run the graph): nothing written"}


def print_summary(report: dict, cfg: Settings, parity_source: str, threads: int) -> None:
    """What happened, in a few lines."""
    out, lat, onnx_info, parity = cfg.out, report["latency"], report["onnx"], report["parity"]
    for w in report["warnings"]:
        print(f"warning: {w}")
    ratio = f"{lat['ratio']:.2f}x" if lat["ratio"] is not None else "n/a"
    print(f"onnx: {out / 'model.onnx'} (opset {onnx_info['opset']}, {onnx_info['nodes']} nodes"
          f"{', simplified' if onnx_info['simplified'] else ''})")
    print(f"parity vs PyTorch on {parity_source}: {parity_line(parity)}")
    print(f"latency, batch {lat['batch']}, {threads} thread(s), median (min) of {lat['runs']}: onnxruntime "
          f"{lat['onnxruntime_ms']:.2f} ({lat['onnxruntime_min_ms']:.2f}) ms, PyTorch eager "
          f"{lat['pytorch_eager_ms']:.2f} ({lat['pytorch_eager_min_ms']:.2f}) ms: ratio {ratio}")
    if lat.get("ratio_cpu") is not None:
        print(f"  on the thread's CPU clock (median): onnxruntime {lat['onnxruntime_cpu_ms']:.2f} ms, PyTorch eager "
              f"{lat['pytorch_eager_cpu_ms']:.2f} ms: ratio {lat['ratio_cpu']:.2f}x")
    compat = "; ".join(trt_compat.summary_line([trt_compat.Issue(**i) for i in r["issues"]], v, r["board"] or "")
                       for v, r in report["trt_compat"].items())
    print(f"TensorRT parser check (onnx-tensorrt tables, not verified on a device): {compat}")
    trt_info = report["tensorrt"]
    if trt_info and trt_info["status"] == "build_on_board":
        where = f" on the {cfg.preset.board}" if cfg.preset else " on the board"
        extra = " + calibrate_int8.py + calib_data.npy" if cfg.precision == "int8" else ""
        print(f"tensorrt: {trt_info['reason']}: wrote model.onnx + build_engine.sh{extra} to {out}; run "
              f"`bash build_engine.sh` there{where} to build the {cfg.precision} engine (exit code 3)")
    elif trt_info:
        print(f"tensorrt: {out / 'model.engine'} ({cfg.precision}, TensorRT {trt_info.get('tensorrt')}), parity: "
              + (parity_line(trt_info["parity"]) if trt_info.get("parity") else "not checked (streaming)"))
    print(f"report: {out / 'export.json'}")


def _op_counts(graph: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _graph_parity(ref: list[np.ndarray], inputs: list[np.ndarray], names, threshold, tolerance, batch):
    """A function graph -> parity dict (with "error" when ONNX Runtime cannot run it)."""
    def check(graph: onnx.ModelProto) -> dict:
        try:
            test = run_chunks(ort_runner(ort_session(graph)), inputs, batch)
        except Exception as exc:  # noqa: BLE001 - an unrunnable graph is a parity failure, said precisely
            return {"passed": False, "error": f"ONNX Runtime cannot run the graph: {_ort_error(exc)}"}
        return parity_metrics(ref, test, names, threshold, tolerance)
    return check


def _streaming_parity(module, seq: torch.Tensor, example: tuple, n_out: int, names, threshold, tolerance):
    """Step-by-step ONNX Runtime against the PyTorch model over the whole sequence: its
    ``full_sequence(seq)`` (the full-sequence forward) when the streaming module has one,
    else the PyTorch step function itself."""
    states0 = [t.float().numpy() for t in example[1:]]
    seq_np = seq.float().numpy()
    torch_steps, torch_states = stream_outputs(torch_runner(module), seq_np, states0, n_out)
    full = None
    if hasattr(module, "full_sequence"):
        with torch.inference_mode():
            full = [o.float().numpy() for o in _as_tuple(module.full_sequence(seq.float()))]

    def check(graph: onnx.ModelProto) -> dict:
        try:
            ort_steps, ort_states = stream_outputs(ort_runner(ort_session(graph)), seq_np, states0, n_out)
        except Exception as exc:  # noqa: BLE001
            return {"passed": False, "error": f"ONNX Runtime cannot run the graph: {_ort_error(exc)}"}
        ref = full if full is not None else torch_steps
        flat = [r.reshape(r.shape[0] * r.shape[1], *r.shape[2:]) for r in ref]
        test = [t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]) for t in ort_steps]
        result = parity_metrics(flat, test, names[:n_out], threshold if flat[0].ndim == 1 else float("nan"),
                                tolerance)
        state_err = max((float(np.abs(a - b).max()) for a, b in zip(ort_states, torch_states)), default=0.0)
        result.update(reference="PyTorch full-sequence forward (module.full_sequence)" if full is not None
                      else "PyTorch step function", steps=int(seq_np.shape[1]), final_state_max_abs_error=state_err)
        if full is not None:  # the step function itself against the full sequence, for the record
            result["torch_steps_vs_full_max_abs_error"] = float(max(np.abs(a - b).max()
                                                                    for a, b in zip(torch_steps, full)))
        return result
    return check


def _trt_parity(engine_path: Path, inputs: list[np.ndarray], ref: list[np.ndarray], names, threshold,
                tolerance, batch) -> dict:
    """The built engine against the same PyTorch outputs the ONNX graph was checked on."""
    from edgediag.deploy.tensorrt import EngineRunner

    runner = EngineRunner(str(engine_path))
    test = run_chunks(lambda a: [runner({runner.inputs[0]: a[0]})[n] for n in names], inputs, batch)
    return {"reference": "PyTorch eager", **parity_metrics(ref, test, names, threshold, tolerance)}


def _ort_error(exc: BaseException) -> str:
    """ONNX Runtime's error without its source locations: the failing node and why."""
    text = " ".join(str(exc).split())
    m = re.search(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if not m:
        return _first_line(exc)
    why = re.sub(r"\S+\.(?:h|cc):\d+ \S+?\(.*?\) ", "", m.group(3))  # "file.h:91 fn(args) "
    return f"{m.group(1)} node {m.group(2)!r}: {why}"[:400]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


if __name__ == "__main__":
    cli.entry(main)
