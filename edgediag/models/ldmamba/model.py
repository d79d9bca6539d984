"""LDMamba: attention-Mamba with a dynamic screening module and dynamic pruning, plus the
two baselines it is compared with (``ldmamba_plain`` and ``seq_cnn``).

Designed from the abstract of "A Novel Robust Lightweight Anomaly Diagnosis Model Capable
of Extracting Dynamic Features" (no code was published); see README.md for
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

Dynamic pruning: :class:`edgediag.nn.gates.ScreeningGate` screens on the Mamba
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

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from edgediag.errors import UserError
from edgediag.models import register_model
from edgediag.models.ldmamba.screening import (
    DynamicScreening,
    StaticAttention,
    causal_conv_step,
    running_stats,
    stats_from_sums,
)
from edgediag.models.ldmamba.sequence import (
    FrameStem,
    SeqCNN,
    SeqCNNConfig,
    SequenceClassifier,
    SequenceExport,
    SequenceInputConfig,
)
from edgediag.models.ldmamba.streaming import LDMambaStreaming
from edgediag.nn.depth import present, remove_blocks
from edgediag.nn.gates import ScreeningGate, ScreeningGroup, channel_costs, screening_sparsity
from edgediag.nn.mamba import BiMambaMixer, MambaMixer, inner_channel_tensors


# --- LDMamba ------------------------------------------------------------------------------
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



class AttentionMambaBlock(nn.Module):
    def __init__(self, c: LDMambaConfig, index: int):
        super().__init__()
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
            for sfx in self.mixer.directions:
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
    # prune's defaults (README.md "Pruning"): at batch 1 its time is mostly per-operator
    # cost, so one of the two blocks goes, then channels to 80 % of the parameters (widths
    # multiples of 8: the scan's vector lanes); 20 epochs at half the training lr recover it
    prune_recipe = {"ratio": 0.8, "round_to": 8, "remove_blocks": 1, "finetune_epochs": 20, "distill": 1.0,
                    "lr_scale": 0.5}

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
            slices = [(f"{p}.inner_gate.raw_scores", 0, 1),
                      *((f"{p}.mixer.{n}", dim, chunks) for n, dim, chunks in inner_channel_tensors(block.mixer))]
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


# the split-out parts stay importable from here (tests and older scripts import them so)
__all__ = ["LDMamba", "LDMambaConfig", "LDMambaStreaming", "SeqCNN", "SeqCNNConfig", "SequenceClassifier", "SequenceExport",
           "SequenceInputConfig", "DynamicScreening", "StaticAttention", "AttentionMambaBlock", "FrameStem",
           "causal_conv_step", "running_stats", "stats_from_sums"]
