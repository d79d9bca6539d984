"""Depthwise 3x3-style convs on channels-last maps, with a training path for maps smaller
than the kernel (the last stages of a small image model: 2 x 2 and 1 x 1 tokens).

oneDNN's depthwise backward is slow on such maps on a CPU: at batch 32 with 3 x 3 kernels,
forward + backward took 6.5 ms on 2 x 2 x 256 and 13 ms on 1 x 1 x 512 (memorymamba_nano's
last two stages, nine such convs a step) against 1.0 and 0.7 ms as a dense per-channel
product (issue 24). Where the map is smaller than the kernel every output sees every
input, so the dense form wastes no work. Evaluation and exports keep the Conv.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

__all__ = ["depthwise_conv_cl", "depthwise_conv_dense"]


@functools.lru_cache(maxsize=64)  # a few map sizes per model, every training step
def _taps(H: int, W: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For a k x k kernel (k odd, padding k // 2) on an H x W map: the tap linking each output
    position to each input position (H*W, H*W), and a mask of the pairs within its reach."""
    p = k // 2
    r, c = torch.arange(H, device=device), torch.arange(W, device=device)
    oh, ow, ih, iw = torch.meshgrid(r, c, r, c, indexing="ij")
    di, dj = ih - oh + p, iw - ow + p
    valid = (di >= 0) & (di < k) & (dj >= 0) & (dj < k)
    idx = torch.where(valid, di * k + dj, torch.zeros_like(di))
    return idx.reshape(H * W, H * W), valid.reshape(H * W, H * W)


def depthwise_conv_dense(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv`` (depthwise, stride 1, k x k with k odd, padding k // 2) on channels-last x
    (B, H, W, C) as a dense per-channel (H*W x H*W) product; channels-last out."""
    n, H, W, C = x.shape
    k = conv.kernel_size[0]
    idx, valid = _taps(H, W, k, x.device)
    weight = conv.weight.reshape(C, k * k)[:, idx] * valid.to(x.dtype)  # (C, HW out, HW in)
    y = (x.reshape(n, 1, H * W, C) * weight.permute(1, 2, 0)).sum(2)
    if conv.bias is not None:
        y = y + conv.bias
    return y.reshape(n, H, W, C)


def _dense_applies(conv: nn.Conv2d, x: Tensor) -> bool:
    k = conv.kernel_size
    return (conv.training and torch.is_grad_enabled() and k[0] == k[1] and k[0] % 2 == 1
            and conv.groups == conv.in_channels == conv.out_channels and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding == (k[0] // 2, k[0] // 2)
            and conv.padding_mode == "zeros" and x.shape[1] < k[0] and x.shape[2] < k[0])


def depthwise_conv_cl(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv`` on channels-last x (B, H, W, C), channels-last out: the dense product when
    training on a map smaller than the kernel, the Conv otherwise."""
    if _dense_applies(conv, x):
        return depthwise_conv_dense(conv, x)
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
