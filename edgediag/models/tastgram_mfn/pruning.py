"""TASTgram-MFN's layers in the pruning registry (:mod:`edgediag.nn.pruning`): the ArcFace
head and the Tgram front end, which torch-pruning cannot prune on its own."""

from __future__ import annotations

import torch_pruning as tp
from torch import nn

from edgediag.errors import UserError
from edgediag.models.tastgram_mfn.model import ArcMarginProduct, TgramNet
from edgediag.nn.pruning import ChannelPruner, InnerGroupPruner, _keep, _sliced, register_pruner


@register_pruner(TgramNet)
class TgramPruner(InnerGroupPruner):
    """TASTgram's learned front end (``TgramNet``) as one leaf: its input is the waveform
    (1 channel) and its output channels are mel bins stacked with the log-mel - both fixed.
    Its LayerNorms normalise over *frames*, not channels (torch-pruning's LayerNorm
    pruner would cut frames), so the graph must not see inside. Inner groups: the output
    channels of every conv but the last ("0" = the extractor, "1".. = encoder convs),
    each also the next conv's input channels."""

    leaf = True

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

    def inner_hooks(self, layer, group: str = "0"):
        return [(self.convs(layer)[int(group)], "out", 1)]

    def size_slots(self, layer) -> list[str]:
        return self.inner_names(layer)  # in and out are fixed


@register_pruner(ArcMarginProduct)
class ArcFacePruner(ChannelPruner):
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

    def size_slots(self, layer) -> list[str]:
        return ["in"]

    def dep_slices(self, name, layer, out):
        return [] if out else [(f"{name}.weight", 1, 1)]


__all__ = ["TgramPruner", "ArcFacePruner"]
