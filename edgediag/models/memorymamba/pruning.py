"""MemoryMamba's layers in the pruning registry (:mod:`edgediag.nn.pruning`): the memory
network and VMamba's PatchMerging, both leaves to torch-pruning's graph."""

from __future__ import annotations

import torch_pruning as tp

from edgediag.models.memorymamba.model import MemoryNetwork, PatchMerging
from edgediag.nn.pruning import ChannelPruner, InnerGroupPruner, _keep, _sliced, register_pruner


@register_pruner(PatchMerging)
class PatchMergingPruner(ChannelPruner):
    """VMamba's PatchMerging: 2x2 neighbours concatenated on the channel (last) dim ->
    LayerNorm(4C) -> Linear(4C, C'). Input channel c is four entries of the 4C vector
    (c, C+c, 2C+c, 3C+c); torch-pruning's concat mapping of channels-last maps gets this
    wrong, so the module is one leaf: in = C, out = C'."""

    leaf = True

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


@register_pruner(MemoryNetwork)
class MemoryNetworkPruner(InnerGroupPruner):
    """MemoryMamba's memory network: depthwise conv (in = out = C) -> query MLP (C -> hidden
    -> key_dim) -> softmax over ``keys`` (slots, key_dim) -> ``values`` (slots, C). Its keys
    and values are bare Parameters used by matmul, which the graph cannot map, so it is a
    leaf: channels C in and out (conv, query input, values columns); inner groups: the
    query MLP's hidden units and the key dim (query output, keys columns)."""

    leaf = True

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

    def inner_hooks(self, layer, group: str = "hidden"):
        # hidden units / key dims leave query[0] / query[2]
        return [((layer.query[0] if group == "hidden" else layer.query[2]), "out", -1)]


__all__ = ["PatchMergingPruner", "MemoryNetworkPruner"]
