"""The selective scan exported as one ONNX node, ``edgediag::SelectiveScan`` (domain
``edgediag``, version 1), which ONNX Runtime runs with the fused CPU kernel
(``kernels/selective_scan_ort.cpp``, loaded by :mod:`edgediag.runtime.custom_ops`).

The portable export writes the chunked scan as ~1,000 standard nodes, which every runtime
(TensorRT included) reads; this node is for ONNX Runtime with the library loaded. It is an
autograd function whose ``symbolic`` the TorchScript exporter calls; its forward computes
the value with the function it is given (the chunked scan), so tracing and eager calls agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

DOMAIN = "edgediag"
OPSET = {DOMAIN: 1}  # torch.onnx.export(custom_opsets=...)


class SelectiveScanOnnxOp(torch.autograd.Function):
    """Inputs as the kernel takes them: D and delta_bias always present (zeros stand in for
    an absent one, exactly), z last and optional."""

    @staticmethod
    def forward(ctx, compute: Callable[..., Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                C: Tensor, D: Tensor, delta_bias: Tensor, z: Tensor | None, delta_softplus: bool) -> Tensor:
        return compute(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)

    @staticmethod
    def symbolic(g, compute, u, delta, A, B, C, D, delta_bias, z, delta_softplus):
        inputs = [u, delta, A, B, C, D, delta_bias] + ([] if z is None else [z])
        y = g.op(f"{DOMAIN}::SelectiveScan", *inputs, delta_softplus_i=int(bool(delta_softplus)))
        y.setType(u.type())
        return y

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the 'onnx_op' selective-scan backend is for export only; train with another backend")


def selective_scan_onnx_op(compute: Callable[..., Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                           C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
                           delta_bias: Tensor | None = None, delta_softplus: bool = False,
                           return_last_state: bool = False) -> Tensor:
    """One ``edgediag::SelectiveScan`` node in an exported graph (fp32; no last state)."""
    if return_last_state:
        raise RuntimeError("the edgediag::SelectiveScan ONNX op returns no last state; export with the "
                           "portable scan (--scan-op graph)")
    dim = u.shape[1]
    zeros = torch.zeros(dim, dtype=torch.float32, device=u.device)
    D = zeros if D is None else D.float()
    delta_bias = zeros if delta_bias is None else delta_bias.float()
    out = SelectiveScanOnnxOp.apply(compute, u.float(), delta.float(), A.float(), B.float(), C.float(),
                                    D, delta_bias, None if z is None else z.float(), bool(delta_softplus))
    return out.to(u.dtype)
