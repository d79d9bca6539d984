"""Data builders, one per kind of input ("audio", "image", "sequence").

A builder reads a folder (real data or what the synthetic generators write) into a
:class:`DataBundle` of map-style datasets whose items are dicts::

    {"x": Tensor, "y": int class index (-1 unknown), "anomaly": 0/1 (-1 unknown),
     "domain": str ("" if none), "key": str (file or segment name)}
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from edgediag.errors import UserError


@dataclasses.dataclass
class DataConfig:
    root: str = ""
    normal_labels: list[str] = dataclasses.field(default_factory=list)  # labels.csv sets: which labels are normal
    # Anomaly detection on labels.csv sets: labels that are neither normal nor a fault (a
    # stopped machine); left out of training and AUCs, still scored and listed.
    ignore_labels: list[str] = dataclasses.field(default_factory=lambda: ["OFF"])
    on_bad_file: str = "error"  # error | skip (skip warns with a count)
    val_fraction: float = 0.0  # held out of train for validation / threshold calibration
    # Audio anomaly sets whose training clips are all normal (DCASE): this fraction of each
    # (normal/anomalous, domain) group of the test split becomes a labelled validation
    # split, on which a model's calibrate() chooses its detection score (AEGAN-AD); the test
    # split keeps the rest, so the reported test figures stay held out.
    val_from_test: float = 0.0
    # Audio: every whole model.clip_seconds segment of a file is an item (key "file#k"),
    # not only its start. A file's segments share its split, so none leaks across.
    segments: bool = False
    test_fraction: float = 0.25  # when the data has no split column / folder
    split_seed: int = 0
    train_normal_only: bool = False  # anomaly-detection models train on normal data only
    max_items: int = 0  # 0 = all; for quick runs


@dataclasses.dataclass
class DataBundle:
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]
    normal_classes: list[str]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


_BUILDERS: dict[str, Callable[..., DataBundle]] = {}
_KIND_MODULES = {"audio": "edgediag.data.audio", "image": "edgediag.data.images",
                 "sequence": "edgediag.data.sequences"}


def register_data(kind: str):
    def deco(fn):
        _BUILDERS[kind] = fn
        return fn
    return deco


def build_data(kind: str, data_cfg: DataConfig, model_cfg, need_train: bool = True) -> DataBundle:
    """Read ``data_cfg.root`` for a model whose inputs are of ``kind``. ``need_train=False``:
    a folder with only test items is fine (scoring with a fitted checkpoint)."""
    if not data_cfg.root:
        raise UserError("no data folder given (--data DIR)")
    root = Path(data_cfg.root)
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"--data {root} is a file; give the folder that holds the data")
    for name in ("test_fraction", "val_fraction", "val_from_test"):
        value = getattr(data_cfg, name)
        if not 0.0 <= value < 1.0:
            raise UserError(f"data.{name} must be in [0, 1), not {value}")
    if kind not in _BUILDERS and kind in _KIND_MODULES:
        importlib.import_module(_KIND_MODULES[kind])
    if kind not in _BUILDERS:
        raise UserError(f"no data reader for {kind!r} inputs")
    for name in ("val_from_test", "segments"):  # options only the audio reader has
        if getattr(data_cfg, name) and kind != "audio":
            raise UserError(f"data.{name} applies to audio sets only, not {kind!r} inputs")
    bundle = _BUILDERS[kind](root, data_cfg, model_cfg)
    if need_train and not len(bundle.train):
        raise UserError(f"no training items in {root}")
    return bundle


def resolve_data_config(recorded: dict | None, root: str | None = None, overrides=(), source: str = "") -> DataConfig:
    """The data settings a stage reads with: what the artifact recorded, then ``--set
    data.KEY=VALUE``, then ``--data`` (evaluate, predict and bench all resolve it here)."""
    from edgediag.config import apply_overrides, from_dict

    tree = apply_overrides({"data": dict(recorded or {})}, list(overrides))
    if set(tree) != {"data"}:
        raise UserError(f"--set here takes data.KEY=VALUE only, not {sorted(set(tree) - {'data'})}")
    values = tree["data"]
    if root:
        values["root"] = str(root)
    if not values.get("root"):
        raise UserError(f"{source or 'the artifact'}: no data folder recorded; pass --data")
    return from_dict(DataConfig, values, "data.")


def labelled_items(dataset, max_items: int = 0) -> tuple[list[int], int]:
    """Indices of the first ``max_items`` items (0 = all) whose anomaly flag is known, and how
    many were left out because it is not (an ``ignore_labels`` state such as a stopped fan)."""
    n = len(dataset) if not max_items else min(max_items, len(dataset))
    keep = [i for i in range(n) if int(dataset[i].get("anomaly", 0)) >= 0]
    return keep, n - len(keep)
