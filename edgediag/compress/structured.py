"""Structured pruning with torch-pruning: DependencyGraph + BasePruner, the custom pruners
edgediag's layers need, latency-aware importance, budgets and rebuildable widths.

How it fits together:

* :func:`make_pruner` builds a ``torch_pruning`` ``BasePruner`` over the model's own
  forward (``model.prunable_forward`` when it has one, else ``forward``), with the
  customised pruners below and the model's fixed layers (:func:`fixed_layers`: heads,
  exported outputs, the layers around fitted statistics) left alone. A group that touches
  a fixed layer in any way is skipped whole, not just when the fixed layer is its root
  (torch-pruning's ``ignored_layers`` only guards roots).
* Mamba mixers and SS2D are leaves to the graph: their d_model sides (``in_proj``
  input, ``out_proj`` output) are ordinary channels that the graph couples with the
  residual stream; their *inner* channel group (d_inner) is internal to the module, so no
  graph group can reach it. :func:`inner_groups` lists those, and :func:`prune_structured`
  prunes them with the same importance and ratio schedule as the graph groups.
* :func:`prune_structured` prunes in small steps (``iterative_steps``), measuring the
  budget (parameters, FLOPs from :mod:`edgediag.measure.cost`, or eager latency) after each, and
  stops at the first step that meets it - a 50 % channel ratio does not give a 50 %
  parameter cut (both sides of a layer shrink), so a *ratio* here is a parameter target.
* :func:`record_widths` / :func:`apply_widths` are how a pruned model is saved: the
  config's ``pruned_widths`` maps module names to their pruned sizes; a model whose config
  has them calls :func:`apply_widths` at the end of ``__init__`` (shrinking the fresh
  modules to those sizes with the same pruning functions), and ``load_state_dict`` fills
  in the weights. No pickled modules, ``torch.load(weights_only=True)`` works.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc

from edgediag.errors import UserError
from edgediag.measure.cost import count_flops, count_parameters
from edgediag.nn.mamba import SS2D, BiMambaMixer, MambaMixer

log = logging.getLogger("edgediag.compress.structured")

IMPORTANCES = ("magnitude", "taylor", "lamp")


def _keep(n: int, idxs: Sequence[int]) -> torch.Tensor:
    drop = set(int(i) for i in idxs)
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def _sliced(p: torch.Tensor, dim: int, keep: torch.Tensor, chunks: int = 1) -> nn.Parameter:
    """``p`` restricted to ``keep`` along ``dim`` (in each of ``chunks`` stacked copies), as a
    new Parameter that keeps the optimiser hints (``_no_weight_decay``) of the old one."""
    if chunks > 1:
        size = p.shape[dim] // chunks
        keep = torch.cat([keep + k * size for k in range(chunks)])
    new = nn.Parameter(p.detach().index_select(dim, keep.to(p.device)).clone(), requires_grad=p.requires_grad)
    for attr in ("_no_weight_decay", "_no_reinit"):
        if hasattr(p, attr):
            setattr(new, attr, getattr(p, attr))
    return new


# --- custom pruners --------------------------------------------------------------------
class _MixerPruner(BasePruningFunc):
    """Shared d_model side of MambaMixer / BiMambaMixer / SS2D: ``in_proj`` columns are the
    module's input channels, ``out_proj`` rows its output channels."""

    def prune_out_channels(self, layer, idxs):
        keep = _keep(layer.out_proj.out_features, idxs)
        layer.out_proj.weight = _sliced(layer.out_proj.weight, 0, keep)
        if layer.out_proj.bias is not None:
            layer.out_proj.bias = _sliced(layer.out_proj.bias, 0, keep)
        layer.out_proj.out_features = len(keep)
        layer.d_model = len(keep)
        return layer

    def prune_in_channels(self, layer, idxs):
        keep = _keep(layer.in_proj.in_features, idxs)
        layer.in_proj.weight = _sliced(layer.in_proj.weight, 1, keep)
        layer.in_proj.in_features = len(keep)
        return layer

    def get_out_channels(self, layer):
        return layer.out_proj.out_features

    def get_in_channels(self, layer):
        return layer.in_proj.in_features

    @staticmethod
    def _prune_xz_halves(layer, keep: torch.Tensor) -> None:
        """in_proj's rows hold the x and z halves: channel c is rows c and d_inner + c."""
        layer.in_proj.weight = _sliced(layer.in_proj.weight, 0, keep, chunks=2)
        if layer.in_proj.bias is not None:
            layer.in_proj.bias = _sliced(layer.in_proj.bias, 0, keep, chunks=2)
        layer.in_proj.out_features = 2 * len(keep)

    # the inner (d_inner) group: not visible to the dependency graph
    def inner_names(self, layer) -> list[str]:
        return ["d_inner"]

    def inner_channels(self, layer, group: str = "d_inner") -> int:
        return layer.out_proj.in_features


class MambaMixerPruner(_MixerPruner):
    """MambaMixer / BiMambaMixer. One inner channel group: the x and z halves of
    ``in_proj``'s rows, ``conv1d`` channels (depthwise: groups too), ``x_proj`` columns,
    ``dt_proj`` rows and bias, ``A_log`` rows (d_inner - never d_state, its columns),
    ``D``, and ``out_proj`` columns; in BiMambaMixer the backward branch's copies too."""

    TARGET_MODULES = (MambaMixer, BiMambaMixer)

    @staticmethod
    def _directions(layer):
        return [sfx for sfx in ("", "_b") if hasattr(layer, f"x_proj{sfx}")]

    def inner_tensors(self, layer, group: str = "d_inner"):
        out = [(layer.in_proj.weight, 0, 2), (layer.out_proj.weight, 1, 1)]
        for sfx in self._directions(layer):
            a_log = "A_log" if not sfx else f"A{sfx}_log"
            out += [(getattr(layer, f"conv1d{sfx}").weight, 0, 1), (getattr(layer, f"x_proj{sfx}").weight, 1, 1),
                    (getattr(layer, f"dt_proj{sfx}").weight, 0, 1), (getattr(layer, a_log), 0, 1),
                    (getattr(layer, f"D{sfx}"), 0, 1)]
        return out

    def prune_inner_channels(self, layer, idxs, group: str = "d_inner"):
        keep = _keep(self.inner_channels(layer), idxs)
        self._prune_xz_halves(layer, keep)
        for sfx in self._directions(layer):
            conv = getattr(layer, f"conv1d{sfx}")
            conv.weight = _sliced(conv.weight, 0, keep)
            if conv.bias is not None:
                conv.bias = _sliced(conv.bias, 0, keep)
            conv.in_channels = conv.out_channels = conv.groups = len(keep)
            x_proj = getattr(layer, f"x_proj{sfx}")
            x_proj.weight = _sliced(x_proj.weight, 1, keep)
            x_proj.in_features = len(keep)
            dt_proj = getattr(layer, f"dt_proj{sfx}")
            dt_proj.weight = _sliced(dt_proj.weight, 0, keep)
            dt_proj.bias = _sliced(dt_proj.bias, 0, keep)
            dt_proj.out_features = len(keep)
            a_log = "A_log" if not sfx else f"A{sfx}_log"
            setattr(layer, a_log, _sliced(getattr(layer, a_log), 0, keep))  # rows = d_inner
            setattr(layer, f"D{sfx}", _sliced(getattr(layer, f"D{sfx}"), 0, keep))
        layer.out_proj.weight = _sliced(layer.out_proj.weight, 1, keep)
        layer.out_proj.in_features = len(keep)
        layer.d_inner = len(keep)
        return layer


class SS2DPruner(_MixerPruner):
    """VMamba's SS2D. The inner group is packed per direction: ``x_proj_weight`` (K, R+2N,
    d_inner) on dim 2, ``dt_projs_weight`` (K, d_inner, R) and ``dt_projs_bias`` (K, d_inner)
    on dim 1, and ``A_logs`` (K*d_inner, N) / ``Ds`` (K*d_inner) hold K stacked copies
    (the same channel in each of the four scan directions) - besides in_proj's halves,
    the depthwise conv2d, ``out_norm`` and out_proj's columns."""

    TARGET_MODULES = (SS2D,)

    def inner_tensors(self, layer, group: str = "d_inner"):
        return [(layer.in_proj.weight, 0, 2), (layer.conv2d.weight, 0, 1), (layer.x_proj_weight, 2, 1),
                (layer.dt_projs_weight, 1, 1), (layer.A_logs, 0, layer.K), (layer.Ds, 0, layer.K),
                (layer.out_proj.weight, 1, 1)]

    def prune_inner_channels(self, layer, idxs, group: str = "d_inner"):
        keep = _keep(self.inner_channels(layer), idxs)
        self._prune_xz_halves(layer, keep)
        conv = layer.conv2d
        conv.weight = _sliced(conv.weight, 0, keep)
        if conv.bias is not None:
            conv.bias = _sliced(conv.bias, 0, keep)
        conv.in_channels = conv.out_channels = conv.groups = len(keep)
        layer.x_proj_weight = _sliced(layer.x_proj_weight, 2, keep)
        layer.dt_projs_weight = _sliced(layer.dt_projs_weight, 1, keep)
        layer.dt_projs_bias = _sliced(layer.dt_projs_bias, 1, keep)
        layer.A_logs = _sliced(layer.A_logs, 0, keep, chunks=layer.K)
        layer.Ds = _sliced(layer.Ds, 0, keep, chunks=layer.K)
        tp.prune_layernorm_out_channels(layer.out_norm, list(sorted(set(range(layer.d_inner)) - set(keep.tolist()))))
        layer.out_proj.weight = _sliced(layer.out_proj.weight, 1, keep)
        layer.out_proj.in_features = len(keep)
        layer.d_inner = len(keep)
        return layer


class TgramPruner(BasePruningFunc):
    """TASTgram's learned front end (``TgramNet``) as one leaf: its input is the waveform
    (1 channel) and its output channels are mel bins stacked with the log-mel - both fixed.
    Its LayerNorms normalise over *frames*, not channels (torch-pruning's LayerNorm
    pruner would cut frames), so the graph must not see inside. Inner groups: the output
    channels of every conv but the last ("0" = the extractor, "1".. = encoder convs),
    each also the next conv's input channels."""

    def prune_out_channels(self, layer, idxs):
        raise UserError("Tgram's output channels are mel bins: they are never pruned")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return None  # never a root

    def get_in_channels(self, layer):
        return None

    @staticmethod
    def convs(layer) -> list[nn.Conv1d]:
        return [layer.conv_extractor] + [seq[2] for seq in layer.conv_encoder]

    def inner_names(self, layer) -> list[str]:
        return [str(i) for i in range(len(self.convs(layer)) - 1)]

    def inner_channels(self, layer, group: str = "0") -> int:
        return self.convs(layer)[int(group)].out_channels

    def inner_tensors(self, layer, group: str = "0"):
        convs = self.convs(layer)
        return [(convs[int(group)].weight, 0, 1), (convs[int(group) + 1].weight, 1, 1)]

    def prune_inner_channels(self, layer, idxs, group: str = "0"):
        convs = self.convs(layer)
        i = int(group)
        tp.prune_conv_out_channels(convs[i], list(idxs))
        tp.prune_conv_in_channels(convs[i + 1], list(idxs))
        return layer


class PatchMergingPruner(BasePruningFunc):
    """VMamba's PatchMerging: 2x2 neighbours concatenated on the channel (last) dim ->
    LayerNorm(4C) -> Linear(4C, C'). Input channel c is four entries of the 4C vector
    (c, C+c, 2C+c, 3C+c); torch-pruning's concat mapping of channels-last maps gets this
    wrong, so the module is one leaf: in = C, out = C'."""

    def prune_out_channels(self, layer, idxs):
        tp.prune_linear_out_channels(layer.reduction, list(idxs))
        return layer

    def prune_in_channels(self, layer, idxs):
        c = layer.reduction.in_features // 4
        four = [i + k * c for k in range(4) for i in idxs]
        tp.prune_layernorm_out_channels(layer.norm, four)
        tp.prune_linear_in_channels(layer.reduction, four)
        return layer

    def get_out_channels(self, layer):
        return layer.reduction.out_features

    def get_in_channels(self, layer):
        return layer.reduction.in_features // 4


class MemoryNetworkPruner(BasePruningFunc):
    """MemoryMamba's memory network: depthwise conv (in = out = C) -> query MLP (C -> hidden
    -> key_dim) -> softmax over ``keys`` (slots, key_dim) -> ``values`` (slots, C). Its keys
    and values are bare Parameters used by matmul, which the graph cannot map, so it is a
    leaf: channels C in and out (conv, query input, values columns); inner groups: the
    query MLP's hidden units and the key dim (query output, keys columns)."""

    def prune_out_channels(self, layer, idxs):
        layer.values = _sliced(layer.values, 1, _keep(layer.values.shape[1], idxs))
        return layer

    def prune_in_channels(self, layer, idxs):
        tp.prune_depthwise_conv_out_channels(layer.conv, list(idxs))
        tp.prune_linear_in_channels(layer.query[0], list(idxs))
        return layer

    def get_out_channels(self, layer):
        return layer.values.shape[1]

    def get_in_channels(self, layer):
        return layer.conv.out_channels

    def inner_names(self, layer) -> list[str]:
        return ["hidden", "key"]

    def inner_channels(self, layer, group: str = "hidden") -> int:
        return layer.query[0].out_features if group == "hidden" else layer.keys.shape[1]

    def inner_tensors(self, layer, group: str = "hidden"):
        if group == "hidden":
            return [(layer.query[0].weight, 0, 1), (layer.query[2].weight, 1, 1)]
        return [(layer.query[2].weight, 0, 1), (layer.keys, 1, 1)]

    def prune_inner_channels(self, layer, idxs, group: str = "hidden"):
        if group == "hidden":
            tp.prune_linear_out_channels(layer.query[0], list(idxs))
            tp.prune_linear_in_channels(layer.query[2], list(idxs))
        else:
            tp.prune_linear_out_channels(layer.query[2], list(idxs))
            layer.keys = _sliced(layer.keys, 1, _keep(layer.keys.shape[1], idxs))
        return layer


class ArcFacePruner(BasePruningFunc):
    """ArcFace head (``ArcMarginProduct``): the class-weight matrix (n_classes, embedding)
    is pruned on the embedding dim only; the class count (its output) stays fixed."""

    def prune_out_channels(self, layer, idxs):
        raise UserError("the ArcFace class count is fixed: its output channels are never pruned")

    def prune_in_channels(self, layer, idxs):
        layer.weight = _sliced(layer.weight, 1, _keep(layer.weight.shape[1], idxs))
        return layer

    def get_out_channels(self, layer):
        return None  # never a root: the class count is the head's output

    def get_in_channels(self, layer):
        return layer.weight.shape[1]


class ChannelLayerNormPruner(BasePruningFunc):
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


def customized_pruners() -> dict[type, BasePruningFunc]:
    from edgediag.models.memorymamba.model import MemoryNetwork, PatchMerging
    from edgediag.models.tastgram_mfn.model import ArcMarginProduct, TgramNet

    mixer = MambaMixerPruner()
    return {MambaMixer: mixer, BiMambaMixer: mixer, SS2D: SS2DPruner(), ArcMarginProduct: ArcFacePruner(),
            TgramNet: TgramPruner(), MemoryNetwork: MemoryNetworkPruner(), PatchMerging: PatchMergingPruner(),
            nn.LayerNorm: ChannelLayerNormPruner()}


_INNER = (MambaMixerPruner, SS2DPruner, TgramPruner, MemoryNetworkPruner)
# leaves whose sizes are recorded as a whole (their children are not listed separately)
_LEAVES = ("MambaMixer", "BiMambaMixer", "SS2D", "TgramNet", "MemoryNetwork", "PatchMerging")


# --- what may be pruned --------------------------------------------------------------------
def fixed_layers(model: nn.Module) -> list[nn.Module]:
    """Modules whose channels must not change: the model's ``pruning_fixed_layers()``
    (heads, exported outputs, layers tied to fitted statistics or to the input layout)."""
    getter = getattr(model, "pruning_fixed_layers", None)
    return list(getter()) if getter else []


def _group_modules(group) -> list[nn.Module]:
    return [dep.target.module for dep, _ in group]


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
        if isinstance(p, _INNER) and m not in fixed:
            out.extend((name, m, p, g) for g in p.inner_names(m))
    return out


# --- importance ---------------------------------------------------------------------------
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


# --- latency per layer -------------------------------------------------------------------
@torch.inference_mode()
def layer_latency(module: nn.Module, x: torch.Tensor, runs: int = 5, threads: int = 1) -> dict[str, float]:
    """Eager CPU time (ms, median over ``runs``) spent in each leaf module and in each
    Mamba/SS2D module, measured with forward pre/post hooks on ``module(x)``."""
    leaves = {n: m for n, m in module.named_modules()
              if not list(m.children()) or isinstance(m, (MambaMixer, BiMambaMixer, SS2D))}
    times: dict[str, list[float]] = {n: [] for n in leaves}
    start: dict[str, float] = {}
    handles = []
    for name, m in leaves.items():
        handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: start.__setitem__(n, time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda _m, _a, _o, n=name: times[n].append((time.perf_counter() - start.pop(n, time.perf_counter())) * 1e3)))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    was = module.training
    module.eval()
    try:
        module(x)  # warm-up
        for ts in times.values():
            ts.clear()
        for _ in range(runs):
            module(x)
    finally:
        for h in handles:
            h.remove()
        torch.set_num_threads(old)
        module.train(was)
    # median over runs (robust to a hiccup of a shared CPU); a module called several times
    # per forward (shared layers) gets its mean time per run
    return {n: (statistics.median(ts) if len(ts) == runs else sum(ts) / runs) for n, ts in times.items() if ts}


class LatencyAwareImportance(tp.importance.Importance):
    """Wraps an importance: each group's scores are divided by (1 + alpha * its layers'
    share of the measured time / the mean share), so under global ranking the channels of
    time-heavy layers go first. ``module_ms``: ms per module object."""

    def __init__(self, base, module_ms: dict[nn.Module, float], alpha: float = 1.0):
        self.base, self.module_ms, self.alpha = base, module_ms, float(alpha)
        total = sum(module_ms.values()) or 1.0
        self.share = {m: v / total for m, v in module_ms.items()}
        self.mean_share = 1.0 / max(1, len(module_ms))

    def __call__(self, group, **kwargs):
        imp = self.base(group, **kwargs)
        if imp is None:
            return None
        share = sum(self.share.get(m, 0.0) for m in set(_group_modules(group)))
        return imp / (1.0 + self.alpha * share / self.mean_share)


# --- budgets ------------------------------------------------------------------------------
def _forward_input(model) -> torch.Tensor:
    return model.example_input(1)


def model_params(model: nn.Module) -> int:
    return count_parameters(model)["total"]


def model_flops(model) -> int:
    was = model.training
    module = model.export_module()
    module.eval()
    try:
        return int(count_flops(module, _forward_input(model))["flops"])
    finally:
        model.train(was)


def eager_latency_ms(model, runs: int = 20, threads: int = 1) -> float:
    """Median eager CPU latency of ``export_module()`` at batch 1 (one thread: the least
    noisy figure on a shared machine, and what one edge core gives)."""
    from edgediag.measure.timing import median_latency_ms

    return median_latency_ms(model.export_module(), _forward_input(model), runs=runs, warmup=3, threads=threads)


@dataclasses.dataclass
class Budget:
    """Stop pruning at the first step where the chosen cost is at or below the target.
    ``both``: parameters and FLOPs, each with its own target (``targets``); the cost is the
    larger of the two as a multiple of its target, so the target is 1."""

    metric: str  # params | flops | latency | both
    target: float
    targets: dict[str, float] | None = None

    def cost(self, model) -> float:
        if self.metric == "both":
            return max(float(model_params(model)) / self.targets["params"],
                       float(model_flops(model)) / self.targets["flops"])
        if self.metric == "params":
            return float(model_params(model))
        if self.metric == "flops":
            return float(model_flops(model))
        return eager_latency_ms(model)

    def met(self, value: float) -> bool:
        return value <= self.target * (1 + 1e-9)


# --- the pruning run ---------------------------------------------------------------------
def _forward_fn(model):
    fwd = getattr(model, "prunable_forward", None)
    if fwd is None:
        return lambda m, x: m(x)
    return lambda m, x: fwd(x)


@contextlib.contextmanager
def _eval(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def make_pruner(model, importance, *, ratio: float, steps: int, global_pruning: bool = False,
                round_to: int | None = None, example: torch.Tensor | None = None):
    """torch-pruning's BasePruner over ``model`` (see the module docstring), with groups
    that touch a fixed layer excluded."""
    example = _forward_input(model) if example is None else example
    fixed = fixed_layers(model)
    with _eval(model):
        pruner = tp.pruner.BasePruner(
            model, example, importance=importance, global_pruning=global_pruning, pruning_ratio=ratio,
            iterative_steps=steps, ignored_layers=fixed, round_to=round_to,
            customized_pruners=customized_pruners(), forward_fn=_forward_fn(model),
            root_module_types=[nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear, MambaMixer, BiMambaMixer, SS2D])
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
                     latency_backend: str = "eager", progress: Callable[[dict], None] | None = None) -> dict:
    """Prune ``model`` in place, step by step, until ``budget`` is met (or ``max_ratio`` of
    every group's channels is gone). Returns a record: steps taken, channel ratio reached,
    cost per step, layer latency used for latency-aware ranking."""
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
    for step in range(1, steps + 1):
        if budget.met(cost):
            break
        if importance == "taylor":
            accumulate_loss_grads(model, batches)
        with _eval(model):
            pruner.step()
        ratio = pruner.per_step_pruning_ratio[min(step, len(pruner.per_step_pruning_ratio) - 1)]
        _inner_step(model, importance, ratio, base_inner, round_to)
        model.zero_grad(set_to_none=True)
        cost = budget.cost(model)
        rec = {"step": step, "channel_ratio": float(ratio), "cost": cost}
        record["steps"].append(rec)
        log.info("structured pruning step %d: channel ratio %.2f, %s %.4g (target %.4g)", step, ratio,
                 budget.metric, cost, budget.target)
        if progress:
            progress(rec)
    record["cost_end"] = cost
    record["met"] = budget.met(cost)
    if latency_aware:
        record["layer_latency_ms_after"] = module_latency(model, latency_backend)
    return record


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


def module_latency(model, backend: str = "eager") -> dict[str, float]:
    """ms per module name of ``export_module()`` at batch 1 on ``backend``: eager (forward
    hooks) or onnxruntime (ORT's profiler, node names mapped back to module paths)."""
    module = model.export_module()
    x = _forward_input(model)
    prefix = "model." if hasattr(module, "model") and module.model is model else ""
    if backend == "eager":
        ms = layer_latency(module, x)
    elif backend == "onnxruntime":
        ms = ort_layer_latency(module, x)
    else:
        raise UserError(f"--latency-backend must be eager or onnxruntime, not {backend!r}")
    return {n[len(prefix):] if n.startswith(prefix) else n: v for n, v in ms.items()}


def ort_layer_latency(module: nn.Module, x: torch.Tensor, runs: int = 5) -> dict[str, float]:
    """Per-module ms on ONNX Runtime (one thread): ORT's profiler times every node; the
    TorchScript exporter names nodes ``/a/b/Op_N`` after the module path ``a.b``."""
    import json
    import os
    import tempfile

    import onnxruntime as ort

    from edgediag.deploy.onnx import export_graph, tracing_context

    with tempfile.TemporaryDirectory() as tmp, _eval(module):
        path = os.path.join(tmp, "m.onnx")
        with tracing_context():
            export_graph(module, (x,), path, ["x"], [f"out{i}" for i in range(_n_outputs(module, x))], 17,
                         False, "torchscript")
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        sess.run(None, feed)
        for _ in range(runs):
            sess.run(None, feed)
        prof = sess.end_profiling()
        with open(prof) as fh:
            events = json.load(fh)
    out: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        node = ev["name"][: -len("_kernel_time")]
        # "/model/blocks/blocks.0/conv2/Conv": each scope names the child either alone
        # ("conv2") or qualified by its parent's last name ("blocks.0"); the op goes last
        name = ""
        for part in [p for p in node.split("/") if p][:-1]:
            last = name.rsplit(".", 1)[-1]
            if name and part.startswith(last + "."):
                name = name[: len(name) - len(last)] + part
            else:
                name = f"{name}.{part}" if name else part
        name = name or "(graph)"
        out[name] = out.get(name, 0.0) + ev.get("dur", 0) / 1e3 / (runs + 1)
    return out


def _n_outputs(module, x) -> int:
    with torch.no_grad():
        out = module(x)
    return len(out) if isinstance(out, (tuple, list)) else 1


# --- widths: record and rebuild ---------------------------------------------------------------
def _sizes(m: nn.Module) -> list[int] | None:
    """The prunable sizes of one module, in a fixed order per type."""
    if isinstance(m, (MambaMixer, BiMambaMixer, SS2D)):
        return [m.out_proj.out_features, m.in_proj.in_features, m.out_proj.in_features]
    if type(m).__name__ == "TgramNet":
        return [c.out_channels for c in TgramPruner.convs(m)[:-1]]
    if type(m).__name__ == "MemoryNetwork":
        return [m.values.shape[1], m.conv.out_channels, m.query[0].out_features, m.keys.shape[1]]
    if type(m).__name__ == "PatchMerging":
        return [m.reduction.out_features, m.reduction.in_features // 4]
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
        return [m.out_channels, m.in_channels]
    if isinstance(m, nn.Linear):
        return [m.out_features, m.in_features]
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return [m.num_features]
    if isinstance(m, nn.LayerNorm):
        return [m.normalized_shape[ChannelLayerNormPruner._dim(m)]]
    if isinstance(m, nn.PReLU):
        return [m.num_parameters]
    if type(m).__name__ == "ArcMarginProduct":
        return [m.weight.shape[1]]
    return None


def _inside_mixer(name: str, mixers: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in mixers)


def module_sizes(model: nn.Module) -> dict[str, list[int]]:
    mixers = [n for n, m in model.named_modules() if type(m).__name__ in _LEAVES]
    out = {}
    for name, m in model.named_modules():
        if name and not _inside_mixer(name, mixers):
            s = _sizes(m)
            if s is not None:
                out[name] = s
    return out


def record_widths(model, reference: nn.Module) -> dict[str, list[int]]:
    """Sizes of the modules of ``model`` that differ from the unpruned ``reference``
    (the same family built from the config without ``pruned_widths``)."""
    now, ref = module_sizes(model), module_sizes(reference)
    return {n: s for n, s in now.items() if ref.get(n) != s}


def _tail(n: int, keep: int) -> list[int]:
    return list(range(keep, n))


def apply_widths(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """Shrink the freshly built ``model`` in place to the recorded sizes (which channels are
    dropped does not matter: ``load_state_dict`` fills the weights next). Raises UserError
    for a name or size the model does not have."""
    modules = dict(model.named_modules())
    pruners = customized_pruners()
    for name, sizes in widths.items():
        m = modules.get(name)
        have = _sizes(m) if m is not None else None
        if have is None or len(have) != len(sizes):
            raise UserError(f"pruned_widths: {name!r} is not a prunable module of {type(model).__name__} "
                            f"(or has {len(have or [])} sizes, not {len(sizes)})")
        if any(int(s) > h or int(s) < 1 for s, h in zip(sizes, have)):
            raise UserError(f"pruned_widths: {name} sizes {sizes} must be in 1..{have}")
        sizes = [int(s) for s in sizes]
        if isinstance(m, (MambaMixer, BiMambaMixer, SS2D)):
            p = pruners[type(m)]
            if sizes[0] < have[0]:
                p.prune_out_channels(m, _tail(have[0], sizes[0]))
            if sizes[1] < have[1]:
                p.prune_in_channels(m, _tail(have[1], sizes[1]))
            if sizes[2] < have[2]:
                p.prune_inner_channels(m, _tail(have[2], sizes[2]))
        elif type(m).__name__ == "TgramNet":
            for i, (s, h) in enumerate(zip(sizes, have)):
                if s < h:
                    pruners[type(m)].prune_inner_channels(m, _tail(h, s), str(i))
        elif type(m).__name__ in ("MemoryNetwork", "PatchMerging"):
            p = pruners[type(m)]
            if sizes[0] < have[0]:
                p.prune_out_channels(m, _tail(have[0], sizes[0]))
            if sizes[1] < have[1]:
                p.prune_in_channels(m, _tail(have[1], sizes[1]))
            for g, s, h in zip(("hidden", "key"), sizes[2:], have[2:]):
                if s < h:
                    p.prune_inner_channels(m, _tail(h, s), g)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if depthwise:
                if sizes[0] != sizes[1]:
                    raise UserError(f"pruned_widths: depthwise conv {name} needs equal sizes, not {sizes}")
                if sizes[0] < have[0]:
                    tp.prune_depthwise_conv_out_channels(m, _tail(have[0], sizes[0]))
            else:
                if sizes[0] < have[0]:
                    tp.prune_conv_out_channels(m, _tail(have[0], sizes[0]))
                if sizes[1] < have[1]:
                    tp.prune_conv_in_channels(m, _tail(have[1], sizes[1]))
        elif isinstance(m, nn.Linear):
            if sizes[0] < have[0]:
                tp.prune_linear_out_channels(m, _tail(have[0], sizes[0]))
            if sizes[1] < have[1]:
                tp.prune_linear_in_channels(m, _tail(have[1], sizes[1]))
        elif sizes[0] == have[0]:
            continue
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            tp.prune_batchnorm_out_channels(m, _tail(have[0], sizes[0]))
        elif isinstance(m, nn.LayerNorm):
            ChannelLayerNormPruner().prune_out_channels(m, _tail(have[0], sizes[0]))
        elif isinstance(m, nn.PReLU):
            tp.prune_prelu_out_channels(m, _tail(have[0], sizes[0]))
        else:  # ArcFace
            ArcFacePruner().prune_in_channels(m, _tail(have[0], sizes[0]))


__all__ = ["MambaMixerPruner", "SS2DPruner", "TgramPruner", "PatchMergingPruner", "MemoryNetworkPruner", "ArcFacePruner", "ChannelLayerNormPruner", "customized_pruners",
           "fixed_layers", "inner_groups", "make_importance", "channel_importance", "inner_importance",
           "accumulate_loss_grads", "layer_latency",
           "module_latency", "ort_layer_latency", "LatencyAwareImportance", "Budget", "model_params",
           "model_flops", "eager_latency_ms", "make_pruner", "prune_structured", "module_sizes",
           "record_widths", "apply_widths", "IMPORTANCES"]
