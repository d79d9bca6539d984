"""`python -m edgediag.monitor`: watch a stream (wav, folder, microphone, video, CSV on stdin)
with an exported model and raise alarms, one JSON event per line.

    python -m edgediag.monitor --checkpoint export/fan/model.onnx --source line.wav --out events.jsonl
    sensor_reader | python -m edgediag.monitor --checkpoint model.onnx --source - --rate 1000

(``--model`` is the old spelling of ``--checkpoint``, still accepted.)

Windows, the alarm rule and the false-alarm rate it promises, smoothing, hysteresis, input
flags and health events: :mod:`edgediag.runtime.monitor`. In short: the artifact's threshold
is calibrated so that a fraction ``train.target_far`` (default 0.1) of normal windows score
above it; the monitor alarms when K of the last N windows do, with K/N the shortest vote
whose expected false alarms stay under ``--false-alarms-per-hour`` (default 1): for a 1 s
model scored every 0.5 s, 7 of 7, an alarm about 4 s after a fault begins.
"""

from __future__ import annotations

from edgediag import cli
from edgediag.runtime.monitor import run


def parser():
    p = cli.make_parser("monitor", "Monitor a stream (wav, folder, microphone, video, CSV) with an exported model. "
                        "The alarm: K of the last N windows above the threshold; by default the shortest K/N whose "
                        "expected false alarms per hour, at the per-window false-alarm rate the threshold was "
                        "calibrated for (train --target-far) and with non-overlapping windows independent, stay "
                        "under --false-alarms-per-hour. The rule and its bound are printed at the start and "
                        "recorded in the summary event.")
    artifact = p.add_argument("--checkpoint", required=True, metavar="PATH",
                              help="the artifact to monitor with: model.onnx, model.engine or a model.pt checkpoint")
    cli.add_alias(p, artifact, "--model")  # the old spelling
    p.add_argument("--source", required=True,
                   help="file.wav|.flac, a folder to watch, mic:[N], video file, camera:N, or - (CSV on stdin)")
    p.add_argument("--window", type=float, help="window length in seconds (default: the model's input length)")
    p.add_argument("--hop", type=float, help="seconds between windows (default: half a window)")
    p.add_argument("--threshold", type=float, help="on-threshold (default: the artifact's calibrated threshold)")
    p.add_argument("--off-threshold", type=float, help="alarm OFF below this (default: 10%% of |on| below on)")
    p.add_argument("--alarm-rule", default="auto", metavar="auto|K/N",
                   help="alarm when K of the last N windows score above the threshold; auto (default): the "
                        "shortest vote that keeps false alarms under --false-alarms-per-hour, given the "
                        "per-window false-alarm rate the threshold was calibrated for (1/1 where there is none)")
    p.add_argument("--false-alarms-per-hour", type=float, default=1.0,
                   help="auto rule: bound on the expected false alarms per hour of normal running (default 1)")
    p.add_argument("--window-far", type=float, metavar="P",
                   help="per-window false-alarm rate at the threshold (default: the artifact's calibrated "
                        "train.target_far, used only with its threshold, window length and unsmoothed scores)")
    p.add_argument("--min-duration", type=float, default=0.0,
                   help="seconds the vote must hold before the alarm (default 0)")
    p.add_argument("--smooth", type=int, default=1,
                   help="smooth scores over the last K windows (default 1 = off; >1 needs --window-far for auto)")
    p.add_argument("--smooth-mode", default="median", choices=["median", "ema"],
                   help="how --smooth K combines the scores: the median of the last K (default) or an exponential "
                        "moving average with weight 2/(K+1) on the newest")
    p.add_argument("--out", metavar="FILE", help="append JSON-lines events to this file (default: stdout)")
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
    return p


def main(argv=None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    cli.entry(main)
