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
  while the cost is above the schedule and eases it when below; if the screens have not
  got there by ``end_epoch`` it closes the lowest-margin channels to meet the budget,
  leaving the remaining epochs to recover.

Costs: :func:`count_params` and :func:`count_flops` (thin wrappers of
:mod:`edgediag.measure.cost`, which counts the selective scan by formula) and
:func:`measure_latency` (median CPU wall time).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from edgediag.errors import UserError
from edgediag.measure import cost as _flops
from edgediag.measure.timing import median_latency_ms

log = logging.getLogger("edgediag.compress.dynamic")


# --- the gate ---------------------------------------------------------------------------
class ScreeningGate(nn.Module):
    """Per-channel learned screen: ``mask = score > tau``, relaxed while training.

    ``scores`` are stored divided by ``gain`` (``score = gain * raw``): with Adam-type
    optimisers every parameter moves about ``lr`` per step whatever its gradient scale,
    so the gain is what lets a screen cross its threshold within a few epochs at the
    network's learning rate.
    """

    def __init__(self, channels: int, init_margin: float = 1.0, temperature: float = 0.5,
                 relaxation: str = "ste", gain: float = 20.0):
        super().__init__()
        if relaxation not in ("ste", "hard_concrete"):
            raise ValueError(f"relaxation must be ste or hard_concrete, not {relaxation!r}")
        if channels < 1:
            raise ValueError("a screening gate needs at least one channel")
        self.channels = int(channels)
        self.temperature, self.relaxation, self.gain = float(temperature), relaxation, float(gain)
        self.raw_scores = nn.Parameter(torch.full((channels,), init_margin / gain))
        self.raw_tau = nn.Parameter(torch.zeros(()))

    @property
    def scores(self) -> torch.Tensor:
        return self.raw_scores * self.gain

    @property
    def tau(self) -> torch.Tensor:
        return self.raw_tau * self.gain

    def logits(self) -> torch.Tensor:
        return (self.scores - self.tau) / self.temperature

    def hard_mask(self) -> torch.Tensor:
        return (self.scores > self.tau).to(self.raw_scores.dtype)

    def open_probability(self) -> torch.Tensor:
        """Differentiable probability that each channel is open (the sparsity term's input)."""
        if self.relaxation == "hard_concrete":
            # P(z > 0) of the stretched hard-concrete distribution (Louizos et al., eq. 12).
            beta, gamma, zeta = 2.0 / 3.0, -0.1, 1.1
            return torch.sigmoid(self.logits() - beta * math.log(-gamma / zeta))
        return torch.sigmoid(self.logits())

    def forward(self) -> torch.Tensor:
        """The (C,) mask to multiply the channels with."""
        hard = self.hard_mask()
        if not self.training:
            return hard
        if self.relaxation == "hard_concrete":
            beta, gamma, zeta = 2.0 / 3.0, -0.1, 1.1
            u = torch.rand_like(self.raw_scores).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.logits()) / beta)
            return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)
        soft = torch.sigmoid(self.logits())
        return hard + soft - soft.detach()  # straight-through: hard forward, soft gradient

    def apply_to(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[dim] = self.channels
        return x * self().to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, relaxation={self.relaxation}, temperature={self.temperature}"


# --- the protocol a prunable model implements ------------------------------------------
@dataclasses.dataclass
class ScreeningGroup:
    """One gate and everything its channels live in.

    ``slices``: (state-dict key, dim, chunks) for every tensor with one entry per channel
    along ``dim``; ``chunks`` > 1 when the dim stacks several copies (e.g. Mamba's
    ``in_proj`` holds the x and z halves: chunks=2). ``config_field``/``config_index``:
    the config entry holding this width (a list field takes an index).
    """

    name: str
    gate: ScreeningGate
    slices: list[tuple[str, int, int]]
    config_field: str
    config_index: int | None = None
    min_channels: int = 4


@runtime_checkable
class Prunable(Protocol):
    sparsity_weight: float

    def screening_groups(self) -> list[ScreeningGroup]: ...


def is_prunable(model: nn.Module) -> bool:
    return isinstance(model, Prunable)


def screening_sparsity(groups: list[ScreeningGroup], costs: dict[str, float] | None = None) -> torch.Tensor:
    """Expected fraction of the prunable cost kept open (0..1): sum over channels of
    cost-per-channel x P(open), divided by the total. Minimising it closes the channels
    whose removal saves most for the least task loss."""
    total, kept = 0.0, None
    for g in groups:
        c = (costs or {}).get(g.name, 1.0)
        term = g.gate.open_probability().sum() * c
        kept = term if kept is None else kept + term
        total += c * g.gate.channels
    if kept is None:
        return torch.zeros(())
    return kept / max(total, 1e-12)


def channel_costs(model: nn.Module, groups: list[ScreeningGroup] | None = None) -> dict[str, float]:
    """Parameters per channel of each group (from the tensors its slices name)."""
    groups = model.screening_groups() if groups is None else groups
    state = model.state_dict()
    out = {}
    for g in groups:
        n = 0.0
        for key, dim, chunks in g.slices:
            t = state[key]
            n += t.numel() / (t.shape[dim] / chunks)
        out[g.name] = n
    return out


# --- physical removal --------------------------------------------------------------------
def slice_channels(t: torch.Tensor, dim: int, keep: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """``t`` restricted to channels ``keep`` along ``dim`` (in each of ``chunks`` copies)."""
    keep = keep.to(device=t.device, dtype=torch.long)
    if chunks > 1:
        size = t.shape[dim] // chunks
        keep = torch.cat([keep + k * size for k in range(chunks)])
    return t.index_select(dim, keep).clone()


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


# --- gates for any model: structured_pruning's channel groups ----------------------------
def _dep_slices(name: str, m: nn.Module, out: bool) -> list[tuple[str, int, int]]:
    """State-dict (key, dim, chunks) of one dependency of a torch-pruning group: the tensors
    whose entries along ``dim`` are the group's channels (their sizes give channel costs)."""
    kind = type(m).__name__
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        dim = 0 if (out or depthwise) != bool(getattr(m, "transposed", False)) else 1
        res = [(f"{name}.weight", dim, 1)]
        return res + ([(f"{name}.bias", 0, 1)] if m.bias is not None and (out or depthwise) else [])
    if isinstance(m, nn.Linear):
        res = [(f"{name}.weight", 0 if out else 1, 1)]
        return res + ([(f"{name}.bias", 0, 1)] if m.bias is not None and out else [])
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
        return [(f"{name}.weight", 0, 1), (f"{name}.bias", 0, 1)]
    if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        dim = 0 if len(m.normalized_shape) == 3 else len(m.normalized_shape) - 1
        return [(f"{name}.weight", dim, 1)]
    if isinstance(m, nn.PReLU) and m.num_parameters > 1:
        return [(f"{name}.weight", 0, 1)]
    if kind in ("MambaMixer", "BiMambaMixer", "SS2D"):
        return [(f"{name}.out_proj.weight", 0, 1)] if out else [(f"{name}.in_proj.weight", 1, 1)]
    if kind == "ArcMarginProduct" and not out:
        return [(f"{name}.weight", 1, 1)]
    return []


def _mask_output(gate: ScreeningGate, dim: int):
    def hook(_module, _args, output):
        return gate.apply_to(output, dim)
    return hook


def _mask_input(gate: ScreeningGate, dim: int):
    def hook(_module, args):
        return (gate.apply_to(args[0], dim),) + tuple(args[1:])
    return hook


class GroupGates:
    """Screening gates on every prunable channel group of *any* model - the groups of
    :mod:`edgediag.compress.structured` (torch-pruning's dependency graph plus the inner
    groups of Mamba mixers, SS2D, Tgram and memory networks) - so LDMamba's dynamic
    pruning applies to every model family.

    :meth:`install` makes the model :class:`Prunable` without editing its class: each
    gate masks its group where the channels leave the group's root layer (forward hooks,
    so exported graphs are untouched once removed), the model's last training phase adds
    ``sparsity_weight`` x :func:`screening_sparsity` and optimises the gates, and
    ``screening_groups()`` lists them (slices name the group's tensors, for channel costs).
    :func:`prune_model` then removes channels through torch-pruning, in place.
    :meth:`uninstall` takes it all off again: an ordinary (smaller) model is left.

    The mask sits on the root layer's output only: in a group coupled through a residual
    sum the other members still write the channel, so removal is not exact there - the
    training that follows (the remaining epochs, or fine-tuning) recovers.
    """

    def __init__(self, model, temperature: float = 0.5, relaxation: str = "ste", init_margin: float = 1.0,
                 min_channels: int = 4):
        import torch_pruning as tp

        from edgediag.compress import structured as sp

        self.model = model
        self.pruner = sp.make_pruner(model, tp.importance.MagnitudeImportance(p=2), ratio=0.5, steps=1)
        DG = self.pruner.DG
        names = {m: n for n, m in model.named_modules()}
        param_names = {id(p): n for n, p in model.named_parameters()}
        kw = dict(temperature=temperature, relaxation=relaxation, init_margin=init_margin)
        self.entries: list[dict] = []
        for group in DG.get_all_groups(ignored_layers=self.pruner.ignored_layers,
                                       root_module_types=self.pruner.root_module_types):
            root = group[0].dep.target.module
            n = DG.get_out_channels(root)
            if not n or n <= min_channels or root not in names:
                continue
            slices = []
            for dep, _ in group:
                m = dep.target.module
                if m in names:
                    slices += _dep_slices(names[m], m, DG.is_out_channel_pruning_fn(dep.handler))
            dim = 1 if isinstance(root, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)) else -1
            self.entries.append({"name": names[root], "root": root, "gate": ScreeningGate(n, **kw), "slices": slices,
                                 "hook": (root, "out", dim), "inner": None})
        for name, m, p, g in sp.inner_groups(model):
            n = p.inner_channels(m, g)
            if n <= min_channels:
                continue
            slices = [(param_names[id(t)], dim, chunks) for t, dim, chunks in p.inner_tensors(m, g)
                      if id(t) in param_names]
            kind = type(m).__name__
            if kind in ("MambaMixer", "BiMambaMixer", "SS2D"):
                hook = (m.out_proj, "in", -1)
            elif kind == "TgramNet":
                hook = (p.convs(m)[int(g)], "out", 1)
            else:  # MemoryNetwork: hidden units / key dims leave query[0] / query[2]
                hook = (m.query[0] if g == "hidden" else m.query[2], "out", -1)
            self.entries.append({"name": f"{name}:{g}", "root": m, "gate": ScreeningGate(n, **kw), "slices": slices,
                                 "hook": hook, "inner": (p, g)})
        self.min_channels = min_channels
        self.handles: list = []

    # --- on and off ---
    def install(self, sparsity_weight: float = 0.0):
        model = self.model
        device = next(model.parameters()).device
        for e in self.entries:
            e["gate"].to(device)
            module, where, dim = e["hook"]
            if where == "out":
                self.handles.append(module.register_forward_hook(_mask_output(e["gate"], dim)))
            else:
                self.handles.append(module.register_forward_pre_hook(_mask_input(e["gate"], dim)))
        original_step, original_params = model.training_step, model.phase_parameters
        last = model.phases[-1]
        gates = self

        def training_step(batch, phase="main"):
            out = original_step(batch, phase)
            if phase != last:
                return out
            keep = screening_sparsity(gates.groups(), gates.costs)
            loss = out["loss"] + model.sparsity_weight * keep if model.sparsity_weight > 0 else out["loss"]
            return {**out, "loss": loss, "channel_keep": keep.detach()}

        def phase_parameters(phase):
            yield from original_params(phase)
            if phase == last:
                for e in gates.entries:
                    yield from e["gate"].parameters()

        model.training_step, model.phase_parameters = training_step, phase_parameters
        model.screening_groups = self.groups
        model.sparsity_weight = float(sparsity_weight)
        model._group_gates = self
        self.costs = channel_costs(model, self.groups())
        return self

    def uninstall(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        for attr in ("training_step", "phase_parameters", "screening_groups", "sparsity_weight", "_group_gates"):
            self.model.__dict__.pop(attr, None)
        return self.model

    def groups(self) -> list[ScreeningGroup]:
        return [ScreeningGroup(e["name"], e["gate"], e["slices"], "pruned_widths", None, self.min_channels)
                for e in self.entries]

    # --- physical removal (prune_model's path for these models) ---
    def remove(self, keep: dict[str, torch.Tensor]):
        DG = self.pruner.DG
        for e in self.entries:
            if e["name"] not in keep:
                continue
            n = e["gate"].channels
            kept = sorted(int(i) for i in keep[e["name"]])
            drop = [i for i in range(n) if i not in set(kept)]
            if not drop:
                continue
            if e["inner"] is None:
                root = e["root"]
                DG.get_pruning_group(root, DG.get_pruner_of_module(root).prune_out_channels, drop).prune()
            else:
                pruner, g = e["inner"]
                pruner.prune_inner_channels(e["root"], drop, g)
            gate = e["gate"]
            gate.raw_scores = nn.Parameter(gate.raw_scores.detach()[torch.tensor(kept)].clone())
            gate.channels = len(kept)
        self.costs = channel_costs(self.model, self.groups())
        return self.model


# --- costs ------------------------------------------------------------------------------
# Parameters and FLOPs come from edgediag.measure.cost (the project's one counter, the selective
# scan included by formula); these two keep the callers' simple signatures.
def count_params(model: nn.Module) -> int:
    return int(_flops.count_parameters(model)["total"])


def count_flops(model: nn.Module, x: torch.Tensor | None = None) -> int:
    """FLOPs of one forward of ``model.export_module()`` (a plain module: itself) on ``x``
    (default ``model.example_input(1)``), by :func:`edgediag.measure.cost.count_flops`."""
    module = model.export_module() if hasattr(model, "export_module") else model
    if x is None:
        x = model.example_input(1)
    x = x.to(next(model.parameters()).device)
    was_training = module.training
    module.eval()
    try:
        return int(_flops.count_flops(module, x)["flops"])
    finally:
        module.train(was_training)


measure_latency = median_latency_ms  # the name the tests and older scripts use


def model_cost(model, metric: str) -> float:
    if metric == "params":
        return float(count_params(model))
    if metric == "flops":
        return float(count_flops(model))
    if metric == "latency":
        return measure_latency(model.export_module(), model.example_input(1).to(next(model.parameters()).device))
    raise UserError(f"prune metric must be params, flops or latency, not {metric!r}")


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
    min_channels: int = 4  # never prune a group below this width

    def validate(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise UserError(f"prune.target must be in (0, 1], not {self.target}")
        bad = [m for m in self.metric.split("+") if m not in ("params", "flops", "latency")]
        if bad or not self.metric:
            raise UserError(f"prune.metric must be params, flops or latency (or e.g. params+flops), "
                            f"not {self.metric!r}")
        if self.patience < 1 or self.pressure_growth < 1.0:
            raise UserError("prune.patience must be >= 1 and prune.pressure_growth >= 1")


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
        if self.cfg.force and epoch >= end and ratio > self.cfg.target * (1 + 1e-6):
            current, forced = self._force_to_budget(current)
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
        allowed = count_params(model) * max(0.0, 1.0 - goal / ratio)
        saved = 0.0
        by_name = {g.name: g for g in groups}
        for _, name, c in cands:
            if saved < allowed:
                remove[name].add(c)
                saved += pcost[name]
            else:
                gate = by_name[name].gate
                with torch.no_grad():
                    gate.raw_scores[c] = (gate.tau + self.cfg.reopen_margin) / gate.gain
                self.streaks[name][c] = 0
        return remove

    def _respect_minimum(self, g: ScreeningGroup, keep_mask: torch.Tensor) -> torch.Tensor:
        minimum = min(max(g.min_channels, self.cfg.min_channels), g.gate.channels)
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

    def _force_to_budget(self, model):
        """Close the lowest-margin channels (score - tau) until the budget is
        met, estimating savings by parameter cost and re-measuring after each rebuild."""
        forced = 0
        for _ in range(8):
            ratio = self.ratio(model)
            if ratio <= self.cfg.target * (1 + 1e-6):
                break
            groups = model.screening_groups()
            pcost = channel_costs(model, groups)
            total_p = count_params(model)
            # Savings needed, expressed in parameters (FLOPs/latency scale roughly with them).
            need = total_p * (1 - self.cfg.target / ratio)
            cands = []
            for g in groups:
                margin = (g.gate.scores - g.gate.tau).detach().cpu()
                for c in range(g.gate.channels):
                    cands.append((float(margin[c]), g.name, c))
            cands.sort()
            removed: dict[str, set] = {g.name: set() for g in groups}
            width = {g.name: g.gate.channels for g in groups}
            minimum = {g.name: min(max(g.min_channels, self.cfg.min_channels), g.gate.channels) for g in groups}
            saved = 0.0
            for _, name, c in cands:
                if saved >= need:
                    break
                if width[name] - len(removed[name]) <= minimum[name]:
                    continue
                removed[name].add(c)
                saved += pcost[name]
            if not any(removed.values()):
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
                "streaks": {k: v.tolist() for k, v in self.streaks.items()}, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.base_cost = state.get("base_cost")
        self.streaks = {k: torch.tensor(v, dtype=torch.long) for k, v in (state.get("streaks") or {}).items()}
        self.history = list(state.get("history") or [])


__all__ = ["ScreeningGate", "ScreeningGroup", "GroupGates", "Prunable", "is_prunable", "screening_sparsity", "channel_costs",
           "slice_channels", "pruned_config", "prune_model", "widths", "count_params", "count_flops",
           "measure_latency", "model_cost", "PruneConfig", "DynamicPruner"]
