"""Screening gates: learned per-channel screens that close during training (LDMamba's
dynamic pruning, usable by any model), and the protocol that lists them.

A model owns its gates (they are part of its state); :mod:`edgediag.compress.dynamic`
removes the channels whose screens closed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn


# --- the gate ---------------------------------------------------------------------------
class ScreeningGate(nn.Module):
    """Per-channel learned screen: ``mask = score > tau``, relaxed while training.

    ``scores`` are stored divided by ``gain`` (``score = gain * raw``): with Adam-type
    optimisers every parameter moves about ``lr`` per step whatever its gradient scale,
    so the gain is what lets a screen cross its threshold within a few epochs at the
    network's learning rate.
    """

    def __init__(self, channels: int, init_margin: float = 1.0, temperature: float = 0.5,
                 relaxation: str = "ste", gain: float = 20.0):
        super().__init__()
        if relaxation not in ("ste", "hard_concrete"):
            raise ValueError(f"relaxation must be ste or hard_concrete, not {relaxation!r}")
        if channels < 1:
            raise ValueError("a screening gate needs at least one channel")
        self.channels = int(channels)
        self.temperature, self.relaxation, self.gain = float(temperature), relaxation, float(gain)
        self.raw_scores = nn.Parameter(torch.full((channels,), init_margin / gain))
        self.raw_tau = nn.Parameter(torch.zeros(()))

    @property
    def scores(self) -> torch.Tensor:
        return self.raw_scores * self.gain

    @property
    def tau(self) -> torch.Tensor:
        return self.raw_tau * self.gain

    def logits(self) -> torch.Tensor:
        return (self.scores - self.tau) / self.temperature

    def hard_mask(self) -> torch.Tensor:
        return (self.scores > self.tau).to(self.raw_scores.dtype)

    def open_probability(self) -> torch.Tensor:
        """Differentiable probability that each channel is open (the sparsity term's input)."""
        if self.relaxation == "hard_concrete":
            # P(z > 0) of the stretched hard-concrete distribution (Louizos et al., eq. 12).
            beta, gamma, zeta = 2.0 / 3.0, -0.1, 1.1
            return torch.sigmoid(self.logits() - beta * math.log(-gamma / zeta))
        return torch.sigmoid(self.logits())

    def forward(self) -> torch.Tensor:
        """The (C,) mask to multiply the channels with."""
        hard = self.hard_mask()
        if not self.training:
            return hard
        if self.relaxation == "hard_concrete":
            beta, gamma, zeta = 2.0 / 3.0, -0.1, 1.1
            u = torch.rand_like(self.raw_scores).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.logits()) / beta)
            return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)
        soft = torch.sigmoid(self.logits())
        return hard + soft - soft.detach()  # straight-through: hard forward, soft gradient

    def apply_to(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[dim] = self.channels
        return x * self().to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, relaxation={self.relaxation}, temperature={self.temperature}"


# --- the protocol a prunable model implements ------------------------------------------
@dataclasses.dataclass
class ScreeningGroup:
    """One gate and everything its channels live in.

    ``slices``: (state-dict key, dim, chunks) for every tensor with one entry per channel
    along ``dim``; ``chunks`` > 1 when the dim stacks several copies (e.g. Mamba's
    ``in_proj`` holds the x and z halves: chunks=2). ``config_field``/``config_index``:
    the config entry holding this width (a list field takes an index).
    """

    name: str
    gate: ScreeningGate
    slices: list[tuple[str, int, int]]
    config_field: str
    config_index: int | None = None
    min_channels: int = 4


@runtime_checkable
class Prunable(Protocol):
    sparsity_weight: float

    def screening_groups(self) -> list[ScreeningGroup]: ...


def is_prunable(model: nn.Module) -> bool:
    return isinstance(model, Prunable)


def screening_sparsity(groups: list[ScreeningGroup], costs: dict[str, float] | None = None) -> torch.Tensor:
    """Expected fraction of the prunable cost kept open (0..1): sum over channels of
    cost-per-channel x P(open), divided by the total. Minimising it closes the channels
    whose removal saves most for the least task loss."""
    total, kept = 0.0, None
    for g in groups:
        c = (costs or {}).get(g.name, 1.0)
        term = g.gate.open_probability().sum() * c
        kept = term if kept is None else kept + term
        total += c * g.gate.channels
    if kept is None:
        return torch.zeros(())
    return kept / max(total, 1e-12)


def channel_costs(model: nn.Module, groups: list[ScreeningGroup] | None = None) -> dict[str, float]:
    """Parameters per channel of each group (from the tensors its slices name)."""
    groups = model.screening_groups() if groups is None else groups
    state = model.state_dict()
    out = {}
    for g in groups:
        n = 0.0
        for key, dim, chunks in g.slices:
            t = state[key]
            n += t.numel() / (t.shape[dim] / chunks)
        out[g.name] = n
    return out


# Stages build gates through these, so compress names no layer class (tests/test_architecture.py).
def new_gate(channels: int, **kwargs) -> ScreeningGate:
    return ScreeningGate(channels, **kwargs)


def new_group(name: str, gate: ScreeningGate, slices: list[tuple[str, int, int]], config_field: str,
              config_index: int | None = None, min_channels: int = 4) -> ScreeningGroup:
    return ScreeningGroup(name, gate, slices, config_field, config_index, min_channels)


# --- normalisation that sees only the open channels ----------------------------------------
def masked_layer_norm(ln: nn.LayerNorm, x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``ln(x)`` computed over the open channels only (``mask`` (C,) along ``dim``), closed
    channels zeroed: what the same LayerNorm gives once the closed channels are removed.

    A LayerNorm whose normalised dims include the channel one mixes every channel into every
    output (the mean and variance): a screen before or after it cannot make a channel's
    removal exact. Gated models compute this instead, so the pruned model (a plain
    LayerNorm over the channels kept) makes the same decisions. With every channel open it
    is ``ln(x)``."""
    shape = [1] * x.dim()
    shape[dim] = mask.shape[0]
    m = mask.to(x.dtype).view(shape)
    nd = len(ln.normalized_shape)
    red = tuple(range(x.dim() - nd, x.dim()))
    per_channel = math.prod(ln.normalized_shape) / mask.shape[0]
    count = (m.sum() * per_channel).clamp(min=1.0)
    mean = (x * m).sum(red, keepdim=True) / count
    var = (((x - mean) ** 2) * m).sum(red, keepdim=True) / count
    y = (x - mean) * torch.rsqrt(var + ln.eps)
    if ln.weight is not None:
        y = y * ln.weight
    if ln.bias is not None:
        y = y + ln.bias
    return y * m


__all__ = ["ScreeningGate", "ScreeningGroup", "Prunable", "is_prunable", "screening_sparsity", "channel_costs",
           "new_gate", "new_group", "masked_layer_norm"]
