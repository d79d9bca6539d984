"""The stream monitor behind `python -m edgediag.monitor` (the verb parses, :func:`run`
monitors): watch a stream with an exported model and raise alarms.

    python -m edgediag.monitor --model export/fan/model.onnx --source line.wav --out events.jsonl
    python -m edgediag.monitor --model model.onnx --source incoming/ --smooth 3 --min-duration 1
    python -m edgediag.monitor --model model.onnx --source mic:0          # needs edgediag[mic]
    python -m edgediag.monitor --model model.onnx --source camera:0 --fps 2
    sensor_reader | python -m edgediag.monitor --model model.onnx --source - --rate 1000

Sources: a wav/flac file; a directory watched for new audio files (each processed once, in
name order; ``--once`` stops when the files present are done); ``mic:``/``mic:N``
(sounddevice); a video file or ``camera:N`` (OpenCV); ``-`` = CSV lines on stdin
(``t,v1,v2,...``, or values only with ``--rate``).

The stream is cut into windows of ``--window`` seconds every ``--hop`` seconds (default: the
model's input length and half of it), each window scored by the artifact
(``edgediag.runtime``); streaming graphs instead get each new time step once, with their
states carried between windows (``--stream-reset S`` zeroes them every S seconds: a model
that pools over all its steps otherwise averages over the whole stream). Scores are
smoothed (median or EMA over ``--smooth`` windows) and go through a hysteresis: the alarm
turns ON once the smoothed score stays above the on-threshold (``--threshold``, default the artifact's calibrated one) for ``--min-duration``
seconds, and OFF when it drops below the off-threshold (``--off-threshold``, default 10 %
of |on| below on). Problems in the input never stop the monitor: NaN/inf samples (set to 0),
clipped audio (|x| >= 0.999 in more than 1 % of a window), dropouts (gaps in CSV timestamps
or between a watched folder's files, microphone overflows), unreadable files or CSV rows and resampling (source rate != model rate, flagged once) become
``flags`` of the window's event.

Events (JSON lines, to ``--out`` appended and flushed per line, else stdout):
``{"type": "window", "t", "score", "smoothed", "state", "alarm", "flags", "latency_ms"}``
(``t`` = end of the window in stream seconds; ``change`` = "on"/"off" when the alarm flips),
and every ``--health-every`` stream seconds ``{"type": "health", "rtf", "latency_p50/p95/p99",
"rss_mb", ...}``; ``--events changes`` writes only alarm changes, flagged windows and health.
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

import numpy as np

from edgediag.errors import UserError
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
    """Alarm state machine on smoothed scores at stream times ``t``.

    normal -> pending when the score exceeds ``on``; pending -> alarm once it has stayed above
    ``on`` for ``min_duration`` seconds (0 = at once); back to normal from pending as soon as it
    drops to ``on`` or below; alarm -> normal when it drops below ``off``."""

    def __init__(self, on: float, off: float | None = None, min_duration: float = 0.0):
        if not math.isfinite(on):
            raise UserError("no decision threshold: the artifact has none calibrated; pass --threshold T")
        self.on = float(on)
        self.off = float(off) if off is not None else default_off(self.on)
        if self.off > self.on:
            raise UserError(f"--off-threshold {self.off:g} is above the on-threshold {self.on:g}")
        self.min_duration = float(min_duration)
        self.state = "normal"
        self.since: float | None = None

    @property
    def alarm(self) -> bool:
        return self.state == "alarm"

    def update(self, t: float, score: float) -> str | None:
        """Advance to time ``t``; returns "on"/"off" when the alarm flips, else None."""
        if not math.isfinite(score):
            return None  # hold the state through an unscorable window
        if self.state == "alarm":
            if score < self.off:
                self.state, self.since = "normal", None
                return "off"
            return None
        if score > self.on:
            if self.since is None:
                self.since = t
            if t - self.since >= self.min_duration - 1e-9:
                self.state = "alarm"
                return "on"
            self.state = "pending"
        else:
            self.state, self.since = "normal", None
        return None


def default_off(on: float) -> float:
    """10 % of |on| below the on-threshold (the normal score spread is not in the metadata)."""
    return on - 0.1 * abs(on)


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
        self.stream_s = 0.0
        self.busy_s = 0.0
        self.windows = 0
        self.flag_counts: collections.Counter = collections.Counter()

    def report(self, t: float) -> dict:
        ms = np.asarray(self.latencies) if self.latencies else np.asarray([float("nan")])
        return {"type": "health", "t": round(t, 4), "rtf": round(self.stream_s / max(self.busy_s, 1e-9), 2),
                "latency_p50": round(float(np.percentile(ms, 50)), 3),
                "latency_p95": round(float(np.percentile(ms, 95)), 3),
                "latency_p99": round(float(np.percentile(ms, 99)), 3),
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
        self.hyst = Hysteresis(on, settings.off_threshold, settings.min_duration)
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


# --- the monitor loop (python -m edgediag.monitor parses its command line) ---------------------
def run(args) -> int:
    """Monitor the stream the command line ``args`` (the verb's parser) names; the exit code."""
    if args.window is not None and args.window <= 0 or args.hop is not None and args.hop <= 0:
        raise UserError("--window and --hop must be positive seconds")
    pred = load(args.model, threads=args.threads, device=args.device, streaming=args.streaming)
    chunks, fps, audio_levels = open_source(args, pred)
    settings = Settings(window=args.window, hop=args.hop, threshold=args.threshold, off_threshold=args.off_threshold,
                        min_duration=args.min_duration, smooth=args.smooth, smooth_mode=args.smooth_mode,
                        health_every=args.health_every, audio_levels=audio_levels, source_rate=fps,
                        stream_reset=args.stream_reset)
    mon = Monitor(pred, settings)
    out = open(args.out, "a", buffering=1) if args.out else sys.stdout  # noqa: SIM115 - a log, line-flushed
    status = sys.stderr.isatty()
    alarms = 0
    last = None
    try:
        t_busy = time.perf_counter()
        for data, flags in chunks:
            if data is None:  # an idle poll: not busy time
                t_busy = time.perf_counter()
                continue
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
