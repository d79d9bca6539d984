"""Synthetic steel-surface defect images for the demo and tests.

Each image is a grey, brushed and grainy metal texture (streaks along the rolling
direction, fine grain, uneven lighting) with one kind of defect drawn on it:

    normal     no defect (texture only)
    scratch    long thin bright or dark lines, slightly curved
    pit        small dark craters with a bright rim on the lit side
    inclusion  dark elongated specks stretched along the rolling direction
    patch      a large irregular region of different brightness and mottling
    crack      a thin dark jagged line that wanders and branches

Written as ``OUT/<class>/<class>_NNNN.png`` (an image-folder layout the "image" data kind
reads); the same (n_per_class, size, seed) always gives the same files.

    python -m edgediag.data.synth_images --out data/synth_defects --n-per-class 60 --size 128
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from edgediag import cli

CLASSES = ("normal", "scratch", "pit", "inclusion", "patch", "crack")


def _smooth_noise(rng: np.random.Generator, size: int, sigma_x: float, sigma_y: float) -> np.ndarray:
    """Unit-variance Gaussian noise blurred with an anisotropic kernel."""
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0),
                             sigmaX=sigma_x, sigmaY=sigma_y, borderType=cv2.BORDER_REFLECT_101)
    return noise / (noise.std() + 1e-6)


def steel_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed, grainy metal in [0, 1] with streaks along x."""
    s = size / 128.0
    base = rng.uniform(0.42, 0.6)
    brushed = _smooth_noise(rng, size, sigma_x=rng.uniform(8, 16) * s, sigma_y=rng.uniform(0.5, 0.9)) * rng.uniform(0.03, 0.06)
    grain = _smooth_noise(rng, size, 0.7, 0.7) * rng.uniform(0.015, 0.03)
    light = _smooth_noise(rng, size, size / 4, size / 4) * rng.uniform(0.02, 0.05)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy - 0.5) * rng.uniform(0.0, 0.08)
    return base + brushed + grain + light + gradient


def _stroke(size: int, points: np.ndarray, thickness: int, blur: float) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    cv2.polylines(mask, [np.round(points * 16).astype(np.int32)], False, 1.0, thickness, cv2.LINE_AA, shift=4)
    return cv2.GaussianBlur(mask, (0, 0), blur) if blur > 0 else mask


def add_scratch(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    for _ in range(rng.integers(1, 4)):
        length = rng.uniform(0.4, 0.9) * size
        angle = rng.uniform(0, math.pi)
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        t = np.linspace(-0.5, 0.5, 40)[:, None]
        direction, normal = np.array([math.cos(angle), math.sin(angle)]), np.array([-math.sin(angle), math.cos(angle)])
        bend = rng.uniform(-0.06, 0.06) * size * (1 - (2 * t) ** 2)  # a gentle arc
        pts = np.array([cx, cy]) + t * length * direction + bend * normal
        mask = _stroke(size, pts, 1, rng.uniform(0.3, 0.6))
        img += mask * rng.choice([-1, 1]) * rng.uniform(0.12, 0.25)


def add_pits(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    s = size / 128.0
    for _ in range(rng.integers(1, 5)):
        r = max(1.2, rng.uniform(1.5, 4.0) * s)
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        hole, rim = np.zeros_like(img), np.zeros_like(img)
        cv2.circle(hole, (int(cx * 16), int(cy * 16)), int(r * 16), 1.0, -1, cv2.LINE_AA, shift=4)
        # The rim catches the light on one side: a bright crescent offset from the hole.
        cv2.circle(rim, (int((cx - 0.6 * r) * 16), int((cy - 0.6 * r) * 16)), int(r * 16), 1.0, -1, cv2.LINE_AA, shift=4)
        rim = np.clip(rim - hole, 0, 1)
        img -= cv2.GaussianBlur(hole, (0, 0), 0.6) * rng.uniform(0.2, 0.35)
        img += cv2.GaussianBlur(rim, (0, 0), 0.6) * rng.uniform(0.08, 0.15)


def add_inclusions(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    s = size / 128.0
    for _ in range(rng.integers(1, 4)):
        mask = np.zeros_like(img)
        # Sizes scale with the image but stay at least a pixel or two wide to remain visible.
        axes = (int(max(3.0, rng.uniform(6, 16) * s) * 16), int(max(1.0, rng.uniform(1.0, 2.2) * s) * 16))
        center = (int(rng.uniform(0.15, 0.85) * size * 16), int(rng.uniform(0.15, 0.85) * size * 16))
        cv2.ellipse(mask, center, axes, rng.uniform(-8, 8), 0, 360, 1.0, -1, cv2.LINE_AA, shift=4)
        # Ragged edges: modulate the blob with fine noise before softening it.
        mask *= np.clip(0.7 + 0.5 * _smooth_noise(rng, size, 1.0, 1.0), 0, 1)
        img -= cv2.GaussianBlur(mask, (0, 0), 0.7) * rng.uniform(0.25, 0.4)


def add_patch(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    rx, ry = rng.uniform(0.15, 0.3, 2)
    blob = 1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2 + 0.5 * _smooth_noise(rng, size, size / 16, size / 16)
    mask = cv2.GaussianBlur((blob > 0).astype(np.float32), (0, 0), 1.5 * size / 128)
    mottle = _smooth_noise(rng, size, 2.0, 2.0) * rng.uniform(0.03, 0.06)
    img += mask * (rng.choice([-1, 1]) * rng.uniform(0.07, 0.14) + mottle)


def add_crack(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]

    def walk(start: np.ndarray, heading: float, steps: int) -> np.ndarray:
        pts, p = [start], start.copy()
        for _ in range(steps):
            heading += rng.normal(0, 0.15)  # the crack keeps its course on the whole...
            step = np.array([math.cos(heading), math.sin(heading)])
            p = p + rng.uniform(1.5, 3.0) * size / 128 * step
            # ...but zigzags from grain to grain: a sideways jitter at every step.
            pts.append(p + rng.normal(0, 0.8) * size / 128 * np.array([-step[1], step[0]]))
        return np.array(pts)

    start = rng.uniform(0.2, 0.8, 2) * size
    heading = rng.uniform(0, 2 * math.pi)
    trunk = walk(start, heading, int(rng.integers(25, 45)))
    paths = [trunk] + [walk(trunk[j], heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), int(rng.integers(6, 15)))
                       for j in rng.integers(5, len(trunk) - 1, rng.integers(0, 3))]
    for path in paths:
        img -= _stroke(size, path, int(rng.integers(1, 3)), 0.4) * rng.uniform(0.2, 0.35)


_DEFECTS = {"scratch": add_scratch, "pit": add_pits, "inclusion": add_inclusions, "patch": add_patch,
            "crack": add_crack}


def defect_image(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (size, size) image of class ``label``."""
    transpose = rng.random() < 0.5  # rolling direction horizontal or vertical
    img = steel_texture(rng, size)
    if label != "normal":
        _DEFECTS[label](img, rng)
    if transpose:
        img = img.T.copy()
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def generate_defect_images(out_dir: str | Path, n_per_class: int = 60, size: int = 128, seed: int = 0,
                           classes=CLASSES) -> dict[str, list[Path]]:
    """Write ``n_per_class`` PNGs of each class to ``out_dir/<class>/``; returns the paths."""
    if n_per_class < 1 or size < 32:
        raise cli.UserError("synthetic images need n_per_class >= 1 and size >= 32")
    unknown = [c for c in classes if c != "normal" and c not in _DEFECTS]
    if unknown:
        raise cli.UserError(f"unknown synthetic defect classes {unknown} (known: {', '.join(CLASSES)})")
    out_dir = Path(out_dir)
    written: dict[str, list[Path]] = {}
    for label in classes:
        folder = out_dir / label
        folder.mkdir(parents=True, exist_ok=True)
        written[label] = []
        for i in range(n_per_class):
            # One generator per image: a file does not depend on how many others are made.
            rng = np.random.default_rng(np.random.SeedSequence([seed, CLASSES.index(label), i]))
            path = folder / f"{label}_{i:04d}.png"
            if not cv2.imwrite(str(path), defect_image(label, size, rng)):
                raise cli.UserError(f"cannot write {path}")
            written[label].append(path)
    return written


def main(argv=None) -> int:
    p = cli.make_parser("data.synth_images", "Write synthetic steel-surface defect images (one folder per class).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-per-class", type=int, default=60)
    p.add_argument("--size", type=int, default=128, help="side of the square images in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    written = generate_defect_images(args.out, args.n_per_class, args.size, args.seed)
    print(f"{sum(map(len, written.values()))} images in {len(written)} classes ({', '.join(written)}) -> {args.out}")
    return 0


if __name__ == "__main__":
    cli.entry(main)
