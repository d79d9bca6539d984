"""Depth pruning: remove whole residual blocks (``python -m edgediag.prune --remove-blocks N``).

Why it exists: at batch 1 on a CPU, eager PyTorch runs these small models at a few hundred
operators of 10-200 us each, mostly fixed per-call cost. Removing channels makes each call
cheaper but leaves the number of calls alone, so channel pruning alone barely moves eager
latency (docs/pruning.md). A residual block ``x + f(x)`` can go whole - what is left is its
input - and takes all its operators with it.

* A model lists its removable blocks in ``removable_blocks()`` (module paths of blocks
  whose output is their input plus a residual branch) and records removed ones in its
  config's ``removed_blocks``; its ``__init__`` calls :func:`remove_blocks`, so
  ``create_model(config)`` rebuilds the shallower shape and the state dict of the other
  blocks keeps its keys.
* :func:`block_importance`: how much each block changes the residual stream it sits on, on
  a batch of real inputs (relative squared change, the error its removal would put there).
* :func:`prune_depth` removes the least important block, re-measures, and repeats
  (greedy: a block's importance depends on which others are still there).
"""

from __future__ import annotations

import torch

from edgediag.errors import UserError
from edgediag.nn.depth import remove_blocks


@torch.no_grad()
def block_importance(model, x: torch.Tensor) -> dict[str, float]:
    """Per removable block: how much it changes its input, mean over the items of
    ||block(h) - h||^2 / ||h||^2 (one forward pass of ``export_module()`` on ``x``). Removing
    the block replaces block(h) by h, so this is the error its removal puts into the
    residual stream there. (The change at the model's outputs is a poorer guide: a score
    measured against fitted statistics - a kNN bank, a Mahalanobis mean - moves about as
    much whichever block goes.)"""
    model.eval()
    scores: dict[str, float] = {}

    def hook(name):
        def record(module, args, out):
            h = args[0].float().flatten(1)
            y = (out[0] if isinstance(out, (tuple, list)) else out).float().flatten(1)
            scores[name] = ((y - h).pow(2).sum(1) / h.pow(2).sum(1).clamp_min(1e-12)).mean().item()
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in model.removable_blocks()]
    try:
        model.export_module()(x)
    finally:
        for h in handles:
            h.remove()
    return scores


def prune_depth(model, n_blocks: int, x: torch.Tensor) -> dict:
    """Remove ``n_blocks`` residual blocks, the least important first (re-measured after each
    removal). Records the removed names in ``model.config.removed_blocks``; returns what was
    measured, for prune.json."""
    from edgediag.config import replace

    available = list(model.removable_blocks())
    if n_blocks > len(available):
        raise UserError(f"--remove-blocks {n_blocks}: {model.model_name} has {len(available)} removable "
                        f"residual blocks{' (' + ', '.join(available) + ')' if available else ''}")
    steps = []
    for _ in range(n_blocks):
        scores = block_importance(model, x)
        name = min(scores, key=scores.get)
        remove_blocks(model, [name])
        steps.append({"removed": name, "stream_change": scores[name], "importance": scores})
    removed = [*model.config.removed_blocks, *[s["removed"] for s in steps]]
    changes = {"removed_blocks": removed}
    widths = getattr(model.config, "pruned_widths", None)
    if widths:  # an earlier channel pruning's sizes of layers that are gone now
        changes["pruned_widths"] = {k: v for k, v in widths.items()
                                    if not any(k == r or k.startswith(r + ".") for r in removed)}
    model.config = replace(model.config, **changes)
    return {"removed_blocks": removed, "steps": steps}


__all__ = ["block_importance", "prune_depth"]
