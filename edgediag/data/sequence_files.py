"""Sequence data files: labels.csv, the per-kind readers and the format detection.

What a file holds and how to decode it (CWRU ``.mat``, audio, video, sensor ``.npy``/``.csv``);
turning the decoded signals into items (windows, splits, front ends) is
:mod:`edgediag.data.sequences`.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from edgediag.errors import UserError

AUDIO_EXT = {".wav", ".flac", ".ogg"}
VIDEO_EXT = {".mp4", ".avi", ".mov", ".mkv"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp"}


def read_labels(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
            cols = [c.strip() for c in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not rows:
        raise UserError(f"{path} lists no items")
    return cols, rows


# --- readers --------------------------------------------------------------------------
def read_mat_signal(path: Path) -> tuple[np.ndarray, str]:
    """The drive-end accelerometer signal of a CWRU .mat file (variable ``X<nnn>_DE_time``)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several unrelated types for a broken file
        raise ValueError(f"not a readable MATLAB file ({type(exc).__name__}: {str(exc)[:80]})") from None
    names = [k for k in mat if k.endswith("_DE_time")]
    if not names:
        raise ValueError(f"no X<nnn>_DE_time variable (has {', '.join(k for k in mat if not k.startswith('__'))})")
    sig = np.asarray(mat[names[0]], dtype=np.float32).ravel()
    if not np.all(np.isfinite(sig)):
        raise ValueError("signal holds NaN/inf values")
    return sig, names[0]


def read_audio(path: Path, sample_rate: int = 0) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their rate; ValueError (the caller names the file) for an
    empty, unreadable, truncated or sample-less file or one holding NaN/inf samples."""
    import soundfile as sf

    from edgediag.data.audio import _wav_truncated  # the one RIFF check, shared with the audio reader

    if path.is_file() and path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile.LibsndfileError, RuntimeError, ...
        reason = str(exc).splitlines()[0].rsplit(": ", 1)[-1].strip() if str(exc) else type(exc).__name__
        raise ValueError(f"not a readable audio file ({reason[:80]})") from None
    if _wav_truncated(path):
        raise ValueError("truncated (its header promises more samples than the file holds)")
    if wave.shape[0] == 0:
        raise ValueError("holds no samples")
    if not np.isfinite(wave).all():
        raise ValueError("holds NaN or infinite samples")
    wave = wave.mean(axis=1)
    if sample_rate and sr != sample_rate:
        import librosa

        wave = librosa.resample(wave, orig_sr=sr, target_sr=sample_rate).astype(np.float32)
        sr = sample_rate
    return wave, sr


def read_sensor(path: Path) -> np.ndarray:
    """(T, F) float32 from a .npy or a .csv (one row per time step, optional header)."""
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"not a readable .npy file ({str(exc)[:80]})") from None
    else:
        try:
            with open(path) as f:
                first = f.readline()
            header = any(c.isalpha() for c in first.replace("e", "").replace("E", ""))
            arr = np.loadtxt(path, delimiter=",", skiprows=1 if header else 0, ndmin=2)
        except (OSError, ValueError) as exc:
            raise ValueError(f"not a numeric CSV ({str(exc)[:80]})") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"expected a (T, F) array, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError("holds NaN/inf values")
    return arr


def read_video(path: Path, size: int, channels: int) -> np.ndarray:
    """All frames of a clip, resized: (T, size, size, channels) uint8 (RGB or grey)."""
    import cv2

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXT)
        if not files:
            raise ValueError("frame folder holds no images")
        from edgediag.data.images import quiet_imdecode

        frames = []
        for f in files:
            img = quiet_imdecode(f.read_bytes(), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"unreadable frame {f.name}")
            frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    elif path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"not a readable .npy file ({str(exc)[:80]})") from None
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or len(arr) == 0:
            raise ValueError(f"expected video (T, H, W[, C]) with C 1 or 3, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            if not np.isfinite(arr).all():
                raise ValueError("holds NaN/inf values")
            arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
        frames = [np.repeat(f, 3, axis=-1) if f.shape[-1] == 1 else f for f in arr]
    else:
        from edgediag.data.images import opencv_quiet

        # A broken file is the caller's one line, not FFmpeg's log (read when OpenCV first opens
        # a video in this process; set OPENCV_FFMPEG_LOGLEVEL to see it) nor OpenCV's.
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        frames = []
        with opencv_quiet():
            cap = cv2.VideoCapture(str(path))
            while cap.isOpened():
                ok, img = cap.read()
                if not ok:
                    break
                frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
            cap.release()
        if not frames:
            raise ValueError("OpenCV decoded no frames (not a video, or a codec OpenCV lacks)")
    out = []
    for f in frames:
        f = cv2.resize(np.ascontiguousarray(f), (size, size), interpolation=cv2.INTER_AREA)
        if channels == 1:
            f = cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)[..., None]
        out.append(f)
    return np.stack(out).astype(np.uint8)


def sample_frames(clip: np.ndarray, n: int) -> np.ndarray:
    """``n`` frames spread evenly over the clip (first and last included)."""
    return clip[np.linspace(0, len(clip) - 1, n).round().astype(int)]


def detect_format(root: Path) -> str:
    """'cwru', 'audio', 'video' or 'sensor' (the rules in the :mod:`edgediag.data.sequences` docstring)."""
    labels = root / "labels.csv"
    if not labels.is_file():
        raise UserError(f"{root} has no labels.csv (sequence data needs labels.csv with path,label[,split] "
                        "or file,fault for .mat recordings)")
    cols, rows = read_labels(labels)
    if "file" in cols and "path" not in cols:
        if not all(r["file"].lower().endswith(".mat") for r in rows):
            raise UserError(f"{labels}: a 'file' column must name .mat recordings")
        return "cwru"
    if "path" not in cols or "label" not in cols:
        raise UserError(f"{labels} needs columns path,label (or file,fault for .mat), has {', '.join(cols)}")
    kinds = set()
    for r in rows:
        p = root / r["path"]
        ext = p.suffix.lower()
        if p.is_dir() or ext in VIDEO_EXT:
            kinds.add("video")
        elif ext in AUDIO_EXT:
            kinds.add("audio")
        elif ext == ".csv":
            kinds.add("sensor")
        elif ext == ".npy":
            if not p.is_file():
                raise UserError(f"{p}: listed in labels.csv but missing")
            kinds.add("video" if np.load(p, mmap_mode="r", allow_pickle=False).ndim >= 3 else "sensor")
        else:
            raise UserError(f"{p}: unsupported file type {ext or '(none)'} (audio {sorted(AUDIO_EXT)}, "
                            f"video {sorted(VIDEO_EXT)} or frame folders, sensor .npy/.csv)")
    if len(kinds) > 1:
        raise UserError(f"{labels} mixes {' and '.join(sorted(kinds))} items; use one kind per folder")
    return kinds.pop()
