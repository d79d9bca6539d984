"""Synthetic sequence data for the demo and tests: a conveyor belt seen by a camera and
a fused-magnesium-furnace's electrode currents, both with strong disturbances.

``python -m edgediag.data.synth_sequences --kind furnace|conveyor --out DIR`` writes one
``.npy`` per item plus ``labels.csv`` (path,label,split) - the layout the "sequence" data
reader takes. Deterministic per ``--seed``; a few seconds on one core.

Conveyor (video, (T, H, W, 3) uint8): a textured belt with cleats runs down the image
between two idler rails. Classes: ``normal``, ``deviation`` (the belt drifts sideways),
``tear`` (a longitudinal slit travelling with the belt), ``foreign_object`` (a bright
lump carried along), ``stoppage`` (the belt does not move - visible only over time).
Disturbances on every clip: illumination flicker, dust (haze + speckles), camera shake.

Furnace (sequence, (T, 3) float32 currents in kA): three electrode currents around a
set point with operating-condition drift (feed steps, a slow random walk, the electrode
regulator's oscillation, phase imbalance). Classes: ``normal``, ``semi_molten`` (one
phase sags and oscillates with growing amplitude, as when the shell melts), ``arc_instability``
(repeated sharp dips on all phases with slow recovery). Disturbances: impulsive noise
and sensor dropout (a channel reads 0 or freezes for a while).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from edgediag import cli
from edgediag.utils import atomic_path

CONVEYOR_CLASSES = ("normal", "deviation", "tear", "foreign_object", "stoppage")
FURNACE_CLASSES = ("normal", "semi_molten", "arc_instability")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: int) -> np.ndarray:
    """Band-limited texture: white noise upsampled from a coarse grid (cv2 bicubic)."""
    import cv2

    coarse = rng.normal(size=(max(2, shape[0] // scale), max(2, shape[1] // scale))).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


# --- conveyor -------------------------------------------------------------------------
def conveyor_clip(rng: np.random.Generator, label: str, frames: int = 16, size: int = 48,
                  disturbance: float = 0.5) -> np.ndarray:
    """One clip (frames, size, size, 3) uint8 of class ``label``."""
    if label not in CONVEYOR_CLASSES:
        raise ValueError(f"unknown conveyor class {label!r}")
    import cv2

    h = w = size
    belt_w = int(0.5 * w)
    tex_h = h * 4
    # Belt texture (rubber grain + cleats every `pitch` rows), long enough to scroll.
    texture = 0.55 + 0.08 * _smooth_noise(rng, (tex_h, belt_w), 3) + 0.04 * rng.normal(size=(tex_h, belt_w))
    pitch = int(rng.integers(9, 14))
    texture[np.arange(tex_h) % pitch < 2] -= 0.18
    texture = np.clip(texture, 0, 1).astype(np.float32)
    tint = np.array([1.0, 0.97, 0.92], np.float32) * rng.uniform(0.85, 1.05)

    speed = 0.0 if label == "stoppage" else rng.uniform(1.5, 3.0)  # rows per frame
    centre0 = w / 2 + rng.uniform(-2, 2)
    drift = (rng.choice([-1, 1]) * rng.uniform(0.6, 1.1)) if label == "deviation" else 0.0
    if label == "tear":
        tear_row, tear_col = rng.uniform(0, tex_h), rng.uniform(0.25, 0.75) * belt_w
        tear_len, tear_w = rng.uniform(10, 18), 1
        rows = (np.arange(int(tear_row), int(tear_row + tear_len)) % tex_h)
        texture[rows, int(tear_col):int(tear_col) + tear_w + 1] = 0.05
    obj = None
    if label == "foreign_object":
        obj = (rng.uniform(-0.2, 0.6) * h, rng.uniform(0.2, 0.8) * belt_w, rng.uniform(2.5, 4.5),
               np.array([0.95, 0.85, rng.uniform(0.3, 0.7)], np.float32))

    background = (0.18 + 0.05 * _smooth_noise(rng, (h, w), 8))[..., None] * np.ones(3, np.float32)
    flicker_amp = disturbance * rng.uniform(0.05, 0.35)
    flicker_f = rng.uniform(0.2, 0.45)
    shake = disturbance * rng.uniform(0.5, 2.5)
    dust = disturbance * rng.uniform(0.0, 0.35)
    haze = 0.5 + 0.1 * _smooth_noise(rng, (h, w), 12)

    clip = np.empty((frames, h, w, 3), np.uint8)
    phase = rng.uniform(0, tex_h)
    for t in range(frames):
        img = background.copy()
        centre = centre0 + drift * t
        left = int(round(centre - belt_w / 2))
        offset = phase - speed * t  # the belt moves down the image
        rows = (np.arange(h) + offset).astype(int) % tex_h
        band = texture[rows][..., None] * tint
        x0, x1 = max(0, left), min(w, left + belt_w)
        if x1 > x0:
            img[:, x0:x1] = band[:, x0 - left:x1 - left]
        if obj is not None:
            oy, ox, r, colour = obj
            cy = oy + speed * t
            cv2.circle(img, (int(round(left + ox)), int(round(cy))), int(round(r)), colour.tolist(), -1)
        # Idler rails stay fixed in the image whatever the belt does.
        rail = int(w / 2 - belt_w / 2) - 3
        img[:, max(0, rail):rail + 2] = 0.35
        img[:, min(w - 2, w - rail - 2):w - rail] = 0.35
        # Disturbances: camera shake, flicker, dust.
        if shake > 0:
            m = np.float32([[1, 0, rng.normal(0, shake)], [0, 1, rng.normal(0, shake)]])
            img = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)
        img = img * (1 + flicker_amp * np.sin(2 * np.pi * flicker_f * t + rng.uniform(0, 0.5))
                     + 0.3 * flicker_amp * rng.normal())
        if dust > 0:
            img = (1 - dust * 0.6) * img + dust * 0.6 * haze[..., None]
            specks = rng.random((h, w)) < 0.02 * dust
            img[specks] = 0.9
        img += rng.normal(0, 0.015, img.shape)
        clip[t] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return clip


# --- furnace --------------------------------------------------------------------------
def furnace_sequence(rng: np.random.Generator, label: str, length: int = 256,
                     disturbance: float = 0.5) -> np.ndarray:
    """One (length, 3) float32 record of the three electrode currents (kA)."""
    if label not in FURNACE_CLASSES:
        raise ValueError(f"unknown furnace class {label!r}")
    t = np.arange(length, dtype=np.float64)
    # Operating condition: set point with feed steps and a slow random walk.
    base = rng.uniform(11.0, 14.0)
    level = np.full(length, base)
    for _ in range(rng.integers(0, 3)):
        at = rng.integers(length // 8, length)
        level[at:] += rng.uniform(-1.5, 1.5)
    level += np.cumsum(rng.normal(0, 0.03, length))
    reg_period = rng.uniform(25, 60)  # electrode regulator hunting
    currents = np.empty((length, 3))
    for p in range(3):
        imbalance = rng.uniform(-0.4, 0.4)
        reg = rng.uniform(0.15, 0.35) * np.sin(2 * np.pi * t / reg_period + rng.uniform(0, 2 * np.pi))
        ar = np.zeros(length)  # arc noise: AR(1), as the arc length wanders
        e = rng.normal(0, 0.12, length)
        for i in range(1, length):
            ar[i] = 0.8 * ar[i - 1] + e[i]
        currents[:, p] = level + imbalance + reg + ar

    if label == "semi_molten":
        p = rng.integers(0, 3)
        onset = rng.uniform(0.15, 0.45) * length
        ramp = np.clip((t - onset) / (length - onset), 0, 1)
        period = rng.uniform(6, 12)
        currents[:, p] -= ramp * rng.uniform(1.2, 2.5)
        currents[:, p] += ramp ** 0.7 * rng.uniform(0.6, 1.2) * np.sin(2 * np.pi * t / period)
    elif label == "arc_instability":
        n_dips = rng.integers(3, 7)
        for at in rng.choice(np.arange(8, length - 12), n_dips, replace=False):
            depth = rng.uniform(0.25, 0.45) * level[at]
            recovery = rng.uniform(3, 8)
            shape = np.where(t >= at, depth * np.exp(-(t - at) / recovery), 0.0)
            currents -= shape[:, None] * rng.uniform(0.7, 1.0, 3)[None]

    # Disturbances of the measurement, on every class.
    if disturbance > 0:
        n_imp = rng.poisson(disturbance * 0.02 * length)
        for _ in range(n_imp):
            i, p = rng.integers(0, length), rng.integers(0, 3)
            currents[i, p] += rng.choice([-1, 1]) * rng.uniform(2, 6) * disturbance
        if rng.random() < disturbance * 0.6:
            p = rng.integers(0, 3)
            start = rng.integers(0, length - 10)
            stop = min(length, start + int(rng.uniform(0.03, 0.12) * length))
            currents[start:stop, p] = 0.0 if rng.random() < 0.5 else currents[start, p]
    currents += rng.normal(0, 0.05, currents.shape)
    return currents.astype(np.float32)


# --- disturbances of recorded signals (robustness tests) ---------------------------------
DISTURBANCES = ("noise", "impulses", "dropout")


def disturb(raw: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """A disturbed copy of one raw item, the way a sensor or camera fails in the field.

    ``raw``: a waveform (N,), a sensor record (T, F) or a video clip (T, H, W, C) uint8.

    * ``noise``: white Gaussian noise at ``level`` dB SNR, against each channel's own
      variance (a furnace current's DC level is not signal power);
    * ``impulses``: a fraction ``level`` of the samples (pixels for video: salt and
      pepper) replaced by spikes of +-5 standard deviations;
    * ``dropout``: a fraction ``level`` of the time axis lost in four gaps: the signal
      reads 0 (video: black frames; multichannel: one channel per gap).
    """
    video = raw.dtype == np.uint8 and raw.ndim == 4
    x = raw.astype(np.float32)
    if kind == "noise":
        axes = tuple(range(x.ndim - 1)) if x.ndim > 1 and not video else None
        std = x.std(axis=axes, keepdims=axes is not None) if not video else x.std()
        x = x + rng.normal(size=x.shape).astype(np.float32) * (std / 10 ** (level / 20.0))
    elif kind == "impulses":
        if video:
            hit = rng.random(x.shape[:3]) < level
            x[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0.0, 255.0)[:, None]
        else:
            centre = x.mean(axis=0)
            std = x.std(axis=0) + 1e-12
            hit = rng.random(x.shape) < level
            signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=x.shape)
            x = np.where(hit, centre + 5.0 * signs * std, x).astype(np.float32)
    elif kind == "dropout":
        n = len(x)
        gap = max(1, int(round(level * n / 4)))
        for _ in range(4):
            start = int(rng.integers(0, max(1, n - gap)))
            if x.ndim == 2:  # multichannel record: one sensor drops out
                x[start:start + gap, int(rng.integers(0, x.shape[1]))] = 0.0
            else:
                x[start:start + gap] = 0.0
    else:
        raise ValueError(f"unknown disturbance {kind!r} (one of {', '.join(DISTURBANCES)})")
    if video:
        return np.clip(x, 0, 255).round().astype(np.uint8)
    return x.astype(raw.dtype)


# --- writers --------------------------------------------------------------------------
def generate(kind: str, out: str | Path, n_train: int = 24, n_test: int = 8, seed: int = 0,
             disturbance: float = 0.5, frames: int = 16, size: int = 48, length: int = 256) -> Path:
    """Write ``n_train`` + ``n_test`` items per class of ``kind`` into ``out``."""
    if kind not in ("furnace", "conveyor"):
        raise cli.UserError(f"--kind must be furnace or conveyor, not {kind!r}")
    if n_train < 1 or n_test < 0:
        raise cli.UserError("--n-train must be >= 1 and --n-test >= 0")
    out = Path(out)
    classes = FURNACE_CLASSES if kind == "furnace" else CONVEYOR_CLASSES
    (out / "items").mkdir(parents=True, exist_ok=True)
    rows = []
    for ci, label in enumerate(classes):
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                # One generator per item: the same seed gives the same item whatever n is.
                rng = np.random.default_rng([seed, ci, 0 if split == "train" else 1, i])
                arr = (furnace_sequence(rng, label, length, disturbance) if kind == "furnace"
                       else conveyor_clip(rng, label, frames, size, disturbance))
                rel = f"items/{split}_{label}_{i:03d}.npy"
                with atomic_path(out / rel) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, arr)
                rows.append((rel, label, split))
    with atomic_path(out / "labels.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "split"])
            writer.writerows(rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgediag.data.synth_sequences", description=__doc__.split("\n")[0])
    p.add_argument("--kind", required=True, choices=["furnace", "conveyor"])
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=24, help="training items per class")
    p.add_argument("--n-test", type=int, default=8, help="test items per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disturbance", type=float, default=0.5, help="0 = clean, 1 = strong")
    p.add_argument("--frames", type=int, default=16, help="conveyor: frames per clip")
    p.add_argument("--size", type=int, default=48, help="conveyor: frame side in pixels")
    p.add_argument("--length", type=int, default=256, help="furnace: time steps per record")
    args = p.parse_args(argv)
    out = generate(args.kind, args.out, args.n_train, args.n_test, args.seed, args.disturbance,
                   args.frames, args.size, args.length)
    print(f"wrote {args.kind} data to {out} ({out / 'labels.csv'})")
    return 0


if __name__ == "__main__":
    cli.entry(main)
