"""A NEU-like synthetic set: hot-rolled steel strip surfaces with six kinds of defect.

Modelled on the NEU surface defect database (Song & Yan, 2013: 1,800 grey 200x200 images,
300 per class) as the MemoryMamba paper uses it; the classes and their look:

    crazing          a fine, low-contrast network of dark cracks over much of the surface
    inclusion        dark (sometimes light-rimmed) specks and streaks along the rolling direction
    patches          large irregular blotches of different brightness with mottled insides
    pitted_surface   a cluster of many small dark pits on a roughened area
    rolled-in_scale  flakes of oxide scale pressed into the surface, light and dark, streaky
    scratches        long thin bright or dark lines, fading in places

NEU's difficulty is kept on purpose: uneven lighting, grain, low contrast, defects from faint
to strong, and the same rolling-direction streaks behind every class (rolled-in scale and
pitted surface, crazing and rolled-in scale are the confusable pairs). Each image has its
own generator seeded by (seed, class, index): the same arguments give the same files.

    python -m edgediag.data.synth_neu --out data/neu_like --n-per-class 300 --size 200
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from edgediag import cli
from edgediag.data.synth_images import _smooth_noise, _stroke

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


def strip_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Hot-rolled strip in [0, 1]: dull grey, grain, streaks along x, uneven lighting."""
    s = size / 200.0
    base = rng.uniform(0.3, 0.6)
    streaks = _smooth_noise(rng, size, rng.uniform(12, 30) * s, rng.uniform(0.6, 1.5) * s) * rng.uniform(0.015, 0.04)
    grain = _smooth_noise(rng, size, 0.8, 0.8) * rng.uniform(0.02, 0.045)
    light = _smooth_noise(rng, size, size / 3, size / 3) * rng.uniform(0.02, 0.07)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy - 0.5) * rng.uniform(0.0, 0.12)
    return base + streaks + grain + light + gradient


def _region(rng: np.random.Generator, size: int, cover: tuple[float, float]) -> np.ndarray:
    """A soft irregular mask covering about ``cover`` of the image (where a defect lies)."""
    noise = _smooth_noise(rng, size, size / 8, size / 8)
    level = np.quantile(noise, 1 - rng.uniform(*cover))
    return cv2.GaussianBlur((noise > level).astype(np.float32), (0, 0), size / 40)


def add_crazing(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    s = size / 200.0
    # Zero crossings of band-pass noise form a closed, cell-like web of thin lines;
    # stretching the noise along x gives the elongated cells of real crazing.
    sx, sy = rng.uniform(5.0, 9.0) * s, rng.uniform(2.5, 4.5) * s
    web = np.zeros_like(img)
    for _ in range(int(rng.integers(1, 3))):
        band = _smooth_noise(rng, size, sx, sy) - 0.6 * _smooth_noise(rng, size, 3 * sx, 3 * sy)
        web = np.maximum(web, np.exp(-(band / rng.uniform(0.15, 0.3)) ** 2))
    cover = _region(rng, size, (0.6, 1.0))
    img -= cv2.GaussianBlur(web, (0, 0), 0.7 * s) * cover * rng.uniform(0.1, 0.22)
    img += _smooth_noise(rng, size, 1.0, 1.0) * cover * rng.uniform(0.01, 0.025)  # roughened


def add_inclusions(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    s = size / 200.0
    for _ in range(int(rng.integers(2, 8))):
        mask = np.zeros_like(img)
        length, width = rng.uniform(5, 25) * s, rng.uniform(2.0, 6.0) * s
        center = (int(rng.uniform(0.1, 0.9) * size * 16), int(rng.uniform(0.1, 0.9) * size * 16))
        cv2.ellipse(mask, center, (int(length * 16), int(width * 16)), rng.uniform(-10, 10), 0, 360, 1.0, -1,
                    cv2.LINE_AA, shift=4)
        mask *= np.clip(0.6 + 0.6 * _smooth_noise(rng, size, 1.5 * s, 1.0), 0, 1)  # ragged, broken up
        mask = cv2.GaussianBlur(mask, (0, 0), 0.8 * s)
        img -= mask * rng.uniform(0.15, 0.4)
        if rng.random() < 0.4:  # a light rim where the inclusion lifted the surface
            img += (cv2.GaussianBlur(mask, (0, 0), 3 * s) - mask).clip(0) * rng.uniform(0.1, 0.3)


def add_patches(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    mask = _region(rng, size, (0.1, 0.45))
    mottle = _smooth_noise(rng, size, 3.0, 3.0) * rng.uniform(0.02, 0.06)
    sign = -1 if rng.random() < 0.8 else 1  # mostly dark blotches, as in NEU
    img += mask * (sign * rng.uniform(0.08, 0.3) + mottle)


def add_pits(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    s = size / 200.0
    area = _region(rng, size, (0.15, 0.7))
    pits = np.zeros_like(img)
    n = int(rng.integers(60, 300))
    ys, xs = rng.integers(0, size, (2, n * 4))
    keep = rng.random(n * 4) < area[ys, xs]  # pits fall inside the pitted area
    for y, x in list(zip(ys[keep], xs[keep]))[:n]:
        r = max(0.8, rng.uniform(1.2, 4.0) * s)
        cv2.circle(pits, (int(x * 16), int(y * 16)), int(r * 16), float(rng.uniform(0.5, 1.0)), -1, cv2.LINE_AA,
                   shift=4)
    img -= cv2.GaussianBlur(pits, (0, 0), 0.6) * rng.uniform(0.2, 0.4)
    img += _smooth_noise(rng, size, 1.2, 1.2) * area * rng.uniform(0.015, 0.04)


def add_scale(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    s = size / 200.0
    area = _region(rng, size, (0.4, 1.0))
    flakes = np.zeros_like(img)
    for _ in range(int(rng.integers(40, 160))):
        x, y = rng.uniform(0, size, 2)
        if rng.random() > area[int(y) % size, int(x) % size]:
            continue
        n_pts = int(rng.integers(4, 8))
        ang = np.sort(rng.uniform(0, 2 * math.pi, n_pts))
        rad = rng.uniform(2.5, 8.0, n_pts) * s
        stretch = rng.uniform(1.5, 3.0)  # pressed flat along the rolling direction
        pts = np.stack([x + stretch * rad * np.cos(ang), y + rad * np.sin(ang)], 1)
        cv2.fillPoly(flakes, [np.round(pts * 16).astype(np.int32)], float(rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1)),
                     cv2.LINE_AA, shift=4)
    img += cv2.GaussianBlur(flakes, (0, 0), 0.7 * s) * rng.uniform(0.15, 0.3)
    img += _smooth_noise(rng, size, 6 * s, 0.8 * s) * area * rng.uniform(0.02, 0.05)  # streaky scale bed


def add_scratches(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    base_angle = rng.uniform(0, math.pi)
    for _ in range(int(rng.integers(1, 5))):
        angle = base_angle + rng.normal(0, 0.08)  # scratches of one event run nearly parallel
        length = rng.uniform(0.5, 1.2) * size
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        t = np.linspace(-0.5, 0.5, 60)[:, None]
        direction, normal = np.array([math.cos(angle), math.sin(angle)]), np.array([-math.sin(angle), math.cos(angle)])
        bend = rng.uniform(-0.03, 0.03) * size * (1 - (2 * t) ** 2)
        pts = np.array([cx, cy]) + t * length * direction + bend * normal
        line = _stroke(size, pts, int(rng.integers(2, 5)), rng.uniform(0.4, 0.9))
        # Fainter where the tool pressed less: the line's strength varies along its length.
        line *= np.clip(1.0 + 0.4 * _smooth_noise(rng, size, size / 25, size / 25), 0.3, 1)
        img += line * rng.choice([-1, 1]) * rng.uniform(0.15, 0.35)


_DEFECTS = {"crazing": add_crazing, "inclusion": add_inclusions, "patches": add_patches,
            "pitted_surface": add_pits, "rolled-in_scale": add_scale, "scratches": add_scratches}


def neu_image(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (size, size) image of class ``label``."""
    img = strip_texture(rng, size)
    _DEFECTS[label](img, rng)
    # The camera: contrast and gamma differ from image to image, plus sensor noise.
    img = (img - img.mean()) * rng.uniform(0.7, 1.4) + rng.uniform(0.3, 0.6)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    img += rng.standard_normal(img.shape).astype(np.float32) * rng.uniform(0.005, 0.02)
    if rng.random() < 0.5:  # rolling direction horizontal or vertical
        img = img.T
    if rng.random() < 0.5:
        img = img[::-1]
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def generate_neu_like(out_dir: str | Path, n_per_class: int = 300, size: int = 200, seed: int = 0,
                      classes=CLASSES) -> dict[str, list[Path]]:
    """Write ``n_per_class`` PNGs of each class to ``out_dir/<class>/``; returns the paths."""
    if n_per_class < 1 or size < 32:
        raise cli.UserError("synthetic images need n_per_class >= 1 and size >= 32")
    unknown = [c for c in classes if c not in _DEFECTS]
    if unknown:
        raise cli.UserError(f"unknown NEU-like classes {unknown} (known: {', '.join(CLASSES)})")
    out_dir = Path(out_dir)
    written: dict[str, list[Path]] = {}
    for label in classes:
        folder = out_dir / label
        folder.mkdir(parents=True, exist_ok=True)
        written[label] = []
        for i in range(n_per_class):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 100 + CLASSES.index(label), i]))
            path = folder / f"{label}_{i:04d}.png"
            if not cv2.imwrite(str(path), np.ascontiguousarray(neu_image(label, size, rng))):
                raise cli.UserError(f"cannot write {path}")
            written[label].append(path)
    return written


def main(argv=None) -> int:
    p = cli.make_parser("data.synth_neu", "Write a NEU-like synthetic steel-strip defect set (one folder per class).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-per-class", type=int, default=300, help="images per class (default 300, as NEU)")
    p.add_argument("--size", type=int, default=200, help="side of the square images in pixels (default 200, as NEU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    written = generate_neu_like(args.out, args.n_per_class, args.size, args.seed)
    print(f"{sum(map(len, written.values()))} images in {len(written)} classes ({', '.join(written)}) -> {args.out}")
    return 0


if __name__ == "__main__":
    cli.entry(main)
