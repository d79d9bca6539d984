"""TensorRT: build the engine here when tensorrt and a GPU are present, else the files that
build it on the board (trtexec command in build_engine.sh, INT8 calibration, a README)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgediag import __version__
from edgediag.deploy.presets import ExportPreset

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
    from edgediag.deploy.trt_engine import build_engine  # imports tensorrt: only where it is installed

    info = build_engine(str(graph_path), str(stage / "model.engine"), precision,
                        preset.workspace_mb if preset else 1024, calib, batch,
                        str(stage / "calib.cache") if precision == "int8" else None,
                        str(stage / "timing.cache"), dla_core, batch, max_batch)
    return {"status": "built", **info}
