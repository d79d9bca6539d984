"""Stream sources of ``python -m edgediag.monitor``: chunks of samples (or video frames)
with the flags of what went wrong on the way (resampling, dropouts, bad rows or files).

Every source is a generator of ``(data, flags)``: ``data`` a float32 array ``(n,)`` /
``(n, channels)`` at the model's rate, or a stack of frames; ``None`` for an idle poll
(a watched folder with nothing new), so the caller does not count the wait as busy time.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from edgediag.errors import UserError

AUDIO_EXT = (".wav", ".flac")
VIDEO_EXT = (".mp4", ".avi", ".mov", ".mkv")


class Resampler:
    """Chunk-by-chunk resampling without seams (soxr's stream API, librosa's backend)."""

    def __init__(self, src: float, dst: float, channels: int = 1):
        try:
            import soxr
        except ImportError:
            raise UserError(f"the source runs at {src:g} Hz, the model at {dst:g} Hz: resampling needs "
                            "soxr (pip install soxr)") from None
        self.stream = soxr.ResampleStream(src, dst, channels, dtype="float32")

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        return self.stream.resample_chunk(np.ascontiguousarray(x, dtype=np.float32), last=last)


def audio_file_chunks(path: Path, rate: int, block_s: float = 0.5) -> Iterator[tuple[np.ndarray, set]]:
    """Mono float32 blocks of an audio file at ``rate`` (resampled on a mismatch, flagged once).
    The file is opened here, not at the first block, so a bad file fails before any output exists."""
    import soundfile as sf

    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes)")
    try:
        f = sf.SoundFile(str(path))
    except Exception as exc:  # noqa: BLE001 - soundfile raises several types for a bad file
        reason = str(exc).splitlines()[0].rsplit(": ", 1)[-1].strip() if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable audio file ({reason[:100]})") from None
    try:
        if f.frames == 0:
            raise UserError(f"{path}: holds no samples")
        resample = Resampler(f.samplerate, rate) if rate and f.samplerate != rate else None
    except BaseException:
        f.close()
        raise
    return _audio_blocks(f, resample, block_s)


def _audio_blocks(f, resample: Resampler | None, block_s: float) -> Iterator[tuple[np.ndarray, set]]:
    with f:
        first = {"resampled"} if resample else set()
        block = max(1, int(block_s * f.samplerate))
        for data in f.blocks(blocksize=block, dtype="float32", always_2d=True):
            x = data.mean(axis=1)
            if resample:
                x = resample(x)
            yield x, first
            first = set()
        if resample:
            tail = resample(np.zeros(0, np.float32), last=True)
            if len(tail):
                yield tail, set()


def folder_chunks(folder: Path, rate: int, once: bool, poll_s: float = 1.0) -> Iterator[tuple[np.ndarray, set]]:
    """New audio files of a folder in name order, each once, as one continuous stream (a
    recorder writing consecutive segments). A dropout is flagged when a file was finished
    (mtime) more than max(1 s, half its duration) later than the previous one plus its own
    duration: the recorder lost audio in between. Memory: the set of names seen."""
    import soundfile as sf

    seen: set[str] = set()
    last_mtime: float | None = None
    while True:
        new = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_EXT and p.name not in seen)
        for p in new:
            seen.add(p.name)
            flags: set[str] = set()
            try:
                mtime, duration = p.stat().st_mtime, sf.info(str(p)).duration
                if last_mtime is not None and mtime - last_mtime - duration > max(1.0, 0.5 * duration):
                    flags.add("dropout")
                last_mtime = mtime
                for i, (x, f) in enumerate(audio_file_chunks(p, rate)):
                    yield x, (f | flags) if i == 0 else f
            except (UserError, RuntimeError) as exc:  # one bad file is a flag, not the end of the watch
                print(f"warning: skipped {p.name}: {str(exc)[:160]}", file=sys.stderr)
                yield np.zeros(0, np.float32), {"bad_file"}
        if once:
            return
        if not new:
            yield None, set()  # idle: lets the caller account waiting time
            time.sleep(poll_s)


def mic_chunks(spec: str, rate: int, block_s: float = 0.25) -> Iterator[tuple[np.ndarray, set]]:
    try:
        import sounddevice as sd
    except ImportError:
        raise UserError("microphone input needs sounddevice: pip install 'edgediag[mic]'") from None
    import queue

    device = int(spec.split(":", 1)[1]) if ":" in spec and spec.split(":", 1)[1] else None
    q: queue.Queue = queue.Queue(maxsize=64)  # bounded: a stalled consumer drops blocks (flagged)
    dropped = [False]

    def callback(indata, frames, when, status):
        try:
            q.put_nowait((indata[:, 0].copy(), bool(status.input_overflow)))
        except queue.Full:
            dropped[0] = True

    try:
        stream = sd.InputStream(samplerate=rate, channels=1, dtype="float32", device=device,
                                blocksize=int(block_s * rate), callback=callback)
    except Exception as exc:  # noqa: BLE001 - PortAudio errors
        raise UserError(f"cannot open microphone {spec!r}: {str(exc).splitlines()[0][:120]}") from None
    with stream:
        while True:
            x, overflow = q.get()
            flags = {"dropout"} if overflow or dropped[0] else set()
            dropped[0] = False
            yield x, flags


def video_frames(spec: str, fps: float | None) -> tuple[Iterator[tuple[np.ndarray, set]], float]:
    """Frames of a video file or ``camera:N`` (OpenCV), subsampled to ``fps``."""
    import cv2

    target = int(spec.split(":", 1)[1] or 0) if spec.startswith("camera:") else spec
    # A broken file is the one line below, not FFmpeg's log (read when OpenCV first opens a video
    # in this process; set OPENCV_FFMPEG_LOGLEVEL to see it) nor OpenCV's (OpenCV >= 4.1).
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    logs = getattr(getattr(cv2, "utils", None), "logging", None)
    level = logs.getLogLevel() if logs else None
    if logs:
        logs.setLogLevel(logs.LOG_LEVEL_SILENT)
    try:
        cap = cv2.VideoCapture(target)
    finally:
        if logs:
            logs.setLogLevel(level)
    if not cap.isOpened():
        raise UserError(f"cannot open video source {spec!r}")
    native = cap.get(cv2.CAP_PROP_FPS) or 0.0
    native = native if native > 0 else (fps or 10.0)
    rate = fps or native

    def gen():
        step, acc = native / rate, 0.0
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    if spec.startswith("camera:"):
                        yield np.zeros((0,), np.uint8), {"dropout"}
                        continue
                    return
                acc += 1.0
                if acc + 1e-9 >= step:
                    acc -= step
                    yield frame[None], set()
        finally:
            cap.release()

    return gen(), rate


def csv_chunks(stream: IO[str], rate: float | None, channels: int, block: int = 0) -> Iterator[tuple[np.ndarray, set]]:
    """CSV lines ``t,v1,...`` (or values only when ``rate`` is given), ``block`` rows per chunk
    (default: 50 ms of data at ``rate``, else 64 rows, so a slow live sensor is not held back).
    Timestamp gaps longer than 1.5 sample periods are dropouts; unparsable fields become NaN
    (flagged downstream), rows with the wrong field count ``bad_row``."""
    block = block or (max(1, min(4096, int(rate * 0.05))) if rate else 64)
    state = {"last_t": None, "period": 1.0 / rate if rate else None}
    lines: list[str] = []
    for line in stream:
        line = line.strip()
        if not line or line[0].isalpha():  # blank or header
            continue
        lines.append(line)
        if len(lines) >= block:
            yield _parse_rows(lines, rate, channels, state)
            lines = []
    if lines:
        yield _parse_rows(lines, rate, channels, state)


def _parse_rows(lines: list[str], rate: float | None, channels: int, state: dict) -> tuple[np.ndarray, set]:
    flags: set[str] = set()
    width = channels + (0 if rate else 1)
    try:  # the common case, in numpy's C parser (Python float() per field is ~10x slower at 48 kHz)
        arr = np.loadtxt(lines, delimiter=",", ndmin=2, dtype=np.float64)
        if arr.shape[1] != width:
            raise ValueError("field count")
    except ValueError:
        arr = np.full((len(lines), width), np.nan)
        for i, line in enumerate(lines):
            fields = line.split(",")
            if len(fields) != width:
                flags.add("bad_row")
            for j, f in enumerate(fields[:width]):
                try:
                    arr[i, j] = float(f)
                except ValueError:
                    pass  # stays NaN: flagged and zeroed by the monitor
    if not rate:
        t = arr[:, 0]
        prev = state["last_t"]
        t_all = t if prev is None else np.concatenate([[prev], t])
        finite = t_all[np.isfinite(t_all)]
        dt = np.diff(finite)
        if state["period"] is None and (dt > 0).any():
            state["period"] = float(dt[dt > 0][0])
        if state["period"] and (dt > 1.5 * state["period"]).any():
            flags.add("dropout")
        if len(finite):
            state["last_t"] = float(finite[-1])
        arr = arr[:, 1:]
    return arr.astype(np.float32), flags


def open_source(args, pred) -> tuple[Iterator, float | None, bool]:
    """(chunk iterator, the source's rate (the time base for models that record none), audio_levels)."""
    src, prep = args.source, pred.preprocess
    if src == "-":
        if prep.unit != "samples":
            raise UserError(f"CSV input needs a sequence/audio model, not a model of kind {prep.kind!r}")
        rate = args.rate
        model_rate = prep.rate
        gen = csv_chunks(sys.stdin, rate, prep.channels)
        if rate and model_rate and abs(rate - model_rate) > 1e-6:
            resample = Resampler(rate, model_rate, prep.channels)

            def resampled():
                first = {"resampled"}
                for x, flags in gen:
                    y = resample(x)
                    yield (y if prep.channels > 1 else y.reshape(-1)), flags | first
                    first = set()
            return resampled(), rate, False
        return ((x if prep.channels > 1 else x.reshape(-1), f) for x, f in gen), rate, False
    if src.startswith("mic:") or src == "mic":
        _need(prep, "samples", src)
        return mic_chunks(src, prep.rate), None, True
    if src.startswith("camera:") or Path(src).suffix.lower() in VIDEO_EXT:
        if prep.unit != "frames":
            raise UserError(f"video input needs an image or video model, not a model of kind {prep.kind!r}")
        if not src.startswith("camera:") and not Path(src).is_file():
            raise UserError(f"source not found: {src}")
        gen, fps = video_frames(src, args.fps)
        return gen, fps, False
    path = Path(src)
    if path.is_dir():
        _need(prep, "samples", src)
        return folder_chunks(path, prep.rate, args.once), None, True
    if not path.exists():
        raise UserError(f"source not found: {src}")
    if path.suffix.lower() in AUDIO_EXT:
        _need(prep, "samples", src)
        return audio_file_chunks(path, prep.rate), None, True
    raise UserError(f"{src}: unknown source (wav/flac file, folder, mic:N, video file, camera:N or -)")


def _need(prep, unit: str, src: str) -> None:
    if prep.unit != unit or prep.channels != 1:
        raise UserError(f"{src}: an audio source needs a model taking a 1-D signal, not a {prep.kind} model "
                        f"with {prep.channels} channels")
