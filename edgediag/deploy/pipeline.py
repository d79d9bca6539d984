"""The export flow of `python -m edgediag.export`: a checkpoint to ONNX (and TensorRT) with
parity checks. The verb (edgediag/export.py) parses the command line and calls :func:`run`.

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
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgediag import __version__, cli
from edgediag.config import from_dict
from edgediag.deploy import presets as trt_compat
from edgediag.deploy.board import build_trt_here, trt_here, write_board_files
from edgediag.deploy.bundle import write_golden, write_manifest
from edgediag.deploy.metadata import build_metadata, graph_io, set_metadata
from edgediag.deploy.onnx import (
    SCAN_OPS,
    as_tuple,
    export_graph,
    graph_latency,
    latency,
    ort_runner,
    ort_session,
    run_chunks,
    torch_runner,
    tracing_context,
)
from edgediag.deploy.parity import (
    first_line,
    graph_parity,
    parity_line,
    streaming_parity,
    trt_parity,
)
from edgediag.deploy.presets import DEFAULT_TRT_VERSIONS, TRT_TOLERANCE, ExportPreset, load_preset
from edgediag.deploy.quantize import (
    FEW_CALIBRATION_ITEMS,
    MIN_AGREEMENT,
    check_line,
    convert_fp16,
    precision_check,
    quantize_int8,
)
from edgediag.deploy.summary import show_summary
from edgediag.errors import UserError
from edgediag.measure.timing import protocol
from edgediag.utils import current_umask

EXIT_OK = 0
EXIT_BUILD_ON_BOARD = 3
EXIT_PARITY = 4

# --- inputs ------------------------------------------------------------------------------------
_BUNDLES: dict[str, Any] = {}


def data_items(model, ckpt: dict, calib_data: str | None, n: int, splits: Sequence[str],
               meta: dict | None = None) -> tuple[torch.Tensor, str]:
    """``n`` items spread evenly over the first non-empty split of the data folder: the
    ``x`` of each stacked, and where they came from. (None, reason) without data. ``meta``,
    if given, receives each item's ``anomaly`` label and ``section``/``domain`` (lists)."""
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
            items = [ds[i] for i in idx]
            x = torch.stack([torch.as_tensor(it["x"]).float() for it in items])
            if meta is not None:
                meta["anomaly"] = np.array([int(it.get("anomaly", -1)) for it in items])
                meta["section"] = [str(it.get("section", "")) for it in items]
                meta["domain"] = [str(it.get("domain", "")) for it in items]
            return x, f"{len(idx)} {split} items of {root}"
    return None, f"{root} has no {' or '.join(splits)} items"


def _repeat_to(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if len(x) >= n else x[torch.arange(n) % len(x)]



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
    if min(args.parity_items, args.calib_items, args.check_items, args.latency_runs, args.stream_steps) < 1:
        raise UserError("--parity-items, --calib-items, --check-items, --latency-runs and --stream-steps must be >= 1")
    if args.tolerance < 0:
        raise UserError("--tolerance must be >= 0")
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch must be >= 1, not {args.batch}")
    if args.calib_data and not Path(args.calib_data).is_dir():
        raise UserError(f"--calib-data {args.calib_data}: no such folder")
    preset, preset_path = load_preset(args.preset) if args.preset else (None, None)
    precision = args.precision or (preset.default_precision if preset and args.target == "trt" else
                                   "fp16" if args.target == "trt" else "fp32")
    if args.streaming and precision == "int8":
        raise UserError("--precision int8 with --streaming: INT8 calibration of streaming graphs (several inputs) "
                        "is not supported")
    if args.scan_op == "custom":
        _check_custom_scan_op(args, precision)
    batch = args.batch or (preset.batch if preset else 1)
    if batch < 1 or args.max_batch < batch:
        raise UserError("--batch must be >= 1 and --max-batch >= the batch")
    dla_core = -1
    if args.dla:
        if args.target != "trt" or not preset or preset.dla_cores < 1:
            raise UserError("--dla needs --target trt and a preset with DLA cores "
                                f"({preset.board if preset else 'no preset'} has none)")
        dla_core = 0
    trt_versions = {preset.tensorrt: preset.board} if preset else dict(DEFAULT_TRT_VERSIONS)
    decompose = args.layernorm == "decompose" or (
        args.layernorm == "auto" and preset is not None and trt_compat.parse_version(preset.tensorrt) < (8, 6))
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "export.json").exists())):
        raise UserError(f"--out {out} exists and is not an earlier export folder: choose a new or empty folder")
    return Settings(preset, preset_path, precision, batch, dla_core, trt_versions, decompose, out)


def _check_custom_scan_op(args, precision: str) -> None:
    """--scan-op custom: a graph for ONNX Runtime with the edgediag library, built here to be checked."""
    if args.target != "onnx" or precision != "fp32" or args.exporter != "torchscript":
        raise UserError("--scan-op custom needs --target onnx, --precision fp32 and the torchscript exporter "
                        "(TensorRT and the fp16/int8 converters do not read the edgediag::SelectiveScan node)")
    from edgediag.runtime import custom_ops

    reason = custom_ops.available()
    if reason is not None:
        raise UserError(f"--scan-op custom: {reason}")


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
            raise UserError(f"{model.model_name}: streaming_module() needs input_names for (x_t, *states) and "
                                f"output_names for (outputs..., *new_states) (got {input_names}, {output_names})")
        n_out = len(output_names) - n_states
    else:
        module = model.export_module().eval()
        example = (model.example_input(2 if args.dynamic_batch else batch).float(),)
        input_names = list(getattr(module, "input_names", None) or ["input"])
        output_names = list(getattr(module, "output_names", None) or ["score"])
        n_out = len(output_names)
    with tracing_context(decompose):
        probe = as_tuple(module(*example))
    if len(probe) != len(output_names):
        raise UserError(f"{model.model_name}: {kind}() returns {len(probe)} outputs (shapes "
                            f"{[tuple(p.shape) for p in probe]}) but names {len(output_names)} ({output_names}); "
                            "the model's owner must set output_names (the score (B,) first)")
    if not args.streaming and tuple(probe[0].shape) != (len(example[0]),):
        raise UserError(f"{model.model_name}: export_module() must return the anomaly score (B,) first; its "
                            f"first output {output_names[0]!r} has shape {tuple(probe[0].shape)} (the model's owner "
                            "must put the score first)")
    return Target(module, example, input_names, output_names, n_out)


def calibration_items(model, ckpt, args, batch: int, warn: list[str]) -> tuple[np.ndarray, str]:
    """INT8 calibration items: the normal training items (up to --calib-items; test normals
    only where the folder has no training split), a whole number of batches."""
    meta: dict = {}
    x, source = data_items(model, ckpt, args.calib_data, 1 << 30, ("train", "test"), meta)  # all of the split
    if x is None:
        raise UserError(f"INT8 needs real calibration data: {source}; pass --calib-data DIR")
    normal = np.flatnonzero(meta["anomaly"] <= 0)  # known anomalies never set the ranges
    if not len(normal):
        raise UserError(f"INT8 calibration: no normal items among {source}")
    keep = np.unique(np.round(np.linspace(0, len(normal) - 1, min(args.calib_items, len(normal)))).astype(int))
    x = x[torch.as_tensor(normal[keep])]
    if len(x) < FEW_CALIBRATION_ITEMS:
        warn.append(f"INT8 ranges rest on {len(x)} normal items (fewer than {FEW_CALIBRATION_ITEMS}): "
                    "activations outside them will clip")
    source = f"{len(x)} normal items ({source})"
    return _repeat_to(x, math.ceil(len(x) / batch) * batch).numpy(), source


def float_prefixes(model, module: nn.Module) -> list[str]:
    """Module paths the INT8 graph keeps float: the signal front ends (log-mel) and the
    model's ``int8_float_modules()``, under every path ONNX may name them by (node names
    drop the export wrapper's own prefix)."""
    # layers mark themselves (LogMel: signal_front_end), so this stage names no layer class
    paths = [name for name, m in module.named_modules() if name and getattr(m, "signal_front_end", False)]
    paths += model.int8_float_modules()
    return sorted({"/".join(p.split(".")[i:]) for p in paths for i in range(len(p.split(".")))})


def reduced_graph(model, ckpt, args, cfg, target: Target, graph: onnx.ModelProto, calib, static: int | None,
                  threshold: float, threads: int, warn: list[str]) -> tuple[onnx.ModelProto, dict]:
    """The fp16 or int8 graph of ``graph`` and its check against the PyTorch fp32 model on
    --check-items items (test split first): error, AUC/accuracy delta, decision agreement."""
    meta: dict = {}
    # Test items (training items only without a test split): a training item is in a kNN
    # score's own bank, scored leave-one-out, so any rounding of its embedding makes it its
    # own nearest neighbour and flips its decision (fan TASTgram-MFN int8: 4 of 45 training
    # items flipped, none of the 20 test items).
    x, source = data_items(model, ckpt, args.calib_data, args.check_items, ("test", "train"), meta)
    if x is None:
        warn.append(f"{cfg.precision} graph checked on the model's example inputs: {source}")
        x, source, meta = model.example_input(args.check_items).float(), f"model.example_input ({source})", {}
    n = len(x)
    padded = _repeat_to(x, math.ceil(n / static) * static if static else n).numpy()
    ref = run_chunks(torch_runner(target.module), [padded], static)[0][:n]
    if cfg.precision == "int8":
        reduced, info = quantize_int8(graph, calib[0], target.input_names[0], static, float_prefixes(model, target.module),
                                      args.int8_calibration)
        info["calibration_data"] = calib[1]
    else:
        reduced, info = convert_fp16(graph, float_prefixes(model, target.module))
    got = run_chunks(ort_runner(ort_session(reduced, threads)), [padded], static)[0][:n]
    thresholds = model.decision_thresholds(meta.get("section"), meta.get("domain")) if meta else threshold
    check = precision_check(ref, got, thresholds, meta.get("anomaly"), MIN_AGREEMENT)
    ms = graph_latency({"fp32": graph, cfg.precision: reduced}, [padded[: static or 1]], threads, args.latency_runs,
                       args.warmup)
    speed = {"batch": static or 1, **protocol(threads, args.warmup, args.latency_runs),
             "fp32_ms": ms["fp32"], f"{cfg.precision}_ms": ms[cfg.precision],
             "speedup": ms["fp32"] / ms[cfg.precision] if ms[cfg.precision] > 0 else None,
             "note": "ONNX Runtime on this CPU (no int8/fp16 speed-up expected without VNNI/fp16 units); "
                     "the board's figure is TensorRT's"}
    return reduced, {**info, "check": {"data": source, **check}, "onnxruntime_latency": speed}


def traced_costs(model, target: Target, streaming: bool) -> dict:
    """Parameters and FLOPs per item of what is traced, counted as bench counts a checkpoint
    (edgediag.measure.cost.scoring_costs: export_module() on one item; a streaming graph:
    one step of streaming_module()); recorded in the graph's metadata, so a graph reports
    the parameter count of the model it was exported from (ONNX folds BatchNorm and stores
    constant buffers beside the weights: its initializers are not that count)."""
    from edgediag.measure.cost import PARAMS_DEFINITION, count_flops, scoring_costs, scoring_parameters
    from edgediag.measure.timing import eval_mode

    if streaming:
        example = tuple(a.float() for a in target.module.example_inputs(1))
        with eval_mode(target.module):
            counted = {"params": scoring_parameters(target.module, *example),
                       "flops": count_flops(target.module, *example)}
    else:
        counted = scoring_costs(model)
    return {"params": counted["params"], "flops_per_item": int(counted["flops"]["flops"]),
            "scan_flops_per_item": int(counted["flops"]["scan_flops"]), "params_definition": PARAMS_DEFINITION}


def trace_and_check(target: Target, args, decompose: bool, check, stage: Path, model_name: str, warn: list[str]):
    """Trace, onnx.checker, parity, onnxslim, parity again. Returns (graph, parity of the
    graph kept, parity of the unsimplified graph, simplified?, note, opset)."""
    raw_path = stage / "raw.onnx"
    with tracing_context(decompose, args.scan_op):
        try:
            export_graph(target.module, target.example, raw_path, target.input_names, target.output_names,
                         args.opset, args.dynamic_batch, args.exporter)
        except (torch.onnx.errors.UnsupportedOperatorError, torch.onnx.errors.SymbolicValueError) as exc:
            raise UserError(f"{model_name}: torch.onnx cannot export an op of the model: "
                                f"{first_line(exc)}") from None
    raw = onnx.load(str(raw_path))
    raw_path.unlink()
    if args.scan_op == "custom":
        custom = sum(n.domain == "edgediag" for n in raw.graph.node)
        warn.append(f"model.onnx holds {custom} edgediag::SelectiveScan node(s): ONNX Runtime runs it with the library "
                    "of python -m edgediag.runtime.custom_ops build (on the board too); TensorRT cannot read it"
                    if custom else f"{model_name} has no selective scan: --scan-op custom changed nothing")
    try:
        onnx.checker.check_model(raw, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise UserError(f"onnx.checker rejects the exported graph of {model_name}: {first_line(exc)}") from None
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
        note = f"onnxslim failed ({type(exc).__name__}: {first_line(exc)[:120]})"
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


def run(args) -> int:
    """The export the command line ``args`` (the verb's parser) asks for; the exit code."""
    cfg = resolve_settings(args)
    from edgediag.engine.checkpoint import load_model

    model, ckpt = load_model(args.checkpoint)
    threshold = float(ckpt.get("threshold", float(model.threshold)))
    threads = args.threads
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
        check = streaming_parity(target.module, seq, target.example, target.n_out, target.output_names,
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
        check = graph_parity(ref, [parity_x.numpy()], target.output_names, threshold, args.tolerance, static)
    calib = calibration_items(model, ckpt, args, cfg.batch, warn) if cfg.precision == "int8" else None

    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.", suffix=".tmp", dir=cfg.out.parent))
    stage.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would become the output folder's mode
    logs = contextlib.ExitStack()
    logs.enter_context(cli.run_log(stage))  # other libraries' warnings: stage/edgediag.log, in the manifest
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
        lat = latency(target.module, graph, lat_args, threads, args.latency_runs, args.warmup)
        counts = traced_costs(model, target, args.streaming)
        compat = {v: trt_compat.report(graph, v, board) for v, board in cfg.trt_versions.items()}
        compat_line = "; ".join(trt_compat.summary_line(trt_compat.check_model(graph, v), v, b)
                                for v, b in cfg.trt_versions.items())
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        export_info = {"opset": opset, "precision": "fp32", "target_precision": cfg.precision, "preset": cfg.preset.board if cfg.preset else None,
                       "tensorrt": cfg.preset.tensorrt if cfg.preset else None, "created": created,
                       "exporter": args.exporter, "torch": str(torch.__version__), "onnx": onnx.__version__,
                       "batch": "dynamic" if args.dynamic_batch else cfg.batch, "streaming": bool(args.streaming),
                       "simplified": simplified, "layernorm": "decomposed" if cfg.decompose_layernorm else "op",
                       "scan_backend": SCAN_OPS[args.scan_op], "checkpoint": str(args.checkpoint),
                       "params": counts["params"], "flops_per_item": counts["flops_per_item"],
                       "scan_flops_per_item": counts["scan_flops_per_item"]}
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

        # --- fp16 / int8: the graph the board builds, checked here against fp32 ---
        reduced, reduced_info, build_path = None, None, graph_path
        if cfg.precision != "fp32" and args.streaming:
            warn.append(f"streaming graphs are not converted to {cfg.precision} here: TensorRT lowers model.onnx "
                        "itself and that is not checked before the board")
        elif cfg.precision != "fp32":
            reduced, reduced_info = reduced_graph(model, ckpt, args, cfg, target, graph, calib, static, threshold,
                                                  threads, warn)
            check = reduced_info["check"]
            if not check["passed"]:
                why = (f"{cfg.precision} graph vs fp32 on {check['data']}: {check_line(check)}")
                if not args.allow_drift:
                    print(f"{why}: below the {MIN_AGREEMENT:.0%} decision agreement; nothing written "
                          "(--allow-drift keeps it)", file=sys.stderr)
                    return EXIT_PARITY
                warn.append(f"{why}: kept because of --allow-drift")
            try:
                onnx.checker.check_model(reduced)
            except onnx.checker.ValidationError as exc:
                raise RuntimeError(f"the {cfg.precision} graph fails onnx.checker: {first_line(exc)}") from None
            del reduced.metadata_props[:]
            set_metadata(reduced, build_metadata(model, ckpt, reduced, {**export_info, "precision": cfg.precision,
                                                                         "reduced_from": "model.onnx",
                                                                         "quantization": reduced_info}, None))
            build_path = stage / f"model.{cfg.precision}.onnx"
            onnx.save(reduced, str(build_path))
            reduced_info["file"] = build_path.name

        # --- TensorRT: build here, or leave the build to the board ---
        exit_code, trt_info = EXIT_OK, None
        if args.target == "trt":
            ok, why = trt_here()
            if ok:
                trt_info = build_trt_here(stage, build_path, cfg.preset, cfg.precision, cfg.batch, args.max_batch,
                                          cfg.dla_core, calib[0] if calib else None)
                if not args.streaming:
                    trt_info["parity"] = trt_parity(stage / "model.engine", [parity_x.numpy()], ref,
                                                     target.output_names, threshold,
                                                     args.trt_tolerance or TRT_TOLERANCE[cfg.precision], static)
                    if not trt_info["parity"]["passed"]:
                        print(f"TensorRT parity failed for {model.model_name}: {parity_line(trt_info['parity'])}; "
                              "nothing written", file=sys.stderr)
                        return EXIT_PARITY
            else:
                summary = {"model_name": model.model_name, "created": created, "checkpoint": str(args.checkpoint),
                           "trt_compat_line": compat_line, "parity_line": parity_line(parity),
                           "reduced_line": check_line(reduced_info["check"]) if reduced_info else ""}
                files = write_board_files(stage, cfg.preset, cfg.precision,
                                          {i["name"]: i["shape"] for i in graph_io(graph.graph.input)}, args.dynamic_batch,
                                          cfg.batch, args.max_batch, cfg.dla_core, calib[0] if calib else None, summary,
                                          build_path.name)
                trt_info = {"status": "build_on_board", "reason": why, "files": files}
                exit_code = EXIT_BUILD_ON_BOARD
            trt_info.update(precision=cfg.precision, dla_core=cfg.dla_core if cfg.dla_core >= 0 else None)

        report = {
            "checkpoint": str(args.checkpoint), "model_name": model.model_name, "target": args.target,
            "streaming": bool(args.streaming), "precision": cfg.precision, "created": created, "edgediag_version": __version__,
            "preset": dataclasses.asdict(cfg.preset) if cfg.preset else None,
            "preset_file": str(cfg.preset_path) if cfg.preset_path else None,
            "onnx": {"file": "model.onnx", "opset": opset, "nodes": len(graph.graph.node),
                     "ops": dict(sorted(_op_counts(graph).items())), "size_bytes": graph_path.stat().st_size,
                     "inputs": graph_io(graph.graph.input), "outputs": graph_io(graph.graph.output),
                     "simplified": simplified, "simplify": simplify_note, "exporter": args.exporter,
                     "layernorm": export_info["layernorm"]},
            "parity": {"data": parity_source, **parity},
            "parity_unsimplified": raw_parity if simplified else None,
            "reduced_precision": reduced_info,
            "counts": counts, "latency": lat, "trt_compat": compat, "tensorrt": trt_info, "warnings": warn, "exit_code": exit_code,
            "exit_codes": EXIT_CODES,
        }
        from edgediag.utils import write_json

        if not args.streaming:  # golden items + references for `python -m edgediag.verify`
            golden_reduced = None
            if reduced is not None:
                score = run_chunks(ort_runner(ort_session(reduced, threads)), [parity_x.numpy()], static)[0]
                golden_reduced = {"file": build_path.name, "precision": cfg.precision, "score": score}
            write_golden(stage, parity_x.numpy(), ref, target.input_names[0], target.output_names, threshold,
                         args.tolerance, parity.get("score_std") or 1.0, static,
                         {p: args.trt_tolerance or t for p, t in TRT_TOLERANCE.items()}, parity_source,
                         golden_reduced)
        write_json(stage / "export.json", report)
        logs.close()
        write_manifest(stage)  # last: digests of every file above
        _swap_into_place(stage, cfg.out)
        cli.run_log_moved(stage, cfg.out)
    finally:
        logs.close()
        shutil.rmtree(stage, ignore_errors=True)
    show_summary(report, cfg.out, cfg.preset, parity_source)
    return exit_code


EXIT_CODES = {"0": "all requested artifacts built", "1": "internal error", "2": "bad input",
              "3": "--target trt without TensorRT/GPU here: ONNX + build script written, build the engine on the board",
              "4": "parity beyond tolerance (or ONNX Runtime cannot run the graph): nothing written"}



def _op_counts(graph: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
