"""LDMamba's dynamic screening module and static (attention) branch, with the running
statistics and the causal-conv step their streaming form uses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgediag.nn.gates import ScreeningGate


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


__all__ = ["running_stats", "stats_from_sums", "causal_conv_step", "DynamicScreening", "StaticAttention"]
