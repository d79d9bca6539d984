"""Removed residual blocks (depth pruning, :mod:`edgediag.compress.depth`): what a model
needs to rebuild a shallower shape from its config's ``removed_blocks``."""

from __future__ import annotations

import torch
from torch import nn

from edgediag.errors import UserError


class RemovedBlock(nn.Module):
    """What a removed residual block leaves behind: its input, unchanged. Models whose
    blocks return more than the output (auxiliary losses, streaming states) skip it with
    ``isinstance(block, RemovedBlock)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def present(blocks: nn.ModuleList) -> list[tuple[int, nn.Module]]:
    """(index, block) of the blocks in ``blocks`` that depth pruning left."""
    return [(i, b) for i, b in enumerate(blocks) if not isinstance(b, RemovedBlock)]


def remove_blocks(model: nn.Module, names: list[str]) -> None:
    """Replace the named blocks by :class:`RemovedBlock` (from a model's ``__init__``)."""
    allowed = set(model.removable_blocks()) | {n for n, m in model.named_modules() if isinstance(m, RemovedBlock)}
    for name in names:
        if name not in allowed:
            raise UserError(f"{model.model_name}: {name!r} is not a removable residual block "
                            f"(removable: {', '.join(model.removable_blocks()) or 'none'})")
        model.set_submodule(name, RemovedBlock())


__all__ = ["RemovedBlock", "present", "remove_blocks"]
