#!/usr/bin/env bash
# Build a TensorRT engine on the Jetson from an edgediag export folder.
#
#   jetson/build_engine.sh [--dry-run] EXPORT_DIR [PRESET] [extra trtexec flags...]
#
# --dry-run prints every step (build, verify, latency) without running any.
#
# EXPORT_DIR: the folder `python -m edgediag.export` wrote (model.onnx, export.json, and, for
# `--target trt` without a GPU, build_engine.sh with the preset's exact trtexec command).
# If that folder has its own build_engine.sh (written for the preset it was exported with,
# including INT8 calibration and dynamic shapes) it is run. Otherwise the command is built
# here from PRESET (export/presets/<board>.yaml or a path): precision = default_precision
# (or $PRECISION; fp16/int8 build model.fp16.onnx / model.int8.onnx, the graphs an export with
# --precision fp16/int8 checked against fp32; INT8 is explicit Q/DQ, no calibration here),
# builder workspace = workspace_mb. Static-batch graphs only (the export default).
# Then `python3 -m edgediag.verify EXPORT_DIR --engine model.engine` (digests + golden parity;
# the script fails if it fails) and a one-line latency check with trtexec --loadEngine.
set -euo pipefail

usage() { echo "usage: $0 [--dry-run] EXPORT_DIR [PRESET] [extra trtexec flags]" >&2; exit 2; }
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
# run a step, or in a dry run print it
step() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }
[ $# -ge 1 ] || usage
EXPORT_DIR=$(cd "$1" && pwd) || { echo "error: export folder not found: $1" >&2; exit 2; }
shift
[ -f "$EXPORT_DIR/model.onnx" ] || { echo "error: no model.onnx in $EXPORT_DIR" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)

TRTEXEC=${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}
if [ ! -x "$TRTEXEC" ]; then TRTEXEC=$(command -v trtexec || true); fi
[ -n "$TRTEXEC" ] || [ "$DRY" = 1 ] || { echo "error: trtexec not found (JetPack: /usr/src/tensorrt/bin/trtexec; or set TRTEXEC)" >&2; exit 2; }
TRTEXEC=${TRTEXEC:-trtexec}
export TRTEXEC

if [ -x "$EXPORT_DIR/build_engine.sh" ] || [ -f "$EXPORT_DIR/build_engine.sh" ]; then
  echo "running the export's own build script: $EXPORT_DIR/build_engine.sh"
  step bash "$EXPORT_DIR/build_engine.sh" "$@"
else
  PRESET=${1:-}
  [ -n "$PRESET" ] || { echo "error: $EXPORT_DIR has no build_engine.sh: name a preset (e.g. orin-nano)" >&2; exit 2; }
  shift
  if [ ! -f "$PRESET" ]; then PRESET="$HERE/../export/presets/$PRESET.yaml"; fi
  [ -f "$PRESET" ] || { echo "error: preset not found: $PRESET" >&2; exit 2; }
  # flat `key: value` YAML: read one key (quotes and comments stripped)
  key() { sed -n "s/^$1:[[:space:]]*\([^#]*\).*/\1/p" "$PRESET" | tr -d "\"' " ; }
  PRECISION=${PRECISION:-$(key default_precision)}
  WORKSPACE=$(key workspace_mb)
  # fp16/int8: the graph of that precision the export checked against fp32, where it wrote one
  GRAPH=model.onnx
  case "$PRECISION" in
    fp32) FLAGS=() ;;
    fp16) FLAGS=(--fp16); [ -f "$EXPORT_DIR/model.fp16.onnx" ] && GRAPH=model.fp16.onnx ;;
    int8) [ -f "$EXPORT_DIR/model.int8.onnx" ] || { echo "error: INT8 needs the checked Q/DQ graph: export with --precision int8" >&2; exit 2; }
          FLAGS=(--int8); GRAPH=model.int8.onnx ;;  # explicit: the scales are in the graph
    *) echo "error: unknown precision '$PRECISION' in $PRESET" >&2; exit 2 ;;
  esac
  echo "building $GRAPH for $(key board) (JetPack $(key jetpack), TensorRT $(key tensorrt)), $PRECISION, workspace ${WORKSPACE:-1024} MiB"
  (cd "$EXPORT_DIR" && step "$TRTEXEC" --onnx="$GRAPH" --saveEngine=model.engine "${FLAGS[@]}" \
      --memPoolSize=workspace:"${WORKSPACE:-1024}" --timingCacheFile=timing.cache "$@")
fi

[ "$DRY" = 1 ] || [ -f "$EXPORT_DIR/model.engine" ] || { echo "error: no model.engine was written" >&2; exit 1; }
echo "engine: $EXPORT_DIR/model.engine"
# parity before use: the bundle's digests, then its golden inputs through the engine against the
# PyTorch references recorded at export (tolerance of the engine's precision); any mismatch fails
# the script. edgediag is imported from the source tree (PYTHONPATH, default: beside jetson/).
if [ -f "$EXPORT_DIR/manifest.json" ]; then
  echo "verifying the engine: python3 -m edgediag.verify $EXPORT_DIR --engine $EXPORT_DIR/model.engine"
  VERIFY_ARGS=()
  [ -n "${PRECISION:-}" ] && VERIFY_ARGS=(--precision "$PRECISION")
  PYTHONPATH="${PYTHONPATH:-$HERE/..}" step ${PYTHON:-python3} -m edgediag.verify "$EXPORT_DIR" \
      --engine "$EXPORT_DIR/model.engine" "${VERIFY_ARGS[@]}" \
    || { echo "error: the engine failed verification (above): do not use it" >&2; exit 1; }
else
  echo "warning: $EXPORT_DIR has no manifest.json (exported by an older edgediag): engine not verified" >&2
fi
# latency of the engine alone (GPU compute, no pre-processing): trtexec's summary lines
step "$TRTEXEC" --loadEngine="$EXPORT_DIR/model.engine" --iterations=200 --warmUp=500 2>&1 \
  | grep -E "^\+|Throughput|Latency: min|GPU Compute Time: min" || true
echo "compare the engine with the graph on real data: python3 -m edgediag.bench --checkpoint $EXPORT_DIR/model.onnx $EXPORT_DIR/model.engine --out bench/"
