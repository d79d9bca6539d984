"""TASTgram-MFN with ArcFace / ArcMix / Noisy-ArcMix (Choi & Choi, ICASSP 2024)."""

from edgediag.models.tastgram_mfn.model import (  # noqa: F401 - importing registers the family
    TASTgramConfig,
    PReLU,
    ConvBlock,
    Bottleneck,
    MobileFaceNet,
    TgramNet,
    temporal_attention,
    ArcMarginProduct,
    mixup_loss,
    random_roll,
    change_rate,
    TASTgramMFN,
    TASTgramExport,
)
