"""The pruning registry: how each layer type's channels are pruned, sized and sliced.

Layers register a torch-pruning pruner (:class:`ChannelPruner`, a ``BasePruningFunc`` with
what edgediag needs beyond torch-pruning) with :func:`register_pruner`, as Torch-Pruning's
``customized_pruners`` expect: the Mamba mixers and SS2D from :mod:`edgediag.nn.mamba_pruning`,
model layers from their family's ``pruning`` module. The compression stages
(:mod:`edgediag.compress`) only ever ask this registry, so they name no layer class.

A registered pruner answers:

* ``leaf``: its sizes are recorded as a whole (children not listed separately) in
  ``pruned_widths``; ``root``: it may root a dependency-graph group;
* ``inner_names`` / ``inner_channels`` / ``inner_tensors`` / ``prune_inner_channels``: channel
  groups internal to the module that no graph group reaches (a mixer's d_inner, Tgram's hidden
  convs, a memory network's hidden units), and ``inner_hooks``: where screening gates mask one
  (a layer with inner groups registers an :class:`InnerGroupPruner`, which must have all five);
* ``dep_slices``: the state-dict tensors (key, dim, chunks) holding a graph group's channels
  in this module, which dynamic pruning's gates cost channels by;
* ``size_slots`` / ``sizes`` / ``resize``: the record-and-rebuild of pruned widths.

:func:`record_widths` / :func:`apply_widths` are how a pruned model is saved: the config's
``pruned_widths`` maps module names to pruned sizes, ``apply_widths`` (end of a model's
``__init__``) shrinks the fresh modules to them, ``load_state_dict`` fills the weights.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc

from edgediag.errors import UserError

_REGISTRY: dict[type, BasePruningFunc] = {}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)


def _keep(n: int, idxs: Sequence[int]) -> torch.Tensor:
    drop = set(int(i) for i in idxs)
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def slice_channels(t: torch.Tensor, dim: int, keep: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """``t`` restricted to channels ``keep`` along ``dim`` (in each of ``chunks`` stacked
    copies: channel c is entry c of each)."""
    keep = keep.to(device=t.device, dtype=torch.long)
    if chunks > 1:
        size = t.shape[dim] // chunks
        keep = torch.cat([keep + k * size for k in range(chunks)])
    return t.index_select(dim, keep).clone()


def _sliced(p: torch.Tensor, dim: int, keep: torch.Tensor, chunks: int = 1) -> nn.Parameter:
    """:func:`slice_channels` as a new Parameter that keeps the optimiser hints
    (``_no_weight_decay``) of the old one."""
    new = nn.Parameter(slice_channels(p.detach(), dim, keep, chunks), requires_grad=p.requires_grad)
    for attr in ("_no_weight_decay", "_no_reinit"):
        if hasattr(p, attr):
            setattr(new, attr, getattr(p, attr))
    return new


def slice_parameter(module: nn.Module, name: str, dim: int, keep: torch.Tensor, chunks: int = 1) -> None:
    """Replace the parameter ``name`` (a dotted path below ``module``) by its slice."""
    owner, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner) if owner else module
    setattr(owner, attr, _sliced(getattr(owner, attr), dim, keep, chunks))


def _tail(n: int, keep: int) -> list[int]:
    return list(range(keep, n))


class ChannelPruner(BasePruningFunc):
    """A torch-pruning pruner plus what edgediag's compression asks of a layer (module
    docstring). The defaults describe a layer with no inner groups and no dependency slices."""

    leaf = False  # sizes recorded whole; its children are not prunable modules of their own
    root = False  # may root a dependency-graph group

    # Inner groups: none by default; a layer that has them uses InnerGroupPruner.
    def inner_names(self, layer) -> list[str]:
        return []

    def dep_slices(self, name: str, layer, out: bool) -> list[tuple[str, int, int]]:
        return []

    # --- widths: record and rebuild ---
    def size_slots(self, layer) -> list[str]:
        """What each recorded size is: "out", "in" or an inner group's name."""
        return ["out", "in", *self.inner_names(layer)]

    def sizes(self, layer) -> list[int]:
        get = {"out": self.get_out_channels, "in": self.get_in_channels}
        return [int(get[s](layer)) if s in get else int(self.inner_channels(layer, s)) for s in self.size_slots(layer)]

    def resize(self, layer, sizes: Sequence[int]) -> None:
        """Shrink ``layer`` to ``sizes`` (which channels go does not matter: the weights are
        loaded next)."""
        prune = {"out": self.prune_out_channels, "in": self.prune_in_channels}
        for slot, s, h in zip(self.size_slots(layer), sizes, self.sizes(layer)):
            if s < h:
                if slot in prune:
                    prune[slot](layer, _tail(h, s))
                else:
                    self.prune_inner_channels(layer, _tail(h, s), slot)


class InnerGroupPruner(ChannelPruner):
    """A ChannelPruner for a layer with inner channel groups (module docstring): the five
    methods below are abstract, so a pruner that leaves one out cannot be instantiated
    (registration fails at import instead of a call failing mid-prune)."""

    @abc.abstractmethod
    def inner_names(self, layer) -> list[str]: ...

    @abc.abstractmethod
    def inner_channels(self, layer, group: str) -> int: ...

    @abc.abstractmethod
    def inner_tensors(self, layer, group: str) -> list[tuple[torch.Tensor, int, int]]: ...

    @abc.abstractmethod
    def prune_inner_channels(self, layer, idxs, group: str): ...

    @abc.abstractmethod
    def inner_hooks(self, layer, group: str) -> list[tuple[nn.Module, str, int]]:
        """[(module, "out" | "in" | "norm", dim)]: every place a screening gate masks the inner
        group so that removing a closed channel is exact (where the channels enter anything
        that mixes them, and where they leave)."""


def register_pruner(*module_types: type, pruner: BasePruningFunc | type | None = None):
    """Register a pruner for ``module_types``: ``register_pruner(T, pruner=p)``, or as a class
    decorator ``@register_pruner(T)`` (the class is instantiated once)."""
    def add(p):
        instance = p() if isinstance(p, type) else p
        for t in module_types:
            _REGISTRY[t] = instance
        return p
    return add if pruner is None else add(pruner)


def customized_pruners() -> dict[type, BasePruningFunc]:
    """Every registered pruner by module type (torch-pruning's ``customized_pruners``)."""
    return dict(_REGISTRY)


def pruner_for(module: nn.Module) -> BasePruningFunc | None:
    return _REGISTRY.get(type(module))


def root_module_types() -> list[type]:
    """Module types that may root a graph group: torch's convs and linears, and the
    registered roots (the mixers)."""
    return [*_CONVS, nn.Linear, *(t for t, p in _REGISTRY.items() if getattr(p, "root", False))]


def leaf_module_types() -> tuple[type, ...]:
    return tuple(t for t, p in _REGISTRY.items() if getattr(p, "leaf", False))


# --- torch's own layers ------------------------------------------------------------------------
@register_pruner(nn.LayerNorm)
class ChannelLayerNormPruner(ChannelPruner):
    """``nn.LayerNorm`` that knows *which* normalised dim is the channel one.

    torch-pruning's LayerNorm pruner always prunes the last normalised dim. AEGAN-AD's
    encoder/decoder normalise (C, H, W) of NCHW maps: there the channels are the first
    normalised dim (``normalized_shape[0]``, weight dim 0); pruning the last one would cut
    the image width. Channels-last LayerNorms (d_model of a Mamba/VMamba block) keep the
    default behaviour."""

    TARGET_MODULES = (nn.LayerNorm,)

    @staticmethod
    def _dim(layer) -> int:
        return 0 if len(layer.normalized_shape) == 3 else len(layer.normalized_shape) - 1

    def prune_out_channels(self, layer, idxs):
        d = self._dim(layer)
        keep = _keep(layer.normalized_shape[d], idxs)
        if layer.elementwise_affine:
            layer.weight = _sliced(layer.weight, d, keep)
            if layer.bias is not None:
                layer.bias = _sliced(layer.bias, d, keep)
        shape = list(layer.normalized_shape)
        shape[d] = len(keep)
        layer.normalized_shape = tuple(shape)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return layer.normalized_shape[self._dim(layer)]

    get_in_channels = get_out_channels

    def size_slots(self, layer) -> list[str]:
        return ["out"]

    def dep_slices(self, name, layer, out):
        return [(f"{name}.weight", self._dim(layer), 1)] if layer.elementwise_affine else []


def _torch_sizes(m: nn.Module) -> list[int] | None:
    if isinstance(m, _CONVS):
        return [m.out_channels, m.in_channels]
    if isinstance(m, nn.Linear):
        return [m.out_features, m.in_features]
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return [m.num_features]
    if isinstance(m, nn.PReLU):
        return [m.num_parameters]
    return None


def _torch_resize(name: str, m: nn.Module, sizes: list[int], have: list[int]) -> None:
    if isinstance(m, _CONVS):
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels:  # depthwise: in = out
            if sizes[0] != sizes[1]:
                raise UserError(f"pruned_widths: depthwise conv {name} needs equal sizes, not {sizes}")
            if sizes[0] < have[0]:
                tp.prune_depthwise_conv_out_channels(m, _tail(have[0], sizes[0]))
            return
        if sizes[0] < have[0]:
            tp.prune_conv_out_channels(m, _tail(have[0], sizes[0]))
        if sizes[1] < have[1]:
            tp.prune_conv_in_channels(m, _tail(have[1], sizes[1]))
    elif isinstance(m, nn.Linear):
        if sizes[0] < have[0]:
            tp.prune_linear_out_channels(m, _tail(have[0], sizes[0]))
        if sizes[1] < have[1]:
            tp.prune_linear_in_channels(m, _tail(have[1], sizes[1]))
    elif sizes[0] < have[0] and isinstance(m, nn.modules.batchnorm._BatchNorm):
        tp.prune_batchnorm_out_channels(m, _tail(have[0], sizes[0]))
    elif sizes[0] < have[0]:
        tp.prune_prelu_out_channels(m, _tail(have[0], sizes[0]))


def dep_slices(name: str, m: nn.Module, out: bool) -> list[tuple[str, int, int]]:
    """State-dict (key, dim, chunks) of one dependency of a torch-pruning group: the tensors
    whose entries along ``dim`` are the group's channels (their sizes give channel costs)."""
    if isinstance(m, _CONVS):
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        dim = 0 if (out or depthwise) != bool(getattr(m, "transposed", False)) else 1
        res = [(f"{name}.weight", dim, 1)]
        return res + ([(f"{name}.bias", 0, 1)] if m.bias is not None and (out or depthwise) else [])
    if isinstance(m, nn.Linear):
        res = [(f"{name}.weight", 0 if out else 1, 1)]
        return res + ([(f"{name}.bias", 0, 1)] if m.bias is not None and out else [])
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
        return [(f"{name}.weight", 0, 1), (f"{name}.bias", 0, 1)]
    if isinstance(m, nn.PReLU) and m.num_parameters > 1:
        return [(f"{name}.weight", 0, 1)]
    p = pruner_for(m)
    return p.dep_slices(name, m, out) if isinstance(p, ChannelPruner) else []


# --- widths: record and rebuild ------------------------------------------------------------
def layer_sizes(m: nn.Module) -> list[int] | None:
    """The prunable sizes of one module, in a fixed order per type."""
    p = pruner_for(m)
    if isinstance(p, ChannelPruner):
        return p.sizes(m)
    return _torch_sizes(m)


def module_sizes(model: nn.Module) -> dict[str, list[int]]:
    """Prunable sizes by module name; a registered leaf (a mixer) is one entry, its children none."""
    leaves = leaf_module_types()
    inside = [n for n, m in model.named_modules() if type(m) in leaves]
    out = {}
    for name, m in model.named_modules():
        if name and not any(name.startswith(p + ".") for p in inside):
            s = layer_sizes(m)
            if s is not None:
                out[name] = s
    return out


def record_widths(model, reference: nn.Module) -> dict[str, list[int]]:
    """Sizes of the modules of ``model`` that differ from the unpruned ``reference``
    (the same family built from the config without ``pruned_widths``)."""
    now, ref = module_sizes(model), module_sizes(reference)
    return {n: s for n, s in now.items() if ref.get(n) != s}


def apply_widths(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """Shrink the freshly built ``model`` in place to the recorded sizes (which channels are
    dropped does not matter: ``load_state_dict`` fills the weights next). Raises UserError
    for a name or size the model does not have."""
    modules = dict(model.named_modules())
    for name, sizes in widths.items():
        m = modules.get(name)
        have = layer_sizes(m) if m is not None else None
        if have is None or len(have) != len(sizes):
            raise UserError(f"pruned_widths: {name!r} is not a prunable module of {type(model).__name__} "
                            f"(or has {len(have or [])} sizes, not {len(sizes)})")
        if any(int(s) > h or int(s) < 1 for s, h in zip(sizes, have)):
            raise UserError(f"pruned_widths: {name} sizes {sizes} must be in 1..{have}")
        sizes = [int(s) for s in sizes]
        p = pruner_for(m)
        if isinstance(p, ChannelPruner):
            p.resize(m, sizes)
        else:
            _torch_resize(name, m, sizes, have)


def resize_to_loaded(module: nn.Module, state_dict: dict, prefix: str, names: Sequence[str]) -> None:
    """Before ``load_state_dict`` copies them: give the buffers ``names`` the loaded shapes.
    Their sizes come from the data a model was fitted on (a kNN bank, Mahalanobis statistics
    of a possibly pruned embedding), not from its config. Call it first in a model's
    ``_load_from_state_dict``."""
    for name in names:
        loaded = state_dict.get(prefix + name)
        current = getattr(module, name)
        if isinstance(loaded, torch.Tensor) and loaded.shape != current.shape:
            setattr(module, name, torch.zeros(loaded.shape, dtype=current.dtype, device=current.device))


__all__ = ["ChannelPruner", "InnerGroupPruner", "ChannelLayerNormPruner", "register_pruner", "customized_pruners", "pruner_for",
           "root_module_types", "leaf_module_types", "dep_slices", "layer_sizes", "module_sizes",
           "record_widths", "apply_widths", "resize_to_loaded", "slice_channels", "slice_parameter"]
