"""TensorRT: build the engine here when tensorrt and a GPU are present, else the files that
build it on the board (trtexec command in build_engine.sh, INT8 calibration, a README)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgediag import __version__
from edgediag.deploy.presets import ExportPreset, trtexec_flags
from edgediag.utils import current_umask

# One implementation of the TensorRT side (edgediag/deploy/trt_engine.py, torch-free), used twice:
# imported here when tensorrt and a GPU are present, and copied to the output folder as
# calibrate_int8.py for the board.
TRT_TOOL = Path(__file__).with_name("trt_engine.py")


def trt_here() -> tuple[bool, str]:
    """(can build engines here, why not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "tensorrt is not installed here"
    except Exception as exc:  # noqa: BLE001 - a broken install is the same answer
        return False, f"tensorrt does not import ({type(exc).__name__}: {exc})"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU here"
    return True, ""


def trtexec_command(input_shapes: dict[str, list], precision: str, workspace_mb: int, dynamic: bool,
                    opt_batch: int, max_batch: int, dla_core: int, graph: str = "model.onnx",
                    implicit_int8: bool = False, tensorrt: str = "10.3", dla_cores: int = 0) -> list[str]:
    """trtexec's build command, spelled for TensorRT ``tensorrt`` (presets.trtexec_flags). INT8
    from a Q/DQ graph is explicit: ``--int8`` alone (the scales are in the graph; its float
    layers stay FP32, as checked); ``implicit_int8``: the fp32 graph with a calibration cache
    (TensorRT's deprecated implicit path) and FP16 for the rest."""
    flags = trtexec_flags(tensorrt)
    fp16 = ["--fp16"] if implicit_int8 else []
    build = flags.build(workspace_mb, precision, qdq=not implicit_int8, dla_cores=max(dla_cores, dla_core + 1),
                        dla_core=dla_core if dla_core >= 0 else None, input_shapes=input_shapes, dynamic=dynamic,
                        opt_batch=opt_batch, max_batch=max_batch)
    return ["\"$TRTEXEC\"", f"--onnx={graph}", "--saveEngine=model.engine", *fp16, *build,
            "--timingCacheFile=timing.cache"]


def write_board_files(stage: Path, preset: ExportPreset | None, precision: str, input_shapes: dict[str, list],
                      dynamic: bool, batch: int, max_batch: int, dla_core: int, calib: np.ndarray | None,
                      summary: dict, graph: str = "model.onnx") -> list[str]:
    """build_engine.sh (from ``graph``: model.onnx, or the checked model.fp16/int8.onnx), the
    implicit-INT8 fallback (calibrate_int8.py, calib_data.npy) and README.md."""
    workspace = preset.workspace_mb if preset else 1024
    board = f"{preset.board} (JetPack {preset.jetpack}, TensorRT {preset.tensorrt})" if preset else "the board"
    lines = ["#!/usr/bin/env bash",
             f"# Written by `python -m edgediag.export` (edgediag {__version__}) for {board}.",
             "# Run on the board, in this folder: bash build_engine.sh [extra trtexec flags]",
             "set -euo pipefail", 'cd "$(dirname "$0")"',
             'TRTEXEC=${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}',
             'if [ ! -x "$TRTEXEC" ]; then TRTEXEC=trtexec; fi']
    files = ["build_engine.sh", "README.md"]
    trt_version, dla_cores = (preset.tensorrt, preset.dla_cores) if preset else ("10.3", 0)
    cmd = trtexec_command(input_shapes, precision, workspace, dynamic, batch, max_batch, dla_core, graph,
                          tensorrt=trt_version, dla_cores=dla_cores)
    if precision == "int8":
        implicit = trtexec_command(input_shapes, precision, workspace, dynamic, batch, max_batch, dla_core,
                                   implicit_int8=True, tensorrt=trt_version, dla_cores=dla_cores)
        lines += [f"# INT8 is explicit: {graph} carries Q/DQ scales checked with ONNX Runtime at export.",
                  "# Fallback for a TensorRT that cannot build it (not checked here): EDGEDIAG_IMPLICIT_INT8=1",
                  "# calibrates model.onnx with the deprecated implicit calibrator over calib_data.npy.",
                  'if [ "${EDGEDIAG_IMPLICIT_INT8:-0}" = 1 ]; then',
                  "  if [ ! -f calib.cache ]; then",
                  f"    python3 calibrate_int8.py --onnx model.onnx --calib calib_data.npy --cache calib.cache "
                  f"--batch {batch} --workspace-mb {workspace}" + (f" --dla-core {dla_core}" if dla_core >= 0 else ""),
                  "  fi",
                  "  " + " \\\n    ".join(implicit) + ' "$@"',
                  "  exit 0",
                  "fi"]
        (stage / "calibrate_int8.py").write_text(TRT_TOOL.read_text())
        np.save(stage / "calib_data.npy", calib.astype(np.float32))
        files += ["calibrate_int8.py", "calib_data.npy"]
    lines.append(" \\\n  ".join(cmd) + ' "$@"')
    script = stage / "build_engine.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o777 & ~current_umask())  # executable, readable as the user's umask allows
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
    if precision in ("fp16", "int8"):
        lines += [f"| `model.{precision}.onnx` | the {precision} graph the engine is built from"
                  + (" (explicit Q/DQ scales)" if precision == "int8" else "")
                  + f", checked against fp32 at export: {summary.get('reduced_line', 'see export.json')} |"]
    if precision == "int8":
        lines += ["| `calibrate_int8.py`, `calib_data.npy` | fallback only (`EDGEDIAG_IMPLICIT_INT8=1`): TensorRT's "
                  "deprecated implicit calibrator on model.onnx, not checked at export |"]
    lines += ["| `golden.npz`, `verify.json`, `manifest.json` | `python3 -m edgediag.verify . --engine model.engine` "
              "checks digests and golden outputs (build_engine.sh in edgediag's jetson/ runs it) |",
              "", "## On the board", "", "```bash", "bash build_engine.sh        # -> model.engine, timing.cache",
              "/usr/src/tensorrt/bin/trtexec --loadEngine=model.engine   # a quick latency check", "```", "",
              f"Precision: {precision}. The ONNX graph matched PyTorch where it was exported "
              f"({summary.get('parity_line', 'see export.json')}). The engine is built on the board: verify it "
              "there before use (`python3 -m edgediag.verify . --engine model.engine`, exit 0 = its golden outputs "
              "and decisions match)."]
    if compat:
        lines += ["", "TensorRT parser check (static, from the onnx-tensorrt tables, not verified on a device): "
                  + compat]
    return "\n".join(lines) + "\n"


def build_trt_here(stage: Path, graph_path: Path, preset: ExportPreset | None, precision: str, batch: int,
                   max_batch: int, dla_core: int, calib: np.ndarray | None) -> dict:
    """Engine, timing cache (and calibration cache) built in this process."""
    from edgediag.deploy.trt_engine import build_engine  # imports tensorrt: only where it is installed

    info = build_engine(str(graph_path), str(stage / "model.engine"), precision,
                        preset.workspace_mb if preset else 1024, calib, batch,
                        str(stage / "calib.cache") if precision == "int8" else None,
                        str(stage / "timing.cache"), dla_core, batch, max_batch)
    return {"status": "built", **info}
