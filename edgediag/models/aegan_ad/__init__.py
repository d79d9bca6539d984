"""AEGAN-AD: an autoencoder generator and a WGAN-GP discriminator, every detection score."""

from edgediag.models.aegan_ad.model import (  # noqa: F401 - importing registers the family
    AEGANAD,
    AEGANConfig,
    AEGANExport,
    ConvPyramid,
    Discriminator,
    Generator,
    choose_score,
    gradient_penalty,
    lof_fit,
    lof_score,
    pairwise_distances,
    score_rows,
    training_range,
    window_starts,
)
