"""The small interface every edgediag model implements.

The training engine, evaluation, pruning, export and bench only talk to a model through
this class, so a new model family plugs into the whole pipeline by subclassing it and
registering itself with :func:`edgediag.models.register_model`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn


class DiagnosisModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class of all models. Its abstract methods (``score``, ``example_input``) are what
    every stage needs: a class that leaves one out cannot be instantiated. ``training_step``
    and ``evaluate`` are needed to train and evaluate; every registered family defines them
    (tests/test_foundation.py checks), an inference-only model need not.

    Class attributes a subclass sets:
        Config: the model's dataclass config (every field JSON/YAML-serialisable).
        data_kind: which data builder reads its data ("audio", "image", "sequence").
        phases: one optimiser per phase, stepped in this order every batch; GANs use
            e.g. ("disc", "gen"). Single-loss models keep ("main",).
        train_defaults: TrainConfig values this model wants unless the user overrides them
            (e.g. a GAN's lr and betas).
        primary_metric: key of :meth:`evaluate`'s result used to pick the best checkpoint
            (higher is better).
        prune_recipe: what `prune` fine-tunes with unless told otherwise
            (``finetune_epochs``, ``distill`` weight): pruning without it loses accuracy silently.
    """

    Config: ClassVar[type]
    data_kind: ClassVar[str] = "audio"
    phases: ClassVar[tuple[str, ...]] = ("main",)
    train_defaults: ClassVar[dict[str, Any]] = {}
    primary_metric: ClassVar[str] = "auc"
    prune_recipe: ClassVar[dict[str, Any]] = {"finetune_epochs": 4, "distill": 1.0}
    model_name: ClassVar[str] = ""  # set by register_model

    def __init__(self, config):
        super().__init__()
        self.config = config
        # The calibrated decision threshold travels in the state dict (and so into the
        # checkpoint and the exported graph's metadata); NaN until the train verb sets it.
        self.register_buffer("threshold", torch.tensor(float("nan")))
        # Thresholds of their own for sections × domains ({"section_00/target": t}), set by
        # the calibration (edgediag.engine.fit) and restored from the checkpoint's meta.
        self.group_thresholds: dict[str, float] = {}

    # --- configuration from data -------------------------------------------------------
    @classmethod
    def config_for_data(cls, config, bundle) -> Any:
        """Return ``config`` completed from the data (class count, input length...)."""
        return config

    # --- training ------------------------------------------------------------------
    def phase_parameters(self, phase: str) -> Iterable[nn.Parameter]:
        """Parameters the optimiser of ``phase`` updates."""
        return self.parameters()

    def training_step(self, batch: dict, phase: str = "main") -> dict[str, torch.Tensor]:
        """Losses for one batch; must hold 'loss' (the one backpropagated); others are logged.
        Every registered family defines it; a model built only for export or runtime (e.g. a
        fixed signal-processing detector) need not, and then cannot be trained."""
        from edgediag.errors import UserError
        raise UserError(f"{type(self).__name__} is inference-only: it has no training_step to train with")

    def cacheable_features(self, batch: dict) -> dict[str, torch.Tensor] | None:
        """Tensors (B, ...) that ``training_step`` computes from each item by a fixed,
        parameter-free, non-random transform (a log-mel): the trainer computes them once
        per training set and adds them to every batch under these names
        (``train.cache_features``, edgediag.engine.cache); ``training_step`` must give the
        same result with them as without. Default: None (nothing to cache)."""
        return None

    @torch.no_grad()
    def fit_normal(self, loader) -> None:
        """After training: fit statistics of normal data that scoring needs (kNN bank,
        Mahalanobis, ...). Store them as buffers or extra state so checkpoints carry them."""

    @property
    def score_uses_normal_statistics(self) -> bool:
        """Whether the decision score depends on what :meth:`fit_normal` fits (a kNN bank, a
        Gaussian). Only then are cross-fitted scores out-of-sample: a classifier's score of
        a clip it was trained on is not, whatever the statistics' folds. Default: the family
        overrides ``fit_normal``; a family whose score choice decides it overrides this."""
        return type(self).fit_normal is not DiagnosisModel.fit_normal

    @torch.no_grad()
    def recalibrate_batchnorm(self, loader, forward=None) -> None:
        """Recompute every BatchNorm's running statistics with the final weights, as the
        exact average over ``loader``'s items ("precise BN"); ``forward`` (default
        ``self.embed``) runs the layers that hold them. The running averages kept during
        training trail weights that were still moving: after short runs (a few dozen steps)
        eval mode predicted one class for every input (measured on TASTgram-MFN and on
        LDMamba video). Everything but the BatchNorms runs as at inference."""
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        forward = forward or self.embed
        was_training = self.training
        self.eval()
        momenta = [bn.momentum for bn in norms]
        for bn in norms:
            bn.reset_running_stats()
            bn.train()
        seen = 0
        for batch in loader:
            n = len(batch["x"])
            if n < 2:  # one item has no batch statistics after global pooling
                continue
            for bn in norms:  # running average weighted by items (a short last batch counts less)
                bn.momentum = n / (seen + n)
            forward(batch["x"].to(self.threshold.device).float())
            seen += n
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        self.train(was_training)

    def decision_thresholds(self, sections=None, domains=None):
        """The threshold of each item (its section × domain's, else the global one); a
        float when there are no per-group thresholds or no groups."""
        if not self.group_thresholds or sections is None:
            return float(self.threshold)
        from edgediag.utils import item_thresholds
        domains = domains if domains is not None else [""] * len(sections)
        return item_thresholds(float(self.threshold), self.group_thresholds, sections, domains)

    @torch.no_grad()
    def calibrate(self, loader) -> dict[str, Any]:
        """After fit_normal, with a labelled validation loader (never the test set): choose
        settings such as which detection score to use. Returns what it chose (logged)."""
        return {}

    # --- inference -----------------------------------------------------------------
    @abc.abstractmethod
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly score per input (B,), higher = more anomalous."""

    @torch.no_grad()
    def evaluate(self, loader, out_dir=None) -> dict[str, Any]:
        """Metrics on a labelled loader; must hold ``primary_metric``. Scalars at the top
        level, optional per-group rows under "table"; plots go to ``out_dir`` if given.
        Every registered family defines it (inference-only models need not)."""
        from edgediag.errors import UserError
        raise UserError(f"{type(self).__name__} is inference-only: it has no evaluate()")

    def export_module(self) -> nn.Module:
        """The module export traces: raw input (waveform, image, sequence) -> the anomaly
        score (B,) first, optionally more outputs after it (class log-probs, embedding).
        Pre-processing (features, normalisation) is inside, so a board needs nothing else.
        Output names: the module's ``output_names`` attribute, else ("score",)."""
        return ScoreModule(self)

    def int8_float_modules(self) -> list[str]:
        """Module paths an INT8 export keeps in float besides the signal front ends (log-mel):
        small layers whose inputs span ranges 8 bits cannot hold (edgediag.deploy.quantize).
        Default: none."""
        return []

    def input_spec(self) -> dict[str, Any]:
        """What the exported graph takes, recorded in the artifact's metadata so a runtime
        can feed it: kind, per-item shape, dtype, and kind-specific fields (sample_rate for
        audio, value range for images, frame rate...). Subclasses add their fields."""
        return {"kind": self.data_kind, "shape": list(self.example_input(1).shape[1:]), "dtype": "float32"}

    def removable_blocks(self) -> list[str]:
        """Module paths of the residual blocks depth pruning may remove (their output is
        their input plus a branch), not yet removed; the config's ``removed_blocks`` lists
        the removed ones (edgediag.compress.depth). Default: none."""
        return []

    def streaming_module(self) -> nn.Module:
        """``(x_t, *states) -> (outputs, *new_states)`` for sample-by-sample inference with
        carried state (causal Mamba models only). Attributes ``input_names``/``output_names``
        and a method ``example_inputs(batch_size)`` describe it for export."""
        from edgediag.errors import UserError
        raise UserError(f"{self.model_name} has no streaming form (only causal Mamba models have one)")

    @abc.abstractmethod
    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A correctly shaped input for tracing and FLOP counting."""


class ScoreModule(nn.Module):
    """x -> model.score(x): the default export module (the score is the graph's output)."""

    output_names = ("score",)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.score(x)
