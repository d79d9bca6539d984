"""AEGAN-AD: an autoencoder generator and a WGAN-GP discriminator, every detection score.

``networks`` holds the generator and critic, ``scores`` the detection scores and the rule
that picks one, ``model`` the registered model and its export module (see README.md).
"""

from edgediag.models.aegan_ad.model import (  # noqa: F401 - importing registers the family
    AEGANAD,
    AEGANConfig,
    AEGANExport,
    training_range,
    window_starts,
)
from edgediag.models.aegan_ad.networks import ConvPyramid, Discriminator, Generator, gradient_penalty  # noqa: F401
from edgediag.models.aegan_ad.scores import choose_score, lof_fit, lof_score, pairwise_distances, score_rows  # noqa: F401
