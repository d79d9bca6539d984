"""The one training engine every model uses.

A model plugs in through :class:`edgediag.engine.model.DiagnosisModel`: ``training_step``
returns losses per phase (one optimiser per phase, so GANs fit the same loop), and
``evaluate`` gives the validation metric that picks the best checkpoint.

Reproducibility: every epoch reseeds all RNGs and the sampler from (seed, epoch), so an
epoch is a pure function of the weights and optimiser state it starts from. Resuming
from ``last.pt`` (saved at each epoch's end) therefore reproduces an uninterrupted run
bit for bit on the CPU.

Distributed (torchrun, world size > 1): the training loss logged is the mean over ranks;
validation runs once, on rank 0, over the whole validation set, after BatchNorm statistics
have been made the same on every rank (``TrainConfig.sync_batchnorm``), and its metrics are
broadcast so every rank records the same numbers and picks the same best checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm import tqdm

from edgediag.engine.cache import cache_features, move_batch
from edgediag.engine.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from edgediag.errors import UserError
from edgediag.utils import keep_freed_memory, seed_everything, select_device

log = logging.getLogger("edgediag.engine")


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    optimizer: str = "adamw"  # adamw | adam
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.05  # fraction of all steps with a linear warm-up
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0  # final lr as a fraction of lr
    grad_clip: float = 1.0  # max grad norm; 0 disables
    amp: bool = True  # mixed precision, CUDA only
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # Features a model derives from each item by a fixed transform (log-mel) computed once
    # per training set instead of every step (DiagnosisModel.cacheable_features).
    cache_features: bool = True
    # Fused Adam/AdamW: one kernel over all parameters instead of a Python loop of small ops
    # (memorymamba_nano's 219 tensors: 17 -> 5.5 ms per step on the CPU).
    fused_optimizer: bool = True
    # glibc keeps freed tensor memory instead of page-faulting it back in every step
    # (edgediag.utils.keep_freed_memory: 1.12-1.22x on the audio families). Process-wide.
    keep_freed_memory: bool = True
    eval_every: int = 1  # epochs between validations
    max_steps_per_epoch: int = 0  # 0 = whole epoch; for quick runs
    # At least this many optimiser steps: on a small data set (45 fan clips, batch 16: two
    # steps per epoch) ``epochs`` is raised to reach it, so a recipe is not 20 steps long
    # there. A recipe's floor (train_defaults); an explicit train.epochs sets it to 0.
    min_steps: int = 0
    # percentile: the empirical quantile, the direct estimate of the false-alarm rate; gamma
    # (the DCASE baselines' fit) can put the threshold above every calibration score when
    # the normal scores are not gamma-shaped (fan, TASTgram-MFN kNN: FAR 0/45 at a 0.1 target)
    threshold_method: str = "percentile"  # percentile | gamma (see edgediag.engine.metrics)
    # The promise a threshold makes: the fraction of normal items allowed to raise an alarm,
    # calibrated on normal scores the scoring statistics did not fit (edgediag.engine.fit).
    target_far: float = 0.1
    threshold_quantile: float = 0.0  # older spelling of 1 - target_far; 0 = use target_far
    # Without a validation split: k-fold cross-fit of the normal statistics (fit_normal) on
    # the training set, so each calibration score comes from statistics that never saw it.
    calibration_folds: int = 5
    # A score that does not use normal statistics (a classifier's) cannot be cross-fitted:
    # training saw every clip. Without a validation split, this fraction of the training
    # data is then held out of training to calibrate on (0 = calibrate in-sample, flagged).
    calibration_holdout: float = 0.2
    # DCASE-style data (sections, source/target domains): a threshold per section × domain
    # where the calibration set holds at least this many of its normals (0 = one threshold),
    # since a domain shift moves the normal scores; the others use the global threshold.
    group_min_normals: int = 10
    # With several processes (torchrun), keep BatchNorm the same on every rank. CUDA (nccl):
    # the layers become torch.nn.SyncBatchNorm while training (batch statistics over the
    # global batch). CPU (gloo): torch's SyncBatchNorm is CUDA-only (its training forward
    # raises on CPU tensors), so the layers stay plain BatchNorm normalising by their rank's
    # batch, each rank tracks running statistics over its own shard, and running_mean and
    # running_var are averaged over ranks at every epoch's end, before validation and
    # checkpoints (the spread of batch means between ranks is left out of running_var).
    # Either way checkpoints hold plain BatchNorm. Off: DDP copies rank 0's buffers to every
    # rank before each step (the running statistics then follow rank 0's batches).
    sync_batchnorm: bool = True

    def validate(self) -> None:
        if not 0 < self.target_far < 1:
            raise UserError(f"train.target_far must be in (0, 1), not {self.target_far}")
        if not 0 <= self.calibration_holdout < 1:
            raise UserError(f"train.calibration_holdout must be in [0, 1), not {self.calibration_holdout}")
        if self.threshold_quantile and not 0 < self.threshold_quantile < 1:
            raise UserError(f"train.threshold_quantile must be in (0, 1), not {self.threshold_quantile}")
        if self.calibration_folds < 0 or self.calibration_folds == 1:
            raise UserError(f"train.calibration_folds must be 0 (off) or >= 2, not {self.calibration_folds}")
        if self.optimizer not in ("adamw", "adam"):
            raise UserError(f"train.optimizer must be adamw or adam, not {self.optimizer!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"train.schedule must be cosine, linear or constant, not {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("train.epochs, train.batch_size and train.lr must be positive")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise UserError(f"train.device {self.device!r} is not a device: auto, cpu, cuda or cuda:N") from None


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Warm-up then cosine/linear decay, as a multiple of cfg.lr."""
    warm = int(cfg.warmup * total)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


class _Steps(nn.Module):
    """Routes DDP's forward to ``training_step`` so DDP's gradient hooks are armed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, phase):
        return self.model.training_step(batch, phase)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def to_sync_batchnorm(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every BatchNorm in ``model`` by a SyncBatchNorm sharing its parameters and
    buffers; returns what :func:`to_plain_batchnorm` needs to put the originals back."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                swaps.append((parent, name, child))
    return swaps


def to_plain_batchnorm(swaps: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Undo :func:`to_sync_batchnorm`: the original modules (their class, hence what
    pruning, export and ``load_state_dict`` expect) come back holding the current tensors."""
    for parent, name, plain in reversed(swaps):
        sync = getattr(parent, name)
        plain._parameters.update(sync._parameters)
        plain._buffers.update(sync._buffers)
        plain.train(sync.training)
        setattr(parent, name, plain)


class Trainer:
    """Fit a DiagnosisModel.

    ``callbacks``: objects with an optional ``on_epoch_end(trainer, epoch)`` that may return
    a replacement model (dynamic pruning rebuilds a smaller one); the optimisers are then
    rebuilt for the new parameters and the schedule continues where it was.
    ``checkpoint_data``: extra entries stored in every checkpoint (data config, classes).
    """

    def __init__(self, model, cfg: TrainConfig, out_dir: str | Path | None = None,
                 callbacks: list | None = None, checkpoint_data: dict | None = None,
                 progress: bool = True):
        cfg.validate()
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir else None
        self.callbacks = list(callbacks or [])
        self.checkpoint_data = checkpoint_data or {}
        self.rank, self.world, local_rank = distributed_env()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = select_device(cfg.device)
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", local_rank)
                torch.cuda.set_device(self.device)
        self.progress = progress and self.rank == 0
        self.amp = cfg.amp and self.device.type == "cuda"
        self.model = model.to(self.device)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimiser steps completed
        self.best_metric = -math.inf
        self.history: list[dict] = []
        self.total_steps = 1
        self._bn_swaps: list = []  # SyncBatchNorm in place while an epoch's steps run (CUDA, world > 1)
        # Seconds of the last epoch per part (data, forward, backward, optimizer) and of
        # building the feature cache: where an epoch's time goes (benchmarks/train_report.py).
        self.timings: dict[str, float] = {}
        self.cache_seconds = 0.0

    # --- set-up -------------------------------------------------------------------
    def _build_optimizers(self) -> None:
        cfg = self.cfg
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizers, self.schedulers = {}, {}
        for phase in self.model.phases:
            params = [p for p in self.model.phase_parameters(phase) if p.requires_grad]
            opt = self._optimizer(cls, params)
            for group in opt.param_groups:
                group["initial_lr"] = cfg.lr
            self.optimizers[phase] = opt
            self.schedulers[phase] = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(s, self.total_steps, cfg), last_epoch=self.step - 1)
        self.scalers = {p: torch.amp.GradScaler("cuda", enabled=self.amp) for p in self.model.phases}
        self._wrap()

    def _optimizer(self, cls, params):
        kwargs = dict(lr=self.cfg.lr, betas=tuple(self.cfg.betas), weight_decay=self.cfg.weight_decay)
        if self.cfg.fused_optimizer and params:
            try:
                return cls(params, fused=True, **kwargs)
            except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
                pass
        return cls(params, **kwargs)

    def _batchnorm_sync(self) -> str:
        """How BatchNorm is kept the same across ranks: "" (one process, no BatchNorm, or
        train.sync_batchnorm off), "sync" (SyncBatchNorm, CUDA) or "stats" (running
        statistics averaged at each epoch's end, CPU: torch's SyncBatchNorm is CUDA-only)."""
        if self.world == 1 or not self.cfg.sync_batchnorm or not any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            return ""
        return "sync" if self.device.type == "cuda" else "stats"

    def _wrap(self) -> None:
        """The module the training steps run through: DDP over the model when distributed."""
        if self.world == 1:
            self.runner = _Steps(self.model)
            return
        # Phases use disjoint parameter subsets (GANs), hence find_unused_parameters. "stats":
        # each rank keeps its own running statistics (averaged in _end_epoch_sync), so DDP must
        # not overwrite them with rank 0's before every step. "sync": the SyncBatchNorm layers
        # go in and out around each epoch's steps (_start_epoch_sync); they share the plain
        # layers' parameters and buffers, and DDP keeps tensors, not modules, so this wrapper
        # stays valid.
        self.runner = nn.parallel.DistributedDataParallel(
            _Steps(self.model), device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=len(self.model.phases) > 1, broadcast_buffers=self._batchnorm_sync() != "stats")

    def _start_epoch_sync(self) -> None:
        """Distributed, before an epoch's steps: SyncBatchNorm in place ("sync" only)."""
        if self._batchnorm_sync() == "sync" and not self._bn_swaps:
            self._bn_swaps = to_sync_batchnorm(self.model)

    def _end_epoch_sync(self) -> None:
        """Distributed, after an epoch's steps: plain BatchNorm back in the model (validation,
        callbacks, checkpoints and the model fit returns see the classes they know), and with
        "stats" the running statistics averaged over ranks and every other buffer from rank 0."""
        if self._bn_swaps:
            to_plain_batchnorm(self._bn_swaps)
            self._bn_swaps = []
        if self._batchnorm_sync() != "stats":
            return
        for module in self.model.modules():
            norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            for name, buf in module._buffers.items():
                if buf is None or name in module._non_persistent_buffers_set:
                    continue
                if norm and name in ("running_mean", "running_var"):
                    dist.all_reduce(buf)
                    buf.div_(self.world)
                else:
                    dist.broadcast(buf, 0)

    def _loader(self, dataset: Dataset, epoch: int) -> DataLoader:
        if self.world > 1:
            sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=self.cfg.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch))
        return DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler,
                          num_workers=self.cfg.num_workers, drop_last=len(dataset) > self.cfg.batch_size)

    # --- checkpoints --------------------------------------------------------------
    def train_state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "best_metric": self.best_metric,
                "history": self.history,
                "optimizers": {p: o.state_dict() for p, o in self.optimizers.items()},
                "scalers": {p: s.state_dict() for p, s in self.scalers.items()}}

    def save(self, name: str, with_state: bool = True) -> Path | None:
        if self.out_dir is None or self.rank != 0:
            return None
        payload = make_checkpoint(self.model, data=self.checkpoint_data,
                                  meta={"epoch": self.epoch, "step": self.step, "train_config": dataclasses.asdict(self.cfg)},
                                  train_state=self.train_state() if with_state else None)
        return save_checkpoint(self.out_dir / name, payload)

    def _restore(self, path: Path) -> None:
        """Load weights, optimiser and schedule state from ``last.pt`` of an earlier run."""
        from edgediag.engine.checkpoint import model_from_checkpoint

        payload = load_checkpoint(path)
        state = payload.get("train_state")
        if state is None:
            raise UserError(f"{path} holds no training state to resume from")
        # The saved config may record pruned widths: rebuild the model from it.
        self.model = model_from_checkpoint(payload).to(self.device).train()
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_metric, self.history = state["best_metric"], list(state["history"])
        self._build_optimizers()
        for phase, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][phase])
            self.scalers[phase].load_state_dict(state["scalers"][phase])
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.step)

    # --- the loop -----------------------------------------------------------------
    def fit(self, train_set: Dataset, val_set: Dataset | None = None, resume: bool = False):
        cfg = self.cfg
        if len(train_set) == 0:
            raise UserError("the training set is empty")
        steps_per_epoch = len(self._loader(train_set, 0))
        if cfg.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
        if cfg.min_steps and steps_per_epoch * cfg.epochs < cfg.min_steps:
            cfg.epochs = math.ceil(cfg.min_steps / steps_per_epoch)
            log.info("%d optimiser steps per epoch: %d epochs to reach train.min_steps=%d",
                     steps_per_epoch, cfg.epochs, cfg.min_steps)
        self.total_steps = max(1, steps_per_epoch * cfg.epochs)
        last = self.out_dir / "last.pt" if self.out_dir else None
        if resume:
            if last is None or not last.is_file():
                raise UserError(f"nothing to resume: {last} does not exist")
            self._restore(last)
        else:
            self._build_optimizers()
        if cfg.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        if cfg.cache_features:
            started = time.perf_counter()
            train_set = cache_features(self.model, train_set, self.device, cfg.batch_size)
            self.cache_seconds = time.perf_counter() - started

        while self.epoch < cfg.epochs:
            epoch = self.epoch
            seed_everything(cfg.seed * 7919 + epoch)
            if self.world > 1:
                self._start_epoch_sync()
            self.model.train()
            sums: dict[str, float] = {}
            self.timings = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)
            seen, t0 = 0, time.perf_counter()
            bar = tqdm(self._loader(train_set, epoch), total=steps_per_epoch, disable=not self.progress,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False, mininterval=1.0)
            waited = time.perf_counter()
            for i, batch in enumerate(bar):
                if i >= steps_per_epoch:
                    break
                batch = move_batch(batch, self.device)
                self.timings["data"] += time.perf_counter() - waited
                for phase in self.model.phases:
                    losses = self._step(batch, phase)
                    for k, v in losses.items():
                        key = k if len(self.model.phases) == 1 else f"{phase}/{k}"
                        sums[key] = sums.get(key, 0.0) + float(v)
                for sched in self.schedulers.values():
                    sched.step()
                self.step += 1
                seen += _batch_size(batch)
                if self.progress:
                    bar.set_postfix(loss=f"{sums.get('loss', next(iter(sums.values()))) / (i + 1):.4f}",
                                    lr=f"{self.schedulers[self.model.phases[0]].get_last_lr()[0]:.2e}",
                                    refresh=False)
                waited = time.perf_counter()
            bar.close()
            elapsed = time.perf_counter() - t0
            n_batches = max(1, min(i + 1, steps_per_epoch))
            means = {k: v / n_batches for k, v in sums.items()}
            if self.world > 1:
                means = self._mean_over_ranks(means)
                self._end_epoch_sync()
            record = {"epoch": epoch + 1, **means,
                      "seconds": elapsed, "samples_per_s": seen * self.world / max(elapsed, 1e-9)}
            self.epoch += 1

            if val_set is not None and len(val_set) and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs):
                record.update(self._validate(val_set))
            self.history.append(record)
            if self.rank == 0:
                log.info(_format_record(record))

            for cb in self.callbacks:
                replacement = getattr(cb, "on_epoch_end", lambda *_: None)(self, epoch)
                if replacement is not None:
                    self.model = replacement.to(self.device)
                    self._build_optimizers()
                    self.best_metric = -math.inf  # a smaller model restarts the best-of race

            metric = record.get(f"val_{self.model.primary_metric}")
            if metric is not None and metric > self.best_metric:
                self.best_metric = metric
                self.save("best.pt", with_state=False)
            self.save("last.pt")
            if self.world > 1:
                dist.barrier()
        if self.out_dir is not None and self.rank == 0 and not (self.out_dir / "best.pt").exists():
            self.save("best.pt", with_state=False)  # no validation set: the last epoch is the best we know
        return self.model

    def _step(self, batch, phase: str) -> dict[str, float]:
        # Wall time per part into self.timings (benchmarks/train_report.py); on CUDA the parts
        # are asynchronous, so the split there is only indicative.
        opt, scaler = self.optimizers[phase], self.scalers[phase]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.amp):
            losses = self.runner(batch, phase)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss in phase {phase!r} at step {self.step}: {float(loss)}")
        t1 = time.perf_counter()
        scaler.scale(loss).backward()
        t2 = time.perf_counter()
        if self.cfg.grad_clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        t3 = time.perf_counter()
        for part, seconds in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
            self.timings[part] = self.timings.get(part, 0.0) + seconds
        return {k: v.detach() for k, v in losses.items()}

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Each logged loss averaged over ranks (every rank logs the same keys)."""
        if not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world for k, v in zip(values, t.tolist())}

    def _validate(self, val_set: Dataset) -> dict[str, float]:
        """``val_*`` scalars of :meth:`evaluate`. Distributed: rank 0 scores the whole
        validation set (the ranks' models are the same after _end_epoch_sync) and the result
        is broadcast, so every rank's history, best metric and callbacks see the same numbers."""
        scalars = None
        if self.rank == 0:
            metrics = self.evaluate(val_set)
            scalars = {f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.world > 1:
            box = [scalars]
            dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
            scalars = box[0]
        return scalars

    @torch.no_grad()
    def evaluate(self, dataset: Dataset) -> dict:
        self.model.eval()
        loader = DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)
        metrics = self.model.evaluate(DeviceLoader(loader, self.device))
        self.model.train()
        return metrics


class DeviceLoader:
    """Wraps a DataLoader so the batches a model sees are already on its device."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device
        self.dataset = loader.dataset

    def __iter__(self):
        return (move_batch(b, self.device) for b in self.loader)

    def __len__(self):
        return len(self.loader)


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        batch = batch.get("x", next(iter(batch.values())))
    return len(batch) if hasattr(batch, "__len__") else 1


def _format_record(rec: dict) -> str:
    parts = [f"epoch {rec['epoch']}"]
    for k, v in rec.items():
        if k in ("epoch", "seconds", "samples_per_s"):
            continue
        parts.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
    parts.append(f"{rec['seconds']:.1f}s ({rec['samples_per_s']:.1f} samples/s)")
    return " | ".join(parts)
