#!/usr/bin/env bash
# Start the edgediag monitor on the board (used by edgediag-monitor.service; also by hand).
#
#   MODEL=/opt/edgediag/models/fan/model.engine SOURCE=mic:0 jetson/run_monitor.sh [extra monitor options]
#
# Settings come from the environment (the service reads /etc/default/edgediag-monitor):
#   MODEL    artifact: model.engine (TensorRT; model.onnx must stay beside it), model.onnx or model.pt
#   SOURCE   mic:N | camera:N | a folder to watch | a wav/video file | - (CSV on stdin)
#   EVENTS   events file, appended (default /var/lib/edgediag/events.jsonl)
#   MONITOR_ARGS  further options, e.g. "--smooth 3 --min-duration 1 --hop 0.5 --health-every 60"
#   EDGEDIAG_HOME  the edgediag source tree (default: this script's parent), put on PYTHONPATH
#   PYTHON   interpreter (default python3; a venv made with --system-site-packages sees JetPack's tensorrt)
#   THREADS  CPU threads for ONNX Runtime (default 1: leaves the other cores to the application)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
EDGEDIAG_HOME=${EDGEDIAG_HOME:-$(dirname "$HERE")}
PYTHON=${PYTHON:-python3}
: "${MODEL:?set MODEL to the artifact (model.engine / model.onnx)}"
: "${SOURCE:?set SOURCE (mic:0, camera:0, a folder, a file, or -)}"
EVENTS=${EVENTS:-/var/lib/edgediag/events.jsonl}
THREADS=${THREADS:-1}
mkdir -p "$(dirname "$EVENTS")"
# one thread per library: ONNX Runtime's own pool is set by --threads; keep BLAS/OpenMP from spawning more
export OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONPATH="$EDGEDIAG_HOME${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=cpu
case "$MODEL" in *.engine|*.plan) DEVICE=cuda ;; esac
# shellcheck disable=SC2086  # MONITOR_ARGS is a list of options
exec "$PYTHON" -m edgediag.monitor --checkpoint "$MODEL" --source "$SOURCE" --out "$EVENTS" \
  --threads "$THREADS" --device "$DEVICE" ${MONITOR_ARGS:-} "$@"
