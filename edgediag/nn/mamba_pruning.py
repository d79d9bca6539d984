"""Pruners of the Mamba mixers and SS2D, registered in :mod:`edgediag.nn.pruning`.

The mixers are leaves to torch-pruning's graph: their d_model sides (``in_proj`` input,
``out_proj`` output) are ordinary channels coupled with the residual stream; their d_inner
group is internal, so no graph group reaches it. Which tensors hold it comes from the one
description in :func:`edgediag.nn.mamba.inner_channel_tensors`.
"""

from __future__ import annotations

from torch import nn

from edgediag.nn.mamba import SS2D, BiMambaMixer, MambaMixer, inner_channel_tensors
from edgediag.nn.pruning import InnerGroupPruner, _keep, _sliced, register_pruner, slice_parameter


def _resync(layer: nn.Module, n: int) -> None:
    """Size attributes after the inner tensors were sliced to ``n`` channels."""
    layer.in_proj.out_features = 2 * n
    layer.out_proj.in_features = n
    for sfx in getattr(layer, "directions", ()):
        getattr(layer, f"x_proj{sfx}").in_features = n
        getattr(layer, f"dt_proj{sfx}").out_features = n
    for m in layer.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):  # depthwise over the inner channels
            m.in_channels = m.out_channels = m.groups = n
        elif isinstance(m, nn.LayerNorm):  # SS2D's out_norm
            m.normalized_shape = (n,)
    layer.d_inner = n


class _MixerPruner(InnerGroupPruner):
    """MambaMixer / BiMambaMixer / SS2D: ``in_proj`` columns are the module's input
    channels, ``out_proj`` rows its output channels; one inner group, d_inner."""

    leaf = True
    root = True

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

    def inner_names(self, layer) -> list[str]:
        return ["d_inner"]

    def inner_channels(self, layer, group: str = "d_inner") -> int:
        return layer.out_proj.in_features

    def inner_tensors(self, layer, group: str = "d_inner"):
        params = dict(layer.named_parameters())
        return [(params[n], dim, chunks) for n, dim, chunks in inner_channel_tensors(layer, ranking=True)]

    def prune_inner_channels(self, layer, idxs, group: str = "d_inner"):
        keep = _keep(self.inner_channels(layer), idxs)
        for name, dim, chunks in inner_channel_tensors(layer):
            slice_parameter(layer, name, dim, keep, chunks)
        _resync(layer, len(keep))
        return layer

    def inner_hooks(self, layer, group: str = "d_inner"):
        """Every place a screening gate masks d_inner so that removing a closed channel is
        exact: where the channels enter what mixes them (the x_proj that makes the shared
        dt/B/C; SS2D: the depthwise conv's output, so the scan sees zeros, and its
        out_norm, normalised over the open channels only) and where they leave (out_proj)."""
        if hasattr(layer, "directions"):
            hooks = [(getattr(layer, f"x_proj{sfx}"), "in", -1) for sfx in layer.directions]
        else:
            hooks = [(layer.conv2d, "out", 1), (layer.out_norm, "norm", -1)]
        return hooks + [(layer.out_proj, "in", -1)]

    def dep_slices(self, name, layer, out):
        return [(f"{name}.out_proj.weight", 0, 1)] if out else [(f"{name}.in_proj.weight", 1, 1)]


class MambaMixerPruner(_MixerPruner):
    """MambaMixer / BiMambaMixer (d_inner: see :func:`edgediag.nn.mamba.inner_channel_tensors`)."""

    TARGET_MODULES = (MambaMixer, BiMambaMixer)


class SS2DPruner(_MixerPruner):
    """VMamba's SS2D: the inner group is packed per scan direction (``A_logs`` / ``Ds`` hold
    K stacked copies), besides the depthwise conv2d and ``out_norm``."""

    TARGET_MODULES = (SS2D,)


register_pruner(MambaMixer, BiMambaMixer, pruner=MambaMixerPruner())
register_pruner(SS2D, pruner=SS2DPruner())

__all__ = ["MambaMixerPruner", "SS2DPruner"]
