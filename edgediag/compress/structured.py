"""Structured pruning with torch-pruning: DependencyGraph + BasePruner over the pruners the
layers register (:mod:`edgediag.nn.pruning`), pruned step by step until a budget is met.

How it fits together:

* :func:`make_pruner` builds a ``torch_pruning`` ``BasePruner`` over the model's own
  forward (``model.prunable_forward`` when it has one, else ``forward``), with the
  registry's pruners and the model's fixed layers (:func:`fixed_layers`: heads, exported
  outputs, the layers around fitted statistics) left alone. A group that touches a fixed
  layer in any way is skipped whole, not just when the fixed layer is its root
  (torch-pruning's ``ignored_layers`` only guards roots).
* Leaves of the graph (Mamba mixers, SS2D, Tgram, memory networks) may have *inner* channel
  groups no graph group reaches (a mixer's d_inner). :func:`inner_groups` lists those, and
  :func:`prune_structured` prunes them with the same importance and ratio schedule.
* :func:`prune_structured` prunes in small steps (``iterative_steps``), measuring the
  budget (:mod:`edgediag.compress.budget`) after each, and stops at the first step that
  meets it - a 50 % channel ratio does not give a 50 % parameter cut (both sides of a layer
  shrink), so a *ratio* here is a parameter target.
* :func:`prune_groups` does the same on a model's screening groups (the width fields of its
  config) for models without ``pruned_widths`` (LDMamba).
* The pruned widths are saved and rebuilt by :func:`edgediag.nn.pruning.record_widths` /
  :func:`edgediag.nn.pruning.apply_widths`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from edgediag.compress.budget import Budget
from edgediag.compress.importance import accumulate_loss_grads, channel_importance, inner_importance, make_importance
from edgediag.compress.latency import LatencyAwareImportance, module_latency
from edgediag.errors import UserError
from edgediag.measure.timing import eval_mode
from edgediag.nn.pruning import customized_pruners, root_module_types
from edgediag.ops import scan_backend

log = logging.getLogger("edgediag.compress.structured")


# --- what may be pruned --------------------------------------------------------------------
def fixed_layers(model: nn.Module) -> list[nn.Module]:
    """Modules whose channels must not change: the model's ``pruning_fixed_layers()``
    (heads, exported outputs, layers tied to fitted statistics or to the input layout)."""
    getter = getattr(model, "pruning_fixed_layers", None)
    return list(getter()) if getter else []


def inner_groups(model: nn.Module) -> list[tuple[str, nn.Module, Any, str]]:
    """(module name, module, pruner, group) of every internal channel group (Mamba mixers'
    and SS2D's d_inner, Tgram's hidden convs): channels no dependency-graph group reaches.
    A model may exclude modules with ``pruning_fixed_inner()``."""
    getter = getattr(model, "pruning_fixed_inner", None)
    fixed = set(getter()) if getter else set()
    pruners = customized_pruners()
    out = []
    for name, m in model.named_modules():
        p = pruners.get(type(m))
        if p is not None and m not in fixed and hasattr(p, "inner_names"):
            out.extend((name, m, p, g) for g in p.inner_names(m))
    return out


# --- the pruning run ---------------------------------------------------------------------
def _forward_fn(model):
    fwd = getattr(model, "prunable_forward", None)
    if fwd is None:
        return lambda m, x: m(x)
    return lambda m, x: fwd(x)


def make_pruner(model, importance, *, ratio: float, steps: int, global_pruning: bool = False,
                round_to: int | None = None, example: torch.Tensor | None = None):
    """torch-pruning's BasePruner over ``model`` (see the module docstring), with groups
    that touch a fixed layer excluded."""
    example = model.example_input(1) if example is None else example
    fixed = fixed_layers(model)
    # torch-pruning maps channels through the autograd graph of one traced forward: the
    # scan must be made of ATen ops there (the native kernel is one opaque Function node)
    with eval_mode(model), scan_backend("chunked"):
        pruner = tp.pruner.BasePruner(
            model, example, importance=importance, global_pruning=global_pruning, pruning_ratio=ratio,
            iterative_steps=steps, ignored_layers=fixed, round_to=round_to,
            customized_pruners=customized_pruners(), forward_fn=_forward_fn(model),
            root_module_types=root_module_types())
    # torch-pruning ignores a fixed layer only as a group root; a group rooted elsewhere may
    # still reach it (a residual stream into the head): exclude such groups entirely.
    fixed_set = set()
    for f in fixed:
        fixed_set.update(f.modules())
    extra = []
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        # pruning a fixed layer's inputs is fine (a head's in_features); its outputs are not
        if any(dep.target.module in fixed_set and pruner.DG.is_out_channel_pruning_fn(dep.handler)
               for dep, _ in group):
            extra.append(group[0].dep.target.module)
    pruner.ignored_layers.extend(extra)
    return pruner


def _inner_step(model, kind: str, ratio: float, base: dict[str, int], round_to: int | None,
                min_channels: int = 8) -> None:
    """Prune every inner group down to ``(1 - ratio)`` of its starting width ``base``."""
    for name, module, pruner, group in inner_groups(model):
        n = pruner.inner_channels(module, group)
        start = base.get(f"{name}:{group}", n)
        target = max(min(min_channels, start), int(round(start * (1.0 - ratio))))
        if round_to:
            target = max(round_to, target - target % round_to) if start >= round_to else target
        if target >= n:
            continue
        imp = inner_importance(module, pruner, kind, group)
        drop = torch.argsort(imp)[: n - target].tolist()
        pruner.prune_inner_channels(module, drop, group)


def prune_structured(model, *, budget: Budget, importance: str = "magnitude", global_pruning: bool = False,
                     round_to: int | None = None, max_ratio: float = 0.9, steps: int = 18,
                     loss_batches: Iterable | None = None, latency_aware: bool = False,
                     latency_backend: str = "eager", progress: Callable[[dict], None] | None = None) -> tuple[Any, dict]:
    """Prune ``model`` step by step until ``budget`` is met (or ``max_ratio`` of every group's
    channels is gone). Returns (the pruned model, a record: steps taken, channel ratio reached,
    cost per step, layer latency used for latency-aware ranking). Steps prune in place; a
    step redone by refine_step returns a pruned copy."""
    if not 0 < max_ratio < 1:
        raise UserError(f"max ratio must be in (0, 1), not {max_ratio}")
    imp = make_importance(importance)
    record: dict[str, Any] = {"importance": importance, "global": global_pruning, "round_to": round_to,
                              "budget": dataclasses.asdict(budget), "steps": []}
    if latency_aware:
        ms = module_latency(model, latency_backend)
        modules = dict(model.named_modules())
        imp = LatencyAwareImportance(imp, {modules[n]: v for n, v in ms.items() if n in modules})
        record["layer_latency_ms_before"] = ms
        # per-layer shares only steer a ranking across layers: latency-aware means global
        global_pruning = True
        record["global"] = True
    base_inner = {f"{name}:{g}": p.inner_channels(m, g) for name, m, p, g in inner_groups(model)}
    pruner = make_pruner(model, imp, ratio=max_ratio, steps=steps, global_pruning=global_pruning,
                         round_to=round_to)
    batches = list(loss_batches or [])
    if importance == "taylor" and not batches:
        raise UserError("taylor importance needs training batches (the model's own loss)")
    cost = budget.cost(model)
    record["cost_start"] = cost
    # a step that overshoots is redone at a bisected ratio (refine_step); latency-aware ranking
    # holds the original's modules, and a latency budget is too noisy to bisect on
    refine = not latency_aware and budget.metric != "latency"
    previous = 0.0
    for step in range(1, steps + 1):
        if budget.met(cost):
            break
        before_step = copy.deepcopy(model) if refine else None
        ratio = pruner.per_step_pruning_ratio[min(step, len(pruner.per_step_pruning_ratio) - 1)]
        _structured_step(model, pruner, importance, ratio, base_inner, round_to, batches)
        cost = budget.cost(model)
        rec = _log_step(record, "structured", step, float(ratio), budget, cost)
        if refine:
            def trial(r, start=before_step, r0=previous):
                m = copy.deepcopy(start)
                one = make_pruner(m, make_importance(importance), ratio=1.0 - (1.0 - r) / (1.0 - r0), steps=1,
                                  global_pruning=global_pruning, round_to=round_to)
                _structured_step(m, one, importance, r, base_inner, round_to, batches)
                return m, budget.cost(m)

            model, cost = refine_step(budget, rec, "structured", trial, previous, model)
        if progress:
            progress(rec)
        previous = rec["channel_ratio"]
    record["cost_end"] = cost
    record["met"] = budget.met(cost)
    if latency_aware:
        record["layer_latency_ms_after"] = module_latency(model, latency_backend)
    return model, record


def _structured_step(model, pruner, importance: str, ratio: float, base_inner: dict[str, int],
                     round_to: int | None, batches) -> None:
    """One pruning step in place: torch-pruning's groups by ``pruner``, then the inner groups
    to ``(1 - ratio)`` of their starting widths."""
    if importance == "taylor":
        accumulate_loss_grads(model, batches)
    with eval_mode(model):
        pruner.step()
    _inner_step(model, importance, ratio, base_inner, round_to)
    model.zero_grad(set_to_none=True)


def _log_step(record: dict, kind: str, step: int, ratio: float, budget: Budget, cost: float) -> dict:
    rec = {"step": step, "channel_ratio": ratio, "cost": cost}
    record["steps"].append(rec)
    log.info("%s pruning step %d: channel ratio %.2f, %s %.4g (target %.4g)", kind, step, ratio, budget.metric,
             cost, budget.target)
    return rec


# A step of the schedule (max_ratio / steps of the channels) can remove far more than the
# budget asks (--ratio 0.5 reached 60 % on a small TASTgram-MFN at 6 steps): the step that
# overshoots is redone at a bisected channel ratio so that the result lands just below the
# target (within LAND_TOLERANCE of it, or as close as the channel rounding allows).
LAND_TOLERANCE = 0.03
LAND_TRIALS = 6


def overshoots(budget: Budget, cost: float) -> bool:
    return budget.met(cost) and cost < budget.target * (1.0 - LAND_TOLERANCE)


def land_on_target(budget: Budget, trial: Callable[[float], tuple[Any, float]], lo: float, hi: float,
                   hi_cost: float) -> tuple[float, Any, float] | None:
    """Bisect the channel ratio in (lo, hi), where lo misses the budget and hi meets it with
    room to spare; ``trial(r)`` prunes a copy to ratio r and returns (model, cost). Returns
    (ratio, model, cost) of the met trial closest to the target, or None if none beats hi."""
    best = None
    best_cost = hi_cost
    for _ in range(LAND_TRIALS):
        mid = 0.5 * (lo + hi)
        model, cost = trial(mid)
        if budget.met(cost):
            hi = mid
            if cost > best_cost:
                best, best_cost = (mid, model, cost), cost
            if not overshoots(budget, cost):
                break
        else:
            lo = mid
    return best


def refine_step(budget: Budget, rec: dict, kind: str, trial: Callable[[float], tuple[Any, float]],
                previous: float, model) -> tuple[Any, float]:
    """The step recorded in ``rec`` (from channel ratio ``previous`` to rec's) redone by
    land_on_target if it overshoots the budget; rec updated. Returns (model, cost): the
    refined copy, or ``model`` and rec's cost as they were."""
    if not overshoots(budget, rec["cost"]):
        return model, rec["cost"]
    best = land_on_target(budget, trial, previous, rec["channel_ratio"], rec["cost"])
    if best is None:
        return model, rec["cost"]
    ratio, model, cost = best
    rec.update(channel_ratio=float(ratio), cost=cost, refined=True)
    log.info("%s pruning step %d refined: channel ratio %.3f, %s %.4g (target %.4g)", kind, rec["step"], ratio,
             budget.metric, cost, budget.target)
    return model, cost


# --- pruning on screening groups (models without pruned_widths: LDMamba) ---------------------------
def prune_groups(model, budget: Budget, importance: str, max_ratio: float, steps: int, round_to: int | None,
                 batches) -> tuple[object, dict]:
    """Structured pruning on the model's screening groups (the width fields of its config):
    each step keeps the (1 - r) most important channels of every group (L2 norm over the
    group's tensors, or |w x grad| for taylor), rebuilt with dynamic.prune_model. A step that
    overshoots the budget is redone at a bisected r (land_on_target)."""
    base = {g.name: g.gate.channels for g in model.screening_groups()}
    record = {"importance": importance, "groups": True, "steps": []}
    cost = budget.cost(model)
    record["cost_start"] = cost
    previous = 0.0
    for step in range(1, steps + 1):
        if budget.met(cost):
            break
        r = max_ratio * step / steps
        before_step = copy.deepcopy(model)
        model = _group_step(model, base, r, importance, round_to, batches)
        cost = budget.cost(model)
        rec = _log_step(record, "group", step, r, budget, cost)
        if budget.metric != "latency":
            def trial(x, start=before_step):
                m = _group_step(copy.deepcopy(start), base, x, importance, round_to, batches)
                return m, budget.cost(m)

            model, cost = refine_step(budget, rec, "group", trial, previous, model)
        previous = rec["channel_ratio"]
    record["cost_end"], record["met"] = cost, budget.met(cost)
    return model, record


def _group_step(model, base: dict[str, int], r: float, importance: str, round_to: int | None, batches):
    """Keep round((1 - r) x base width) of each screening group's channels (rounded down to
    round_to), the most important ones."""
    from edgediag.compress.dynamic import prune_model

    if importance == "taylor":
        accumulate_loss_grads(model, batches)
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    keep = {}
    for g in model.screening_groups():
        n = g.gate.channels
        target = max(min(g.min_channels, n), int(round(base[g.name] * (1 - r))))
        if round_to and target >= round_to:
            target -= target % round_to
        if target >= n:
            continue
        imp = channel_importance([(state[key], dim, chunks) for key, dim, chunks in g.slices], n, importance)
        keep[g.name] = torch.argsort(imp, descending=True)[:target].sort().values
    model.zero_grad(set_to_none=True)
    return prune_model(model, keep) if keep else model


__all__ = ["fixed_layers", "inner_groups", "make_pruner", "prune_structured", "prune_groups"]
