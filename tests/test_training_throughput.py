"""Issue 24 item 4: the training engine's feature cache, fused optimiser, allocator settings
and per-part timings, and the NEU-like synthetic set (no timed assertions: the timings are only checked
to be recorded)."""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from edgediag.data import DataConfig, build_data
from edgediag.data.synth_neu import CLASSES as NEU_CLASSES
from edgediag.data.synth_neu import generate_neu_like
from edgediag.engine.cache import CachedFeatures, cache_features
from edgediag.engine.trainer import TrainConfig, Trainer
from edgediag.models.aegan_ad import AEGANAD, AEGANConfig
from edgediag.models.tastgram_mfn.model import TASTgramConfig, TASTgramMFN
from edgediag.utils import keep_freed_memory

SR = 16000
TAST_TINY = dict(clip_seconds=1.0, n_fft=512, hop=256, n_mels=32, tgram_win=512, stem_channels=16,
                 bottlenecks=[[2, 32, 1, 2], [2, 32, 1, 2], [2, 32, 1, 2]], head_channels=64, embedding_dim=32)
AEGAN_TINY = dict(channels=4, d_channels=4, latent_dim=16, window_hop=4, train_windows=2, lof_k=3, clip_seconds=4.5,
                  input_min=-80.0, input_max=0.0)


class Clips(Dataset):
    """Machine-like clips (harmonics + noise) with labels, as the audio reader gives them."""

    def __init__(self, n: int, seconds: float, n_classes: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        t = np.arange(int(seconds * SR)) / SR
        self.x = [torch.tensor(0.05 * sum(np.sin(2 * np.pi * k * (20 + 5 * i) * t + rng.uniform(0, 6)) / k
                                          for k in range(1, 8)) + 0.01 * rng.standard_normal(len(t)),
                               dtype=torch.float32) for i in range(n)]
        self.y = [i % n_classes for i in range(n)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "anomaly": 0, "key": f"clip{i}"}


def _batch(dataset, cached: bool, model):
    items = [dataset[i] for i in range(len(dataset))]
    batch = {"x": torch.stack([it["x"] for it in items]), "y": torch.tensor([it["y"] for it in items])}
    if cached:
        ds = cache_features(model, dataset, torch.device("cpu"), batch_size=3)
        assert isinstance(ds, CachedFeatures)
        extra = [ds[i] for i in range(len(ds))]
        batch.update({k: torch.stack([e[k] for e in extra]) for k in ds.features})
    return batch


@pytest.mark.parametrize("n_classes", [1, 3])
def test_tastgram_step_with_cached_log_mel_equals_the_uncached_step(n_classes, one_thread):
    torch.manual_seed(0)
    model = TASTgramMFN(TASTgramConfig(n_classes=n_classes, **TAST_TINY))
    data = Clips(6, 1.0, n_classes)
    losses = {}
    for cached in (False, True):
        batch = _batch(data, cached, model)
        assert ("logmel_rates" if n_classes == 1 else "logmel") in batch or not cached
        torch.manual_seed(1)  # the same pseudo-rates and mixup draws on both paths
        losses[cached] = model.training_step(batch)["loss"]
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


def test_tastgram_caches_nothing_with_random_time_shifts():
    model = TASTgramMFN(TASTgramConfig(n_classes=2, time_shift=True, **TAST_TINY))
    data = Clips(4, 1.0, 2)
    assert cache_features(model, data, torch.device("cpu")) is data


def test_aegan_step_with_cached_log_mel_equals_the_uncached_step(one_thread):
    torch.manual_seed(0)
    model = AEGANAD(AEGANConfig(**AEGAN_TINY))
    data = Clips(4, 4.5, 1)
    for phase in model.phases:
        losses = {}
        for cached in (False, True):
            batch = _batch(data, cached, model)
            torch.manual_seed(2)  # the same random windows
            losses[cached] = model.training_step(batch, phase)["loss"]
        torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


def _fit(data, **switches):
    torch.manual_seed(0)
    model = TASTgramMFN(TASTgramConfig(n_classes=2, **TAST_TINY))
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=4, lr=1e-3, seed=0, **switches), out_dir=None,
                      progress=False)
    trainer.fit(data)
    return trainer, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_trainer_feature_cache_and_fused_optimiser_train_like_the_plain_engine(one_thread):
    """Same seed, one epoch: the feature cache gives exactly the weights of the per-step
    log-mel; the fused AdamW those of the for-loop AdamW up to float rounding, which Adam's
    normalised step can magnify where a gradient is about 0 (a bias just before a BatchNorm:
    1e-4 apart after two steps of lr 1e-3), so within a fifth of one step there. The trainer
    records where an epoch's time went."""
    data = Clips(8, 1.0, 2)
    plain, w_plain = _fit(data, cache_features=False, fused_optimizer=False)
    cached, w_cached = _fit(data, cache_features=True, fused_optimizer=False)
    fused, w_fused = _fit(data, cache_features=True, fused_optimizer=True)
    for key in w_plain:
        torch.testing.assert_close(w_cached[key], w_plain[key], rtol=0, atol=0, equal_nan=True, msg=key)
        torch.testing.assert_close(w_fused[key], w_plain[key], rtol=1e-4, atol=2e-4, equal_nan=True, msg=key)
    assert all(opt.defaults.get("fused") for opt in fused.optimizers.values())
    assert not any(opt.defaults.get("fused") for opt in plain.optimizers.values())
    assert set(fused.timings) == {"data", "forward", "backward", "optimizer"}
    assert all(v >= 0 for v in fused.timings.values()) and cached.cache_seconds > 0
    assert plain.cache_seconds == 0.0


# --- the NEU-like synthetic set ------------------------------------------------------
def test_neu_like_generator_writes_six_grey_classes_deterministically(tmp_path):
    a = generate_neu_like(tmp_path / "a", n_per_class=2, size=64, seed=3)
    b = generate_neu_like(tmp_path / "b", n_per_class=3, size=64, seed=3)
    c = generate_neu_like(tmp_path / "c", n_per_class=2, size=64, seed=4)
    assert list(a) == list(NEU_CLASSES) and len(NEU_CLASSES) == 6
    import cv2

    for label in NEU_CLASSES:
        for i, path in enumerate(a[label]):
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert img.shape == (64, 64) and img.dtype == np.uint8 and img.std() > 2
            # a file depends on (seed, class, index) only, not on how many others are made
            assert path.read_bytes() == b[label][i].read_bytes()
            assert path.read_bytes() != c[label][i].read_bytes()
    bundle = build_data("image", DataConfig(root=str(tmp_path / "b"), test_fraction=0.34),
                        dataclasses.make_dataclass("Cfg", [("image_size", int, 32)])())
    assert bundle.classes == sorted(NEU_CLASSES) and bundle.info["channels"] == 1
    assert len(bundle.train) == 12 and len(bundle.test) == 6


def test_neu_like_classes_differ_from_each_other(tmp_path):
    """Each defect leaves its own mark: images of one class are closer in simple texture
    statistics to each other than to the average of the others (a sanity floor, not a
    difficulty measure)."""
    import cv2

    written = generate_neu_like(tmp_path, n_per_class=8, size=96, seed=0)

    def stats(path):
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
        gx, gy = np.abs(np.diff(img, axis=1)).mean(), np.abs(np.diff(img, axis=0)).mean()
        low = cv2.GaussianBlur(img, (0, 0), 6)
        return np.array([img.std(), max(gx, gy), min(gx, gy), low.std(), (img < low - 0.08).mean()])

    feats = {label: np.stack([stats(p) for p in paths]) for label, paths in written.items()}
    allf = np.concatenate(list(feats.values()))
    mu, sd = allf.mean(0), allf.std(0) + 1e-6
    centres = {k: ((v - mu) / sd).mean(0) for k, v in feats.items()}
    distinct = {tuple(np.round(c, 1)) for c in centres.values()}
    assert len(distinct) == 6


def test_transpose_augmentation_adds_the_transposed_orientations_only_when_asked():
    from edgediag.data.images import ImageDataset

    img = np.zeros((16, 16, 1), np.uint8)
    img[2:4, 5:12] = 255  # a horizontal bar: flips keep it horizontal, a transpose makes it vertical
    seen = {}
    for transpose in (False, True):
        ds = ImageDataset([img], [0], [0], ["a"], augment=True, max_shift=0.0, transpose=transpose)
        torch.manual_seed(0)
        xs = [ds[0]["x"][0] for _ in range(40)]
        # per-row sums spread more than per-column sums: the bar lies horizontally
        seen[transpose] = {bool(x.sum(1).std() > x.sum(0).std()) for x in xs}
    assert seen[False] == {True} and seen[True] == {True, False}


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h)
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallinfo2") else None


@pytest.mark.skipif(_glibc() is None, reason="needs glibc >= 2.33 (mallinfo2)")
def test_keep_freed_memory_serves_big_blocks_from_the_heap_and_keeps_them_after_free():
    libc = _glibc()
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    assert keep_freed_memory() and keep_freed_memory()  # applied, and idempotent
    size = 24 << 20  # a step's worth of activations: above glibc's default mmap threshold
    before = libc.mallinfo2()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    assert during.hblkhd == before.hblkhd  # not a fresh mapping (faulted in page by page)
    assert during.arena >= before.arena  # but heap
    assert after.arena == during.arena  # and not trimmed back to the OS when freed
