"""Machine-sound data (kind "audio"): DCASE Task 2 folders and labelled folders.

Layouts, detected from the folder's contents (first match wins):

1. ``labels.csv`` in the root: columns ``path,label`` and optionally ``split``
   (train/val/test; without it a stratified ``data.test_fraction`` split) and ``domain``.
   ``data.normal_labels`` names the normal labels; the others are faults, except the
   *ignored* labels (``data.ignore_labels`` if the data config has that field, else
   ``OFF``): a stopped machine is neither a normal running state nor a fault, so those
   clips are left out of training and out of every AUC (anomaly = -1) but still scored
   and listed in the per-label table, which shows whether a monitor would flag them.
2. The root is one DCASE machine folder: ``<root>/{train,test}/*.wav``.
3. The root holds several: ``<root>/<machine>/{train,test}/*.wav``.

``data.val_from_test`` (a fraction) moves that share of each (normal/anomalous, domain)
group of the test split into a labelled validation split: DCASE training clips
are all normal, so this is where a model can choose its detection score (AEGAN-AD's
``calibrate``) while the rest of the test split stays held out.

DCASE labels come from the file names (:func:`edgediag.data.dcase_names.parse_name`). Classes for a
classifier: machine type × section (2021+) or × id (2020); a machine type with a single
section but several attribute values in its training clips is split by attribute
instead (DCASE 2023 valve: pat_00..pat_03), as attribute-classification systems do.

Audio: soundfile decode, mono mix-down, resampling to the model's rate
(``librosa.resample``), then a fixed length (the model config's ``clip_seconds``; 0 = the
typical length of the training clips) by cropping the start or padding (``pad_mode``:
``wrap`` repeats the clip - machine sound is stationary, so this adds no silence the
model never hears in practice - or ``zeros``). With ``data.segments`` every whole
segment of that length is an item (key ``<file>#k``; a shorter file gives one, padded),
so a 5 s recording scored by a 1 s model gives five items instead of its first second.
Every clip is decoded once, when the
bundle is built, and kept in memory (the sets this targets are small), which also means
a bad file is reported before training starts: empty, silent, truncated, non-audio or
NaN files raise a UserError naming the file, or with ``data.on_bad_file=skip`` are
skipped with a warning and counted in ``bundle.info["skipped_files"]``.

Items: ``{"x": float32 (n_samples,), "y", "anomaly", "domain", "key"}`` plus
``"machine"``, ``"section"`` (DCASE scoring groups; '' for labelled folders) and
``"label"`` (the class name, or the CSV label), which evaluation maps to the model's own
class list, so a checkpoint scores data whose class order differs.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import struct
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from edgediag.data import DataBundle, DataConfig, register_data
from edgediag.data.dcase_names import parse_name
from edgediag.errors import UserError

log = logging.getLogger("edgediag.data.audio")

AUDIO_EXTENSIONS = (".wav", ".flac")
DEFAULT_IGNORED_LABELS = ("OFF",)
SILENCE_PEAK = 1e-6  # below this peak amplitude (full scale 1.0) a clip holds no sound
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class BadAudio(Exception):
    """A file that cannot be used as a clip; the message names the problem."""


@dataclasses.dataclass
class ClipRecord:
    path: Path
    key: str
    split: str
    label: str  # class name (DCASE) or CSV label
    anomaly: int  # 0 normal, 1 anomalous, -1 unknown / not applicable
    domain: str = ""
    machine: str = ""
    section: str = ""
    y: int = -1


# --- decoding ------------------------------------------------------------------------
def _wav_truncated(path: Path) -> bool:
    """True when a RIFF/WAVE file's data chunk claims more bytes than the file holds
    (libsndfile silently reads what is there, so a cut-off copy would pass unnoticed)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return False
            size = path.stat().st_size
            pos = 12
            while pos + 8 <= size:
                fh.seek(pos)
                cid, clen = struct.unpack("<4sI", fh.read(8))
                if cid == b"data":
                    # 0xFFFFFFFF / 0 mark streamed files whose length was never written.
                    return clen not in (0, 0xFFFFFFFF) and pos + 8 + clen > size
                pos += 8 + clen + (clen & 1)
    except OSError:
        return False
    return False


def decode_clip(path: str | Path, sample_rate: int, n_samples: int | None = None, pad_mode: str = "wrap") -> np.ndarray:
    """One clip as float32 mono at ``sample_rate``, cut/padded to ``n_samples`` if given.
    Raises :class:`BadAudio` for files that hold no usable sound."""
    path = Path(path)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise BadAudio(f"not a readable audio file ({str(exc).split(':')[-1].strip() or 'unknown format'})") from None
    if _wav_truncated(path):
        raise BadAudio("is truncated (its header promises more samples than the file holds)")
    if data.shape[0] == 0:
        raise BadAudio("holds no samples (empty)")
    if not np.isfinite(data).all():
        raise BadAudio("contains NaN or infinite samples")
    y = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if float(np.max(np.abs(y))) < SILENCE_PEAK:
        raise BadAudio("is silent (every sample is ~0)")
    if sr != sample_rate:
        import librosa

        y = librosa.resample(y, orig_sr=sr, target_sr=sample_rate).astype(np.float32)
    if n_samples is not None:
        y = fix_length(y, n_samples, pad_mode)
    return np.ascontiguousarray(y, dtype=np.float32)


def fix_length(y: np.ndarray, n_samples: int, pad_mode: str = "wrap") -> np.ndarray:
    """Crop the start ``n_samples`` (as the published code does) or pad."""
    if len(y) >= n_samples:
        return y[:n_samples]
    if pad_mode == "wrap":
        return np.resize(y, n_samples)  # repeats the clip
    if pad_mode == "zeros":
        return np.pad(y, (0, n_samples - len(y)))
    raise UserError(f"model.pad_mode must be wrap or zeros, not {pad_mode!r}")


class AudioClips(Dataset):
    """Decoded clips held in memory, one item dict per clip."""

    def __init__(self, records: list[ClipRecord], clips: np.ndarray):
        self.records, self.clips = records, clips

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        return {"x": torch.from_numpy(self.clips[i]), "y": r.y, "anomaly": r.anomaly, "domain": r.domain,
                "key": r.key, "machine": r.machine, "section": r.section, "label": r.label}


# --- layouts -------------------------------------------------------------------------
def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


def _is_machine_dir(folder: Path) -> bool:
    return any((folder / split).is_dir() for split in ("train", "test"))


def _dcase_records(root: Path, data_cfg: DataConfig) -> tuple[list[ClipRecord], list[str]]:
    if _is_machine_dir(root):
        machine_dirs = [root]
    else:
        machine_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _is_machine_dir(d))
    records, unparsed = [], []
    for mdir in machine_dirs:
        for split in ("train", "test"):
            folder = mdir / split
            if not folder.is_dir():
                continue
            for path in _audio_files(folder):
                meta = parse_name(path.name)
                if meta is None:
                    unparsed.append(str(path))
                    continue
                records.append(ClipRecord(path=path, key=f"{mdir.name}/{split}/{path.name}", split=split,
                                          label=meta["attributes"], anomaly=meta["anomaly"], domain=meta["domain"],
                                          machine=mdir.name, section=meta["section"]))
    return records, unparsed


def _assign_dcase_classes(records: list[ClipRecord]) -> tuple[list[str], dict]:
    """Class names from the training clips; sets each record's ``label`` to its class name
    (or '' when its class is unknown, e.g. an attribute never seen in training)."""
    train = [r for r in records if r.split == "train" and r.anomaly == 0]
    by_machine = defaultdict(list)
    for r in train:
        by_machine[r.machine].append(r)
    by_attribute = {}
    for machine, rs in by_machine.items():
        sections = {r.section for r in rs}
        attrs = {r.label for r in rs if r.label}
        by_attribute[machine] = len(sections) == 1 and len(attrs) > 1

    def class_of(r: ClipRecord) -> str:
        if by_attribute.get(r.machine):
            return f"{r.machine}_{r.label}" if r.label else ""
        return f"{r.machine}_{r.section}"

    classes = sorted({class_of(r) for r in train if class_of(r)})
    for r in records:
        name = class_of(r)
        r.label = name if name in classes else ""
    source = {m: ("attributes" if by_attribute[m] else "sections") for m in by_machine}
    return classes, source


def _labelled_records(root: Path, data_cfg: DataConfig) -> list[ClipRecord]:
    csv_path = root / "labels.csv"
    try:
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read {csv_path}: {exc}") from None
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise UserError(f"{csv_path} needs the columns path,label[,split] (found: {', '.join(rows[0]) if rows else 'nothing'})")
    has_split = "split" in rows[0]
    records = []
    for line, row in enumerate(rows, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel or not label:
            raise UserError(f"{csv_path} line {line}: empty path or label")
        split = ""
        if has_split:
            split = _SPLIT_NAMES.get((row.get("split") or "").strip().lower(), "")
            if not split:
                raise UserError(f"{csv_path} line {line}: split must be train, val or test, not {row.get('split')!r}")
        records.append(ClipRecord(path=root / rel, key=rel, split=split, label=label, anomaly=-1,
                                  domain=(row.get("domain") or "").strip()))
    if not has_split:
        _stratified_split(records, data_cfg.test_fraction, data_cfg.split_seed, "test")
    return records


def _stratified_split(records: list[ClipRecord], fraction: float, seed: int, name: str,
                      pool: str = "", by=lambda r: r.label) -> None:
    """Mark ``fraction`` of each group's records (``by``: the label) in split ``pool`` as
    split ``name`` (the rest of an unsplit pool becomes train)."""
    rng = np.random.default_rng(seed)
    groups = defaultdict(list)
    for r in records:
        if r.split == pool:
            groups[by(r)].append(r)
    for label in sorted(groups):
        rs = groups[label]
        n_out = int(round(len(rs) * fraction))
        if fraction > 0 and n_out == 0 and len(rs) > 1:
            n_out = 1
        chosen = set(rng.permutation(len(rs))[:n_out].tolist())
        for i, r in enumerate(rs):
            r.split = name if i in chosen else (pool or "train")


_YAML11_BOOLS = {True: ("on", "yes", "y", "true"), False: ("off", "no", "n", "false")}


def _label_name(value, labels: set[str]) -> str:
    """A configured label as a string. ``--set data.normal_labels=[ON]`` reaches us as
    ``[True]`` (YAML 1.1 reads ON/OFF/yes/no as booleans), so a boolean is matched back to
    the one label spelled as such a word."""
    if isinstance(value, bool):
        matches = [lab for lab in labels if lab.lower() in _YAML11_BOOLS[value]]
        if len(matches) == 1:
            return matches[0]
    return str(value)


def _typical_seconds(paths: list[Path]) -> float:
    durations = []
    for p in paths:
        try:
            info = sf.info(str(p))
            if info.samplerate > 0 and info.frames > 0:
                durations.append(round(info.frames / info.samplerate, 3))
        except (sf.LibsndfileError, RuntimeError):
            continue  # reported when the clip is decoded
    if not durations:
        return 10.0
    return float(Counter(durations).most_common(1)[0][0])


# --- the builder ---------------------------------------------------------------------
@register_data("audio")
def build_audio(root: Path, data_cfg: DataConfig, model_cfg) -> DataBundle:
    """Read a DCASE or labelled machine-sound folder for ``model_cfg``'s input format.

    Reads from ``model_cfg`` (all optional): ``sample_rate`` (16000), ``clip_seconds``
    (0 = from the data), ``pad_mode`` ("wrap"), ``train_normal_only`` (False; anomaly
    detectors set it so only normal training clips are kept).
    """
    root = Path(root)
    if data_cfg.on_bad_file not in ("error", "skip"):
        raise UserError(f"data.on_bad_file must be error or skip, not {data_cfg.on_bad_file!r}")
    sample_rate = int(getattr(model_cfg, "sample_rate", 16000) or 16000)
    pad_mode = getattr(model_cfg, "pad_mode", "wrap")
    normal_only = bool(data_cfg.train_normal_only or getattr(model_cfg, "train_normal_only", False))
    info: dict = {"root": str(root), "sample_rate": sample_rate}

    if (root / "labels.csv").is_file():
        records = _labelled_records(root, data_cfg)
        labels = {r.label for r in records}
        normal = {_label_name(v, labels) for v in data_cfg.normal_labels}
        ignored = {_label_name(v, labels) for v in getattr(data_cfg, "ignore_labels", DEFAULT_IGNORED_LABELS)} - normal
        unknown = normal - labels
        if unknown:
            raise UserError(f"data.normal_labels {sorted(unknown)} not among the labels of {root / 'labels.csv'} "
                            f"({', '.join(sorted(labels))})")
        for r in records:
            r.machine = root.name
            r.anomaly = -1 if not normal or r.label in ignored else int(r.label not in normal)
        if normal_only:
            if not normal:
                raise UserError(f"{root / 'labels.csv'}: this model trains on normal clips only; name them with "
                                f"--set data.normal_labels=[LABEL] (labels: {', '.join(sorted(labels))})")
            records = [r for r in records if r.split != "train" or r.anomaly == 0]
            classes = sorted({r.label for r in records if r.split == "train"})
        else:
            classes = sorted({r.label for r in records if r.split == "train"})
        normal_classes = [c for c in classes if c in normal]
        info.update(layout="labels.csv", machines=[root.name], sections={}, class_source="labels",
                    ignored_labels=sorted(ignored & labels), normal_labels=sorted(normal))
    else:
        records, unparsed = _dcase_records(root, data_cfg)
        if unparsed:
            msg = f"{len(unparsed)} file(s) with names that are not DCASE names, e.g. {unparsed[0]}"
            if data_cfg.on_bad_file == "error":
                raise UserError(msg + " (pass --set data.on_bad_file=skip to skip them)")
            log.warning("skipping %s", msg)
        if not records:
            raise UserError(f"no audio found in {root}: expected labels.csv, <machine>/{{train,test}}/*.wav "
                            f"or {{train,test}}/*.wav")
        if normal_only:
            records = [r for r in records if r.split != "train" or r.anomaly == 0]
        classes, class_source = _assign_dcase_classes(records)
        normal_classes = list(classes)
        machines = sorted({r.machine for r in records})
        info.update(layout="dcase", machines=machines,
                    sections={m: sorted({r.section for r in records if r.machine == m}) for m in machines},
                    class_source=class_source, skipped_names=unparsed[:20], n_skipped_names=len(unparsed))

    class_index = {c: i for i, c in enumerate(classes)}
    for r in records:
        r.y = class_index.get(r.label, -1)
    train_records = [r for r in records if r.split == "train"]
    if data_cfg.val_fraction > 0 and not any(r.split == "val" for r in records):
        _stratified_split(train_records, data_cfg.val_fraction, data_cfg.split_seed, "val", pool="train")
    if data_cfg.val_from_test:
        if not 0 < data_cfg.val_from_test < 1:
            raise UserError(f"data.val_from_test must be in (0, 1), not {data_cfg.val_from_test}")
        test = [r for r in records if r.split == "test"]
        if len({r.anomaly for r in test} - {-1}) < 2:
            raise UserError(f"data.val_from_test needs a test split with normal and anomalous clips ({root})")
        _stratified_split(test, data_cfg.val_from_test, data_cfg.split_seed + 1, "val", pool="test",
                          by=lambda r: (r.anomaly, r.domain))

    seconds = float(getattr(model_cfg, "clip_seconds", 0.0) or 0.0)
    if seconds <= 0:
        seconds = _typical_seconds([r.path for r in records if r.split == "train"])
    n_samples = int(round(seconds * sample_rate))
    info.update(clip_seconds=seconds, n_samples=n_samples,
                domains=sorted({r.domain for r in records if r.domain}))

    splits = {}
    skipped: list[str] = []
    for split in ("train", "val", "test"):
        rs = [r for r in records if r.split == split]
        if data_cfg.max_items and len(rs) > data_cfg.max_items:
            pick = np.sort(np.random.default_rng(data_cfg.split_seed).permutation(len(rs))[:data_cfg.max_items])
            rs = [rs[i] for i in pick]
        splits[split] = _decode_all(rs, sample_rate, n_samples, pad_mode, data_cfg.on_bad_file, skipped, split,
                                    data_cfg.segments)
    if skipped and not any(len(clips) for clips in splits.values()):  # one line, not a warning per file first
        raise UserError(f"no readable audio files in {root}: all {len(skipped)} skipped as bad, e.g. {skipped[0]}")
    for problem in skipped:
        log.warning("skipping %s", problem)
    if skipped:
        log.warning("skipped %d bad audio file(s) (data.on_bad_file=skip)", len(skipped))
    info.update(skipped_files=skipped[:50], n_skipped=len(skipped))
    if classes:
        info["class_counts"] = {c: sum(1 for r in splits["train"].records if r.label == c) for c in classes}
    return DataBundle(train=splits["train"], val=splits["val"] if len(splits["val"]) else None,
                      test=splits["test"] if len(splits["test"]) else None,
                      classes=classes, normal_classes=normal_classes, info=info)


def _decode_all(records: list[ClipRecord], sample_rate: int, n_samples: int, pad_mode: str, on_bad: str,
                skipped: list[str], split: str, segments: bool = False) -> AudioClips:
    kept, clips = [], []
    for r in tqdm(records, desc=f"decoding {split}", unit="clip", leave=False, disable=len(records) < 200):
        if not r.path.is_file():
            problem = "not found"
        else:
            try:
                y = decode_clip(r.path, sample_rate, None if segments else n_samples, pad_mode)
            except BadAudio as exc:
                problem = str(exc)
            else:
                n_seg = max(1, len(y) // n_samples) if segments else 1
                for k in range(n_seg):
                    clips.append(fix_length(y[k * n_samples:], n_samples, pad_mode))
                    kept.append(dataclasses.replace(r, key=f"{r.key}#{k}") if segments else r)
                continue
        if on_bad == "error":
            raise UserError(f"audio file {r.path}: {problem} (pass --set data.on_bad_file=skip to skip such files)")
        skipped.append(f"{r.key}: {problem}")  # logged by build_audio (not at all when no file was usable)
    array = np.stack(clips) if clips else np.zeros((0, n_samples), dtype=np.float32)
    return AudioClips(kept, array)
