"""Per-item features computed once per training set instead of at every step.

A model whose training step starts with a fixed, parameter-free transform of each item
(a log-mel spectrogram of a waveform) returns it from ``cacheable_features(batch)``; the
trainer runs that over the training set once (``train.cache_features``) and hands the
results to every batch under the names the model chose, and ``training_step`` uses them
where present. Recomputing the log-mel of the same clips every epoch was most of a step
(benchmarks/train_report.py, README "Training throughput").
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger("edgediag.engine")


def move_batch(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (nested in a dict, list or tuple) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def model_caches_features(model) -> bool:
    """Whether the model overrides ``cacheable_features`` (else there is nothing to cache)."""
    from edgediag.engine.model import DiagnosisModel

    return type(model).cacheable_features is not DiagnosisModel.cacheable_features


class CachedFeatures(Dataset):
    """``base``'s items with the cached tensors added: item i gets ``features[name][i]``."""

    def __init__(self, base: Dataset, features: dict[str, torch.Tensor]):
        self.base, self.features = base, features

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return {**self.base[i], **{name: values[i] for name, values in self.features.items()}}


@torch.no_grad()
def cache_features(model, dataset: Dataset, device: torch.device, batch_size: int = 32) -> Dataset:
    """``dataset`` wrapped with ``model.cacheable_features`` of every item (kept on the CPU,
    like the items), or ``dataset`` itself when the model has none to give."""
    if not model_caches_features(model) or isinstance(dataset, CachedFeatures):
        return dataset

    t0 = time.perf_counter()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        out = model.cacheable_features(move_batch(batch, device))
        if not out:  # this configuration has nothing fixed to cache (e.g. random time shifts)
            return dataset
        for name, values in out.items():
            parts.setdefault(name, []).append(values.detach().cpu())
    features = {name: torch.cat(values) for name, values in parts.items()}
    log.info("cached %s of %d training items in %.1f s (train.cache_features)",
             ", ".join(features), len(dataset), time.perf_counter() - t0)
    return CachedFeatures(dataset, features)
