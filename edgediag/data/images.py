"""Image data ("image" kind): defect-image folders for the image classifiers.

Two layouts are read:

* an image folder: one subfolder per class (``ROOT/<class>/**/*.png``), optionally under
  ``ROOT/train`` and ``ROOT/test`` (then that split is used);
* a ``labels.csv`` with an image column (``image``/``file``/``path``) and a class column
  (``class``/``label``); optional ``split`` (train/val/test) and ``is_defect``/``anomaly``
  columns. The shared magnetic-tile set has ``image,mask,class,is_defect``.

Without a given split, a deterministic stratified split is drawn per class from
``data.split_seed`` and ``data.test_fraction`` (then ``data.val_fraction`` of the rest);
its keys go to ``bundle.info["split"]`` so the train verb stores them in the checkpoint.

Images are decoded once with OpenCV, resized to the model's ``image_size`` (a square) and
cached in memory as uint8; items hold float tensors in [0, 1], (C, H, W). Normalisation
is the model's job (its buffers take the per-channel statistics of the training split,
``info["pixel_mean"]``/``info["pixel_std"]``), so an exported graph takes [0, 1] images.
Training items are augmented with random flips and small shifts (and transposes with the
model's ``augment_transpose``); others never are.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from edgediag.data import DataBundle, DataConfig, register_data
from edgediag.errors import UserError

log = logging.getLogger("edgediag.data.images")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
# Class names taken as the defect-free class when neither data.normal_labels nor an
# is_defect column says which classes are normal.
NORMAL_NAMES = {"free", "normal", "good", "ok", "none", "no_defect", "non_defect", "nodefect", "pass"}
IMAGE_COLUMNS = ("image", "file", "filename", "path", "img")
CLASS_COLUMNS = ("class", "label", "category", "defect")
ANOMALY_COLUMNS = ("is_defect", "anomaly", "is_anomaly", "defect_flag")
# Sub-folders of a class folder that hold masks or ground truth, not samples.
MASK_DIRS = {"mask", "masks", "gt", "ground_truth", "groundtruth", "labels", "annotations"}
DEFAULT_IMAGE_SIZE = 160
MAX_SHIFT = 0.06  # train-time shifts: up to 6 % of the side, small enough to keep a defect in view


@dataclass
class _Entry:
    path: Path
    key: str  # path relative to the data root: stable across machines
    label: str
    anomaly: int  # -1 unknown (decided from the normal classes later)
    split: str  # "" = not given


# --- listing -------------------------------------------------------------------------
def _pick_column(header: list[str], names: tuple[str, ...]) -> str | None:
    lower = {h.strip().lower(): h for h in header}
    return next((lower[n] for n in names if n in lower), None)


def _split_name(value: str, where: str) -> str:
    v = value.strip().lower()
    if v in ("train", "training"):
        return "train"
    if v in ("val", "valid", "validation", "dev"):
        return "val"
    if v in ("test", "eval", "evaluation"):
        return "test"
    raise UserError(f"{where}: unknown split {value!r} (train, val or test)")


def _list_csv(root: Path, csv_path: Path) -> list[_Entry]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read {csv_path}: {exc}") from None
    image_col, class_col = _pick_column(header, IMAGE_COLUMNS), _pick_column(header, CLASS_COLUMNS)
    if image_col is None or class_col is None:
        raise UserError(f"{csv_path} needs an image column ({'/'.join(IMAGE_COLUMNS)}) and a class column "
                        f"({'/'.join(CLASS_COLUMNS)}); it has: {', '.join(header) or 'no header'}")
    anomaly_col, split_col = _pick_column(header, ANOMALY_COLUMNS), _pick_column(header, ("split", "subset"))
    entries = []
    for line, row in enumerate(rows, start=2):
        rel, label = (row.get(image_col) or "").strip(), (row.get(class_col) or "").strip()
        if not rel or not label:
            raise UserError(f"{csv_path} line {line}: empty image or class")
        anomaly = -1
        if anomaly_col and (row.get(anomaly_col) or "").strip() != "":
            raw = row[anomaly_col].strip().lower()
            if raw not in ("0", "1", "true", "false", "yes", "no"):
                raise UserError(f"{csv_path} line {line}: {anomaly_col} must be 0/1, not {row[anomaly_col]!r}")
            anomaly = int(raw in ("1", "true", "yes"))
        split = _split_name(row[split_col], f"{csv_path} line {line}") if split_col and row.get(split_col) else ""
        entries.append(_Entry(root / rel, Path(rel).as_posix(), label, anomaly, split))
    return entries


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not any(part.lower() in MASK_DIRS or part.startswith(".")
                              for part in p.relative_to(folder).parts[:-1])
                  and not p.name.startswith("."))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _list_folders(root: Path) -> list[_Entry]:
    split_dirs = {d.name.lower(): d for d in _class_dirs(root)}
    given = [s for s in ("train", "val", "test") if s in split_dirs]
    layout = [(split_dirs[s], s) for s in given] if "train" in given and "test" in given else [(root, "")]
    entries = []
    for base, split in layout:
        for class_dir in _class_dirs(base):
            for path in _images_under(class_dir):
                entries.append(_Entry(path, path.relative_to(root).as_posix(), class_dir.name, -1, split))
    return entries


def list_images(root: Path) -> tuple[list[_Entry], str]:
    """All labelled images under ``root`` and the layout they came from."""
    csv_path = root / "labels.csv"
    entries, layout = (_list_csv(root, csv_path), "labels.csv") if csv_path.is_file() else (_list_folders(root), "folders")
    if not entries:
        raise UserError(f"no images found in {root} (expected labels.csv or one subfolder of images per class)")
    entries.sort(key=lambda e: e.key)  # listing order must not depend on the file system
    return entries, layout


def _normal_classes(entries: list[_Entry], classes: list[str], data_cfg: DataConfig, root: Path) -> list[str]:
    if data_cfg.normal_labels:
        unknown = sorted(set(data_cfg.normal_labels) - set(classes))
        if unknown:
            raise UserError(f"data.normal_labels {unknown} are not classes of {root} ({', '.join(classes)})")
        return [c for c in classes if c in data_cfg.normal_labels]
    flagged = [e for e in entries if e.anomaly >= 0]
    if flagged:
        defect = {e.label for e in flagged if e.anomaly == 1}
        return [c for c in classes if c not in defect and any(e.label == c for e in flagged)]
    return [c for c in classes if c.lower().replace("-", "_").replace(" ", "_") in NORMAL_NAMES]


# --- decoding ------------------------------------------------------------------------
def _truncated(data: bytes, suffix: str) -> bool:
    """JPEG and PNG files end with a marker; OpenCV decodes a cut-off file without error
    (grey bottom rows), so a missing end marker is the reliable sign of truncation."""
    if suffix in (".jpg", ".jpeg"):
        return b"\xff\xd9" not in data[-1024:]
    if suffix == ".png":
        return b"IEND" not in data[-64:]
    return False


@contextlib.contextmanager
def opencv_quiet() -> Iterator[None]:
    """No OpenCV (or its FFmpeg's) log lines on stderr for a broken file inside the block:
    the caller reports the file in one line."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def quiet_imdecode(data: bytes, flags: int) -> np.ndarray | None:
    with opencv_quiet():
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def decode_image(path: Path) -> np.ndarray:
    """uint8 image, (H, W) for grey or (H, W, 3) RGB; ValueError says what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read ({exc.strerror or exc})") from None
    if not data:
        raise ValueError("empty file")
    if _truncated(data, path.suffix.lower()):
        raise ValueError("truncated (no end-of-image marker)")
    img = quiet_imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ValueError("not a decodable image")
    if img.dtype == np.uint16:  # 16-bit PNG/TIFF: keep the range, drop the precision
        img = (img / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        img = cv2.normalize(img.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3:
        img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)
        # Colour files of grey content (common for scanned defects) count as grey.
        if np.array_equal(img[:, :, 0], img[:, :, 1]) and np.array_equal(img[:, :, 1], img[:, :, 2]):
            img = img[:, :, 0]
    return img


# (path, mtime, size) -> resized uint8 array: a second bundle of the same folder (the
# train verb evaluating after training, tests) does not decode again.
_CACHE: dict[tuple[str, float, int], np.ndarray] = {}
_CACHE_LIMIT = 2 << 30  # bytes


def _load_resized(path: Path, size: int) -> np.ndarray:
    try:
        key = (str(path.resolve()), path.stat().st_mtime, size)
    except OSError as exc:
        raise ValueError(f"cannot read ({exc.strerror or exc})") from None
    if key in _CACHE:
        return _CACHE[key]
    img = decode_image(path)
    # INTER_AREA averages when shrinking (no aliasing of fine scratches), cubic when enlarging.
    interp = cv2.INTER_AREA if min(img.shape[:2]) >= size else cv2.INTER_CUBIC
    img = cv2.resize(img, (size, size), interpolation=interp)
    if sum(a.nbytes for a in _CACHE.values()) + img.nbytes <= _CACHE_LIMIT:
        _CACHE[key] = img
    return img


def clear_cache() -> None:
    _CACHE.clear()


# --- splits --------------------------------------------------------------------------
def _per_class_pick(indices_by_class: dict[str, list[int]], fraction: float, seed: int) -> set[int]:
    """A stratified, seeded choice of ``fraction`` of every class (at least one item of a
    class with two or more, so every class is seen on both sides)."""
    picked: set[int] = set()
    for label in sorted(indices_by_class):
        idx = indices_by_class[label]
        if fraction <= 0 or len(idx) < 2:
            continue
        digest = hashlib.sha256(f"{seed}/{label}".encode()).digest()  # a stable per-class seed
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        n = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        picked.update(idx[j] for j in rng.permutation(len(idx))[:n])
    return picked


def _by_class(entries: list[_Entry], indices) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in indices:
        out.setdefault(entries[i].label, []).append(i)
    return out


def split_entries(entries: list[_Entry], data_cfg: DataConfig) -> dict[str, list[int]]:
    """Indices of train/val/test: the given split where there is one, else stratified."""
    if not 0 <= data_cfg.test_fraction < 1 or not 0 <= data_cfg.val_fraction < 1:
        raise UserError("data.test_fraction and data.val_fraction must be in [0, 1)")
    all_idx = list(range(len(entries)))
    if any(e.split for e in entries):
        split = {s: [i for i in all_idx if entries[i].split == s] for s in ("train", "val", "test")}
        unsplit = [entries[i].key for i in all_idx if not entries[i].split]
        if unsplit:
            raise UserError(f"{len(unsplit)} images have no split while others do (first: {unsplit[0]})")
    else:
        test = _per_class_pick(_by_class(entries, all_idx), data_cfg.test_fraction, data_cfg.split_seed)
        split = {"train": [i for i in all_idx if i not in test], "val": [], "test": sorted(test)}
    if data_cfg.val_fraction > 0 and not split["val"]:
        val = _per_class_pick(_by_class(entries, split["train"]), data_cfg.val_fraction, data_cfg.split_seed + 1)
        split["train"], split["val"] = [i for i in split["train"] if i not in val], sorted(val)
    return split


def _subsample(entries: list[_Entry], max_items: int, seed: int) -> list[_Entry]:
    """``max_items`` entries in the class proportions of the whole set (quick runs)."""
    if not max_items or max_items >= len(entries):
        return entries
    keep = _per_class_pick(_by_class(entries, range(len(entries))), max_items / len(entries), seed + 2)
    return [e for i, e in enumerate(entries) if i in keep]


# --- datasets ------------------------------------------------------------------------
class ImageDataset(Dataset):
    """Cached uint8 images -> {"x": float (C, H, W) in [0, 1], "y", "anomaly", "domain", "key"}."""

    def __init__(self, images: list[np.ndarray], labels: list[int], anomaly: list[int], keys: list[str],
                 augment: bool = False, max_shift: float = MAX_SHIFT, transpose: bool = False):
        self.images, self.labels, self.anomaly, self.keys = images, labels, anomaly, keys
        self.augment, self.max_shift, self.transpose = augment, max_shift, transpose

    def __len__(self) -> int:
        return len(self.images)

    def _augmented(self, img: np.ndarray) -> np.ndarray:
        # torch's RNG: seeded per epoch by the engine and per worker by the DataLoader.
        flip_h, flip_v, dx, dy = torch.rand(4).tolist()
        if flip_h < 0.5:
            img = img[:, ::-1]
        if flip_v < 0.5:
            img = img[::-1]
        # Only drawn when asked for, so the other draws (and old runs) stay as they were.
        if self.transpose and float(torch.rand(())) < 0.5:  # images are square (resized)
            img = img.swapaxes(0, 1)
        h, w = img.shape[:2]
        tx, ty = (2 * dx - 1) * self.max_shift * w, (2 * dy - 1) * self.max_shift * h
        shift = np.float32([[1, 0, tx], [0, 1, ty]])
        return cv2.warpAffine(np.ascontiguousarray(img), shift, (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101)

    def __getitem__(self, i: int) -> dict:
        img = self.images[i]
        if self.augment:
            img = self._augmented(img)
        x = torch.from_numpy(np.ascontiguousarray(img)).float().div_(255.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return {"x": x.contiguous(), "y": self.labels[i], "anomaly": self.anomaly[i], "domain": "", "key": self.keys[i]}


def channel_stats(images: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1] units) of uint8 images (H, W, C)."""
    stack = np.stack(images).reshape(len(images), -1, images[0].shape[-1]).astype(np.float64) / 255.0
    mean = stack.mean(axis=(0, 1))
    std = np.maximum(stack.std(axis=(0, 1)), 1e-3)  # a flat channel must not divide by ~0
    return [float(m) for m in mean], [float(s) for s in std]


@register_data("image")
def build_images(root: Path, data_cfg: DataConfig, model_cfg) -> DataBundle:
    """Read an image folder or labels.csv into train/val/test image datasets.

    From the model config: ``image_size`` (side of the square the images are resized to)
    and ``color`` ("auto": grey if every image is grey, else RGB; "gray"; "rgb").
    """
    size = int(getattr(model_cfg, "image_size", DEFAULT_IMAGE_SIZE) or DEFAULT_IMAGE_SIZE)
    color = str(getattr(model_cfg, "color", "auto") or "auto").lower()
    transpose = bool(getattr(model_cfg, "augment_transpose", False))
    if color not in ("auto", "gray", "rgb"):
        raise UserError(f"model.color must be auto, gray or rgb, not {color!r}")
    if data_cfg.on_bad_file not in ("error", "skip"):
        raise UserError(f"data.on_bad_file must be error or skip, not {data_cfg.on_bad_file!r}")
    entries, layout = list_images(root)
    entries = _subsample(entries, data_cfg.max_items, data_cfg.split_seed)

    images, good, bad = [], [], []
    for entry in tqdm(entries, desc=f"decoding {root.name}", unit="img", leave=False, mininterval=1.0,
                      disable=len(entries) < 200):
        try:
            images.append(_load_resized(entry.path, size))
            good.append(entry)
        except ValueError as exc:
            if data_cfg.on_bad_file == "error":
                raise UserError(f"bad image {entry.path}: {exc} (data.on_bad_file=skip skips such files)") from None
            bad.append(entry.key)
    if not good:  # one line: the skips are in it
        raise UserError(f"no readable images in {root}" + (f" ({len(bad)} skipped as bad, e.g. {bad[0]})" if bad else ""))
    if bad:
        log.warning("skipped %d unreadable image%s (first: %s)", len(bad), "s" if len(bad) > 1 else "", bad[0])
    entries = good

    grey = all(img.ndim == 2 for img in images)
    channels = 1 if color == "gray" or (color == "auto" and grey) else 3
    if channels == 1:
        images = [img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) for img in images]
        images = [img[:, :, None] for img in images]
    else:
        images = [cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img for img in images]

    classes = sorted({e.label for e in entries})
    normal = _normal_classes(entries, classes, data_cfg, root)
    class_index = {c: i for i, c in enumerate(classes)}
    anomaly = [e.anomaly if e.anomaly >= 0 else (int(e.label not in normal) if normal else -1) for e in entries]

    split = split_entries(entries, data_cfg)
    if data_cfg.train_normal_only:
        if not normal:
            raise UserError(f"data.train_normal_only needs the normal classes of {root} (set data.normal_labels)")
        split["train"] = [i for i in split["train"] if entries[i].label in normal]
    if not split["train"]:
        raise UserError(f"no training images in {root} after the split")

    def subset(indices: list[int], augment: bool) -> ImageDataset | None:
        if not indices:
            return None
        return ImageDataset([images[i] for i in indices], [class_index[entries[i].label] for i in indices],
                            [anomaly[i] for i in indices], [entries[i].key for i in indices], augment=augment,
                            transpose=transpose)

    mean, std = channel_stats([images[i] for i in split["train"]])
    counts = [sum(entries[i].label == c for i in split["train"]) for c in classes]
    keys = {name: [entries[i].key for i in idx] for name, idx in split.items()}
    info = {
        "layout": layout, "image_size": size, "channels": channels, "pixel_mean": mean, "pixel_std": std,
        "class_counts": counts, "skipped": len(bad), "split": keys,
        # A digest of the test keys: evaluate rebuilds the split from the same settings and
        # the model compares digests to tell when the data folder has changed since.
        "split_digest": hashlib.sha256("\n".join(keys["test"]).encode()).hexdigest()[:16],
        "split_given": any(e.split for e in entries),
    }
    trained_on = str(getattr(model_cfg, "split_digest", "") or "")
    if trained_on and trained_on != info["split_digest"]:
        log.warning("the test split of %s differs from the one this model was trained with "
                    "(files added or removed, or other split settings): test metrics are not comparable", root)
    log.info("%s (%s): %d images, %d classes, %d channel%s, %d px; train %d, val %d, test %d",
             root, layout, len(entries), len(classes), channels, "" if channels == 1 else "s", size,
             len(split["train"]), len(split["val"]), len(split["test"]))
    return DataBundle(train=subset(split["train"], True), val=subset(split["val"], False),
                      test=subset(split["test"], False), classes=classes, normal_classes=normal, info=info)
