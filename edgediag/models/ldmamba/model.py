"""LDMamba: attention-Mamba with a dynamic screening module and dynamic pruning, plus the
two baselines it is compared with (``ldmamba_plain`` and ``seq_cnn``).

Designed from the abstract of "A Novel Robust Lightweight Anomaly Diagnosis Model Capable
of Extracting Dynamic Features" (no code was published); see docs/models/ldmamba.md for
the claims, our design decisions and the measured numbers.

Input: a feature sequence (B, T, F) - log-mel or spectrum frames, vibration frames,
process variables - or a video clip (B, T, C, H, W), whose frames a small conv stem turns
into a (B, T, F) sequence. Time runs along T.

Network (``ldmamba``)::

    x -> normalise (train statistics) -> [video: per-frame conv stem] -> temporal conv stem
      -> N x AttentionMambaBlock -> LayerNorm -> [mean; max] over time -> Linear(64) -> classes

AttentionMambaBlock (pre-norm residual): a *dynamic* branch (BiMambaMixer, the selective
scan over time), a *static* branch (squeeze-excitation over time-pooled mean/std:
per-channel adaptive rescale-and-shift), fused by learned per-channel gates, then the
*dynamic screening module*: a depthwise conv over time scores every token, tokens below
an adaptive, learned threshold are zeroed (hard mask at inference, straight-through in
training), so only locally salient frames update the residual stream.

Dynamic pruning: :class:`edgediag.compress.dynamic.ScreeningGate` screens on the Mamba
inner channels, the static branch's hidden units, the stem's hidden channels and the
head's hidden units; the model lists them in :meth:`screening_groups`, so
:class:`edgediag.compress.dynamic.DynamicPruner` can remove closed channels while training.
The widths live in per-block lists in the config, so ``create_model("ldmamba", **config)``
rebuilds a pruned model.

Scores: ``softmax`` (1 - p(normal classes), i.e. the probability of a fault class), ``knn`` (cosine distance of the 64-d
embedding to the nearest normal training embeddings) or ``mahalanobis`` (Ledoit-Wolf
covariance of the normal embeddings), the last two fitted by :meth:`fit_normal`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgediag.compress.depth import present, remove_blocks
from edgediag.compress.dynamic import ScreeningGate, ScreeningGroup, channel_costs, screening_sparsity
from edgediag.engine.metrics import auc_pauc, classification_report, decision_report, save_confusion_png, save_roc_png
from edgediag.engine.model import DiagnosisModel
from edgediag.errors import UserError
from edgediag.models import register_model


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
class LDMambaConfig(SequenceInputConfig):
    stem_channels: list[int] = dataclasses.field(default_factory=lambda: [128])  # hidden widths (pruned)
    stem_kernels: list[int] = dataclasses.field(default_factory=lambda: [5, 3])  # len(stem_channels) + 1
    d_model: int = 128
    d_inner: list[int] = dataclasses.field(default_factory=lambda: [128, 128])  # per block (pruned)
    se_hidden: list[int] = dataclasses.field(default_factory=lambda: [32, 32])  # per block (pruned)
    head_hidden: int = 64  # the embedding (pruned)
    d_state: int = 16
    d_conv: int = 4
    bidirectional: bool = True
    # Streaming form: causal stem and screening convs, running (prefix) statistics in the
    # static branch and the screen, a forward-only scan; streaming_module() then steps it.
    causal: bool = False
    static_branch: bool = True  # the attention (rescale-and-shift) branch
    screening: bool = True  # token screening + channel screens (needed for dynamic pruning)
    screen_kernel: int = 5
    gate_relaxation: str = "ste"  # ste | hard_concrete
    gate_temperature: float = 0.5
    gate_init_margin: float = 0.5
    token_temperature: float = 0.5
    token_sparsity: float = 0.01  # weight of the fraction of tokens kept, in the loss
    sparsity_weight: float = 0.0  # weight of the channel-screen sparsity (the pruner raises it)
    scan_backend: str = "auto"
    # Depth pruning (--remove-blocks): blocks removed, by module path ("blocks.1"); their
    # d_inner/se_hidden entries stay in the lists, unused.
    removed_blocks: list[str] = dataclasses.field(default_factory=list)


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
        # The fitted statistics' shapes depend on the data: take the loaded shapes.
        for key in self._FITTED:
            loaded = state_dict.get(prefix + key)
            if isinstance(loaded, torch.Tensor):
                setattr(self, key, torch.empty_like(loaded, device=self.in_mean.device))
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


# --- LDMamba ------------------------------------------------------------------------------
def running_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over time of every prefix x[:, :t+1] of (B, T, C): what a causal model
    knows at step t. Computed from running sums, exactly as the streaming step keeps them."""
    n = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).view(1, -1, 1)
    mu = x.cumsum(dim=1) / n
    var = (x * x).cumsum(dim=1) / n - mu * mu
    return mu, var.clamp_min(0.0).add(eps).sqrt()


def stats_from_sums(total: torch.Tensor, total_sq: torch.Tensor, n: torch.Tensor, eps: float = 1e-5):
    """The step form of :func:`running_stats`: mean and std from running sums over n steps."""
    mu = total / n
    return mu, (total_sq / n - mu * mu).clamp_min(0.0).add(eps).sqrt()


def causal_conv_step(conv: nn.Conv1d, buf: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of a left-padded (causal) Conv1d: buf holds the previous k-1 inputs
    (B, C_in, k-1), zeros at the start. Returns (y_t (B, C_out), new buf)."""
    window = torch.cat([buf, x_t.unsqueeze(-1)], dim=-1)  # (B, C_in, k)
    y = F.conv1d(window, conv.weight, conv.bias, groups=conv.groups).squeeze(-1)
    return y, window[..., 1:]


class DynamicScreening(nn.Module):
    """Token screening: a depthwise conv over time (then a pointwise projection) scores every
    token; scores are standardised over the sequence and compared with a learned threshold
    (in standard deviations, bounded to +-2), so the cut adapts to each sequence's level
    and spread - a disturbance that lifts every score does not open every token.

    Training: straight-through (hard mask forward, sigmoid((z - tau)/T) gradient);
    inference: the hard mask. Returns the screened tokens and the soft keep fraction.
    Causal: the conv sees only past tokens and z uses the running statistics of the prefix."""

    def __init__(self, d_model: int, kernel: int = 5, temperature: float = 0.5, init_tau: float = -1.0,
                 causal: bool = False):
        super().__init__()
        self.causal = causal
        self.dw = nn.Conv1d(d_model, d_model, kernel, padding=0 if causal else kernel // 2, groups=d_model)
        self.pw = nn.Linear(d_model, 1)
        self.raw_tau = nn.Parameter(torch.tensor(math.atanh(init_tau / 2.0)))
        self.temperature = float(temperature)

    @property
    def tau(self) -> torch.Tensor:
        return 2.0 * torch.tanh(self.raw_tau)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xt = x.transpose(1, 2)
        if self.causal:
            xt = F.pad(xt, (self.dw.kernel_size[0] - 1, 0))
        s = self.pw(F.gelu(self.dw(xt).transpose(1, 2))).squeeze(-1)  # (B, L)
        if self.causal:
            mu, sd = (t.squeeze(-1) for t in running_stats(s.unsqueeze(-1)))
        else:
            mu = s.mean(dim=1, keepdim=True)
            sd = ((s - mu) ** 2).mean(dim=1, keepdim=True).add(1e-5).sqrt()
        z = (s - mu) / sd
        soft = torch.sigmoid((z - self.tau) / self.temperature)
        hard = (z > self.tau).to(x.dtype)
        mask = hard + soft - soft.detach() if self.training else hard
        return x * mask.unsqueeze(-1), soft.mean()

    def step(self, y_t: torch.Tensor, buf, total, total_sq, n):
        """Causal form, one token (B, d): (screened token, new buf, new sums)."""
        h, buf = causal_conv_step(self.dw, buf, y_t)
        s = self.pw(F.gelu(h))  # (B, 1)
        total, total_sq = total + s, total_sq + s * s
        mu, sd = stats_from_sums(total, total_sq, n)
        return y_t * ((s - mu) / sd > self.tau).to(y_t.dtype), buf, total, total_sq


class StaticAttention(nn.Module):
    """Static features: squeeze-excitation over time-pooled statistics. (mean, std) of each
    channel -> MLP -> per-channel scale and shift applied to every token. The last layer
    starts at zero, so the branch starts as the identity. Causal: each token gets the
    scale and shift of the statistics of the prefix up to it."""

    def __init__(self, d_model: int, hidden: int, gate: ScreeningGate | None, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.fc1 = nn.Linear(2 * d_model, hidden)
        self.fc2 = nn.Linear(hidden, 2 * d_model)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.causal:
            return self.modulate(x, *running_stats(x))  # (B, T, d) statistics per prefix
        mu = x.mean(dim=1)
        sd = ((x - mu.unsqueeze(1)) ** 2).mean(dim=1).add(1e-5).sqrt()
        return self.modulate(x, mu.unsqueeze(1), sd.unsqueeze(1))

    def modulate(self, x: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(torch.cat([mu, sd], dim=-1)))
        if self.gate is not None:
            h = self.gate.apply_to(h)
        scale, shift = self.fc2(h).chunk(2, dim=-1)
        return x * (1.0 + scale) + shift


def _scan_directions(mixer: nn.Module) -> list[str]:
    """Attribute suffixes of the mixer's scan directions: MambaMixer has "" (conv1d, x_proj,
    dt_proj, A_log, D); BiMambaMixer adds "_b" (conv1d_b, ..., A_b_log, D_b), sharing
    in_proj and out_proj."""
    return [sfx for sfx in ("", "_b") if hasattr(mixer, f"x_proj{sfx}")]


def _inner_slices(prefix: str, mixer: nn.Module) -> list[tuple[str, int, int]]:
    """Every tensor of a (Bi)MambaMixer with one entry per inner channel."""
    out = [(f"{prefix}.in_proj.weight", 0, 2), (f"{prefix}.out_proj.weight", 1, 1)]
    if mixer.in_proj.bias is not None:
        out.append((f"{prefix}.in_proj.bias", 0, 2))
    for sfx in _scan_directions(mixer):
        a_log = "A_log" if not sfx else f"A{sfx}_log"
        out += [(f"{prefix}.conv1d{sfx}.weight", 0, 1), (f"{prefix}.x_proj{sfx}.weight", 1, 1),
                (f"{prefix}.dt_proj{sfx}.weight", 0, 1), (f"{prefix}.dt_proj{sfx}.bias", 0, 1),
                (f"{prefix}.{a_log}", 0, 1), (f"{prefix}.D{sfx}", 0, 1)]
        if getattr(mixer, f"conv1d{sfx}").bias is not None:
            out.append((f"{prefix}.conv1d{sfx}.bias", 0, 1))
    return out


class AttentionMambaBlock(nn.Module):
    def __init__(self, c: LDMambaConfig, index: int):
        super().__init__()
        from edgediag.nn.mamba import BiMambaMixer, MambaMixer

        d = c.d_model
        self.norm = nn.LayerNorm(d)
        mixer_cls = BiMambaMixer if c.bidirectional else MambaMixer
        self.mixer = mixer_cls(d, d_state=c.d_state, d_conv=c.d_conv, d_inner=c.d_inner[index],
                               scan_backend=c.scan_backend)
        gate_kw = dict(temperature=c.gate_temperature, relaxation=c.gate_relaxation, init_margin=c.gate_init_margin)
        self.inner_gate = ScreeningGate(c.d_inner[index], **gate_kw) if c.screening else None
        if self.inner_gate is not None:
            # The screen multiplies an inner channel where it leaves the conv (into x_proj,
            # which makes the shared dt/B/C from all channels) and where it leaves the scan
            # (into out_proj). A closed channel then influences nothing and is removed
            # exactly. Pre-hooks keep the shared MambaMixer untouched and run in traced and
            # exported graphs too.
            for sfx in _scan_directions(self.mixer):
                getattr(self.mixer, f"x_proj{sfx}").register_forward_pre_hook(self._screen_inner)
            self.mixer.out_proj.register_forward_pre_hook(self._screen_inner)
        if c.static_branch:
            self.static = StaticAttention(d, c.se_hidden[index], ScreeningGate(c.se_hidden[index], **gate_kw)
                                          if c.screening else None, causal=c.causal)
            # Learned per-channel fusion gates: g = sigmoid(a*dyn + b*static + c).
            self.fuse_a = nn.Parameter(torch.zeros(d))
            self.fuse_b = nn.Parameter(torch.zeros(d))
            self.fuse_c = nn.Parameter(torch.zeros(d))
        else:
            self.static = None
        self.screen = DynamicScreening(d, c.screen_kernel, c.token_temperature, causal=c.causal) if c.screening else None
        self.drop = nn.Dropout(c.dropout)

    def _screen_inner(self, module, args):
        return (self.inner_gate.apply_to(args[0]),) + tuple(args[1:])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        dyn = self.mixer(h)
        y = self._fuse(dyn, self.static(h)) if self.static is not None else dyn
        keep = x.new_ones(())
        if self.screen is not None:
            y, keep = self.screen(y)
        return x + self.drop(y), keep

    def _fuse(self, dyn: torch.Tensor, sta: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.fuse_a * dyn + self.fuse_b * sta + self.fuse_c)
        return g * dyn + (1.0 - g) * sta

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Carried state of the causal block (zeros at the start), by name."""
        d = self.norm.normalized_shape[0]
        conv, ssm = self.mixer.allocate_states(batch)
        shapes = {"conv": tuple(conv.shape), "ssm": tuple(ssm.shape)}
        if self.static is not None:
            shapes.update(static_sum=(batch, d), static_sq=(batch, d))
        if self.screen is not None:
            shapes.update(screen_buf=(batch, d, self.screen.dw.kernel_size[0] - 1), screen_sum=(batch, 1),
                          screen_sq=(batch, 1))
        return shapes

    def step(self, x_t: torch.Tensor, n: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        """One token (B, d) of the causal block; ``n`` (B, 1) counts the steps so far,
        this one included. Returns the output token and the new state dict."""
        h = self.norm(x_t)
        dyn, conv, ssm = self.mixer.step(h, st["conv"], st["ssm"])
        new = {"conv": conv, "ssm": ssm}
        y = dyn
        if self.static is not None:
            total, total_sq = st["static_sum"] + h, st["static_sq"] + h * h
            y = self._fuse(dyn, self.static.modulate(h, *stats_from_sums(total, total_sq, n)))
            new.update(static_sum=total, static_sq=total_sq)
        if self.screen is not None:
            y, buf, total, total_sq = self.screen.step(y, st["screen_buf"], st["screen_sum"], st["screen_sq"], n)
            new.update(screen_buf=buf, screen_sum=total, screen_sq=total_sq)
        return x_t + y, new


@register_model("ldmamba", variants={
    # The same network without the paper's additions: plain (bidirectional) Mamba blocks.
    "ldmamba_plain": {"static_branch": False, "screening": False},
    "ldmamba_small": {"d_model": 64, "stem_channels": [64], "d_inner": [96, 96], "se_hidden": [16, 16]},
    # The streaming form: causal throughout, stepped one frame at a time by streaming_module().
    "ldmamba_causal": {"causal": True, "bidirectional": False},
})
class LDMamba(SequenceClassifier):
    Config = LDMambaConfig

    def __init__(self, config: LDMambaConfig):
        super().__init__(config)
        c = config
        if len(c.stem_kernels) != len(c.stem_channels) + 1:
            raise UserError(f"model.stem_kernels needs {len(c.stem_channels) + 1} entries "
                            f"(one per stem conv), has {len(c.stem_kernels)}")
        if not c.d_inner or len(c.se_hidden) != len(c.d_inner):
            raise UserError("model.d_inner and model.se_hidden need one entry per block")
        if c.gate_relaxation not in ("ste", "hard_concrete"):
            raise UserError(f"model.gate_relaxation must be ste or hard_concrete, not {c.gate_relaxation!r}")
        if c.causal and c.bidirectional:
            raise UserError("model.causal needs model.bidirectional=false (a backward scan sees the future)")
        gate_kw = dict(temperature=c.gate_temperature, relaxation=c.gate_relaxation, init_margin=c.gate_init_margin)
        # Temporal conv stem (the authors' kernels 5 and 3): local patterns before the scan.
        widths = [self.seq_features, *c.stem_channels, c.d_model]
        self.stem_convs = nn.ModuleList()
        self.stem_norms = nn.ModuleList()
        self.stem_gates = nn.ModuleList()
        for i, k in enumerate(c.stem_kernels):
            # causal: padded on the left in forward, so frame t sees frames <= t only
            self.stem_convs.append(nn.Conv1d(widths[i], widths[i + 1], k, padding=0 if c.causal else k // 2,
                                             bias=False))
            self.stem_norms.append(nn.BatchNorm1d(widths[i + 1]))
            if i < len(c.stem_channels) and c.screening:
                self.stem_gates.append(ScreeningGate(widths[i + 1], **gate_kw))
        self.blocks = nn.ModuleList(AttentionMambaBlock(c, i) for i in range(len(c.d_inner)))
        self.norm = nn.LayerNorm(c.d_model)
        self.head_fc = nn.Linear(2 * c.d_model, c.head_hidden)
        self.head_gate = ScreeningGate(c.head_hidden, **gate_kw) if c.screening else None
        self.head_drop = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(c.head_hidden, c.n_classes)
        self.sparsity_weight = float(c.sparsity_weight)
        self._costs: dict[str, float] | None = None
        remove_blocks(self, c.removed_blocks)

    def present_blocks(self) -> list[tuple[int, AttentionMambaBlock]]:
        """(index, block) of the blocks depth pruning left."""
        return present(self.blocks)

    def removable_blocks(self) -> list[str]:
        """Every attention-Mamba block (residual: x + screened branch)."""
        return [f"blocks.{i}" for i, _ in self.present_blocks()]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._embed(x)[0]

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(embedding, each block's soft fraction of tokens kept - for the training loss)."""
        h, keeps = self._tokens(x)
        return self._head(torch.cat([h.mean(dim=1), h.amax(dim=1)], dim=-1)), keeps

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised tokens after the blocks (B, T, d_model), and the blocks' keep fractions."""
        h = self.frames(x).transpose(1, 2)  # (B, F, T)
        for i, (conv, bn) in enumerate(zip(self.stem_convs, self.stem_norms)):
            if self.config.causal:
                h = F.pad(h, (conv.kernel_size[0] - 1, 0))
            h = self._stem_act(i, bn(conv(h)), dim=1)
        h = h.transpose(1, 2)  # (B, T, d_model)
        keeps = []
        for _, block in self.present_blocks():
            h, keep = block(h)
            keeps.append(keep)
        return self.norm(h), keeps

    def _stem_act(self, i: int, h: torch.Tensor, dim: int) -> torch.Tensor:
        h = F.gelu(h)
        return self.stem_gates[i].apply_to(h, dim=dim) if i < len(self.stem_gates) else h

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        e = F.gelu(self.head_fc(pooled))
        if self.head_gate is not None:
            e = self.head_gate.apply_to(e)
        return self.head_drop(e)

    def streaming_module(self) -> nn.Module:
        if not self.config.causal:
            raise UserError("ldmamba streams only in its causal form: train ldmamba_causal "
                            "(model.causal=true, model.bidirectional=false)")
        if self.frame_stem is not None:
            raise UserError("ldmamba streams feature sequences, not video (model.input_kind=video)")
        return LDMambaStreaming(self)

    def training_step(self, batch: dict, phase: str = "main") -> dict[str, torch.Tensor]:
        emb, keeps = self._embed(batch["x"])
        out = self._classification_losses(self.classifier(emb), batch["y"])
        if not self.config.screening:
            return out
        token_keep = torch.stack(keeps).mean() if keeps else emb.new_ones(())
        loss = out["loss"] + self.config.token_sparsity * token_keep
        groups = self.screening_groups()
        if self._costs is None:
            self._costs = channel_costs(self, groups)
        channel_keep = screening_sparsity(groups, self._costs)
        if self.sparsity_weight > 0:
            loss = loss + self.sparsity_weight * channel_keep
        out.update(loss=loss, token_keep=token_keep.detach(), channel_keep=channel_keep.detach())
        return out

    # --- dynamic pruning protocol (edgediag.compress.dynamic) ---
    def screening_groups(self) -> list[ScreeningGroup]:
        if not self.config.screening:
            return []
        groups = []
        n_stem = len(self.config.stem_channels)
        for i in range(n_stem):
            p = f"stem_convs.{i}"
            slices = [(f"{p}.weight", 0, 1), (f"stem_convs.{i + 1}.weight", 1, 1),
                      (f"stem_gates.{i}.raw_scores", 0, 1)]
            slices += [(f"stem_norms.{i}.{k}", 0, 1) for k in ("weight", "bias", "running_mean", "running_var")]
            groups.append(ScreeningGroup(f"stem.{i}", self.stem_gates[i], slices, "stem_channels", i))
        for i, block in self.present_blocks():
            p = f"blocks.{i}"
            slices = [(f"{p}.inner_gate.raw_scores", 0, 1), *_inner_slices(f"{p}.mixer", block.mixer)]
            groups.append(ScreeningGroup(f"blocks.{i}.inner", block.inner_gate, slices, "d_inner", i, min_channels=8))
            if block.static is not None:
                s = f"{p}.static"
                groups.append(ScreeningGroup(
                    f"blocks.{i}.static", block.static.gate,
                    [(f"{s}.fc1.weight", 0, 1), (f"{s}.fc1.bias", 0, 1), (f"{s}.fc2.weight", 1, 1),
                     (f"{s}.gate.raw_scores", 0, 1)], "se_hidden", i))
        groups.append(ScreeningGroup("head", self.head_gate,
                                     [("head_fc.weight", 0, 1), ("head_fc.bias", 0, 1), ("classifier.weight", 1, 1),
                                      ("head_gate.raw_scores", 0, 1)], "head_hidden", None, min_channels=8))
        return groups


class LDMambaStreaming(nn.Module):
    """The causal LDMamba one frame at a time: ``(x_t (B, F), *states) -> (score, probs,
    embedding, *new_states)``; the outputs at step t are those of the full model on frames
    0..t (:meth:`full_sequence` computes them all at once, the export's parity reference).

    States (zeros at the start): each stem conv's last k-1 inputs, per block the Mamba conv
    and SSM states, the running sums of the static branch and of the screen's scores and the
    screen conv's inputs, the head's running sum and max of the tokens, and the step count.
    """

    def __init__(self, model: LDMamba):
        super().__init__()
        self.model = model
        self.method, self.k = model.active_score_method(), model.knn_neighbours()
        self.state_names = [name for name, _ in self._state_shapes(1)]
        self.input_names = ["x_t", *self.state_names]
        self.output_names = ["score", "probs", "embedding", *[f"new_{n}" for n in self.state_names]]
        self.train(model.training)

    def _state_shapes(self, batch: int) -> list[tuple[str, tuple[int, ...]]]:
        m = self.model
        shapes = [(f"stem{i}", (batch, conv.in_channels, conv.kernel_size[0] - 1))
                  for i, conv in enumerate(m.stem_convs)]
        for b, block in m.present_blocks():
            shapes += [(f"block{b}_{k}", v) for k, v in block.state_shapes(batch).items()]
        d = m.config.d_model
        return shapes + [("head_sum", (batch, d)), ("head_max", (batch, d)), ("count", (batch, 1))]

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        x_t = self.model.example_input(batch_size)[:, 0].float()
        dev = self.model.in_mean.device
        return (x_t, *[torch.zeros(shape, device=dev) for _, shape in self._state_shapes(batch_size)])

    def forward(self, x_t: torch.Tensor, *states: torch.Tensor):
        m = self.model
        st = dict(zip(self.state_names, states))
        n = st["count"] + 1.0
        new: dict[str, torch.Tensor] = {"count": n}
        h = m.normalise(x_t.float())
        for i, (conv, bn) in enumerate(zip(m.stem_convs, m.stem_norms)):
            h, new[f"stem{i}"] = causal_conv_step(conv, st[f"stem{i}"], h)
            h = m._stem_act(i, bn(h), dim=1)
        for b, block in m.present_blocks():
            prefix = f"block{b}_"
            h, block_state = block.step(h, n, {k[len(prefix):]: v for k, v in st.items() if k.startswith(prefix)})
            new.update({prefix + k: v for k, v in block_state.items()})
        h = m.norm(h)
        new["head_sum"] = st["head_sum"] + h
        # the running max starts at the first token (the zero initial state is not a token)
        new["head_max"] = torch.where(st["count"] > 0, torch.maximum(st["head_max"], h), h)
        emb = m._head(torch.cat([new["head_sum"] / n, new["head_max"]], dim=-1))
        logits = m.classifier(emb)
        score = m.scores_from(emb, logits, self.method, self.k)
        return (score, logits.softmax(dim=-1), emb, *[new[name] for name in self.state_names])

    def full_sequence(self, xs: torch.Tensor):
        """Per-step outputs (B, T, ...) of the full-sequence (causal) forward, at once."""
        m = self.model
        h, _ = m._tokens(xs)
        n = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device).view(1, -1, 1)
        pooled = torch.cat([h.cumsum(dim=1) / n, h.cummax(dim=1).values], dim=-1)  # (B, T, 2d)
        B, T = pooled.shape[:2]
        emb = m._head(pooled.reshape(B * T, -1))
        logits = m.classifier(emb)
        score = m.scores_from(emb, logits, self.method, self.k)
        return score.view(B, T), logits.softmax(dim=-1).view(B, T, -1), emb.view(B, T, -1)


# --- the CNN baseline ---------------------------------------------------------------------
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


__all__ = ["LDMamba", "LDMambaConfig", "LDMambaStreaming", "SeqCNN", "SeqCNNConfig", "SequenceClassifier", "SequenceExport",
           "DynamicScreening", "StaticAttention", "AttentionMambaBlock", "FrameStem"]
