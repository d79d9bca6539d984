"""TASTgram-MFN with ArcFace / ArcMix / Noisy-ArcMix (Choi & Choi, ICASSP 2024)."""

from edgediag.models.tastgram_mfn import pruning  # noqa: F401 - registers its layers' pruners
from edgediag.models.tastgram_mfn.model import (  # noqa: F401 - importing registers the family
    ArcMarginProduct,
    Bottleneck,
    ConvBlock,
    MobileFaceNet,
    PReLU,
    TASTgramConfig,
    TASTgramExport,
    TASTgramMFN,
    TgramNet,
    change_rate,
    mixup_loss,
    random_roll,
    temporal_attention,
)
