"""Dynamic pruning: learned channel screens that close during training, and a driver
that physically removes the closed channels between epochs until a budget is met.

The strategy (LDMamba's "dynamic pruning", written model-independent for issue 8):

* A :class:`ScreeningGate` holds one learned score per channel and one learned
  threshold ``tau``. A channel is open when ``score > tau``. Training uses the hard
  mask in the forward pass and the gradient of ``sigmoid((score - tau) / T)`` in the
  backward pass (straight-through), so the network trains exactly as it will run, yet
  every score - closed or open - keeps receiving the task's gradient and can reopen.
  ``relaxation="hard_concrete"`` uses the stochastic hard-concrete gate of Louizos et
  al. (2018) instead. Inference always uses the hard mask.
* A model is *dynamically prunable* when it implements :class:`Prunable`:
  ``screening_groups()`` lists its gates, which state-dict tensors (and dims) hold each
  gate's channels and which config field records the width; ``sparsity_weight`` is the
  weight of :func:`screening_sparsity` in its loss.
* :func:`prune_model` rebuilds the model from its config with the new widths
  (``create_model(name, **config)`` gives the pruned shape) and slices the old weights
  into it. Removing channels whose hard mask is 0 is exact: the outputs do not change.
* :class:`DynamicPruner` is a training-engine callback (``on_epoch_end(trainer, epoch)``
  returns a replacement model; the engine rebuilds the optimisers). The cost follows a
  linear schedule from 100 % (``start_epoch``) to ``target`` (``end_epoch``). Each epoch
  end it removes channels whose screens stayed closed for ``patience`` epochs - only as
  many as the schedule asks, reopening the rest - raises the model's sparsity pressure
  while the cost is above the schedule and eases it when below; at every epoch end behind
  the schedule it closes the lowest-margin channels, at most ``max_step_fraction`` of a
  group at a time and never below max(``min_channels``, ``min_fraction`` of its starting
  width), so the network adapts between steps; the cap is lifted (with a warning) only at
  ``end_epoch`` when the budget cannot be met otherwise.

The gates and the protocol live in :mod:`edgediag.nn.gates` (models own them); costs
come from :mod:`edgediag.compress.budget`; gates on any model's channel groups from
:mod:`edgediag.compress.group_gates`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch

from edgediag.compress.budget import model_cost, model_params
from edgediag.errors import UserError
from edgediag.nn.gates import channel_costs, is_prunable
from edgediag.nn.pruning import slice_channels

log = logging.getLogger("edgediag.compress.dynamic")


# --- physical removal --------------------------------------------------------------------
def pruned_config(model, keep: dict[str, torch.Tensor], groups=None):
    """The model's config with every group's width set to ``len(keep[group])``."""
    from edgediag.config import from_dict, to_dict

    groups = model.screening_groups() if groups is None else groups
    values = to_dict(model.config)
    for g in groups:
        if g.name not in keep:
            continue
        width = int(len(keep[g.name]))
        if g.config_index is None:
            values[g.config_field] = width
        else:
            widths = list(values[g.config_field])
            widths[g.config_index] = width
            values[g.config_field] = widths
    return from_dict(type(model.config), values)


def prune_model(model, keep: dict[str, torch.Tensor]):
    """A new, smaller model of the same class holding the channels ``keep[group]``.

    The new model is built from the pruned config (so ``create_model(name, **config)``
    rebuilds this shape from a checkpoint) and the old tensors are sliced into it.
    """
    if getattr(model, "_group_gates", None) is not None:
        return model._group_gates.remove(keep)  # gates on any model: removed in place via torch-pruning
    groups = model.screening_groups()
    names = {g.name for g in groups}
    unknown = set(keep) - names
    if unknown:
        raise ValueError(f"unknown screening groups {sorted(unknown)} (have {sorted(names)})")
    keep = {k: torch.as_tensor(v, dtype=torch.long).sort().values for k, v in keep.items()}
    for g in groups:
        if g.name in keep and (len(keep[g.name]) == 0 or int(keep[g.name].max()) >= g.gate.channels):
            raise ValueError(f"group {g.name}: keep indices must be a non-empty subset of 0..{g.gate.channels - 1}")
    state = {k: v for k, v in model.state_dict().items()}
    for g in groups:
        if g.name not in keep:
            continue
        for key, dim, chunks in g.slices:
            state[key] = slice_channels(state[key], dim, keep[g.name], chunks)
    new = type(model)(pruned_config(model, keep, groups))
    param = next(model.parameters())
    new = new.to(device=param.device)
    expected = new.state_dict()
    params = {k for k, _ in model.named_parameters()}
    sliced = {key for g in groups if g.name in keep for key, _, _ in g.slices}
    bad = [k for k, v in expected.items() if isinstance(v, torch.Tensor) and k in state
           and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)]
    # Fitted statistics sized by a pruned width (a kNN bank or Mahalanobis of the head's
    # embedding) cannot be sliced meaningfully: the rebuilt model starts them empty, and
    # whoever prunes a fitted model refits them (fit_normal), as the prune verb does.
    stale = [k for k in bad if k not in params and k not in sliced]
    for k in stale:
        state[k] = expected[k]
    if stale:
        log.info("pruning reset fitted statistics %s: run fit_normal again", stale)
    bad = [k for k in bad if k not in stale]
    if bad:
        raise RuntimeError(f"pruned tensors do not fit the rebuilt model: {bad[:4]} "
                           "(a screening group's slices are incomplete)")
    new.load_state_dict(state)
    new.train(model.training)
    if hasattr(model, "sparsity_weight"):
        new.sparsity_weight = model.sparsity_weight
    return new


def widths(model) -> dict[str, int]:
    return {g.name: g.gate.channels for g in model.screening_groups()}


# --- the driver ---------------------------------------------------------------------------
@dataclasses.dataclass
class PruneConfig:
    target: float = 0.5  # final cost as a fraction of the starting cost
    metric: str = "params"  # params | flops | latency, or several joined by "+" (all must meet the target)
    start_epoch: int = 1  # first epoch (0-based, after it ends) at which channels may be removed
    end_epoch: int = -1  # epoch by which the budget must be met; -1 = 70 % of train epochs (or start + 3)
    patience: int = 1  # epoch ends a screen must be seen closed before its channel is removed
    pressure_growth: float = 2.0  # sparsity weight multiplier while the cost is above schedule
    initial_pressure: float = 0.1  # sparsity weight once pruning starts (0 = keep the model's)
    force: bool = True  # at end_epoch, close the lowest-margin channels if the screens fell short
    follow_schedule: bool = True  # remove at most what the schedule asks; reopen the other closed screens
    reopen_margin: float = 0.05  # how far above its threshold a reopened screen's score is set
    min_channels: int = 8  # never prune a group below this width...
    min_fraction: float = 0.1  # ...nor below this fraction of its starting width
    max_step_fraction: float = 0.35  # at most this fraction of a group's width removed at one epoch end

    def validate(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise UserError(f"prune.target must be in (0, 1], not {self.target}")
        bad = [m for m in self.metric.split("+") if m not in ("params", "flops", "latency")]
        if bad or not self.metric:
            raise UserError(f"prune.metric must be params, flops or latency (or e.g. params+flops), "
                            f"not {self.metric!r}")
        if self.patience < 1 or self.pressure_growth < 1.0:
            raise UserError("prune.patience must be >= 1 and prune.pressure_growth >= 1")
        if self.min_channels < 1 or not 0.0 <= self.min_fraction < 1.0 or not 0.0 < self.max_step_fraction <= 1.0:
            raise UserError("prune.min_channels must be >= 1, prune.min_fraction in [0, 1) and "
                            "prune.max_step_fraction in (0, 1]")


class DynamicPruner:
    """Training-engine callback that shrinks a :class:`Prunable` model to a budget.

    ``on_epoch_end(trainer_or_model, epoch)`` returns a new, smaller model when it removed
    channels (else None); ``history`` records cost, widths and pressure per call.
    """

    def __init__(self, cfg: PruneConfig | None = None, total_epochs: int | None = None, **kwargs: Any):
        self.cfg = cfg or PruneConfig(**kwargs)
        self.cfg.validate()
        self.total_epochs = total_epochs
        self.base_cost: dict[str, float] | None = None  # per metric, at the first call
        self.streaks: dict[str, torch.Tensor] = {}
        self.base_widths: dict[str, int] = {}  # each group's width when first seen
        self.history: list[dict] = []

    # the epoch by which the budget must be met
    def _end_epoch(self, trainer) -> int:
        if self.cfg.end_epoch >= 0:
            return self.cfg.end_epoch
        total = self.total_epochs or getattr(getattr(trainer, "cfg", None), "epochs", None)
        if total:
            return max(self.cfg.start_epoch, int(math.ceil(0.7 * total)) - 1)
        return self.cfg.start_epoch + 3

    def scheduled_target(self, epoch: int, end: int) -> float:
        """Cost fraction the model should be at after ``epoch``: linear from 1 to target."""
        if epoch < self.cfg.start_epoch:
            return 1.0
        progress = min(1.0, (epoch - self.cfg.start_epoch + 1) / max(1, end - self.cfg.start_epoch + 1))
        return 1.0 - (1.0 - self.cfg.target) * progress

    def on_train_start(self, model) -> None:
        if not is_prunable(model):
            raise UserError(f"{type(model).__name__} is not dynamically prunable (no screening_groups)")
        if not model.screening_groups():
            raise UserError(f"{type(model).__name__} has no screening gates to prune (e.g. model.screening=false)")
        self.base_cost = {m: model_cost(model, m) for m in self.cfg.metric.split("+")}
        if self.cfg.initial_pressure > 0:
            model.sparsity_weight = self.cfg.initial_pressure

    def on_epoch_end(self, trainer, epoch: int):
        model = trainer.model if hasattr(trainer, "model") else trainer
        if self.base_cost is None:
            self.on_train_start(model)
        end = self._end_epoch(trainer)
        groups = model.screening_groups()
        for g in groups:
            self.base_widths.setdefault(g.name, g.gate.channels)
        self._step_start = {g.name: g.gate.channels for g in groups}  # the per-step cap counts from here
        # Channels closed at this epoch's end extend their streak; open ones reset it.
        for g in groups:
            closed = g.gate.hard_mask().detach().cpu() == 0
            prev = self.streaks.get(g.name)
            if prev is None or len(prev) != g.gate.channels:
                prev = torch.zeros(g.gate.channels, dtype=torch.long)
            self.streaks[g.name] = torch.where(closed, prev + 1, torch.zeros_like(prev))
        if epoch < self.cfg.start_epoch:
            return None

        goal = self.scheduled_target(epoch, end)
        ratio_before = self.ratio(model)
        remove = self._choose_removals(model, groups, goal, ratio_before)
        keep = {}
        for g in groups:
            mask = torch.ones(g.gate.channels, dtype=torch.bool)
            mask[sorted(remove[g.name])] = False
            keep[g.name] = self._respect_minimum(g, mask)
        replacement = None
        if any(len(k) < g.gate.channels for k, g in zip(keep.values(), groups)):
            replacement = prune_model(model, keep)
            self._slice_streaks(keep)

        current = replacement if replacement is not None else model
        ratio = self.ratio(current)
        forced = 0
        # Behind the schedule: close the lowest-margin channels up to this epoch's goal, at
        # most max_step_fraction of any group per epoch end, so the model shrinks along the
        # schedule (and the training between steps adapts) instead of all at once at the
        # deadline. At the deadline the budget is met even if that takes more.
        if self.cfg.force and ratio > goal * (1 + 1e-6):
            current, forced = self._force_to_budget(current, goal)
            if epoch >= end and self.ratio(current) > self.cfg.target * (1 + 1e-6):
                log.warning("dynamic pruning: the budget needs more than prune.max_step_fraction=%g of a group "
                            "at epoch %d; closing more at once", self.cfg.max_step_fraction, epoch + 1)
                current, more = self._force_to_budget(current, goal, capped=False)
                forced += more
            if forced:
                replacement = current
            ratio = self.ratio(current)
        if hasattr(current, "sparsity_weight"):
            if ratio <= self.cfg.target + 1e-9:
                current.sparsity_weight = 0.0  # budget met: let the remaining epochs recover accuracy
            elif ratio > goal:  # behind schedule: push harder
                current.sparsity_weight = max(current.sparsity_weight, 1e-3) * self.cfg.pressure_growth
            else:  # ahead of schedule: ease off, so channels close progressively, not all at once
                current.sparsity_weight = current.sparsity_weight / self.cfg.pressure_growth
        rec = {"epoch": epoch + 1, "ratio_before": ratio_before, "ratio": ratio, "goal": goal,
               "cost": {m: model_cost(current, m) for m in self.base_cost}, "widths": widths(current),
               "forced": forced, "pressure": float(getattr(current, "sparsity_weight", float("nan")))}
        self.history.append(rec)
        log.info("dynamic pruning after epoch %d: %s %.1f%% -> %.1f%% of start (schedule %.1f%%)%s, widths %s",
                 epoch + 1, self.cfg.metric, 100 * ratio_before, 100 * ratio, 100 * goal,
                 f", {forced} channels forced closed" if forced else "", rec["widths"])
        return replacement

    # --- helpers ---
    def ratio(self, model) -> float:
        """Cost as a fraction of the starting cost; with several metrics the largest."""
        return max(model_cost(model, m) / self.base_cost[m] for m in self.base_cost)

    def _choose_removals(self, model, groups, goal: float, ratio: float) -> dict[str, set]:
        """Channels to remove now: those closed for ``patience`` epoch ends, most firmly
        closed first. With ``follow_schedule`` only as many as bring the cost down to this
        epoch's goal (savings estimated from parameter counts); the other closed screens
        are reopened just above their threshold, so the model shrinks progressively
        instead of all at once when the task barely needs the channels."""
        cands = []
        for g in groups:
            margin = (g.gate.scores - g.gate.tau).detach().cpu()
            for c in (self.streaks[g.name] >= self.cfg.patience).nonzero().flatten().tolist():
                cands.append((float(margin[c]), g.name, c))
        cands.sort()
        remove: dict[str, set] = {g.name: set() for g in groups}
        if not self.cfg.follow_schedule:
            for _, name, c in cands:
                remove[name].add(c)
            return remove
        pcost = channel_costs(model, groups)
        allowed = model_params(model) * max(0.0, 1.0 - goal / ratio)
        saved = 0.0
        by_name = {g.name: g for g in groups}
        room = {g.name: self._room(g) for g in groups}
        for _, name, c in cands:
            if saved < allowed and len(remove[name]) < room[name]:
                remove[name].add(c)
                saved += pcost[name]
            else:
                gate = by_name[name].gate
                with torch.no_grad():
                    gate.raw_scores[c] = (gate.tau + self.cfg.reopen_margin) / gate.gain
                self.streaks[name][c] = 0
        return remove

    def _minimum(self, g) -> int:
        """The narrowest a group may get: min_channels (the group's or the config's, the
        larger), and min_fraction of its starting width."""
        base = self.base_widths.get(g.name, g.gate.channels)
        floor = max(g.min_channels, self.cfg.min_channels, math.ceil(self.cfg.min_fraction * base))
        return min(floor, g.gate.channels)

    def _room(self, g, capped: bool = True) -> int:
        """How many more of the group's channels this epoch end may remove."""
        room = g.gate.channels - self._minimum(g)
        if capped:
            start = getattr(self, "_step_start", {}).get(g.name, g.gate.channels)
            cap = int(math.floor(self.cfg.max_step_fraction * start))
            room = min(room, cap - (start - g.gate.channels))
        return max(0, room)

    def _respect_minimum(self, g, keep_mask: torch.Tensor) -> torch.Tensor:
        minimum = self._minimum(g)
        if int(keep_mask.sum()) >= minimum:
            return keep_mask.nonzero().flatten()
        # Too few open: keep the highest-scoring channels and open their screens, so the
        # kept channels actually compute (closed ones contribute zero).
        order = torch.argsort(g.gate.scores.detach().cpu(), descending=True)[:minimum]
        with torch.no_grad():
            tau = float(g.gate.tau)
            for c in order.tolist():
                if float(g.gate.scores[c]) <= tau:
                    g.gate.raw_scores[c] = (tau + 0.1) / g.gate.gain
        return order.sort().values

    def _slice_streaks(self, keep: dict[str, torch.Tensor]) -> None:
        for name, idx in keep.items():
            self.streaks[name] = self.streaks[name][idx.cpu()]

    def _force_to_budget(self, model, goal: float | None = None, capped: bool = True):
        """Close the lowest-margin channels (score - tau) until the cost is at ``goal``
        (default: the target), estimating savings by parameter cost and re-measuring after
        each rebuild. ``capped``: no group loses more than max_step_fraction of its width at
        this epoch end; no group goes below its minimum width."""
        goal = self.cfg.target if goal is None else goal
        forced = 0
        for _ in range(8):
            ratio = self.ratio(model)
            if ratio <= goal * (1 + 1e-6):
                break
            groups = model.screening_groups()
            pcost = channel_costs(model, groups)
            total_p = model_params(model)
            # Savings needed, expressed in parameters (FLOPs/latency scale roughly with them).
            need = total_p * (1 - goal / ratio)
            cands = []
            for g in groups:
                margin = (g.gate.scores - g.gate.tau).detach().cpu()
                for c in range(g.gate.channels):
                    cands.append((float(margin[c]), g.name, c))
            cands.sort()
            removed: dict[str, set] = {g.name: set() for g in groups}
            room = {g.name: self._room(g, capped) for g in groups}
            saved = 0.0
            for _, name, c in cands:
                if saved >= need:
                    break
                if len(removed[name]) >= room[name]:
                    continue
                removed[name].add(c)
                saved += pcost[name]
            if not any(removed.values()):
                if not capped:
                    log.warning("dynamic pruning: every group is at its minimum width; budget not reachable")
                break
            keep = {g.name: torch.tensor([c for c in range(g.gate.channels) if c not in removed[g.name]])
                    for g in groups}
            forced += sum(len(v) for v in removed.values())
            model = prune_model(model, keep)
            self._slice_streaks(keep)
        return model, forced

    def state_dict(self) -> dict:
        """Plain values (``torch.load(weights_only=True)``-safe) to resume a pruning run:
        the starting cost the target is relative to, the closed-streaks and the history."""
        return {"config": dataclasses.asdict(self.cfg), "base_cost": self.base_cost,
                "streaks": {k: v.tolist() for k, v in self.streaks.items()}, "base_widths": dict(self.base_widths),
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.base_cost = state.get("base_cost")
        self.streaks = {k: torch.tensor(v, dtype=torch.long) for k, v in (state.get("streaks") or {}).items()}
        self.base_widths = dict(state.get("base_widths") or {})
        self.history = list(state.get("history") or [])


__all__ = ["pruned_config", "prune_model", "widths", "PruneConfig", "DynamicPruner"]
