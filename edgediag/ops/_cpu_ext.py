"""Build-at-first-use loader for the native CPU selective-scan kernel.

The C++ source lives in ``kernels/selective_scan_cpu.cpp`` and is compiled with
``torch.utils.cpp_extension.load`` the first time it is needed. The build
directory is cached under ``$EDGEDIAG_CACHE`` (default ``~/.cache/edgediag``),
keyed by torch version, architecture and compiler flags, so a machine builds it
once. A failed build (no compiler, no ninja, ...) is reported once through
``warnings``/``logging`` and the caller falls back to the pure-PyTorch scan.

Concurrent builds (several processes, e.g. a test run beside a demo) take an OS file lock
around torch's build: the OS releases it when its holder dies. torch's own lock file is
left behind by a build that was killed, and every later build would wait on it forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

from edgediag.utils import build_lock, cache_root, native_vector_flags

logger = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).resolve().parents[2] / "kernels" / "selective_scan_cpu.cpp"
KERNEL_HEADER = KERNEL_SOURCE.with_suffix(".h")

_lock = threading.Lock()
_module = None
_error: str | None = None
_warned = False


def compile_flags() -> list[str]:
    """-O3 plus AVX2/FMA when this x86 CPU has them (edgediag.utils.native_vector_flags)."""
    return ["-O3", "-fopenmp", *native_vector_flags()]  # at::parallel_for is OpenMP inline code in headers


def build_directory(flags: list[str]) -> Path:
    key = hashlib.sha1(" ".join([torch.__version__, platform.machine(), *flags]).encode()).hexdigest()[:10]
    return cache_root() / "torch_extensions" / f"selective_scan_cpu_{key}"


def _ensure_ninja_on_path() -> None:
    # torch looks ninja up on PATH; the pip package puts it next to the
    # interpreter, which is not on PATH when the venv is not activated.
    try:
        import ninja  # type: ignore[import-not-found]

        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        return
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


@contextlib.contextmanager
def _exclusive(build_dir: Path):
    """The build lock (edgediag.utils.build_lock); holding it, any torch lock file there
    belongs to a dead build and is removed."""
    with build_lock(build_dir):
        stale = build_dir / "lock"  # torch.utils.file_baton's file
        if stale.exists():
            logger.warning("removing %s, left by a build that did not finish", stale)
            stale.unlink(missing_ok=True)
        yield


def _build(verbose: bool):
    from torch.utils.cpp_extension import load

    if not KERNEL_SOURCE.is_file():  # e.g. a wheel install without the repository's kernels/
        raise FileNotFoundError(f"kernel source {KERNEL_SOURCE} not found")
    _ensure_ninja_on_path()
    flags = compile_flags()
    build_dir = build_directory(flags)
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch rebuilds when the .cpp or the flags change; the header's hash in a define makes
    # an edit of the header count too
    header_hash = hashlib.sha1(KERNEL_HEADER.read_bytes()).hexdigest()[:12]
    with _exclusive(build_dir):
        return load(
            name="edgediag_selective_scan_cpu",
            sources=[str(KERNEL_SOURCE)],
            extra_cflags=[*flags, f"-DEDGEDIAG_KERNEL_HEADER_HASH={header_hash}"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=verbose,
        )


def load_extension(verbose: bool = False):
    """The compiled module, or None if it cannot be built here (warns once)."""
    global _module, _error, _warned
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is None and _error is None:
            if os.environ.get("EDGEDIAG_DISABLE_CPU_EXT", "") not in ("", "0"):
                _error = "disabled by EDGEDIAG_DISABLE_CPU_EXT"
            else:
                try:
                    _module = _build(verbose)
                except Exception as exc:  # compiler missing, ninja missing, build error...
                    _error = f"{type(exc).__name__}: {exc}"
            if _error is not None and not _warned:
                _warned = True
                msg = (f"edgediag: native CPU selective scan unavailable ({_error.splitlines()[0][:300]}); "
                       "using the pure-PyTorch 'chunked' backend instead")
                logger.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return _module


def build_error() -> str | None:
    """Why the extension is unavailable (None if it loaded or was never tried)."""
    return _error
