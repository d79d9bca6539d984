"""AEGAN-AD: an autoencoder generator and a WGAN-GP discriminator, every detection score."""

from edgediag.models.aegan_ad.model import (  # noqa: F401 - importing registers the family
    AEGANConfig,
    ConvPyramid,
    Generator,
    Discriminator,
    gradient_penalty,
    pairwise_distances,
    lof_fit,
    lof_score,
    window_starts,
    AEGANAD,
    AEGANExport,
    score_rows,
    choose_score,
    training_range,
)
