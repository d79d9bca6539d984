"""TASTgram-MFN's kNN score: a clip's distance to the nearest normal training clips.

The feature is the unit-norm embedding, and beside it (``knn_band_weight`` > 0) each mel
band's maximum over time, standardised by the normal training clips' mean and std and
scaled to norm ~``knn_band_weight``: the loudest moment of each band, which pooled
convolutions lose (README "Valve": on the valve set a 1-NN on band maxima alone reaches AUC
0.97 where the classifier's score is at chance). With the band part the distance is
Euclidean; a bank of embeddings alone (checkpoints before it) keeps the cosine distance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def band_statistics(band_maxima: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-band mean and std (floored at 0.1 dB: a band that never moves must not dominate)."""
    return band_maxima.mean(0), band_maxima.std(0, unbiased=False).clamp_min(0.1)


def knn_features(emb: torch.Tensor, mel: torch.Tensor, band_mean: torch.Tensor, band_std: torch.Tensor,
                 weight: float) -> torch.Tensor:
    feats = F.normalize(emb)
    if weight <= 0 or band_mean.numel() == 0:
        return feats
    z = (mel.amax(-1) - band_mean) / band_std
    return torch.cat([feats, z * (weight / math.sqrt(z.shape[1]))], dim=1)


def knn_distance(feats: torch.Tensor, bank: torch.Tensor, k: int, euclidean: bool) -> torch.Tensor:
    """Mean distance to the k nearest bank rows. A clip that is itself in the bank (a
    training clip) skips its own entry, so its score is a leave-one-out distance:
    otherwise every training clip scores 0 and a threshold calibrated on them flags
    everything."""
    if euclidean:
        sq = feats.square().sum(1, keepdim=True)
        d2 = (sq + bank.square().sum(1) - 2 * feats @ bank.t()).clamp_min(0)
        self_match = d2 < 1e-6 * (1 + sq)
        dist = torch.where(self_match, torch.full_like(d2, 1e6), d2.sqrt())
    else:  # cosine distance of unit vectors, <= 2
        dist = 1.0 - feats @ bank.t()
        dist = torch.where(dist < 1e-6, torch.full_like(dist, 2.0), dist)
    k = min(k, max(1, bank.shape[0] - 1))
    return dist.topk(k, dim=1, largest=False).values.mean(dim=1)
