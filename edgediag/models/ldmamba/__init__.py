"""LDMamba: attention-Mamba with a dynamic screening module and dynamic pruning, plus the"""

from edgediag.models.ldmamba.model import (  # noqa: F401 - importing registers the family
    AttentionMambaBlock,
    DynamicScreening,
    FrameStem,
    LDMamba,
    LDMambaConfig,
    LDMambaStreaming,
    SeqCNN,
    SeqCNNConfig,
    SequenceClassifier,
    SequenceExport,
    SequenceInputConfig,
    StaticAttention,
    causal_conv_step,
    running_stats,
    stats_from_sums,
)
