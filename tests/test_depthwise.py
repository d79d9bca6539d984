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
    """Evaluation, no-grad, large maps and convs that are not stride-1 'same' depthwise ones
    run the Conv itself: the same numbers as calling it."""
    torch.manual_seed(1)
    x = torch.randn(2, 2, 2, 4)
    convs = [nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),   # strided: output 1 x 1
             nn.Conv2d(4, 8, 3, padding=1, groups=4),             # not depthwise
             nn.Conv2d(4, 4, 3, padding=0, groups=4)]             # no padding: output 0 x 0 would fail densely
    for conv in convs[:2]:
        assert depthwise_conv_cl(conv, x).shape[1:3] == conv(x.permute(0, 3, 1, 2)).shape[2:]
    with pytest.raises(RuntimeError):
        depthwise_conv_cl(convs[2], x)  # the Conv's own error: the kernel exceeds the padded input
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4).eval()
    torch.testing.assert_close(depthwise_conv_cl(conv, x), conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1),
                               rtol=0, atol=0)
