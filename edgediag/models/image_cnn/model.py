"""Defect-image classifiers: the shared base class and a small CNN baseline.

:class:`ImageClassifier` holds what every image classifier of the project shares: the
input normalisation (per-channel statistics of the training split, kept as buffers so
checkpoints and exported graphs carry them), class weights, the anomaly score
1 - p(normal classes), evaluation (ACC, macro precision/recall/F1, AUC, confusion and
ROC plots) and the export wrapper. A model only supplies ``forward`` (logits).

Input contract (training, ``score`` and the exported graph alike): float images
(B, C, H, W) with values in [0, 1], C = 1 for grey data sets, H = W = ``image_size``.

``image_cnn`` is a plain ResNet-style CNN (BasicBlocks, BatchNorm, ReLU) as the baseline
the paper compares against (ResNet18 there, from scratch and smaller here).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgediag.config import replace
from edgediag.engine.metrics import auc_pauc, classification_report, decision_report, save_confusion_png, save_roc_png
from edgediag.engine.model import DiagnosisModel
from edgediag.errors import UserError
from edgediag.models import register_model
from edgediag.nn.pruning import apply_widths


@dataclasses.dataclass
class ImageClassifierConfig:
    n_classes: int = 6
    in_chans: int = 3  # set from the data: 1 for grey images
    image_size: int = 160
    color: str = "auto"  # auto | gray | rgb: how the data reader loads images
    classes: list[str] = dataclasses.field(default_factory=list)
    normal_classes: list[str] = dataclasses.field(default_factory=list)  # score = 1 - p(these)
    pixel_mean: list[float] = dataclasses.field(default_factory=list)  # of the training split, [0, 1] units
    pixel_std: list[float] = dataclasses.field(default_factory=list)
    class_counts: list[int] = dataclasses.field(default_factory=list)  # training split
    class_weighting: str = "none"  # none | balanced | sqrt (inverse frequency, or its square root)
    label_smoothing: float = 0.0
    # Training images also transposed half of the time (with the flips: all 8 right-angle
    # orientations), for square images whose defects have no preferred direction.
    augment_transpose: bool = False
    split_digest: str = ""  # of the test split trained with (see edgediag.data.images)
    # Structured pruning (python -m edgediag.prune): module name -> pruned sizes, as
    # edgediag.nn.pruning.record_widths writes them; empty = unpruned.
    pruned_widths: dict[str, list[int]] = dataclasses.field(default_factory=dict)


class ImageClassifier(DiagnosisModel):
    """Base of the image classifiers; subclasses implement ``forward(x) -> logits``."""

    Config: ClassVar[type] = ImageClassifierConfig
    data_kind = "image"
    primary_metric = "acc"

    def __init__(self, config):
        super().__init__(config)
        c = config
        if c.n_classes < 2 or c.in_chans < 1 or c.image_size < 8:
            raise UserError(f"{self.model_name or type(self).__name__}: need n_classes >= 2, in_chans >= 1, "
                            f"image_size >= 8 (got {c.n_classes}, {c.in_chans}, {c.image_size})")
        if c.classes and len(c.classes) != c.n_classes:
            raise UserError(f"model.classes lists {len(c.classes)} names for n_classes={c.n_classes}")
        for name, stats in (("pixel_mean", c.pixel_mean), ("pixel_std", c.pixel_std)):
            if stats and len(stats) != c.in_chans:
                raise UserError(f"model.{name} has {len(stats)} values for in_chans={c.in_chans}")
        if c.class_weighting not in ("none", "balanced", "sqrt"):
            raise UserError(f"model.class_weighting must be none, balanced or sqrt, not {c.class_weighting!r}")
        mean = torch.tensor(c.pixel_mean or [0.5] * c.in_chans, dtype=torch.float32)
        std = torch.tensor(c.pixel_std or [0.25] * c.in_chans, dtype=torch.float32)
        self.register_buffer("pixel_mean", mean.view(1, -1, 1, 1))
        self.register_buffer("pixel_std", std.view(1, -1, 1, 1))
        self.register_buffer("class_weight", self._class_weights(c))
        normal = [c.classes.index(n) for n in c.normal_classes if n in c.classes]
        mask = torch.zeros(c.n_classes)
        mask[normal] = 1.0
        self.register_buffer("normal_mask", mask)
        self.has_normal = bool(normal)

    @staticmethod
    def _class_weights(c) -> torch.Tensor:
        if c.class_weighting == "none" or len(c.class_counts) != c.n_classes:
            return torch.ones(c.n_classes)
        counts = torch.tensor(c.class_counts, dtype=torch.float32).clamp(min=1)
        w = counts.sum() / (len(counts) * counts)
        if c.class_weighting == "sqrt":
            w = w.sqrt()
        return w / (w * counts).sum() * counts.sum()  # the mean weight per training item stays 1

    @classmethod
    def config_for_data(cls, config, bundle):
        info = bundle.info or {}
        return replace(config, n_classes=len(bundle.classes), classes=list(bundle.classes),
                       normal_classes=list(bundle.normal_classes),
                       in_chans=int(info.get("channels", config.in_chans)),
                       image_size=int(info.get("image_size", config.image_size)),
                       pixel_mean=list(info.get("pixel_mean", [])), pixel_std=list(info.get("pixel_std", [])),
                       class_counts=list(info.get("class_counts", [])),
                       split_digest=str(info.get("split_digest", "")))

    # --- the network ---------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pixel_mean) / self.pixel_std

    # --- structured pruning ---------------------------------------------------------------
    def apply_pruned_widths(self) -> None:
        """Subclasses call this last in ``__init__``: shrink to ``config.pruned_widths``."""
        if self.config.pruned_widths:
            apply_widths(self, self.config.pruned_widths)

    def pruning_fixed_layers(self) -> list[nn.Module]:
        """The classifier (its outputs are the classes)."""
        linears = [m for m in self.head.modules() if isinstance(m, nn.Linear)] if hasattr(self, "head") else []
        return linears[-1:]

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, C, H, W) -> logits (B, n_classes)."""

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x).float(), dim=-1)

    def anomaly_score(self, probs: torch.Tensor) -> torch.Tensor:
        """1 - p(normal classes); without a normal class, 1 - p(most likely class)."""
        if self.has_normal:
            return 1.0 - (probs * self.normal_mask).sum(dim=-1)
        return 1.0 - probs.max(dim=-1).values

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.anomaly_score(self.probabilities(x))

    def export_module(self) -> nn.Module:
        wrapper = ImageClassifierExport(self)
        # Same mode as the model, without touching it: exporters restore the wrapper's mode
        # afterwards, recursively, and must not leave an eval model in training mode.
        wrapper.training = self.training
        return wrapper

    def input_spec(self) -> dict[str, Any]:
        """[0, 1] float images, NCHW, resized to image_size (any interpolation; training
        used OpenCV INTER_AREA for shrinking); normalisation is in the graph."""
        spec = super().input_spec()
        c = self.config
        spec.update(layout="C,H,W", value_range=[0.0, 1.0], channels="grey" if c.in_chans == 1 else "RGB",
                    image_size=c.image_size, normalised_inside=True, classes=list(c.classes),
                    normal_classes=list(c.normal_classes))
        return spec

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        c = self.config
        return torch.rand(batch_size, c.in_chans, c.image_size, c.image_size, device=self.pixel_mean.device)

    # --- training ------------------------------------------------------------------
    def classification_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, weight=self.class_weight,
                               label_smoothing=self.config.label_smoothing)

    def training_step(self, batch: dict, phase: str = "main") -> dict[str, torch.Tensor]:
        y = torch.as_tensor(batch["y"], device=batch["x"].device)
        logits = self(batch["x"])
        loss = self.classification_loss(logits, y)
        return {"loss": loss, "acc": (logits.argmax(-1) == y).float().mean()}

    # --- evaluation ----------------------------------------------------------------
    @torch.no_grad()
    def predict(self, loader) -> dict[str, np.ndarray]:
        """Probabilities, labels, anomaly labels and keys of a whole loader."""
        was_training = self.training
        self.eval()
        device = self.pixel_mean.device
        probs, ys, anomaly, keys = [], [], [], []
        for batch in loader:
            probs.append(self.probabilities(batch["x"].to(device)).cpu())
            ys.append(torch.as_tensor(batch["y"]).view(-1).cpu())
            anomaly.append(torch.as_tensor(batch.get("anomaly", [-1] * len(ys[-1]))).view(-1).cpu())
            keys.extend(batch.get("key", [""] * len(ys[-1])))
        self.train(was_training)
        if not probs:
            raise UserError("nothing to evaluate: the data split is empty")
        return {"probs": torch.cat(probs).numpy(), "y": torch.cat(ys).numpy(),
                "anomaly": torch.cat(anomaly).numpy(), "keys": np.asarray(keys)}

    @torch.no_grad()
    def evaluate(self, loader, out_dir=None) -> dict[str, Any]:
        out = self.predict(loader)
        probs, y, anomaly = out["probs"], out["y"], out["anomaly"]
        known = y >= 0
        if not known.any():
            raise UserError("no labelled items to evaluate")
        classes = list(self.config.classes) or [f"class_{i}" for i in range(self.config.n_classes)]
        pred = probs.argmax(-1)
        report = classification_report(y[known], pred[known], classes)
        metrics: dict[str, Any] = {k: report[k] for k in ("acc", "macro_precision", "macro_recall", "macro_f1")}
        metrics["n"] = int(known.sum())
        score = self.anomaly_score(torch.from_numpy(probs)).numpy()
        flagged = anomaly >= 0
        if self.has_normal and flagged.any():
            auc, pauc = auc_pauc(anomaly[flagged], score[flagged])
            if not math.isnan(auc):
                metrics.update(auc=auc, pauc=pauc)
            if math.isfinite(float(self.threshold)):
                decision = decision_report(anomaly[flagged], score[flagged], float(self.threshold))
                metrics.update({f"anomaly_{k}": v for k, v in decision.items()})
        from sklearn.metrics import precision_recall_fscore_support

        p, r, f, support = precision_recall_fscore_support(y[known], pred[known], labels=list(range(len(classes))),
                                                           zero_division=0)
        metrics["table"] = [{"class": name, "n": int(support[i]), "precision": float(p[i]), "recall": float(r[i]),
                             "f1": float(f[i])} for i, name in enumerate(classes)]
        metrics["confusion"], metrics["classes"] = report["confusion"], classes
        if out_dir is not None:
            out_dir = Path(out_dir)
            save_confusion_png(out_dir / "confusion.png", report["confusion"], classes,
                               title=f"{self.model_name}: confusion matrix")
            if "auc" in metrics:
                save_roc_png(out_dir / "roc.png", {"defect vs normal (1 - p(normal))": (anomaly[flagged], score[flagged])},
                             title=f"{self.model_name}: ROC")
        return metrics


class ImageClassifierExport(nn.Module):
    """What export traces: [0, 1] images (B, C, H, W) -> (anomaly score (B,), class
    probabilities (B, K)). Normalisation is inside the graph."""

    output_names = ("score", "probs")

    def __init__(self, model: ImageClassifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        probs = self.model.probabilities(x)
        return self.model.anomaly_score(probs), probs


# --- the CNN baseline ----------------------------------------------------------------
@dataclasses.dataclass
class ImageCNNConfig(ImageClassifierConfig):
    image_size: int = 128
    # 1.92 M parameters with 6 grey classes: the size of memorymamba_nano (1.97 M).
    widths: list[int] = dataclasses.field(default_factory=lambda: [40, 80, 160, 320])
    depths: list[int] = dataclasses.field(default_factory=lambda: [1, 1, 1, 1])  # BasicBlocks per stage
    dropout: float = 0.1


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_model("image_cnn", variants={
    # ResNet18's layout (the paper's CNN baseline), without its 7x7 stem.
    "image_cnn_resnet18": {"widths": [64, 128, 256, 512], "depths": [2, 2, 2, 2], "image_size": 224}})
class ImageCNN(ImageClassifier):
    """ResNet-style CNN: stem (conv 3x3 stride 2 + max-pool), one stage per width (the
    first at stride 1, then stride 2), global average pool, dropout, linear head."""

    Config = ImageCNNConfig
    # The from-scratch recipe measured on magnetic tiles (../memorymamba/README.md): batch
    # 16, 50 epochs, ~2850 steps; 12 epochs of 32 stayed at always-Free.
    train_defaults = {"epochs": 50, "batch_size": 16, "lr": 2e-3, "weight_decay": 0.05, "optimizer": "adamw",
                      "warmup": 0.05, "schedule": "cosine"}

    def __init__(self, config: ImageCNNConfig):
        super().__init__(config)
        if not config.widths or len(config.widths) != len(config.depths) or min(config.depths) < 1:
            raise UserError("image_cnn: widths and depths need the same (non-zero) length, depths >= 1")
        w0 = config.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(config.in_chans, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, c_in = [], w0
        for i, (width, depth) in enumerate(zip(config.widths, config.depths)):
            for j in range(depth):
                blocks.append(BasicBlock(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(c_in, config.n_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.apply_pruned_widths()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.blocks(self.stem(self.normalize(x)))
        return self.head(feats.mean(dim=(2, 3)))
