"""edgediag.nn.depthwise: the dense per-channel form of a depthwise conv against nn.Conv2d.

Tolerances (|a - b| <= atol + rtol * |b|), fp32, sums of at most k*k products:

    what                   rtol    atol
    outputs                1e-5    1e-5
    gradients (x, w, b)    1e-5    1e-5
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgediag.nn.depthwise import depthwise_conv_cl, depthwise_conv_dense

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (1, 2), (2, 3), (4, 4), (6, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_form_matches_conv(k, hw, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, k, padding=k // 2, groups=6, bias=bias)
    x = torch.randn(3, *hw, 6, requires_grad=True)
    g = torch.randn(3, *hw, 6)
    ref = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    ref_grads = torch.autograd.grad(ref, [x, *conv.parameters()], g)
    out = depthwise_conv_dense(conv, x)
    grads = torch.autograd.grad(out, [x, *conv.parameters()], g)
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_conv_kept_where_the_dense_form_does_not_apply():
    """Strided and non-depthwise convs, evaluation, no-grad and maps as large as the kernel
    run the Conv itself: its shapes and its numbers."""
    torch.manual_seed(1)
    x = torch.randn(2, 2, 2, 4)
    for conv in (nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),  # output 1 x 1
                 nn.Conv2d(4, 8, 3, padding=1, groups=4)):           # 8 channels out
        assert depthwise_conv_cl(conv, x).shape == conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).shape
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)

    def as_conv(t):
        return conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    big = torch.randn(2, 3, 3, 4)
    torch.testing.assert_close(depthwise_conv_cl(conv, big), as_conv(big), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(depthwise_conv_cl(conv, x), as_conv(x), rtol=0, atol=0)
    conv.eval()
    torch.testing.assert_close(depthwise_conv_cl(conv, x), as_conv(x), rtol=0, atol=0)
