"""A small model and data kind registered for engine tests (the engine, train verb and
checkpoints under test are the real ones). Data: ``toy.npz`` with x (N, 8), y (N,)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgediag.data import DataBundle, register_data
from edgediag.models import DiagnosisModel, register_model


class _Arrays(torch.utils.data.Dataset):
    def __init__(self, x, y, anomaly=None):
        self.x, self.y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
        self.anomaly = (self.y != 0).long() if anomaly is None else torch.as_tensor(anomaly)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": int(self.y[i]), "anomaly": int(self.anomaly[i]), "domain": "", "key": str(i)}


@register_data("toy")
def build_toy(root: Path, data_cfg, model_cfg) -> DataBundle:
    arrays = np.load(root / "toy.npz")
    x, y = arrays["x"], arrays["y"]
    anomaly = arrays["anomaly"] if "anomaly" in arrays else (y != 0).astype(np.int64)  # -1: unknown (a stopped machine)
    n_test = len(y) // 4
    test = _Arrays(x[:n_test], y[:n_test], anomaly[:n_test])
    return DataBundle(train=_Arrays(x[n_test:], y[n_test:]), val=test, test=test, classes=["normal", "fault"],
                      normal_classes=["normal"])


def write_toy_data(root: Path, n: int = 256, seed: int = 0, unknown: int = 0) -> Path:
    """``unknown``: the first items get anomaly flag -1 (neither normal nor a fault)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 8)) + y[:, None] * 2.5
    anomaly = (y != 0).astype(np.int64)
    anomaly[:unknown] = -1
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "toy.npz", x=x.astype(np.float32), y=y, anomaly=anomaly)
    return root


@dataclasses.dataclass
class ToyConfig:
    hidden: int = 32
    n_classes: int = 2
    dropout: float = 0.2


@register_model("toy_mlp")
class ToyMLP(DiagnosisModel):
    Config = ToyConfig
    data_kind = "toy"
    primary_metric = "acc"

    def __init__(self, config):
        super().__init__(config)
        self.net = nn.Sequential(nn.Linear(8, config.hidden), nn.ReLU(), nn.Dropout(config.dropout),
                                 nn.Linear(config.hidden, config.n_classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, phase="main"):
        return {"loss": F.cross_entropy(self(batch["x"]), batch["y"])}

    def score(self, x):
        return 1 - self(x).softmax(-1)[:, 0]

    def evaluate(self, loader, out_dir=None):
        correct = total = 0
        for batch in loader:
            correct += int((self(batch["x"]).argmax(-1) == batch["y"]).sum())
            total += len(batch["y"])
        return {"acc": correct / max(total, 1)}

    def example_input(self, batch_size=1):
        return torch.zeros(batch_size, 8)


# Runs a real verb with the toy model registered: `python -m tests.toy train|evaluate <args>`.
if __name__ == "__main__":
    import importlib
    import sys

    from edgediag import cli

    verb = sys.argv.pop(1)
    cli.entry(importlib.import_module(f"edgediag.{verb}").main)


def trained_image_checkpoint(root: Path, name: str, **config) -> tuple[Path, Path]:
    """A checkpoint of image model ``name`` (two short epochs) on generated defect images
    under ``root``: returns (model.pt, data folder)."""
    from edgediag.config import to_dict
    from edgediag.data import DataConfig, build_data
    from edgediag.data.synth_images import generate_defect_images
    from edgediag.engine.checkpoint import make_checkpoint, save_checkpoint
    from edgediag.engine.trainer import TrainConfig, Trainer
    from edgediag.models import create_model

    data = root / "images"
    generate_defect_images(data, n_per_class=8, size=32, classes=("normal", "scratch", "pit"))
    torch.manual_seed(0)
    model = create_model(name, **config)
    data_cfg = DataConfig(root=str(data), test_fraction=0.25)
    bundle = build_data("image", data_cfg, model.config)
    model = type(model)(type(model).config_for_data(model.config, bundle))
    model = Trainer(model, TrainConfig(epochs=2, batch_size=8, device="cpu"), progress=False).fit(bundle.train)
    model.eval().threshold.fill_(0.5)
    path = root / "model.pt"
    save_checkpoint(path, make_checkpoint(model, data={"kind": "image", "config": to_dict(data_cfg),
                                                       "classes": list(bundle.classes),
                                                       "normal_classes": list(bundle.normal_classes)}))
    return path, data
