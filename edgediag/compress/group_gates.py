"""Screening gates on any model's channel groups, so LDMamba's dynamic pruning applies to
every model family (``prune --method dynamic``): the groups of torch-pruning's dependency
graph plus the registry's inner groups, gated by forward hooks and removed in place."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from edgediag.compress.structured import inner_groups, make_pruner
from edgediag.nn.gates import channel_costs, masked_layer_norm, new_gate, new_group, screening_sparsity
from edgediag.nn.pruning import dep_slices


def _mask_output(gate, dim: int):
    def hook(_module, _args, output):
        return gate.apply_to(output, dim)
    return hook


def _masked_norm(gate, dim: int):
    def hook(module, args, _output):
        return masked_layer_norm(module, args[0], gate(), dim)
    return hook


def _channel_dim(module) -> int:
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)) else -1


def _mask_points(DG, group, names) -> list[tuple[nn.Module, str, int]]:
    """Where one gate masks a dependency-graph group so that removing its closed channels
    is exact: after every normalisation of the channels (a BatchNorm's closed channel
    would otherwise put out ``beta - mean * gamma / sqrt(var)``, not 0), a LayerNorm over
    the channels computed on the open channels only (:func:`masked_layer_norm`), and the
    output of every other layer that writes the channels (each member of a residual sum),
    unless all it feeds is one of those normalisations."""
    norms, writers = [], []
    for dep, _ in group:
        m = dep.target.module
        if m not in names:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            norms.append((m, "out", 1))
        elif isinstance(m, nn.LayerNorm):
            norms.append((m, "norm", -3 if len(m.normalized_shape) == 3 else -1))
        elif DG.is_out_channel_pruning_fn(dep.handler) and not isinstance(m, nn.PReLU):
            writers.append(m)
    normed = {id(m) for m, _, _ in norms}
    points = list(norms)
    seen = set()
    for m in writers:
        if id(m) in seen:
            continue
        seen.add(id(m))
        node = DG.module2node.get(m)
        outs = [o.module for o in node.outputs] if node is not None else []
        if outs and all(id(o) in normed for o in outs):
            continue  # its channels reach nothing but a gated normalisation
        points.append((m, "out", _channel_dim(m)))
    return points


def _mask_input(gate, dim: int):
    def hook(_module, args):
        return (gate.apply_to(args[0], dim),) + tuple(args[1:])
    return hook


class GroupGates:
    """Screening gates on every prunable channel group of *any* model - the groups of
    :mod:`edgediag.compress.structured` (torch-pruning's dependency graph plus the inner
    groups of Mamba mixers, SS2D, Tgram and memory networks) - so LDMamba's dynamic
    pruning applies to every model family.

    :meth:`install` makes the model :class:`Prunable` without editing its class: each
    gate masks its group where removal is exact (forward hooks, so exported graphs are
    untouched once removed; :func:`_mask_points`): after each BatchNorm of the channels,
    inside each LayerNorm over them (statistics of the open channels only), and on every
    other layer writing them (all members of a residual sum). Each gate is trained in the
    phase that trains its layer, with ``sparsity_weight`` x :func:`screening_sparsity` of
    that phase's gates added to that phase's loss; ``screening_groups()`` lists them
    (slices name the group's tensors, for channel costs). :func:`prune_model` then removes
    channels through torch-pruning, in place: in eval mode the smaller model computes what
    the gated one did. :meth:`uninstall` takes it all off again: an ordinary (smaller)
    model is left.
    """

    def __init__(self, model, temperature: float = 0.5, relaxation: str = "ste", init_margin: float = 1.0,
                 min_channels: int = 4):
        self.model = model
        self.pruner = make_pruner(model, tp.importance.MagnitudeImportance(p=2), ratio=0.5, steps=1)
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
                    slices += dep_slices(names[m], m, DG.is_out_channel_pruning_fn(dep.handler))
            self.entries.append({"name": names[root], "root": root, "gate": new_gate(n, **kw), "slices": slices,
                                 "hooks": _mask_points(DG, group, names), "inner": None})
        for name, m, p, g in inner_groups(model):
            n = p.inner_channels(m, g)
            if n <= min_channels:
                continue
            slices = [(param_names[id(t)], dim, chunks) for t, dim, chunks in p.inner_tensors(m, g)
                      if id(t) in param_names]
            self.entries.append({"name": f"{name}:{g}", "root": m, "gate": new_gate(n, **kw), "slices": slices,
                                 "hooks": list(p.inner_hooks(m, g)), "inner": (p, g)})
        # Each gate is trained by the loss of the phase that trains its layer (AEGAN-AD's
        # critic gates by the critic's loss, not the generator's).
        owner = {}
        for phase in model.phases:
            for prm in model.phase_parameters(phase):
                owner.setdefault(id(prm), phase)
        for e in self.entries:
            phases = [owner[id(prm)] for prm in e["root"].parameters() if id(prm) in owner]
            e["phase"] = phases[0] if phases else model.phases[-1]
        self.min_channels = min_channels
        self.handles: list = []

    # --- on and off ---
    def install(self, sparsity_weight: float = 0.0):
        model = self.model
        device = next(model.parameters()).device
        for e in self.entries:
            e["gate"].to(device)
            for module, where, dim in e["hooks"]:
                if where == "out":
                    self.handles.append(module.register_forward_hook(_mask_output(e["gate"], dim)))
                elif where == "norm":
                    self.handles.append(module.register_forward_hook(_masked_norm(e["gate"], dim)))
                else:
                    self.handles.append(module.register_forward_pre_hook(_mask_input(e["gate"], dim)))
        original_step, original_params = model.training_step, model.phase_parameters
        gates = self

        def training_step(batch, phase="main"):
            out = original_step(batch, phase)
            own = gates.groups(phase)
            if not own:
                return out
            keep = screening_sparsity(own, gates.costs)
            loss = out["loss"] + model.sparsity_weight * keep if model.sparsity_weight > 0 else out["loss"]
            return {**out, "loss": loss, "channel_keep": keep.detach()}

        def phase_parameters(phase):
            yield from original_params(phase)
            for e in gates.entries:
                if e["phase"] == phase:
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

    def groups(self, phase: str | None = None) -> list:
        """The gates as screening groups; with ``phase``, those that phase trains."""
        return [new_group(e["name"], e["gate"], e["slices"], "pruned_widths", None, self.min_channels)
                for e in self.entries if phase is None or e["phase"] == phase]

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


__all__ = ["GroupGates"]
