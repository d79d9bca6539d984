"""Sequence data (kind "sequence"): frame sequences for LDMamba and the sequence baselines.

Every item's ``x`` is either a feature sequence ``(T, F)`` (float32) or a video clip
``(T, C, H, W)`` (float32 in 0..1). The folder's format is detected from its contents:

1. **Vibration recordings** (CWRU layout): ``labels.csv`` with a ``file`` column naming
   MATLAB ``.mat`` files (label column ``fault``, else ``label``). The drive-end signal
   (variable ``X<nnn>_DE_time``) is cut into windows of ``model.window`` samples
   (default 4096) with stride ``model.window_stride`` (default window/2). Split **by time
   within each file**: the first ``1 - data.test_fraction`` of every recording gives the
   training windows (its last ``data.val_fraction`` the validation ones), the rest the
   test windows, so no test window overlaps a training window.
2. ``labels.csv`` with ``path,label[,split][,domain]`` columns; the kind of the listed
   paths decides the rest (all rows must be of one kind):

   * **audio** (``.wav .flac .ogg``): each file (or each ``model.clip_seconds`` segment of
     it) is one item;
   * **video** (``.mp4 .avi .mov .mkv`` decoded with OpenCV, a folder of frame images, or
     a ``.npy`` of shape (T, H, W[, C])): ``model.seq_len`` frames (at most the shortest
     clip's count) sampled evenly, resized to ``model.frame_size`` squared,
     ``model.in_channels`` 1 (grey) or 3 (RGB);
   * **sensor** (``.npy`` of shape (T, F), or ``.csv`` with one row per time step, an
     optional header): the whole sequence is one item (all must share T), or windows of
     ``model.window`` rows (split by time within each file when there is no split column).

   Without a ``split`` column, items are split at random per class
   (``data.test_fraction``, ``data.split_seed``); ``data.val_fraction`` is held out of
   train the same way.

1-D signals become feature sequences by ``model.frontend``: ``logmel`` (audio default;
``model.n_mels`` bands), ``logspec`` (vibration default; log power spectrum, n_fft/2+1
bins) or ``frames`` (the raw signal cut into ``model.seq_len`` frames). The hop is
chosen so that an item gives ``model.seq_len`` frames (``model.hop_length`` to fix it).

Normal labels: ``data.normal_labels``, else the labels named normal/ok/good/healthy/on
(case-insensitive). Labels in ``data.ignore_labels`` (default OFF: a stopped fan is neither
normal running nor a fault) stay classes of the diagnosis but get ``anomaly = -1``, so they
are left out of anomaly AUCs, normal statistics and threshold calibration. Classes are
ordered normal first, then the others alphabetically.
Per-feature mean/std of the training items go to ``bundle.info`` for the model to store.

This module turns decoded signals into items (front ends, windows, splits); reading the
files and detecting the format is :mod:`edgediag.data.sequence_files`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from edgediag.data import DataBundle, DataConfig, register_data
from edgediag.data.sequence_files import (  # noqa: F401 - readers re-exported: the public names stay here
    detect_format,
    read_audio,
    read_labels,
    read_mat_signal,
    read_sensor,
    read_video,
    sample_frames,
)
from edgediag.errors import UserError

log = logging.getLogger("edgediag.data.sequences")

DEFAULT_NORMAL = {"normal", "ok", "good", "healthy", "on"}


# --- dataset --------------------------------------------------------------------------
class SequenceDataset(Dataset):
    """Items from raw signals through a front end.

    ``raws`` are what the front end reads (waveform windows, (T, F) arrays, or resized
    uint8 clips); keeping them lets :meth:`with_raws` rebuild the same items from altered
    signals (the disturbance benchmark adds noise to the raw signal, not to features).
    """

    def __init__(self, raws: list[np.ndarray], labels: list[int], anomaly: list[int], keys: list[str],
                 domains: list[str], frontend: Frontend, lazy: bool = False,
                 features: list[torch.Tensor] | None = None):
        self.raws, self.labels, self.anomaly = raws, list(labels), list(anomaly)
        self.keys, self.domains, self.frontend, self.lazy = list(keys), list(domains), frontend, lazy
        if lazy:
            self._cache = None
        else:
            self._cache = features if features is not None else [torch.from_numpy(f) for f in frontend.many(raws)]

    def __len__(self) -> int:
        return len(self.raws)

    def features(self, i: int) -> torch.Tensor:
        return self._cache[i] if self._cache is not None else torch.from_numpy(self.frontend(self.raws[i]))

    def __getitem__(self, i: int) -> dict:
        return {"x": self.features(i), "y": self.labels[i], "anomaly": self.anomaly[i],
                "domain": self.domains[i], "key": self.keys[i]}

    def subset(self, idx: Sequence[int]) -> SequenceDataset:
        idx = list(idx)
        return SequenceDataset([self.raws[i] for i in idx], [self.labels[i] for i in idx],
                               [self.anomaly[i] for i in idx], [self.keys[i] for i in idx],
                               [self.domains[i] for i in idx], self.frontend, self.lazy,
                               None if self._cache is None else [self._cache[i] for i in idx])

    def with_raws(self, raws: list[np.ndarray]) -> SequenceDataset:
        if len(raws) != len(self.raws):
            raise ValueError("with_raws needs one raw signal per item")
        return SequenceDataset(raws, self.labels, self.anomaly, self.keys, self.domains, self.frontend, self.lazy)


# --- front ends -----------------------------------------------------------------------
class Frontend:
    """Raw item -> float32 features. ``params`` (plain values) describe it completely and
    are written into the model config, so evaluation rebuilds identical inputs."""

    def __init__(self, kind: str, params: dict):
        self.kind, self.params = kind, dict(params)
        self._logmel = None
        if kind in ("logmel", "logspec"):
            from edgediag.nn.features import LogMel

            p = self.params
            n_mels = p["n_mels"] if kind == "logmel" else 8  # logspec only uses the STFT
            self._logmel = LogMel(sample_rate=p["sample_rate"], n_fft=p["n_fft"], hop=p["hop_length"],
                                  n_mels=n_mels, log="power_to_db", top_db=None)

    def many(self, raws: list[np.ndarray], batch: int = 256) -> list[np.ndarray]:
        """Features of many items; equal-length waveforms go through the STFT together
        (one call per batch instead of one per item: ~20x faster for short windows)."""
        if self.kind not in ("logmel", "logspec"):
            return [self(r) for r in raws]
        out: list[np.ndarray | None] = [None] * len(raws)
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(raws):
            by_len.setdefault(len(r), []).append(i)
        for idx in by_len.values():
            for k in range(0, len(idx), batch):
                part = idx[k:k + batch]
                feats = self._waves_to_features(np.stack([raws[i] for i in part]))
                for i, f in zip(part, feats):
                    out[i] = f
        return out

    def _waves_to_features(self, waves: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            wave = torch.from_numpy(np.ascontiguousarray(waves, dtype=np.float32))
            if self.kind == "logmel":
                feat = self._logmel(wave)
            else:
                feat = 10.0 * torch.log10(self._logmel.spectrogram(wave).clamp_min(1e-10))
        return np.ascontiguousarray(feat.transpose(1, 2)[:, : self.params["seq_len"]].numpy(), dtype=np.float32)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        p = self.params
        if self.kind == "video":
            x = raw.astype(np.float32) / 255.0  # (T, H, W, C) uint8 -> (T, C, H, W) in 0..1
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if self.kind == "none":
            return np.ascontiguousarray(raw, dtype=np.float32)
        if self.kind == "frames":
            hop = p["hop_length"]
            n = p["seq_len"] * hop
            return np.ascontiguousarray(raw[:n].reshape(p["seq_len"], hop), dtype=np.float32)
        return self._waves_to_features(raw[None])[0]


def _resolve_1d_frontend(model_cfg, default: str, n_samples: int, sample_rate: int) -> Frontend:
    """Front-end parameters for 1-D items of ``n_samples`` samples from the model config."""
    kind = getattr(model_cfg, "frontend", "auto") or "auto"
    kind = default if kind == "auto" else kind
    if kind not in ("logmel", "logspec", "frames"):
        raise UserError(f"model.frontend must be auto, logmel, logspec or frames for 1-D signals, not {kind!r}")
    seq_len = int(getattr(model_cfg, "seq_len", 64) or 64)
    hop = int(getattr(model_cfg, "hop_length", 0) or 0) or max(1, n_samples // seq_len)
    if kind == "frames":
        if hop * seq_len > n_samples:
            raise UserError(f"model.seq_len x model.hop_length = {seq_len * hop} samples exceeds the "
                            f"{n_samples}-sample items")
        return Frontend("frames", {"seq_len": seq_len, "hop_length": hop})
    # Default window: two hops (a power of two, for the FFT) but at most 2048 samples - long
    # enough to resolve a machine's harmonics, short enough to keep the STFT cheap - and
    # never shorter than the hop, so no sample is skipped.
    pow2 = lambda n: 2 ** int(math.ceil(math.log2(max(2, n))))  # noqa: E731
    n_fft = int(getattr(model_cfg, "n_fft", 0) or 0) or max(pow2(hop), min(2048, pow2(2 * hop)))
    frames = 1 + n_samples // hop  # torch.stft with center=True
    if frames < seq_len:
        raise UserError(f"items of {n_samples} samples give {frames} frames at hop {hop}, fewer than "
                        f"model.seq_len={seq_len}")
    return Frontend(kind, {"seq_len": seq_len, "hop_length": hop, "n_fft": n_fft,
                           "n_mels": int(getattr(model_cfg, "n_mels", 64) or 64), "sample_rate": sample_rate})


# --- labels.csv -----------------------------------------------------------------------
def _class_order(labels: Sequence[str], normal_labels: Sequence[str]) -> tuple[list[str], list[str]]:
    present = sorted(set(labels))
    if normal_labels:
        normal = [c for c in present if c in set(normal_labels)]
        missing = set(normal_labels) - set(present)
        if missing:
            raise UserError(f"data.normal_labels {sorted(missing)} not among the labels {present}")
    else:
        normal = [c for c in present if c.lower() in DEFAULT_NORMAL]
    return normal + [c for c in present if c not in normal], normal


def _labelled_rows(root: Path, data_cfg: DataConfig) -> tuple[Path, list[dict], list[str], list[str]]:
    """(labels.csv, its rows, the classes normal first, the normal ones) of a path,label folder."""
    labels_csv = root / "labels.csv"
    _, rows = read_labels(labels_csv)
    return (labels_csv, rows, *_class_order([r["label"] for r in rows], data_cfg.normal_labels))


def _anomaly(label: str, normal: Sequence[str], data_cfg: DataConfig) -> int:
    """0 normal, 1 fault, -1 neither (an ignored label such as a stopped machine)."""
    if label in normal:
        return 0
    return -1 if label in set(getattr(data_cfg, "ignore_labels", []) or []) else 1


def _stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held-out) index lists; each class contributes round(fraction * n), at least
    one item when it has two or more."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    labels = np.asarray(labels)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = int(round(fraction * len(idx)))
        if fraction > 0 and n == 0 and len(idx) >= 2:
            n = 1
        held += idx[:n].tolist()
        kept += idx[n:].tolist()
    return sorted(kept), sorted(held)


def _limit(ds: SequenceDataset | None, max_items: int) -> SequenceDataset | None:
    """Every k-th item of each class, so a quick run keeps the class balance."""
    if ds is None or not max_items or len(ds) <= max_items:
        return ds
    step = len(ds) / max_items
    order = np.argsort(np.asarray(ds.labels), kind="stable")
    return ds.subset(sorted(order[(np.arange(max_items) * step).astype(int)].tolist()))


def _bad(path: Path, reason: str, data_cfg: DataConfig, skipped: list) -> None:
    if data_cfg.on_bad_file == "skip":
        skipped.append(path)
        return
    raise UserError(f"{path}: {reason} (data.on_bad_file=skip ignores bad files)")


# --- the builder ----------------------------------------------------------------------
@register_data("sequence")
def build_sequences(root: Path, data_cfg: DataConfig, model_cfg) -> DataBundle:
    root = Path(root)
    fmt = detect_format(root)
    builder = {"cwru": _build_cwru, "audio": _build_audio, "video": _build_video, "sensor": _build_sensor}[fmt]
    train, val, test, classes, normal, info = builder(root, data_cfg, model_cfg)
    if data_cfg.train_normal_only:
        keep = [i for i, a in enumerate(train.anomaly) if a == 0]
        train = train.subset(keep)
    train, val, test = (_limit(d, data_cfg.max_items) for d in (train, val, test))
    if len(train) == 0:
        raise UserError(f"{root}: no training items")
    ignored = [c for c in classes if c not in normal and c in set(getattr(data_cfg, "ignore_labels", []) or [])]
    info.update(_feature_stats(train), format=fmt, classes=classes, ignored_classes=ignored)
    return DataBundle(train=train, val=val, test=test, classes=classes, normal_classes=normal, info=info)


def _feature_stats(ds: SequenceDataset) -> dict:
    """Per-feature (sequence) or per-channel (video) mean and std over all training frames."""
    total = sq = None
    count = 0
    for i in range(len(ds)):
        x = ds.features(i).double()
        x = x.transpose(0, 1).reshape(x.shape[1], -1).T if x.dim() == 4 else x  # video: (T*H*W, C)
        s, q = x.sum(0), (x * x).sum(0)
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += x.shape[0]
    mean = total / count
    std = (sq / count - mean ** 2).clamp_min(0).sqrt().clamp_min(1e-6)
    sample = ds.features(0)
    return {"feature_mean": mean.float().tolist(), "feature_std": std.float().tolist(),
            "seq_len": int(sample.shape[0]),
            "input_kind": "video" if sample.dim() == 4 else "sequence",
            "n_features": int(sample.shape[1])}  # video: channels


def _finish_split(items: dict[str, list], split_of: list[str], data_cfg: DataConfig, frontend: Frontend,
                  lazy: bool = False, time_val: list[bool] | None = None):
    """train/val/test datasets from per-item lists and each item's split name."""
    all_ds = SequenceDataset(items["raws"], items["labels"], items["anomaly"], items["keys"],
                             items["domains"], frontend, lazy)
    idx = {s: [i for i, x in enumerate(split_of) if x == s] for s in ("train", "val", "test")}
    train = all_ds.subset(idx["train"])
    val = all_ds.subset(idx["val"]) if idx["val"] else None
    test = all_ds.subset(idx["test"]) if idx["test"] else None
    if val is None and data_cfg.val_fraction > 0 and len(train) > 1:
        keep, held = _stratified_split(train.labels, data_cfg.val_fraction, data_cfg.split_seed + 1)
        train, val = train.subset(keep), train.subset(held)
    return train, val, test


def _split_rows(rows: list[dict], labels: list[int], data_cfg: DataConfig, where: Path) -> list[str]:
    """Each row's split: the split column (train/val/test) or a stratified random split."""
    if rows and "split" in rows[0] and any(r["split"] for r in rows):
        out = []
        for r in rows:
            s = r["split"].lower()
            s = {"training": "train", "validation": "val", "valid": "val", "eval": "test"}.get(s, s)
            if s not in ("train", "val", "test"):
                raise UserError(f"{where}: split {r['split']!r} of {r.get('path') or r.get('file')} is not "
                                "train, val or test")
            out.append(s)
        return out
    _, held = _stratified_split(labels, data_cfg.test_fraction, data_cfg.split_seed)
    held = set(held)
    return ["test" if i in held else "train" for i in range(len(rows))]


def _time_windows(n: int, window: int, stride: int, start: int, stop: int) -> list[int]:
    """Starts of windows lying wholly inside samples [start, stop)."""
    return list(range(start, max(start, stop - window + 1), stride))


def _time_split_items(signal_len: int, window: int, stride: int, data_cfg: DataConfig) -> dict[str, list[int]]:
    """Window starts per split, cut by time: [train | val] then test, never overlapping."""
    test_start = int(round(signal_len * (1 - data_cfg.test_fraction)))
    val_start = int(round(test_start * (1 - data_cfg.val_fraction))) if data_cfg.val_fraction > 0 else test_start
    return {"train": _time_windows(signal_len, window, stride, 0, val_start),
            "val": _time_windows(signal_len, window, stride, val_start, test_start),
            "test": _time_windows(signal_len, window, stride, test_start, signal_len)}


def _build_cwru(root, data_cfg, model_cfg):
    labels_csv = root / "labels.csv"
    cols, rows = read_labels(labels_csv)
    label_col = "fault" if "fault" in cols else "label" if "label" in cols else None
    if label_col is None:
        raise UserError(f"{labels_csv} needs a fault (or label) column")
    classes, normal = _class_order([r[label_col] for r in rows], data_cfg.normal_labels)
    window = int(getattr(model_cfg, "window", 0) or 0) or 4096
    stride = int(getattr(model_cfg, "window_stride", 0) or 0) or window // 2
    items = _new_items()
    split_of, skipped, rates = [], [], set()
    for r in rows:
        path = root / r["file"]
        try:
            sig, _ = read_mat_signal(path)
        except (ValueError, FileNotFoundError, OSError) as exc:
            _bad(path, str(exc) if not isinstance(exc, FileNotFoundError) else "missing", data_cfg, skipped)
            continue
        if len(sig) < 4 * window:
            _bad(path, f"only {len(sig)} samples, fewer than 4 windows of {window}", data_cfg, skipped)
            continue
        rates.add(int(float(r.get("fs_hz") or 0)) or 48000)
        cls = r[label_col]
        for split, starts in _time_split_items(len(sig), window, stride, data_cfg).items():
            for s in starts:
                _append(items, sig[s:s + window], classes.index(cls), cls, f"{r['file']}@{s}",
                        r.get("fault_diameter", "") or "", normal, data_cfg)
                split_of.append(split)
    if not items["raws"]:
        raise UserError(f"{root}: no readable recordings" + (f" ({len(skipped)} skipped as bad)" if skipped else ""))
    _warn_skipped(skipped)
    if len(rates) > 1:
        raise UserError(f"{labels_csv}: recordings at several sample rates {sorted(rates)}; resample them first")
    frontend = _resolve_1d_frontend(model_cfg, "logspec", window, rates.pop())
    train, val, test = _finish_split(items, split_of, data_cfg, frontend)
    if val is not None and not len(val):
        val = None
    info = {"frontend": frontend.kind, "frontend_params": frontend.params, "window": window,
            "window_stride": stride, "split_rule": "by time within each recording"}
    return train, val, test, classes, normal, info


def _build_audio(root, data_cfg, model_cfg):
    labels_csv, rows, classes, normal = _labelled_rows(root, data_cfg)
    want_sr = int(getattr(model_cfg, "sample_rate", 0) or 0)
    clip_s = float(getattr(model_cfg, "clip_seconds", 0.0) or 0.0)
    kept_rows, decoded = _read_rows(root, rows, lambda path: read_audio(path, want_sr), data_cfg, "audio files")
    waves, rates = [w for w, _ in decoded], {sr for _, sr in decoded}
    if len(rates) > 1:
        raise UserError(f"{labels_csv}: audio at several sample rates {sorted(rates)}; set model.sample_rate")
    sr = rates.pop()
    seg = int(round(clip_s * sr)) if clip_s > 0 else min(len(w) for w in waves)
    items = _new_items()
    split_rows = _split_rows(kept_rows, [classes.index(r["label"]) for r in kept_rows], data_cfg, labels_csv)
    split_of = []
    for wave, r, split in zip(waves, kept_rows, split_rows):
        if len(wave) < seg:
            # Whole-file items must share a length; a short file is padded by repetition
            # (a stationary machine sound repeats naturally) rather than silently dropped.
            wave = np.resize(wave, seg)
        n_seg = len(wave) // seg if clip_s > 0 else 1
        for k in range(n_seg):
            _append(items, wave[k * seg:(k + 1) * seg], classes.index(r["label"]), r["label"],
                    r["path"] if n_seg == 1 else f"{r['path']}#{k}", r.get("domain", ""), normal, data_cfg)
            split_of.append(split)
    frontend = _resolve_1d_frontend(model_cfg, "logmel", seg, sr)
    train, val, test = _finish_split(items, split_of, data_cfg, frontend)
    info = {"frontend": frontend.kind, "frontend_params": frontend.params, "sample_rate": sr,
            "clip_samples": seg}
    return train, val, test, classes, normal, info


def _build_video(root, data_cfg, model_cfg):
    labels_csv, rows, classes, normal = _labelled_rows(root, data_cfg)
    size = int(getattr(model_cfg, "frame_size", 48) or 48)
    channels = int(getattr(model_cfg, "in_channels", 3) or 3)
    if channels not in (1, 3):
        raise UserError(f"model.in_channels must be 1 or 3 for video, not {channels}")
    items = _new_items()
    kept, clips = _read_rows(root, rows, lambda path: read_video(path, size, channels), data_cfg, "video clips")
    for r, clip in zip(kept, clips):
        _append(items, clip, classes.index(r["label"]), r["label"], r["path"], r.get("domain", ""), normal, data_cfg)
    # model.seq_len frames per clip, but never more than the shortest clip has (no
    # invented frames); evaluation passes the resolved seq_len back, so it is stable.
    n_frames = min(int(getattr(model_cfg, "seq_len", 16) or 16), min(len(c) for c in items["raws"]))
    items["raws"] = [sample_frames(c, n_frames) for c in items["raws"]]
    split_of = _split_rows(kept, items["labels"], data_cfg, labels_csv)
    frontend = Frontend("video", {"seq_len": n_frames, "frame_size": size, "in_channels": channels})
    train, val, test = _finish_split(items, split_of, data_cfg, frontend, lazy=True)
    info = {"frontend": "video", "frontend_params": frontend.params, "frame_size": size, "in_channels": channels}
    return train, val, test, classes, normal, info


def _build_sensor(root, data_cfg, model_cfg):
    labels_csv, rows, classes, normal = _labelled_rows(root, data_cfg)
    window = int(getattr(model_cfg, "window", 0) or 0)
    stride = int(getattr(model_cfg, "window_stride", 0) or 0) or window
    kept, arrays = _read_rows(root, rows, read_sensor, data_cfg, "sequences")
    widths = {a.shape[1] for a in arrays}
    if len(widths) > 1:
        odd = next(r["path"] for a, r in zip(arrays, kept) if a.shape[1] != arrays[0].shape[1])
        raise UserError(f"{root / odd}: {len(widths)} different feature counts among the sequences "
                        f"({sorted(widths)}); every sequence needs the same columns")
    labels = [classes.index(r["label"]) for r in kept]
    items = _new_items()
    split_of = []
    has_split = "split" in kept[0] and any(r["split"] for r in kept)
    row_split = _split_rows(kept, labels, data_cfg, labels_csv) if (has_split or not window) else None
    for i, (a, r) in enumerate(zip(arrays, kept)):
        if window:
            if len(a) < window:
                raise UserError(f"{root / r['path']}: {len(a)} rows, fewer than model.window={window}")
            if row_split is not None:
                parts = {row_split[i]: _time_windows(len(a), window, stride, 0, len(a))}
            else:  # no split column: by time within the file, like the vibration recordings
                parts = _time_split_items(len(a), window, stride, data_cfg)
            for split, starts in parts.items():
                for s in starts:
                    _append(items, a[s:s + window], labels[i], r["label"], f"{r['path']}@{s}", r.get("domain", ""),
                            normal, data_cfg)
                    split_of.append(split)
        else:
            if len(a) != len(arrays[0]):
                raise UserError(f"{root / r['path']}: {len(a)} rows but {kept[0]['path']} has {len(arrays[0])}; "
                                "set model.window to cut equal windows")
            _append(items, a, labels[i], r["label"], r["path"], r.get("domain", ""), normal, data_cfg)
            split_of.append(row_split[i])
    frontend = Frontend("none", {"seq_len": window or len(arrays[0])})
    train, val, test = _finish_split(items, split_of, data_cfg, frontend)
    if val is not None and not len(val):
        val = None
    info = {"frontend": "none", "frontend_params": frontend.params, "window": window}
    return train, val, test, classes, normal, info


def _read_rows(root: Path, rows: list[dict], read, data_cfg, what: str) -> tuple[list[dict], list]:
    """(the rows whose file ``read`` decoded, the decoded values); an unreadable file stops
    the run or is skipped and counted (``data.on_bad_file``, see ``_bad``)."""
    kept, values, skipped = [], [], []
    for r in rows:
        path = root / r["path"]
        try:
            values.append(read(path))
        except (ValueError, OSError) as exc:
            _bad(path, str(exc) if path.exists() else "missing", data_cfg, skipped)
            continue
        kept.append(r)
    if not values:  # one line: the skips are in it
        raise UserError(f"{root}: no readable {what}" + (f" ({len(skipped)} skipped as bad, e.g. {skipped[0].name})"
                                                         if skipped else ""))
    _warn_skipped(skipped)
    return kept, values


def _new_items() -> dict[str, list]:
    return {k: [] for k in ("raws", "labels", "anomaly", "keys", "domains")}


def _append(items, raw, label: int, label_name: str, key: str, domain: str, normal, data_cfg) -> None:
    """One item: its raw signal, class index, anomaly flag (from the label name), key and domain."""
    items["raws"].append(raw)
    items["labels"].append(label)
    items["anomaly"].append(_anomaly(label_name, normal, data_cfg))
    items["keys"].append(key)
    items["domains"].append(domain)


def _warn_skipped(skipped: list) -> None:
    if skipped:
        log.warning("skipped %d unreadable file(s), e.g. %s", len(skipped), skipped[0])


__all__ = ["SequenceDataset", "Frontend", "build_sequences", "detect_format", "read_mat_signal", "read_audio",
           "read_sensor", "read_video", "sample_frames"]
