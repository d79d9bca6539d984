"""`python -m edgediag.monitor`: watch a stream (wav, folder, microphone, video, CSV on stdin)
with an exported model and raise alarms, one JSON event per line.

    python -m edgediag.monitor --model export/fan/model.onnx --source line.wav --out events.jsonl
    sensor_reader | python -m edgediag.monitor --model model.onnx --source - --rate 1000

Windows, smoothing, hysteresis, input flags and health events: :mod:`edgediag.runtime.monitor`.
"""

from __future__ import annotations

from edgediag import cli
from edgediag.errors import UserError
from edgediag.runtime.monitor import run


def parser():
    p = cli.make_parser("monitor", "Monitor a stream (wav, folder, microphone, video, CSV) with an exported model.")
    p.add_argument("--model", required=True, metavar="ARTIFACT", help="model.onnx, model.engine or a model.pt checkpoint")
    p.add_argument("--source", required=True,
                   help="file.wav|.flac, a folder to watch, mic:[N], video file, camera:N, or - (CSV on stdin)")
    p.add_argument("--window", type=float, help="window length in seconds (default: the model's input length)")
    p.add_argument("--hop", type=float, help="seconds between windows (default: half a window)")
    p.add_argument("--threshold", type=float, help="on-threshold (default: the artifact's calibrated threshold)")
    p.add_argument("--off-threshold", type=float, help="alarm OFF below this (default: 10%% of |on| below on)")
    p.add_argument("--min-duration", type=float, default=0.0, help="seconds above the threshold before the alarm")
    p.add_argument("--smooth", type=int, default=1, help="smooth scores over the last K windows (default 1 = off)")
    p.add_argument("--smooth-mode", default="median", choices=["median", "ema"])
    p.add_argument("--out", help="append JSON-lines events to this file (default: stdout)")
    p.add_argument("--events", default="all", choices=["all", "changes"],
                   help="all windows, or only alarm changes, flagged windows and health")
    p.add_argument("--health-every", type=float, default=60.0, help="stream seconds between health events")
    p.add_argument("--rate", type=float, help="CSV on stdin: sample rate of value-only lines")
    p.add_argument("--fps", type=float, help="video/camera: frames per second to score")
    p.add_argument("--once", action="store_true", help="folder source: stop when the files present are done")
    cli.add_threads_arg(p, 1, "inference threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--streaming", action="store_true", help=".pt checkpoints: run the streaming module")
    p.add_argument("--stream-reset", type=float, default=0.0,
                   help="streaming graphs: zero the carried states every S seconds (default 0 = never)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop after this much stream time (0 = never)")

    def error(message):  # argparse's usage+error lines -> the project's one-line exit 2
        raise UserError(message)

    p.error = error
    return p


def main(argv=None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    cli.entry(main)
