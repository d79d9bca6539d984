"""Small helpers shared by every stage: atomic files, JSON, seeds, devices. Torch is imported
only inside the functions that need it, so the board-side runtime can use this module."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgediag.errors import UserError

log = logging.getLogger("edgediag")


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success,
    so a crash or bad input never leaves a half-written output file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes the file 0600; the output gets the mode any new file of the user's
        # gets (0644 with the usual umask), so a service account on the board can read it.
        tmp.chmod(0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def context_value(var: contextvars.ContextVar, value) -> Iterator[None]:
    """``var`` set to ``value`` inside the block, restored after it (forced backend choices)."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray) or type(obj).__name__ == "Tensor":  # torch.Tensor, without importing torch
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def group_key(section: str, domain: str) -> str:
    """The name a per-group threshold is stored under: ``section_00/source``."""
    return f"{section}/{domain}"


def group_thresholds(calibration: dict | None) -> dict[str, float]:
    """{section/domain: threshold} of a calibration report (``threshold_calibration`` in a
    checkpoint's meta or an artifact's metadata), for the groups that have their own."""
    groups = (calibration or {}).get("groups") or {}
    return {k: float(v["threshold"]) for k, v in groups.items() if v.get("threshold") is not None}


def item_thresholds(threshold: float, groups: dict[str, float] | None, sections, domains) -> np.ndarray:
    """Each item's decision threshold: its section × domain's when ``groups`` has one (a
    threshold calibrated per group, edgediag.engine.fit), else the global ``threshold``."""
    groups = groups or {}
    return np.array([groups.get(group_key(s or "", d or ""), threshold) for s, d in zip(sections, domains)],
                    dtype=np.float64)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(name: str = "auto"):
    """'auto' -> cuda if present else cpu; an unavailable 'cuda' falls back with a message."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name!r} is not a device: auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA requested but not available: using the CPU")
        return torch.device("cpu")
    return device


_KEEP_FREED_MEMORY: bool | None = None


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed tensor memory back to the OS between training steps.

    PyTorch's CPU allocator is malloc. By default glibc serves blocks above a moving
    threshold by mmap and trims the heap top after large frees, so each step's activations
    and gradients are page-faulted in (and zeroed by the kernel) again, step after step:
    measured on 2 cores, 1.22x the clips/s for TASTgram-MFN and 1.12x for AEGAN-AD with this
    (benchmarks/train_report.py). Setting only the trim threshold is worse than the default:
    it freezes the mmap threshold at 128 KiB, so every tensor above it is mapped fresh (2.3x
    slower), hence all three settings. The cost: the process keeps its peak heap. Once per
    process, glibc only; returns whether the settings took effect."""
    global _KEEP_FREED_MEMORY
    if _KEEP_FREED_MEMORY is None:
        _KEEP_FREED_MEMORY = False
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
                M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # malloc.h
                # 32 MiB: glibc's largest mmap threshold on 64-bit; bigger blocks stay mapped
                _KEEP_FREED_MEMORY = all(libc.mallopt(param, value) == 1 for param, value in (
                    (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))
        except OSError:
            pass
    return _KEEP_FREED_MEMORY


def native_vector_flags() -> list[str]:
    """Compiler flags of the native kernels: -mavx2 -mfma where this x86 CPU has both (the
    build runs on the machine that uses it; aarch64 gets NEON without a flag). No
    -march=native, so a cached build stays valid on any CPU with the same flags."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


def cache_root() -> Path:
    """Where native builds and fetched headers are cached: $EDGEDIAG_CACHE, else ~/.cache/edgediag."""
    return Path(os.environ.get("EDGEDIAG_CACHE", Path.home() / ".cache" / "edgediag"))


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """An OS lock on ``folder`` for one build at a time; the OS releases it even when its
    holder is killed (a lock *file* would outlive a killed build and block every later one)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(Path(folder) / "edgediag.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
