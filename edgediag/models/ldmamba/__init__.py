"""LDMamba: attention-Mamba with a dynamic screening module and dynamic pruning, plus the"""

from edgediag.models.ldmamba.model import (  # noqa: F401 - importing registers the family
    SequenceInputConfig,
    LDMambaConfig,
    SeqCNNConfig,
    FrameStem,
    SequenceClassifier,
    SequenceExport,
    running_stats,
    stats_from_sums,
    causal_conv_step,
    DynamicScreening,
    StaticAttention,
    AttentionMambaBlock,
    LDMamba,
    LDMambaStreaming,
    SeqCNN,
)
