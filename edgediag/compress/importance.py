"""Channel importance for structured pruning: torch-pruning's criteria for graph groups,
the same criteria over the tensors of an inner channel group, and the loss gradients
Taylor importance needs."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch_pruning as tp
from torch import nn

from edgediag.errors import UserError

IMPORTANCES = ("magnitude", "taylor", "lamp")


def make_importance(kind: str):
    if kind == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    if kind == "lamp":
        return tp.importance.LAMPImportance(p=2)
    raise UserError(f"--importance must be one of {', '.join(IMPORTANCES)}, not {kind!r}")


def channel_importance(tensors: Iterable[tuple[torch.Tensor, int, int]], n: int, kind: str) -> torch.Tensor:
    """Importance of ``n`` channels held by ``tensors`` ((tensor, dim, chunks): the channel
    is entry c of each of ``chunks`` stacked copies along ``dim``): the L2 norm over all of
    them (magnitude, lamp), or the first-order Taylor term |w x grad| summed (taylor; a
    tensor without a gradient counts by magnitude)."""
    imp = torch.zeros(n)
    for t, dim, chunks in tensors:
        w = t.detach().float().cpu()
        grad = getattr(t, "grad", None)
        w = (w * grad.detach().float().cpu()).abs() if kind == "taylor" and grad is not None else w.pow(2)
        imp += w.movedim(dim, 0).reshape(chunks, n, -1).sum(dim=(0, 2))
    return imp if kind == "taylor" else imp.sqrt()


def inner_importance(module: nn.Module, pruner, kind: str, group: str) -> torch.Tensor:
    """Per channel of an inner group (see :func:`channel_importance`)."""
    return channel_importance(pruner.inner_tensors(module, group), pruner.inner_channels(module, group), kind)


def accumulate_loss_grads(model, batches) -> None:
    """Gradients of the model's own loss (its first phase) on a few batches, for Taylor."""
    model.zero_grad(set_to_none=True)
    was = model.training
    model.train()
    phase = model.phases[0] if hasattr(model, "phases") else "main"
    try:
        for batch in batches:
            out = model.training_step(batch, phase)
            out["loss"].backward()
    finally:
        model.train(was)


__all__ = ["IMPORTANCES", "make_importance", "channel_importance", "inner_importance", "accumulate_loss_grads"]
