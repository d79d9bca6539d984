"""The sequence models' shared front: input configs, normalisation, the video frame stem,
scores, evaluation and export (:class:`SequenceClassifier`), and the CNN baseline ``seq_cnn``
LDMamba is compared with."""

from __future__ import annotations

import abc
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgediag.engine.metrics import auc_pauc, classification_report, decision_report, save_confusion_png, save_roc_png
from edgediag.engine.model import DiagnosisModel
from edgediag.errors import UserError
from edgediag.models import register_model
from edgediag.nn.pruning import resize_to_loaded


# --- configs ------------------------------------------------------------------------------
@dataclasses.dataclass
class SequenceInputConfig:
    """Task and input fields shared by the sequence models; ``config_for_data`` fills the
    data-dependent ones, so a checkpoint's config rebuilds the exact same inputs."""

    n_classes: int = 2
    class_names: list[str] = dataclasses.field(default_factory=list)
    normal_classes: list[int] = dataclasses.field(default_factory=lambda: [0])  # class ids that are not faults
    input_kind: str = "sequence"  # sequence (B, T, F) | video (B, T, C, H, W)
    n_features: int = 64  # F (sequence) / channels (video)
    seq_len: int = 64  # T: frames per item
    # data front end (read by the "sequence" data builder; "auto" resolved from the data)
    frontend: str = "auto"  # auto | logmel | logspec | frames | none | video
    hop_length: int = 0  # 0: item length / seq_len
    n_fft: int = 0  # 0: two hops, power of two, <= 2048
    n_mels: int = 64
    sample_rate: int = 0  # 0: the files' rate
    clip_seconds: float = 0.0  # audio: cut files into segments of this length (0 = whole file)
    window: int = 0  # long recordings: samples/rows per item (0: 4096 for .mat, whole sequence otherwise)
    window_stride: int = 0  # 0: window/2 for .mat, window for sensor files
    frame_size: int = 48  # video: frames resized to frame_size squared
    in_channels: int = 3  # video: 1 grey or 3 RGB
    feature_mean: list[float] = dataclasses.field(default_factory=list)  # per feature (video: per channel)
    feature_std: list[float] = dataclasses.field(default_factory=list)
    video_channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64])  # per-frame conv stem
    # scoring
    score_method: str = "softmax"  # softmax | knn | mahalanobis
    knn_k: int = 1
    dropout: float = 0.1
    label_smoothing: float = 0.05


@dataclasses.dataclass
class SeqCNNConfig(SequenceInputConfig):
    channels: list[int] = dataclasses.field(default_factory=lambda: [128, 128, 128])
    kernels: list[int] = dataclasses.field(default_factory=lambda: [5, 3, 3])
    head_hidden: int = 64


# --- shared parts -------------------------------------------------------------------------
class FrameStem(nn.Module):
    """Per-frame conv features for video: (B, T, C, H, W) -> (B, T, F).

    Strided 3x3 convs + BN + ReLU, then global average pooling; the frames are folded into
    the batch so the graph stays a plain Conv2d stack (ONNX/TensorRT-friendly)."""

    def __init__(self, in_channels: int, channels: list[int]):
        super().__init__()
        layers, c = [], in_channels
        for w in channels:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.net = nn.Sequential(*layers)
        self.out_features = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        y = self.net(x.flatten(0, 1)).mean(dim=(2, 3))
        return y.reshape(b, t, -1)


class SequenceClassifier(DiagnosisModel):
    """Input normalisation, scores (softmax / kNN / Mahalanobis), evaluation and export
    shared by LDMamba and the CNN baseline. Subclasses implement :meth:`embed`
    ((B, ...) -> (B, E)) and set ``self.classifier``."""

    data_kind = "sequence"
    primary_metric = "acc"
    prune_recipe = {"finetune_epochs": 8, "distill": 1.0}
    train_defaults = {"lr": 1e-3, "batch_size": 32, "weight_decay": 0.01, "epochs": 30}  # the authors' AdamW

    def __init__(self, config):
        super().__init__(config)
        c = config
        if c.input_kind not in ("sequence", "video"):
            raise UserError(f"model.input_kind must be sequence or video, not {c.input_kind!r}")
        if c.n_classes < 2:
            raise UserError("sequence models are supervised diagnosers: the data needs at least two "
                            "classes (the knn/mahalanobis scores are then fitted on the normal items)")
        if c.score_method not in ("softmax", "knn", "mahalanobis"):
            raise UserError(f"model.score_method must be softmax, knn or mahalanobis, not {c.score_method!r}")
        width = c.in_channels if c.input_kind == "video" else c.n_features
        mean = c.feature_mean if len(c.feature_mean) == width else [0.0] * width
        std = c.feature_std if len(c.feature_std) == width else [1.0] * width
        self.register_buffer("in_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("in_std", torch.tensor(std, dtype=torch.float32).clamp_min(1e-6))
        normal = torch.zeros(c.n_classes)
        normal[[i for i in c.normal_classes if 0 <= i < c.n_classes]] = 1.0
        self.register_buffer("normal_mask", normal)
        self.frame_stem = FrameStem(c.in_channels, list(c.video_channels)) if c.input_kind == "video" else None
        self.seq_features = self.frame_stem.out_features if self.frame_stem is not None else c.n_features
        # Fitted normal statistics (empty until fit_normal). Buffers, so checkpoints and
        # exported graphs carry them; _load_from_state_dict resizes them to what is loaded.
        self.register_buffer("knn_bank", torch.zeros(0, 0))
        self.register_buffer("maha_mean", torch.zeros(0))
        self.register_buffer("maha_precision", torch.zeros(0, 0))

    # --- config from the data ---
    @classmethod
    def config_for_data(cls, config, bundle):
        info = bundle.info or {}
        params = info.get("frontend_params", {})
        # Classes the fault score does not count: the normal ones and ignored labels
        # (a stopped machine is not a fault), so score = p(fault classes).
        not_faults = set(bundle.normal_classes) | set(info.get("ignored_classes", []))
        normal = [i for i, name in enumerate(bundle.classes) if name in not_faults]
        values = {"n_classes": len(bundle.classes), "class_names": list(bundle.classes), "normal_classes": normal,
                  "input_kind": info.get("input_kind", config.input_kind),
                  "n_features": int(info.get("n_features", config.n_features)),
                  "seq_len": int(info.get("seq_len", config.seq_len)),
                  "feature_mean": list(info.get("feature_mean", [])), "feature_std": list(info.get("feature_std", [])),
                  "frontend": info.get("frontend", config.frontend)}
        for key in ("hop_length", "n_fft", "n_mels", "sample_rate", "frame_size", "in_channels"):
            if key in params:
                values[key] = int(params[key])
        for key in ("window", "window_stride"):
            if key in info:
                values[key] = int(info[key])
        return dataclasses.replace(config, **values)

    # --- forward ---
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.frame_stem is not None:  # (B, T, C, H, W): per-channel statistics
            return (x - self.in_mean.view(1, 1, -1, 1, 1)) / self.in_std.view(1, 1, -1, 1, 1)
        return (x - self.in_mean) / self.in_std

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input as a (B, T, F) sequence."""
        x = self.normalise(x.float())
        return self.frame_stem(x) if self.frame_stem is not None else x

    @abc.abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) input -> (B, E) embedding the classifier head reads; each family's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

    # --- training ---
    def training_step(self, batch: dict, phase: str = "main") -> dict[str, torch.Tensor]:
        return self._classification_losses(self(batch["x"]), batch["y"])

    def _classification_losses(self, logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits, y.long(), label_smoothing=self.config.label_smoothing)
        acc = (logits.argmax(-1) == y).float().mean()
        return {"loss": ce, "ce": ce.detach(), "acc": acc.detach()}

    # --- normal statistics and scores ---
    _FITTED = ("knn_bank", "maha_mean", "maha_precision")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        resize_to_loaded(self, state_dict, prefix, self._FITTED)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit_normal(self, loader, max_bank: int = 2048) -> None:
        """After training, on the training loader: recalibrate BatchNorm statistics, then
        fit the kNN bank and the Mahalanobis model on the normal items (anomaly == 0)."""
        self.recalibrate_batchnorm(loader)
        was_training = self.training
        self.eval()
        embs = []
        for batch in loader:
            keep = torch.as_tensor(batch["anomaly"]) == 0
            if keep.any():
                embs.append(self.embed(batch["x"][keep.to(batch["x"].device)]).float().cpu())
        self.train(was_training)
        if not embs:
            raise UserError("fit_normal: the training data holds no normal items")
        emb = torch.cat(embs)
        if len(emb) > max_bank:  # even subsample: deterministic and covers the whole set
            emb = emb[torch.linspace(0, len(emb) - 1, max_bank).round().long()]
        from sklearn.covariance import LedoitWolf

        device = self.in_mean.device
        self.knn_bank = F.normalize(emb, dim=1).to(device)
        lw = LedoitWolf().fit(emb.double().numpy())
        self.maha_mean = torch.from_numpy(lw.location_).float().to(device)
        self.maha_precision = torch.from_numpy(lw.precision_).float().to(device)

    @property
    def score_uses_normal_statistics(self) -> bool:
        return self.config.score_method != "softmax"

    def active_score_method(self) -> str:
        """The configured score, or ``softmax`` while the normal statistics it needs are
        not fitted yet. A plain string: decided once, outside any traced graph."""
        method = self.config.score_method
        fitted = {"knn": self.knn_bank.shape[0] > 0, "mahalanobis": self.maha_mean.shape[0] > 0}
        return method if fitted.get(method, True) else "softmax"

    def knn_neighbours(self) -> int:
        return min(self.config.knn_k, int(self.knn_bank.shape[0]))

    def scores_from(self, emb: torch.Tensor, logits: torch.Tensor, method: str | None = None,
                    k: int | None = None) -> torch.Tensor:
        method = method or self.active_score_method()
        if method == "knn":
            dist = 1.0 - F.normalize(emb, dim=1) @ self.knn_bank.t()
            k = k or self.knn_neighbours()
            return dist.topk(k, dim=1, largest=False).values.mean(dim=1)
        if method == "mahalanobis":
            d = emb - self.maha_mean
            return ((d @ self.maha_precision) * d).sum(dim=1)
        # softmax: 1 - p(classes that are not faults)
        return 1.0 - (logits.softmax(dim=-1) * self.normal_mask).sum(dim=-1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embed(x)
        return self.scores_from(emb, self.classifier(emb))

    # --- evaluation ---
    @torch.no_grad()
    def evaluate(self, loader, out_dir=None) -> dict[str, Any]:
        """Accuracy and macro-F1 of the diagnosis (primary: ``acc``), per-class rows, and the
        anomaly AUC/pAUC of the score (normal vs fault items) when both are present."""
        was_training = self.training
        self.eval()
        ys, preds, scores, anomaly = [], [], [], []
        for batch in loader:
            emb = self.embed(batch["x"])
            logits = self.classifier(emb)
            ys += torch.as_tensor(batch["y"]).tolist()
            preds += logits.argmax(-1).cpu().tolist()
            scores += self.scores_from(emb, logits).cpu().tolist()
            anomaly += torch.as_tensor(batch["anomaly"]).tolist()
        self.train(was_training)
        names = list(self.config.class_names) or [str(i) for i in range(self.config.n_classes)]
        known = [i for i, y in enumerate(ys) if y >= 0]
        rep = classification_report([ys[i] for i in known], [preds[i] for i in known], names)
        out: dict[str, Any] = {"acc": rep["acc"], "macro_f1": rep["macro_f1"],
                               "macro_precision": rep["macro_precision"], "macro_recall": rep["macro_recall"],
                               "items": len(ys)}
        labelled = [i for i, a in enumerate(anomaly) if a in (0, 1)]
        lab = [anomaly[i] for i in labelled]
        sc = [scores[i] for i in labelled]
        auc, pauc = auc_pauc(lab, sc)
        if not math.isnan(auc):
            out.update(auc=auc, pauc=pauc)
            if math.isfinite(float(self.threshold)):
                out.update({f"decision_{k}": v for k, v in decision_report(lab, sc, float(self.threshold)).items()})
        out["score_method"] = self.config.score_method
        from sklearn.metrics import precision_recall_fscore_support

        y_known, p_known = [ys[i] for i in known], [preds[i] for i in known]
        p, r, f, s = precision_recall_fscore_support(y_known, p_known, labels=list(range(len(names))),
                                                     zero_division=0)
        out["table"] = [{"class": n, "items": int(s[i]), "precision": float(p[i]), "recall": float(r[i]),
                         "f1": float(f[i])} for i, n in enumerate(names)]
        out["confusion"] = rep["confusion"]
        if out_dir is not None:
            out_dir = Path(out_dir)
            save_confusion_png(out_dir / "confusion.png", rep["confusion"], names,
                               title=f"{self.model_name}: acc {rep['acc']:.3f}")
            if "auc" in out:
                save_roc_png(out_dir / "roc.png", {f"{self.config.score_method} score": (lab, sc)},
                             title=f"{self.model_name}: normal vs fault")
        return out

    # --- export ---
    def export_module(self) -> nn.Module:
        return SequenceExport(self)

    def input_spec(self) -> dict[str, Any]:
        """The graph's input and how to make it from a recording: the features come from
        the data front end (not in the graph); normalisation is in the graph."""
        spec = super().input_spec()
        c = self.config
        spec.update(input_kind=c.input_kind, normalised_inside=True, classes=list(c.class_names))
        if c.input_kind == "video":
            spec.update(layout="T,C,H,W", value_range=[0.0, 1.0], channels="RGB" if c.in_channels == 3 else "grey",
                        frame_size=c.frame_size, frames=c.seq_len)
        else:
            spec.update(layout="T,F", frontend=c.frontend, frames=c.seq_len, window=c.window)
            if c.frontend in ("logmel", "logspec"):
                spec.update(sample_rate=c.sample_rate, n_fft=c.n_fft, hop_length=c.hop_length,
                            stft="torch.stft, Hann window, center=True, constant padding",
                            log="10*log10(max(power, 1e-10))")
                if c.frontend == "logmel":
                    spec.update(n_mels=c.n_mels, mel="librosa.filters.mel (Slaney)")
            elif c.frontend == "frames":
                spec.update(hop_length=c.hop_length)
        return spec

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        c = self.config
        g = torch.Generator().manual_seed(0)
        if c.input_kind == "video":
            x = torch.rand(batch_size, c.seq_len, c.in_channels, c.frame_size, c.frame_size, generator=g)
        else:  # features around the training statistics, with a slow trend like real frames
            trend = torch.linspace(-1, 1, c.seq_len).view(1, -1, 1)
            x = self.in_mean.cpu() + self.in_std.cpu() * (0.5 * trend + torch.randn(batch_size, c.seq_len,
                                                                                    c.n_features, generator=g))
        return x.to(self.in_mean.device)


class SequenceExport(nn.Module):
    """(B, T, F) or (B, T, C, H, W) -> (score (B,), probs (B, n_classes), embedding (B, E))."""

    output_names = ("score", "probs", "embedding")

    def __init__(self, model: SequenceClassifier):
        super().__init__()
        self.model = model
        self.method, self.k = model.active_score_method(), model.knn_neighbours()  # fixed in the graph
        # Mirror the model's mode: restoring this wrapper's mode after export or FLOP
        # counting must not flip the model from eval to training.
        self.train(model.training)

    def forward(self, x: torch.Tensor):
        emb = self.model.embed(x)
        logits = self.model.classifier(emb)
        return self.model.scores_from(emb, logits, self.method, self.k), logits.softmax(dim=-1), emb


@register_model("seq_cnn")
class SeqCNN(SequenceClassifier):
    """A small 1-D CNN over time (conv-BN-ReLU, max-pool by 2 between layers), global
    mean+max pooling and the same 64-d head: the non-recurrent baseline."""

    Config = SeqCNNConfig

    def __init__(self, config: SeqCNNConfig):
        super().__init__(config)
        c = config
        if len(c.kernels) != len(c.channels):
            raise UserError("model.kernels needs one entry per model.channels entry")
        layers, w = [], self.seq_features
        for i, (ch, k) in enumerate(zip(c.channels, c.kernels)):
            layers += [nn.Conv1d(w, ch, k, padding=k // 2, bias=False), nn.BatchNorm1d(ch), nn.ReLU(inplace=True)]
            if i < len(c.channels) - 1:
                layers.append(nn.MaxPool1d(2, ceil_mode=True))
            w = ch
        self.net = nn.Sequential(*layers)
        self.head_fc = nn.Linear(2 * w, c.head_hidden)
        self.head_drop = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(c.head_hidden, c.n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(self.frames(x).transpose(1, 2))
        pooled = torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=-1)
        return self.head_drop(F.gelu(self.head_fc(pooled)))


__all__ = ["SequenceInputConfig", "SeqCNNConfig", "FrameStem", "SequenceClassifier", "SequenceExport", "SeqCNN"]
