"""The stream monitor behind `python -m edgediag.monitor` (the verb parses, :func:`run`
monitors): watch a stream with an exported model and raise alarms.

    python -m edgediag.monitor --checkpoint export/fan/model.onnx --source line.wav --out events.jsonl
    python -m edgediag.monitor --checkpoint model.onnx --source incoming/ --smooth 3 --min-duration 1
    python -m edgediag.monitor --checkpoint model.onnx --source mic:0          # needs edgediag[mic]
    python -m edgediag.monitor --checkpoint model.onnx --source camera:0 --fps 2
    sensor_reader | python -m edgediag.monitor --checkpoint model.onnx --source - --rate 1000

Sources: a wav/flac file; a directory watched for new audio files (each processed once, in
name order; ``--once`` stops when the files present are done); ``mic:``/``mic:N``
(sounddevice); a video file or ``camera:N`` (OpenCV); ``-`` = CSV lines on stdin
(``t,v1,v2,...``, or values only with ``--rate``).

The stream is cut into windows of ``--window`` seconds every ``--hop`` seconds (default: the
model's input length and half of it), each window scored by the artifact
(``edgediag.runtime``); streaming graphs instead get each new time step once, with their
states carried between windows (``--stream-reset S`` zeroes them every S seconds: a model
that pools over all its steps otherwise averages over the whole stream).

The alarm rule and what it promises. Training calibrates the threshold so that a fraction
p = ``train.target_far`` (default 0.1) of normal items (windows of the model's length) score
above it (the artifact's ``threshold_calibration``), so one window above it is no evidence:
alarming on single windows every 0.5 s raises hundreds of false alarms an hour. The alarm
turns ON when K of the last N windows score above the on-threshold (``--threshold``, default
the artifact's) for ``--min-duration`` seconds (default 0), OFF when fewer than K of the
last N are at or above the off-threshold (``--off-threshold``, default 10 % of |on| below
on). ``--alarm-rule auto`` (default) takes the shortest K/N whose expected false alarms per
hour of normal running stay under ``--false-alarms-per-hour`` (default 1), bounded by
:func:`edgediag.runtime.alarm.false_alarms_per_hour` assuming normal windows that do not overlap score
independently. A 1 s model every 0.5 s at p = 0.1: 7 of 7 (at most 0.72/hour), an alarm
about window + (K - 1) * hop = 4 s after a fault whose windows score above the threshold; a
5 s model at hop 2.5 s: 7 of 7 too, 20 s (short windows alarm fast). The rule and its rate
(also at the calibration's 95 % upper bound on p) go to stderr and to the summary event's
``alarm_rule``; a rate is stated only where the monitor scores what was calibrated (the
artifact's threshold, the model's window length, unsmoothed scores of a window graph) or
``--window-far P`` gives p; else the rule is 1 of 1, nothing promised. ``--alarm-rule K/N``
sets the vote (N > K tolerates fault windows dipping below the threshold); ``--smooth`` K
smooths scores (median or EMA) before the vote. The promise is only as good as p.

Problems in the input never stop the monitor: NaN/inf samples (set to 0),
clipped audio (|x| >= 0.999 in more than 1 % of a window), dropouts (gaps in CSV timestamps
or between a watched folder's files, microphone overflows), unreadable files or CSV rows and resampling (source rate != model rate, flagged once) become
``flags`` of the window's event.

Events (JSON lines, to ``--out`` appended and flushed per line, else stdout):
``{"type": "window", "t", "score", "smoothed", "state", "alarm", "flags", "latency_ms"}``
(``t`` = end of the window in stream seconds; ``change`` = "on"/"off" when the alarm flips;
``votes`` = how many of the last N windows are above the on-threshold, where N > 1),
and every ``--health-every`` stream seconds ``{"type": "health", "rtf", "latency_p50/p95/p99",
"rss_mb", ...}``; ``--events changes`` writes only alarm changes, flagged windows and health;
the last line is ``{"type": "summary", "alarms", "state", "alarm_rule", ...}``.
Memory is bounded: ring buffers and fixed-size deques only.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgediag.errors import UserError
from edgediag.runtime.alarm import AlarmRule, choose_rule, parse_rule
from edgediag.runtime.predictor import load
from edgediag.runtime.sources import open_source

CLIP_LEVEL = 0.999  # full scale is 1.0
CLIP_FRACTION = 0.01


# --- smoothing and hysteresis -------------------------------------------------------------------
class Smoother:
    """Median (robust to one-window spikes) or EMA over the last ``k`` scores; k=1 = raw."""

    def __init__(self, k: int = 1, mode: str = "median"):
        if k < 1:
            raise UserError(f"--smooth must be >= 1, not {k}")
        if mode not in ("median", "ema"):
            raise UserError(f"--smooth-mode must be median or ema, not {mode!r}")
        self.k, self.mode = k, mode
        self.recent: collections.deque = collections.deque(maxlen=k)
        self.ema: float | None = None

    def __call__(self, score: float) -> float:
        if not math.isfinite(score):  # a broken score must not poison the EMA forever
            return self.ema if (self.mode == "ema" and self.ema is not None) else score
        if self.mode == "ema":
            alpha = 2.0 / (self.k + 1)
            self.ema = score if self.ema is None else alpha * score + (1 - alpha) * self.ema
            return self.ema
        self.recent.append(score)
        return float(np.median(self.recent))


class Hysteresis:
    """Alarm state machine on (smoothed) scores at stream times ``t``: a vote of ``votes``
    of the last ``of`` windows.

    The alarm turns ON once at least ``votes`` of the last ``of`` scores are above ``on``
    and that has held for ``min_duration`` seconds (0 = at once); it turns OFF when fewer
    than ``votes`` of the last ``of`` scores are at or above ``off``. ``state`` is "alarm",
    "pending" (some of the last ``of`` scores are above ``on``, not yet enough or not for
    long enough) or "normal". With 1 of 1 (the default): ON when the score exceeds ``on``
    for ``min_duration``, OFF when it drops below ``off``."""

    def __init__(self, on: float, off: float | None = None, min_duration: float = 0.0,
                 votes: int = 1, of: int = 1):
        if not math.isfinite(on):
            raise UserError("no decision threshold: the artifact has none calibrated; pass --threshold T")
        self.on = float(on)
        self.off = float(off) if off is not None else default_off(self.on)
        if self.off > self.on:
            raise UserError(f"--off-threshold {self.off:g} is above the on-threshold {self.on:g}")
        if not 1 <= votes <= of:
            raise UserError(f"--alarm-rule {votes}/{of}: need 1 <= K <= N")
        self.min_duration = float(min_duration)
        self.votes, self.of = int(votes), int(of)
        self.above_on: collections.deque = collections.deque(maxlen=self.of)
        self.above_off: collections.deque = collections.deque(maxlen=self.of)
        self.state = "normal"
        self.since: float | None = None

    @property
    def alarm(self) -> bool:
        return self.state == "alarm"

    @property
    def count(self) -> int:
        """How many of the last ``of`` scores are above the on-threshold."""
        return sum(self.above_on)

    def update(self, t: float, score: float) -> str | None:
        """Advance to time ``t``; returns "on"/"off" when the alarm flips, else None."""
        if not math.isfinite(score):
            return None  # hold the state through an unscorable window
        self.above_on.append(score > self.on)
        self.above_off.append(score >= self.off)
        if self.state == "alarm":
            if sum(self.above_off) < self.votes:
                self.state, self.since = "normal", None
                return "off"
            return None
        if sum(self.above_on) >= self.votes:
            if self.since is None:
                self.since = t
            if t - self.since >= self.min_duration - 1e-9:
                self.state = "alarm"
                return "on"
            self.state = "pending"
            return None
        self.since = None
        self.state = "pending" if any(self.above_on) and self.of > 1 else "normal"
        return None


def default_off(on: float) -> float:
    """10 % of |on| below the on-threshold (the normal score spread is not in the metadata)."""
    return on - 0.1 * abs(on)


def calibration_of(pred) -> dict:
    """The artifact's threshold calibration report (``threshold_calibration``: target_far,
    n_normals, far_on_calibration, far_ci95); {} where it has none."""
    cal = pred.metadata.get("threshold_calibration")
    return dict(cal) if isinstance(cal, dict) else {}


# --- health -------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Current resident set size (not the peak), from /proc; NaN where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


class Health:
    """Real-time factor and latency percentiles over a fixed-size window of recent scores."""

    def __init__(self, keep: int = 1024):
        self.latencies: collections.deque = collections.deque(maxlen=keep)
        self.threads: int | None = None  # the inference threads the latencies were taken with (None: the runtime's)
        self.stream_s = 0.0
        self.busy_s = 0.0
        self.windows = 0
        self.flag_counts: collections.Counter = collections.Counter()

    def report(self, t: float) -> dict:
        ms = np.asarray(self.latencies) if self.latencies else np.asarray([float("nan")])
        return {"type": "health", "t": round(t, 4), "rtf": round(self.stream_s / max(self.busy_s, 1e-9), 2),
                "latency_p50": round(float(np.percentile(ms, 50)), 3),
                "latency_p95": round(float(np.percentile(ms, 95)), 3),
                "latency_p99": round(float(np.percentile(ms, 99)), 3), "threads": self.threads,
                "rss_mb": round(rss_mb(), 1), "windows": self.windows, "flags": dict(self.flag_counts)}


# --- the monitor core (source-agnostic) ---------------------------------------------------------
@dataclass
class Settings:
    window: float | None = None  # seconds (frames for video at --fps); None = the model's
    hop: float | None = None
    threshold: float | None = None
    off_threshold: float | None = None
    min_duration: float = 0.0
    smooth: int = 1
    smooth_mode: str = "median"
    alarm_rule: str = "auto"  # "auto" (derived from the per-window false-alarm rate) or "K/N"
    false_alarms_per_hour: float = 1.0  # what "auto" keeps the expected false alarms under
    window_far: float | None = None  # per-window false-alarm rate at the threshold; None = the artifact's
    health_every: float = 60.0
    audio_levels: bool = True  # check clipping (full-scale audio sources only)
    source_rate: float | None = None  # the time base when the model records no rate (video fps, CSV --rate)
    stream_reset: float = 0.0  # streaming graphs: zero the states every this many seconds (0 = never)
    extra: dict = field(default_factory=dict)  # added to every window event


class Monitor:
    """Windows -> scores -> smoothing -> hysteresis -> events, for one stream.

    ``push(data, flags)`` takes the next samples ``(n,)``/``(n, C)`` (or video frames) at the
    model's rate and yields the events that became due; memory is one window's ring buffer."""

    def __init__(self, predictor, settings: Settings):
        self.pred, self.s = predictor, settings
        prep = predictor.preprocess
        self.prep = prep
        self.unit = prep.unit
        self.rate = float(prep.rate or settings.source_rate or 0)
        if self.unit == "samples" and prep.rate == 0 and not self.rate:
            self.rate = 1.0  # sensor rows without a recorded rate: time in rows
        model_window = prep.window
        if settings.window and not predictor.streaming:  # a streaming graph's window is the model's
            # (its features are cut there); a window graph pads/crops like the reader does
            self.window = max(1, int(round(settings.window * self.rate)))
        else:
            self.window = model_window
        if self.unit == "frames" and prep.kind == "image":
            self.window = 1
        self.hop = max(1, int(round(settings.hop * self.rate))) if settings.hop else max(1, self.window // 2)
        if prep.kind == "image":
            self.hop = 1
        self.stream_steps = 0
        if predictor.streaming:
            self._init_streaming()
        on = predictor.threshold if settings.threshold is None else settings.threshold
        self.rule = self._alarm_rule(model_window)
        self.hyst = Hysteresis(on, settings.off_threshold, settings.min_duration, self.rule.votes, self.rule.of)
        self.smoother = Smoother(settings.smooth, settings.smooth_mode)
        chans = prep.channels if self.unit == "samples" else None
        self.buf = (np.zeros((self.window, chans), np.float32) if chans and chans > 1
                    else np.zeros(self.window, np.float32)) if self.unit == "samples" else None
        self.frames: collections.deque = collections.deque(maxlen=self.window)
        self.filled = 0  # samples in buf (up to window)
        self.since_emit = 0
        self.total = 0  # samples/frames pushed
        self.pending_flags: set[str] = set()
        self.health = Health()
        self.next_health = settings.health_every

    def _init_streaming(self) -> None:
        """Streaming graphs: every window's features, but each frame is fed to step() once."""
        prep = self.prep
        hop_len = getattr(prep, "hop_length", 1)
        if self.hop % hop_len:  # a hop must be whole feature frames so frames line up across windows
            self.hop = max(hop_len, int(round(self.hop / hop_len)) * hop_len)
        self.states = self.pred.initial_states(1)
        self.fed_until = 0  # absolute index (in feature frames) of the next frame to feed
        # a streaming model pools over every step since its states were zero; a reset bounds
        # that context (e.g. to the training windows' length) so old normal data cannot dilute a change
        self.reset_steps = int(round(self.s.stream_reset * self.rate / hop_len)) if self.s.stream_reset else 0
        self.since_reset = 0

    def _alarm_rule(self, model_window: int) -> AlarmRule:
        """The vote: given (``--alarm-rule K/N``) or derived (``auto``) from the per-window
        false-alarm rate - ``--window-far``, else the artifact's calibration report where
        the monitor scores what was calibrated (the artifact's threshold, windows of the
        model's length, raw scores of a window graph) - so the expected false alarms per
        hour stay under ``--false-alarms-per-hour``. Without a rate: 1 of 1, nothing promised."""
        s = self.s
        window_s = self.window / self.rate if self.rate else float(self.window)
        hop_s = self.hop / self.rate if self.rate else float(self.hop)
        given = parse_rule(s.alarm_rule)
        if s.false_alarms_per_hour is None or not s.false_alarms_per_hour > 0:
            raise UserError(f"--false-alarms-per-hour must be positive, not {s.false_alarms_per_hour}")
        p = hi = None
        note = ""
        if s.window_far is not None:
            if not 0 < s.window_far < 1:
                raise UserError(f"--window-far must be in (0, 1), not {s.window_far}")
            p = float(s.window_far)
        else:
            cal = calibration_of(self.pred)
            if not cal or not cal.get("n_normals"):
                note = "the artifact carries no threshold calibration (train --target-far); pass --window-far P"
            elif s.threshold is not None:
                note = "--threshold replaces the calibrated threshold; pass --window-far P for its rate"
            elif self.window != model_window:
                note = "--window differs from the length the threshold was calibrated on; pass --window-far P"
            elif self.pred.streaming:
                note = "a streaming graph's scores pool over its carried states; pass --window-far P"
            elif s.smooth > 1:
                note = "--smooth changes the per-window false-alarm rate; pass --window-far P for the smoothed score"
            else:
                p = max(float(cal.get("target_far", 0.0)), float(cal.get("far_on_calibration", 0.0)))
                ci = cal.get("far_ci95") or []
                hi = float(ci[1]) if len(ci) == 2 and math.isfinite(float(ci[1])) else None
                if not 0 < p < 1:
                    p, note = None, f"the artifact's calibrated false-alarm rate {p:g} is unusable; pass --window-far P"
        if given is not None:
            votes, of = given
        elif p is not None:
            votes, of = choose_rule(p, window_s, hop_s, s.false_alarms_per_hour)
        else:
            votes, of = 1, 1
        return AlarmRule(votes, of, window_s, hop_s, p, hi, note, s.min_duration)

    @property
    def t(self) -> float:
        return self.total / self.rate if self.rate else float(self.total)

    def push(self, data: np.ndarray, flags: tuple[str, ...] | set[str] = ()) -> Iterator[dict]:
        self.pending_flags.update(flags)
        if self.unit == "frames":
            for frame in data:
                self.frames.append(frame)
                self.total += 1
                self.since_emit += 1
                if len(self.frames) == self.window and self.since_emit >= self.hop:
                    self.since_emit = 0
                    yield from self._emit(np.stack(self.frames))
            return
        data = np.asarray(data, dtype=np.float32)
        if self.buf.ndim == 2 and data.ndim == 1:
            data = data.reshape(-1, self.buf.shape[1])
        pos = 0
        while pos < len(data):
            # take samples up to the next emission point, so windows land exactly every hop
            need = self.hop - self.since_emit if self.filled >= self.window else \
                max(self.window - self.filled, self.hop - self.since_emit)
            part = data[pos:pos + max(1, need)]
            pos += len(part)
            n = len(part)
            if n >= self.window:
                self.buf[:] = part[-self.window:]
            else:
                self.buf[:-n] = self.buf[n:]
                self.buf[-n:] = part
            self.filled = min(self.window, self.filled + n)
            self.total += n
            self.since_emit += n
            if self.filled >= self.window and self.since_emit >= self.hop:
                self.since_emit = 0
                yield from self._emit(self.buf)

    def _check(self, window: np.ndarray) -> tuple[np.ndarray, list[str]]:
        flags = sorted(self.pending_flags)
        self.pending_flags.clear()
        finite = np.isfinite(window)
        if not finite.all():
            window = np.where(finite, window, 0.0).astype(np.float32)
            flags.append("nan")
        if self.s.audio_levels and self.unit == "samples" and \
                np.mean(np.abs(window) >= CLIP_LEVEL) > CLIP_FRACTION:
            flags.append("clipped")
        return window, flags

    def _emit(self, window: np.ndarray) -> Iterator[dict]:
        t0 = time.perf_counter()
        window, flags = self._check(window)
        x = self.pred.prepare(window)
        score = self._stream_score(x) if self.pred.streaming else float(self.pred.score(x[None])[0])
        latency = (time.perf_counter() - t0) * 1e3
        smoothed = self.smoother(score)
        change = self.hyst.update(self.t, smoothed)
        h = self.health
        h.latencies.append(latency)
        h.windows += 1
        h.flag_counts.update(flags)
        event = {"type": "window", "t": round(self.t, 4), "score": _num(score), "smoothed": _num(smoothed),
                 "state": self.hyst.state, "alarm": self.hyst.alarm, "flags": flags,
                 "latency_ms": round(latency, 3), **self.s.extra}
        if self.rule.of > 1:
            event["votes"] = self.hyst.count  # of the last `of` windows, above the on-threshold
        if change:
            event["change"] = change
        yield event
        if self.t >= self.next_health:
            self.next_health = self.t + self.s.health_every
            yield h.report(self.t)

    def _stream_score(self, feats: np.ndarray) -> float:
        """Feed the window's frames not fed yet (skipping the last ones whose STFT frame
        reaches past the window: they are fed from the next window, where they are whole)."""
        prep = self.prep
        hop_len = getattr(prep, "hop_length", 1)
        n_frames = len(feats)
        first_abs = (self.total - self.window) // hop_len  # absolute index of feats[0]
        stop = n_frames - prep.edge_frames
        start = max(0, self.fed_until - first_abs)
        if start > stop:  # a dropout or reset: restart from this window
            start = 0
        out = None
        for i in range(start, stop):
            if self.reset_steps and self.since_reset >= self.reset_steps:
                self.states, self.since_reset = self.pred.initial_states(1), 0
            out, self.states = self.pred.step(feats[i][None], self.states)
            self.since_reset += 1
        self.fed_until = first_abs + stop
        self.stream_steps += max(0, stop - start)
        if out is None:
            return float("nan")
        return float(np.asarray(out[next(iter(out))]).reshape(-1)[0])

    def account(self, stream_s: float, busy_s: float) -> None:
        self.health.stream_s += stream_s
        self.health.busy_s += busy_s


def _num(v: float):
    return round(float(v), 6) if math.isfinite(v) else None


class EventLog:
    """``--out``: JSON lines appended and flushed per line, the file opened at the first event,
    so a run that fails first (a bad model or source) leaves no empty log behind."""

    def __init__(self, path: str):
        self.path, self.file = Path(path), None
        if self.path.is_dir():
            raise UserError(f"--out {path} is a folder; name the events file (e.g. {self.path / 'events.jsonl'})")
        if not self.path.parent.is_dir():
            raise UserError(f"--out {path}: folder {self.path.parent} does not exist")

    def write(self, line: str) -> None:
        if self.file is None:
            try:
                self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 - a log, line-flushed
            except OSError as exc:
                raise UserError(f"--out {self.path}: cannot write ({exc.strerror or exc})") from None
        self.file.write(line)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# --- the monitor loop (python -m edgediag.monitor parses its command line) ---------------------
def run(args) -> int:
    """Monitor the stream the command line ``args`` (the verb's parser) names; the exit code."""
    if args.window is not None and args.window <= 0 or args.hop is not None and args.hop <= 0:
        raise UserError("--window and --hop must be positive seconds")
    for flag, value, least in (("--fps", args.fps, None), ("--rate", args.rate, None),
                               ("--health-every", args.health_every, None), ("--min-duration", args.min_duration, 0.0),
                               ("--max-seconds", args.max_seconds, 0.0), ("--stream-reset", args.stream_reset, 0.0)):
        if value is not None and not (value >= least if least is not None else value > 0):
            raise UserError(f"{flag} must be {'>= 0' if least is not None else 'positive'}, not {value}")
    events = EventLog(args.out) if args.out else None  # checked now, opened at the first event
    pred = load(args.checkpoint, threads=args.threads, device=args.device, streaming=args.streaming)
    chunks, fps, audio_levels = open_source(args, pred)
    settings = Settings(window=args.window, hop=args.hop, threshold=args.threshold, off_threshold=args.off_threshold,
                        min_duration=args.min_duration, smooth=args.smooth, smooth_mode=args.smooth_mode,
                        alarm_rule=args.alarm_rule, false_alarms_per_hour=args.false_alarms_per_hour,
                        window_far=args.window_far,
                        health_every=args.health_every, audio_levels=audio_levels, source_rate=fps,
                        stream_reset=args.stream_reset)
    mon = Monitor(pred, settings)
    mon.health.threads = args.threads
    out = events or sys.stdout
    status = sys.stderr.isatty()
    alarms = 0
    last = None
    announced = False
    try:
        t_busy = time.perf_counter()
        for data, flags in chunks:
            if data is None:  # an idle poll: not busy time
                t_busy = time.perf_counter()
                continue
            if not announced:  # the source opened: say the rule and what it promises
                print(mon.rule.describe(), file=sys.stderr)
                announced = True
            t_before = mon.t
            for ev in mon.push(data, flags):
                alarms += ev.get("change") == "on"
                if ev["type"] == "window":
                    last = ev
                if args.events == "all" or ev["type"] == "health" or ev.get("change") or ev.get("flags"):
                    out.write(json.dumps(ev) + "\n")
                    out.flush()
                if status and ev["type"] == "window":
                    h = mon.health
                    print(f"\r t={ev['t']:9.2f}s score={ev['score']} smoothed={ev['smoothed']} {ev['state']:7s} "
                          f"rtf={h.stream_s / max(h.busy_s, 1e-9):7.1f}x", end="", file=sys.stderr, flush=True)
            now = time.perf_counter()
            mon.account(mon.t - t_before, now - t_busy)
            t_busy = now
            if args.max_seconds and mon.t >= args.max_seconds:
                break
        final = mon.health.report(mon.t)
        final["type"] = "summary"
        final["alarms"] = int(alarms)
        final["state"] = mon.hyst.state
        final["alarm_rule"] = mon.rule.as_dict()
        out.write(json.dumps(final) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
        if status:
            print(file=sys.stderr)
    if last is None:
        print(f"warning: the stream ended before one window of {mon.window} samples/frames", file=sys.stderr)
    print(f"{mon.health.windows} windows, {alarms} alarm(s), real-time factor {final['rtf']}x", file=sys.stderr)
    return 0
