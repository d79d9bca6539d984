"""AEGAN-AD: an autoencoder generator and a WGAN-GP discriminator, every detection score.

Jiang, Hou et al., "AEGAN-AD: Unsupervised anomaly detection with an autoencoder GAN"
(DCASE 2020 / 2022 Task 2; official code github.com/jianganbai/AEGAN-AD). One model per
machine type, trained on its normal clips only.

Input: the clip's log-mel (n_fft 2048, hop 512, 128 mels, ``librosa.power_to_db`` with an
80 dB floor, by :class:`edgediag.nn.features.LogMel`), min-max scaled to [-1, 1] with the
minimum and maximum over the machine's training clips, cut into 128-frame windows.

* The scaling statistics are two scalars computed by a pre-pass over the training split in
  :meth:`AEGANAD.config_for_data` (the one hook that sees the data before training
  starts); they are recorded in the config (``input_min``/``input_max``, visible in
  train.json) and held as buffers, so checkpoints and the exported graph carry them. A
  model trained without ``config_for_data`` fits them on its first training batch and
  warns.
* Windows: the published code scores every window (hop 1, 186 per 10 s clip). On a small
  CPU that is ~7x the cost of hop 8, so ``window_hop`` defaults to 8 (plus one window at
  the clip's end) and training draws ``train_windows`` random windows per clip per step.

Networks (published sizes with ``channels=32``, LayerNorm): the generator is a DCGAN
autoencoder, Conv2d 4x4/s2 blocks 1->32->64->128->256->512 (128x128 -> 4x4), each
followed by a norm (LayerNorm over CxHxW, BatchNorm or none) and LeakyReLU 0.2, then a
4x4 conv to a 256x1x1 latent; the decoder mirrors it with ConvTranspose2d + norm + ReLU
and a Tanh output: 10.78 M parameters. The discriminator is the same conv pyramid, a
depthwise 4x4 conv to a 512-d embedding f(x), then LayerNorm -> LeakyReLU -> Linear(1):
3.30 M parameters.

Training (two optimisers, ``phases = ("disc", "gen")``): WGAN-GP critic loss
D(G(x)) - D(x) + lambda·GP, GP = E[(||grad D(x_hat)|| - 1)^2] on random interpolates x_hat
between x and G(x); generator loss = MSE(G(x), x) + mu1·mse(mean f(x), mean f(G(x))) +
mu2·mse(std f(x), std f(G(x))) (batch statistics of the discriminator embedding; mse =
||.||^2 / 512, so mu=1 weighs it like the pixel MSE). Adam 2e-4, betas (0.5, 0.999).

Scores (per clip, from its windows; names as in the paper):

* ``D-maha``, ``D-KNN``, ``D-LOF``, ``D-cos``: the clip embedding (mean of its windows'
  f(x)) against the normal training clips' embeddings: Mahalanobis distance (Ledoit-Wolf
  shrunk covariance: 512 dimensions, tens of clips), mean Euclidean distance to the
  ``knn_k`` nearest, local outlier factor (``lof_k`` neighbours), cosine distance to the
  nearest. LOF is computed in torch from the training k-distances and reachability
  densities (what scikit-learn's ``LocalOutlierFactor(novelty=True)`` stores; a test
  checks equality), so every score, LOF included, is ONNX-exportable.
* ``G-{x,z}-{L1,L2,cos}-{mean,min,max,sum}``: reconstruction error of each window in input
  space (x vs G(x)) or latent space (E(x) vs E(G(x))), aggregated over the clip's windows.

``score`` (config) picks the score ``score(x)`` returns; :meth:`calibrate` replaces it by
the best one on a labelled validation set when that set holds anomalies.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgediag.engine.dcase import ITEM_FIELDS, anomaly_report, report_groups
from edgediag.engine.model import DiagnosisModel
from edgediag.errors import NotFittedError, UserError
from edgediag.models import register_model
from edgediag.models.aegan_ad.networks import WINDOW, Discriminator, Generator, dcgan_init, gradient_penalty
from edgediag.models.aegan_ad.scores import (
    G_SCORES,
    SCORE_NAMES,
    choose_score,
    lof_fit,
    lof_score,
    pairwise_distances,
    score_parts,
    score_rows,
)
from edgediag.nn.features import LogMel
from edgediag.nn.pruning import apply_widths, resize_to_loaded
from edgediag.ops import is_tracing

log = logging.getLogger("edgediag.models.aegan_ad")

FITTED_STATS = ("bank", "maha_mean", "maha_precision", "lof_kdist", "lof_lrd")  # set by fit_normal


@dataclasses.dataclass
class AEGANConfig:
    sample_rate: int = 16000
    clip_seconds: float = 0.0  # 0 = the training clips' length (10 s for DCASE); 10 s without data
    pad_mode: str = "wrap"  # read by the audio builder
    train_normal_only: bool = True  # read by the audio builder
    n_fft: int = 2048
    hop: int = 512
    n_mels: int = 128  # must be 128 (one window is 128 mels x 128 frames)
    top_db: float = 80.0
    window_hop: int = 8  # frames between scored windows (published: 1)
    train_windows: int = 4  # random windows per clip per training step
    channels: int = 32  # generator's first conv width; doubles to 16x (512)
    latent_dim: int = 256
    norm: str = "layer"  # generator norm: layer (published, over CxHxW) | batch | none
    d_channels: int = 32  # discriminator's first conv width; embedding = 16x (512)
    d_norm: str = "layer"  # layer | none (BatchNorm would couple the per-sample gradient penalty)
    gp_weight: float = 10.0  # lambda of WGAN-GP
    mu_mean: float = 1.0  # mu1: feature matching of the embedding's batch mean
    mu_std: float = 1.0  # mu2: ... and of its batch standard deviation
    mu_per_machine: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # machine -> [mu1, mu2]
    score: str = "D-maha"  # one of SCORE_NAMES
    knn_k: int = 1
    lof_k: int = 20  # scikit-learn's default n_neighbors, capped at (training clips - 1)
    input_min: float = 0.0  # log-mel (dB) range of the training clips; set by config_for_data
    input_max: float = 0.0  # (max <= min: not fitted yet)
    # Structured pruning (python -m edgediag.prune): module name -> pruned sizes, as
    # edgediag.nn.pruning.record_widths writes them; empty = unpruned.
    pruned_widths: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def window_starts(n_frames: int, hop: int) -> list[int]:
    """Start frames of the scored windows: every ``hop`` frames, plus one window ending at
    the last frame so the clip's tail is always seen."""
    last = n_frames - WINDOW
    starts = list(range(0, last + 1, hop))
    if starts[-1] != last:
        starts.append(last)
    return starts


def _as_windows(rows: torch.Tensor) -> torch.Tensor:
    """Gathered frames (B, W·WINDOW, mels), window after window -> (B·W, 1, mels, WINDOW)."""
    return rows.reshape(-1, WINDOW, rows.shape[-1]).transpose(1, 2).unsqueeze(1)


@register_model("aegan_ad", variants={
    # Edge variant: half the widths (16 -> 256 channels), a 128-d latent; ~1/4 of the MACs.
    "aegan_ad_small": {"channels": 16, "d_channels": 16, "latent_dim": 128},
})
class AEGANAD(DiagnosisModel):
    Config = AEGANConfig
    data_kind = "audio"
    phases = ("disc", "gen")
    # Published: Adam 2e-4, betas (0.5, 0.999), constant lr, no weight decay or clipping.
    train_defaults = {"lr": 2e-4, "betas": (0.5, 0.999), "optimizer": "adam", "weight_decay": 0.0,
                      "schedule": "constant", "warmup": 0.0, "grad_clip": 0.0, "batch_size": 8}
    primary_metric = "auc"
    # prune's defaults (README.md "Pruning"): 62 % of the scoring graph's parameters (the
    # critic's hidden widths halved; 0.75 of the whole checkpoint, generator included) in
    # multiples of 8 halves batch-1 latency; 2 epochs of the GAN's own losses recover it
    prune_recipe = {"ratio": 0.62, "round_to": 8, "finetune_epochs": 2, "distill": 0.0}

    def __init__(self, config: AEGANConfig):
        super().__init__(config)
        c = config
        if c.score not in SCORE_NAMES:
            raise UserError(f"model.score must be one of {', '.join(SCORE_NAMES)}; not {c.score!r}")
        if c.norm not in ("layer", "batch", "none"):
            raise UserError(f"model.norm must be layer, batch or none, not {c.norm!r}")
        if c.d_norm not in ("layer", "none"):
            raise UserError(f"model.d_norm must be layer or none, not {c.d_norm!r} "
                            "(batch statistics would break the per-sample gradient penalty)")
        if c.n_mels != WINDOW:
            raise UserError(f"model.n_mels must be {WINDOW}: the conv pyramid takes {WINDOW}x{WINDOW} windows")
        if min(c.window_hop, c.train_windows, c.channels, c.d_channels, c.latent_dim, c.knn_k, c.lof_k) < 1:
            raise UserError("model.window_hop, train_windows, channels, d_channels, latent_dim, knn_k and lof_k "
                            "must be positive")
        self.n_samples = int(round((c.clip_seconds or 10.0) * c.sample_rate))
        self.logmel = LogMel(c.sample_rate, c.n_fft, c.hop, c.n_mels, center=True, log="power_to_db",
                             top_db=c.top_db)
        self.n_frames = self.logmel.n_frames(self.n_samples)
        if self.n_frames < WINDOW:
            need = ((WINDOW - 1) * c.hop) / c.sample_rate
            raise UserError(f"clips of {self.n_samples / c.sample_rate:g} s give {self.n_frames} frames, fewer than "
                            f"one {WINDOW}-frame window: set model.clip_seconds >= {need:.2f} (short clips are padded)")
        starts = torch.tensor(window_starts(self.n_frames, c.window_hop))
        self.register_buffer("window_index", starts[:, None] + torch.arange(WINDOW), persistent=False)
        self.register_buffer("input_min", torch.tensor(float(c.input_min)))
        self.register_buffer("input_max", torch.tensor(float(c.input_max)))
        self.generator = Generator(c.channels, c.latent_dim, c.norm)
        self.discriminator = Discriminator(c.d_channels, c.d_norm)
        dcgan_init(self)
        # Normal statistics of the D scores, fitted by fit_normal. Plain buffers (not a dict
        # in get_extra_state, which torch.jit.trace and so the ONNX export cannot handle);
        # their sizes depend on the training set, see _load_from_state_dict.
        dim = self.discriminator.embedding_dim
        for name, shape in (("bank", (0, dim)), ("maha_mean", (dim,)), ("maha_precision", (dim, dim)),
                            ("lof_kdist", (0,)), ("lof_lrd", (0,))):
            self.register_buffer(name, torch.zeros(shape))
        if c.pruned_widths:
            apply_widths(self, c.pruned_widths)

    # --- structured pruning ---------------------------------------------------------------
    def pruning_fixed_layers(self) -> list[nn.Module]:
        """Layers whose output channels pruning must keep: the log-mel front end, the
        decoder's image output, and the discriminator's embedding (the fitted normal
        statistics live in its 16·d_channels dims) and critic head."""
        return [self.logmel, self.generator.decoder[-2], self.discriminator.depthwise, self.discriminator.head]

    def prunable_forward(self, wave: torch.Tensor):
        """Every network on one window of ``wave``: the graph structured pruning traces."""
        w = self.windows(self.features(wave))[:1]
        return self.generator(w), self.discriminator(w)

    # --- configuration -----------------------------------------------------------------
    @classmethod
    def config_for_data(cls, config, bundle):
        """Clip length and rate from the data, per-machine mu, and the pre-pass that fits
        the min-max scaling on the training split (val and test are never looked at)."""
        info = bundle.info or {}
        changes: dict[str, Any] = {"clip_seconds": float(info.get("clip_seconds") or config.clip_seconds),
                                   "sample_rate": int(info.get("sample_rate") or config.sample_rate)}
        machines = info.get("machines") or []
        if len(machines) > 1:
            log.warning("AEGAN-AD is one model per machine type (as published); %d machine types share this one "
                        "and its scaling statistics", len(machines))
        if len(machines) == 1 and machines[0] in config.mu_per_machine:
            mu = list(config.mu_per_machine[machines[0]])
            if len(mu) != 2:
                raise UserError(f"model.mu_per_machine[{machines[0]!r}] must be [mu1, mu2], not {mu}")
            changes["mu_mean"], changes["mu_std"] = float(mu[0]), float(mu[1])
        config = dataclasses.replace(config, **changes)
        lo, hi = training_range(config, bundle.train)
        return dataclasses.replace(config, input_min=lo, input_max=hi)

    def _scaler_fitted(self) -> bool:
        return float(self.input_max) > float(self.input_min)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        resize_to_loaded(self, state_dict, prefix, FITTED_STATS)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- features ----------------------------------------------------------------------
    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """Waveform (B, L) -> scaled log-mel (B, 128, frames) in [-1, 1] on training data."""
        return self.scaled(self.logmel(wave.float()))

    def scaled(self, db: torch.Tensor) -> torch.Tensor:
        """Log-mel in dB -> [-1, 1] by the training clips' range."""
        return 2.0 * (db - self.input_min) / (self.input_max - self.input_min) - 1.0

    def cacheable_features(self, batch: dict) -> dict[str, torch.Tensor]:
        """The clips' log-mel in dB: the same at every step, and both phases need it."""
        return {"logmel_db": self.logmel(batch["x"].float())}

    def windows(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 128, frames) -> (B·W, 1, 128, 128), the clip's windows in order."""
        # Gather whole frames (contiguous rows of the transposed mel), not single values
        # along the last axis: 3.5x faster in eager, 20x in ONNX Runtime (7.5 -> 0.33 ms).
        return _as_windows(mel.transpose(1, 2)[:, self.window_index.reshape(-1)])

    def random_windows(self, mel: torch.Tensor, k: int) -> torch.Tensor:
        """k windows per clip at random start frames (training)."""
        b = mel.shape[0]
        starts = torch.randint(0, mel.shape[-1] - WINDOW + 1, (b, k), device=mel.device)
        idx = (starts[..., None] + torch.arange(WINDOW, device=mel.device)).view(b, -1, 1)
        return _as_windows(mel.transpose(1, 2).gather(1, idx.expand(-1, -1, mel.shape[1])))  # whole frames

    # --- training ----------------------------------------------------------------------
    def phase_parameters(self, phase: str):
        if phase == "disc":
            return self.discriminator.parameters()
        if phase == "gen":
            return self.generator.parameters()
        raise ValueError(f"unknown phase {phase!r} (disc, gen)")

    def _training_windows(self, wave: torch.Tensor, db: torch.Tensor | None = None) -> torch.Tensor:
        """``db``: the clips' log-mel when the trainer cached it (cacheable_features)."""
        if db is None:
            db = self.logmel(wave.float())
        if not self._scaler_fitted():
            # Only when the model was built without config_for_data (not via the train verb).
            self.input_min.fill_(float(db.min()))
            self.input_max.fill_(float(db.max()))
            log.warning("AEGAN-AD input scaling was not fitted by config_for_data: using the first training "
                        "batch's log-mel range [%.1f, %.1f] dB", float(self.input_min), float(self.input_max))
        return self.random_windows(self.scaled(db), self.config.train_windows)

    def training_step(self, batch: dict, phase: str = "disc") -> dict[str, torch.Tensor]:
        x = self._training_windows(batch["x"], batch.get("logmel_db"))
        c = self.config
        if phase == "disc":
            with torch.no_grad():
                fake = self.generator(x)
            out = self.discriminator(torch.cat([x, fake]))  # LayerNorm is per sample: one pass for both
            d_real, d_fake = out[: len(x)].mean(), out[len(x):].mean()
            gp = gradient_penalty(self.discriminator, x, fake)
            return {"loss": d_fake - d_real + c.gp_weight * gp, "wasserstein": (d_real - d_fake).detach(),
                    "gp": gp.detach()}
        if phase == "gen":
            fake = self.generator(x)
            rec = F.mse_loss(fake, x)
            # The critic is a fixed feature extractor here: no graph for its parameters.
            flags = [p.requires_grad for p in self.discriminator.parameters()]
            for p in self.discriminator.parameters():
                p.requires_grad_(False)
            try:
                f_fake = self.discriminator.embed(fake)
                with torch.no_grad():
                    f_real = self.discriminator.embed(x)
            finally:
                for p, flag in zip(self.discriminator.parameters(), flags):
                    p.requires_grad_(flag)
            match_mean = F.mse_loss(f_fake.mean(0), f_real.mean(0))
            match_std = F.mse_loss(f_fake.std(0, unbiased=False), f_real.std(0, unbiased=False))
            loss = rec + c.mu_mean * match_mean + c.mu_std * match_std
            return {"loss": loss, "rec": rec.detach(), "match_mean": match_mean.detach(),
                    "match_std": match_std.detach()}
        raise ValueError(f"unknown phase {phase!r} (disc, gen)")

    # --- scoring -----------------------------------------------------------------------
    def _window_terms(self, w: torch.Tensor, gx: bool, gz: bool, d: bool) -> dict[str, torch.Tensor]:
        """Per-window reconstruction distances and embeddings for windows w (N, 1, 128, 128)."""
        out = {}
        if gx or gz:
            z = self.generator.encode(w)
            rec = self.generator.decoder(z)
            if gx:
                a, b = w.flatten(1), rec.flatten(1)
                out["x-L1"] = (a - b).abs().mean(1)
                out["x-L2"] = (a - b).pow(2).mean(1)
                out["x-cos"] = 1 - F.cosine_similarity(a, b, dim=1)
            if gz:
                a, b = z.flatten(1), self.generator.encode(rec).flatten(1)
                out["z-L1"] = (a - b).abs().mean(1)
                out["z-L2"] = (a - b).pow(2).mean(1)
                out["z-cos"] = 1 - F.cosine_similarity(a, b, dim=1)
        if d:
            out["emb"] = self.discriminator.embed(w)
        return out

    def _windows_in_chunks(self, w: torch.Tensor, gx, gz, d, chunk: int = 256) -> dict[str, torch.Tensor]:
        # Chunks bound the memory of eager scoring (hop 1: 186 windows per clip); a traced
        # export takes one pass (the chunk count would fix the batch size in the graph).
        if is_tracing() or len(w) <= chunk:
            return self._window_terms(w, gx, gz, d)
        parts = [self._window_terms(w[i:i + chunk], gx, gz, d) for i in range(0, len(w), chunk)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def clip_embeddings(self, wave: torch.Tensor) -> torch.Tensor:
        """Clip embedding (B, 512): the mean of its windows' discriminator embeddings."""
        w = self.windows(self.features(wave))
        emb = self._windows_in_chunks(w, False, False, True)["emb"]
        return emb.view(wave.shape[0], -1, emb.shape[-1]).mean(1)

    def _d_fitted(self) -> bool:
        return self.bank.shape[0] > 0

    def d_scores(self, emb: torch.Tensor, names) -> dict[str, torch.Tensor]:
        out = {}
        n = self.bank.shape[0]
        if "D-maha" in names:
            diff = emb - self.maha_mean
            out["D-maha"] = ((diff @ self.maha_precision) * diff).sum(1).clamp_min(0).sqrt()
        if "D-KNN" in names:
            out["D-KNN"] = pairwise_distances(emb, self.bank).topk(min(self.config.knn_k, n), dim=1,
                                                                   largest=False).values.mean(1)
        if "D-LOF" in names:
            out["D-LOF"] = lof_score(emb, self.bank, self.lof_kdist, self.lof_lrd, self._lof_k())
        if "D-cos" in names:
            cos_dist = 1 - F.normalize(emb, dim=1) @ F.normalize(self.bank, dim=1).t()
            out["D-cos"] = cos_dist.topk(min(self.config.knn_k, n), dim=1, largest=False).values.mean(1)
        return out

    def _lof_k(self) -> int:
        return max(1, min(self.config.lof_k, self.bank.shape[0] - 1))

    def clip_scores(self, wave: torch.Tensor, names=SCORE_NAMES) -> dict[str, torch.Tensor]:
        """The named scores (each (B,)) of clips ``wave`` (B, n_samples)."""
        names = tuple(names)
        gx, gz, d = score_parts(names)
        if not is_tracing():  # graph capture: no eager-only checks, no data-dependent branch
            if not self._scaler_fitted():
                raise NotFittedError("AEGAN-AD input scaling is not fitted (config_for_data or a training step)")
            if d and not self._d_fitted():
                raise NotFittedError("D-* scores need fit_normal() on the normal training clips first")
        b = wave.shape[0]
        terms = self._windows_in_chunks(self.windows(self.features(wave)), gx, gz, d)
        out = {}
        for name in names:
            if name.startswith("G-"):
                _, space, dist, agg = name.split("-")
                per_window = terms[f"{space}-{dist}"].view(b, -1)
                out[name] = {"mean": per_window.mean(1), "min": per_window.amin(1), "max": per_window.amax(1),
                             "sum": per_window.sum(1)}[agg]
        if d:
            emb = terms["emb"].view(b, -1, terms["emb"].shape[-1]).mean(1)
            out.update(self.d_scores(emb, names))
        return out

    @property
    def score_uses_normal_statistics(self) -> bool:
        return self.config.score.startswith("D-")  # G scores: reconstruction errors alone

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """The configured (or calibrated) score ``config.score``, (B,)."""
        return self.clip_scores(x, (self.config.score,))[self.config.score]

    @torch.no_grad()
    def fit_normal(self, loader) -> None:
        """Normal statistics of the D scores from the training clips (anomalous ones skipped):
        embedding bank (kNN, cosine), Ledoit-Wolf mean/precision, LOF k-distances/densities."""
        from sklearn.covariance import LedoitWolf

        was_training = self.training
        self.eval()
        device = self.threshold.device
        bank = []
        for batch in loader:
            emb = self.clip_embeddings(batch["x"].to(device))
            if "anomaly" in batch:
                emb = emb[torch.as_tensor(batch["anomaly"]).to(device) <= 0]
            bank.append(emb)
        self.train(was_training)
        bank = torch.cat(bank) if bank else torch.zeros(0, self.discriminator.embedding_dim, device=device)
        if bank.shape[0] < 2:
            raise UserError(f"AEGAN-AD needs at least 2 normal training clips to fit its D scores, got {bank.shape[0]}")
        lw = LedoitWolf().fit(bank.double().cpu().numpy())
        self.bank = bank.float()
        self.maha_mean = torch.as_tensor(lw.location_, dtype=torch.float32, device=device)
        self.maha_precision = torch.as_tensor(lw.precision_, dtype=torch.float32, device=device)
        kdist, lrd = lof_fit(bank.double(), self._lof_k())
        self.lof_kdist, self.lof_lrd = kdist.float(), lrd.float()

    # --- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def collect_scores(self, loader) -> tuple[dict[str, np.ndarray], dict[str, list]]:
        """Every available score of every clip (D scores only once fit_normal ran) and the
        clips' labels and DCASE groups."""
        was_training = self.training
        self.eval()
        device = self.threshold.device
        names = SCORE_NAMES if self._d_fitted() else G_SCORES
        scores: dict[str, list] = {n: [] for n in names}
        meta: dict[str, list] = {k: [] for k in ("anomaly", *ITEM_FIELDS)}
        for batch in loader:
            x = batch["x"].to(device)
            for name, value in self.clip_scores(x, names).items():
                scores[name] += value.float().cpu().tolist()
            meta["anomaly"] += torch.as_tensor(batch["anomaly"]).tolist()
            for key in ITEM_FIELDS:
                meta[key] += list(batch.get(key, [""] * len(x)))
        self.train(was_training)
        return {n: np.asarray(v, dtype=np.float64) for n, v in scores.items()}, meta

    @torch.no_grad()
    def calibrate(self, loader) -> dict[str, Any]:
        """Choose ``config.score`` by AUC on a labelled validation set holding both normal
        and anomalous clips; otherwise keep the configured score and say why."""
        scores, meta = self.collect_scores(loader)
        chosen = choose_score(scores, meta["anomaly"], self.config.score)
        self.config.score = chosen["score"]
        return chosen

    @torch.no_grad()
    def evaluate(self, loader, out_dir=None) -> dict[str, Any]:
        """The chosen score's report (AUC/pAUC, DCASE official score or per-label rows,
        decisions at the stored threshold, roc.png) and every score's AUC/pAUC as the
        ``table`` rows; the chosen score's per-section / per-label rows are under ``groups``.
        Before fit_normal only the G scores exist (a chosen D score then reports NaN)."""
        scores, meta = self.collect_scores(loader)
        chosen = self.config.score
        n = len(meta["anomaly"])
        if chosen in scores:
            report = anomaly_report(scores[chosen], meta["anomaly"], out_dir=out_dir,
                                    threshold=self.decision_thresholds(meta["section"], meta["domain"]),
                                    title=f"{self.model_name} ({chosen})", **report_groups(meta))
        else:
            report = {"n_items": n, "auc": float("nan"), "pauc": float("nan"),
                      "note": f"{chosen} needs fit_normal() first"}
        report["groups"] = report.pop("table", [])
        rows = score_rows(scores, meta, chosen)
        report["table"] = rows
        report["score_name"] = chosen
        return report

    # --- export ------------------------------------------------------------------------
    def export_module(self) -> nn.Module:
        return AEGANExport(self)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        # A quiet machine-like tone with noise, not zeros (the dB floor would be flat).
        t = torch.arange(self.n_samples, dtype=torch.float32) / self.config.sample_rate
        wave = 0.05 * torch.sin(2 * math.pi * 120.0 * t) + 0.01 * torch.randn(
            batch_size, self.n_samples, generator=torch.Generator().manual_seed(0))
        return wave.to(self.threshold.device)


class AEGANExport(nn.Module):
    """Raw waveform (B, n_samples) -> the chosen score (B,).

    Log-mel by the factored matrix DFT (no STFT operator), scaling by the stored training range,
    windows by a constant-index gather, then only the networks the score needs: the
    generator for G scores, the discriminator and its fitted normal statistics (constants
    in the graph) for D scores, LOF included.
    """

    input_names = ("waveform",)
    output_names = ("score",)

    def __init__(self, model: AEGANAD):
        super().__init__()
        self.model = model
        self.score_name = model.config.score

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.model.clip_scores(wave, (self.score_name,))[self.score_name]


@torch.no_grad()
def training_range(config: AEGANConfig, dataset, batch_size: int = 16) -> tuple[float, float]:
    """(min, max) of the log-mel (dB) over a dataset's clips (the scaling pre-pass)."""
    logmel = LogMel(config.sample_rate, config.n_fft, config.hop, config.n_mels, center=True,
                    log="power_to_db", top_db=config.top_db)
    lo, hi = math.inf, -math.inf
    n = len(dataset)
    for start in range(0, n, batch_size):
        wave = torch.stack([torch.as_tensor(dataset[i]["x"], dtype=torch.float32)
                            for i in range(start, min(n, start + batch_size))])
        db = logmel(wave)
        lo, hi = min(lo, float(db.min())), max(hi, float(db.max()))
    if not hi > lo:
        raise UserError("AEGAN-AD: the training clips' log-mel has no range to scale (constant or no clips)")
    return lo, hi
