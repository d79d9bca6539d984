"""A model family defined only here goes through the whole pipeline with no change to stage
code: it registers itself (the model, and a pruner for its one custom layer), then
train -> prune (structured and dynamic) -> export -> bench -> predict run through the
verbs a user calls. If a stage had to know this family, this test could not pass."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgediag import bench, cli, export, predict, prune, train
from edgediag.engine.checkpoint import load_model
from edgediag.models import DiagnosisModel, register_model
from edgediag.nn.pruning import ChannelPruner, apply_widths, register_pruner
from tests.toy import write_toy_data  # noqa: F401 - also registers the "toy" data reader


class ChannelScale(nn.Module):
    """x * weight per channel: a custom layer torch-pruning knows nothing about."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.weight


@register_pruner(ChannelScale)
class ChannelScalePruner(ChannelPruner):
    """Its channels pass straight through: pruning one side prunes both; one recorded size."""

    def prune_out_channels(self, layer, idxs):
        keep = [i for i in range(len(layer.weight)) if i not in set(idxs)]
        layer.weight = nn.Parameter(layer.weight.data[keep].clone())
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return len(layer.weight)

    get_in_channels = get_out_channels

    def size_slots(self, layer):
        return ["out"]

    def dep_slices(self, name, layer, out):
        return [(f"{name}.weight", 0, 1)]


@dataclasses.dataclass
class ToyFamilyConfig:
    hidden: int = 32
    n_classes: int = 2
    pruned_widths: dict = dataclasses.field(default_factory=dict)  # written by structured pruning


@register_model("test_toy_family")
class ToyFamily(DiagnosisModel):
    Config = ToyFamilyConfig
    data_kind = "toy"
    primary_metric = "acc"

    def __init__(self, config):
        super().__init__(config)
        self.body = nn.Linear(8, config.hidden)
        self.scale = ChannelScale(config.hidden)
        self.head = nn.Linear(config.hidden, config.n_classes)
        apply_widths(self, config.pruned_widths)

    def forward(self, x):
        return self.head(self.scale(F.relu(self.body(x))))

    def pruning_fixed_layers(self):
        return [self.head]  # the class outputs stay

    def training_step(self, batch, phase="main"):
        return {"loss": F.cross_entropy(self(batch["x"]), batch["y"])}

    def score(self, x):
        return 1 - self(x).softmax(-1)[:, 0]

    @torch.no_grad()
    def evaluate(self, loader, out_dir=None):
        correct = total = 0
        for batch in loader:
            correct += int((self(batch["x"]).argmax(-1) == batch["y"]).sum())
            total += len(batch["y"])
        return {"acc": correct / max(total, 1)}

    def example_input(self, batch_size=1):
        return torch.randn(batch_size, 8, generator=torch.Generator().manual_seed(batch_size))


def run(verb, *args) -> int:
    return cli.run(verb.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_family")
    data = write_toy_data(root / "data", n=256)
    assert run(train, "--model", "test_toy_family", "--data", data, "--out", root / "run", "--epochs", 3,
               "--set", "model.hidden=32") == 0
    return root, data, root / "run" / "model.pt"


@pytest.mark.parametrize("method", ["structured", "dynamic"])
def test_toy_family_through_the_pipeline(trained, method, tmp_path, one_thread):
    root, data, ckpt = trained
    pruned = tmp_path / "pruned"
    assert run(prune, "--checkpoint", ckpt, "--data", data, "--out", pruned, "--method", method, "--ratio", 0.5,
               "--finetune-epochs", 2, "--latency-runs", 2) == 0
    model, payload = load_model(pruned / "model.pt")
    original, _ = load_model(ckpt)
    # the custom layer was pruned through its registered pruner, in step with its neighbours
    assert model.scale.weight.numel() == model.body.out_features == model.head.in_features < original.config.hidden
    assert payload["model_config"]["pruned_widths"]

    graph_dir = tmp_path / "onnx"
    assert run(export, "--checkpoint", pruned / "model.pt", "--out", graph_dir, "--latency-runs", 2,
               "--parity-items", 4, "--threads", 1) == 0
    assert json.loads((graph_dir / "export.json").read_text())["parity"]["passed"]

    report = tmp_path / "bench"
    assert run(bench, "--checkpoint", ckpt, pruned / "model.pt", graph_dir / "model.onnx", "--data", data,
               "--out", report, "--backends", "eager,onnxruntime", "--latency-runs", 2, "--warmup", 1, "--threads", 1) == 0
    rows = [r for r in json.loads((report / "report.json").read_text())["rows"] if r["status"] == "ok"]
    assert {r["artifact"] for r in rows} == {str(ckpt), str(pruned / "model.pt"), str(graph_dir / "model.onnx")}

    # predict: the graph and the checkpoint it came from make the same decisions, item by item
    outs = {}
    for name, art in (("graph", graph_dir / "model.onnx"), ("eager", pruned / "model.pt")):
        out = tmp_path / f"predict-{name}"
        assert run(predict, "--checkpoint", art, "--data", data, "--out", out) == 0
        with open(out / "predictions.csv") as fh:
            outs[name] = list(csv.DictReader(fh))
    assert len(outs["graph"]) == len(outs["eager"]) == 64  # the toy reader's test split
    assert [r["decision"] for r in outs["graph"]] == [r["decision"] for r in outs["eager"]]
    for g, e in zip(outs["graph"], outs["eager"]):
        assert abs(float(g["score"]) - float(e["score"])) < 1e-4
