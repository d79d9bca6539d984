"""The selective scan as an ONNX Runtime custom operator (``edgediag::SelectiveScan``,
``kernels/selective_scan_ort.cpp``): the header it builds against, the library build, and
ONNX Runtime sessions that load it when a graph needs it. Torch-free, so the board builds
and loads it the same way.

- Headers: ONNX Runtime's C API header is not in the pip wheel. ``fetch_headers()`` takes
  Debian's ``libonnxruntime-dev`` (a pinned version and sha256; the headers are the same on
  every architecture) from the Debian archive once, at install time (``make install`` runs
  ``python -m edgediag.runtime.custom_ops fetch-headers``), into ``$EDGEDIAG_CACHE``.
  ``EDGEDIAG_ORT_INCLUDE`` points at another folder holding ``onnxruntime_c_api.h`` (1.17+).
- Library: compiled with ``c++`` on first use, cached under ``$EDGEDIAG_CACHE/ort_ops/<key>``
  (key: sources, header, flags, machine), written to a temporary name and renamed.
- Sessions: :func:`open_session` registers the library only when the graph holds the op, so
  ordinary graphs never build it.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.request
from pathlib import Path

from edgediag.errors import UserError
from edgediag.utils import build_lock, cache_root, native_vector_flags

DOMAIN = "edgediag"
OP = "SelectiveScan"
KERNELS = Path(__file__).resolve().parents[2] / "kernels"
SOURCE = KERNELS / "selective_scan_ort.cpp"
KERNEL_HEADER = KERNELS / "selective_scan_cpu.h"

# Debian's libonnxruntime-dev: only its headers are used (the C API is stable: a library built
# against 1.21's header and asking for API level 17 loads into ONNX Runtime 1.17 and newer)
HEADERS_VERSION = "1.21.0"
HEADERS_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/"
               "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb")
HEADERS_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
C_API_HEADER = "onnxruntime_c_api.h"

_lock = threading.Lock()
_library: Path | None = None


class CustomOpsUnavailable(UserError):
    """The custom-op library cannot be built or loaded here (the message says why): a
    one-line error, exit 2, wherever it reaches a verb."""


def include_dir() -> Path | None:
    """A folder holding onnxruntime_c_api.h: $EDGEDIAG_ORT_INCLUDE, the fetched headers, or
    a system install (/usr/include/onnxruntime, e.g. Debian's libonnxruntime-dev)."""
    candidates = [os.environ.get("EDGEDIAG_ORT_INCLUDE", ""),
                  str(cache_root() / "onnxruntime-headers" / HEADERS_VERSION),
                  "/usr/include/onnxruntime", "/usr/local/include/onnxruntime"]
    for folder in filter(None, candidates):
        if (Path(folder) / C_API_HEADER).is_file():
            return Path(folder)
    return None


def _deb_member(deb: bytes, prefix: str) -> tuple[str, bytes]:
    """The first member of a .deb (an ar archive) whose name starts with ``prefix``."""
    if not deb.startswith(b"!<arch>\n"):
        raise CustomOpsUnavailable("the downloaded headers package is not a .deb")
    pos = 8
    while pos + 60 <= len(deb):
        name = deb[pos:pos + 16].decode().strip().rstrip("/")
        size = int(deb[pos + 48:pos + 58].decode().strip())
        if name.startswith(prefix):
            return name, deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise CustomOpsUnavailable(f"no {prefix}* in the headers package")


def fetch_headers(timeout: float = 60.0) -> Path:
    """Download Debian's libonnxruntime-dev (pinned, sha256-checked) and keep its headers;
    a folder that already holds them is returned as it is."""
    found = include_dir()
    if found is not None:
        return found
    target = cache_root() / "onnxruntime-headers" / HEADERS_VERSION
    try:
        # plain http, as apt uses the archive: the pinned sha256 below is the integrity check
        with urllib.request.urlopen(HEADERS_DEB, timeout=timeout) as response:
            deb = response.read()
    except OSError as exc:
        raise CustomOpsUnavailable(f"cannot download {HEADERS_DEB} ({exc})") from None
    digest = hashlib.sha256(deb).hexdigest()
    if digest != HEADERS_SHA256:
        raise CustomOpsUnavailable(f"{HEADERS_DEB}: sha256 {digest}, expected {HEADERS_SHA256}")
    _, data = _deb_member(deb, "data.tar")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".headers-", dir=target.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and "onnxruntime" in parts and member.name.endswith(".h"):
                    rel = Path(*parts[parts.index("onnxruntime") + 1:])
                    out = staging / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(tar.extractfile(member).read())
        if not (staging / C_API_HEADER).is_file():
            raise CustomOpsUnavailable(f"{C_API_HEADER} is not in {HEADERS_DEB}")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build() -> Path:
    headers = include_dir()
    if headers is None:
        raise CustomOpsUnavailable(
            f"ONNX Runtime's {C_API_HEADER} is not here: run `python -m edgediag.runtime.custom_ops "
            "fetch-headers` (make install does) or set EDGEDIAG_ORT_INCLUDE")
    if not SOURCE.is_file():
        raise CustomOpsUnavailable(f"{SOURCE} not found (the custom op builds from a repository checkout)")
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise CustomOpsUnavailable("no C++ compiler (c++) on PATH")
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", *native_vector_flags()]
    key = hashlib.sha1(b"".join([SOURCE.read_bytes(), KERNEL_HEADER.read_bytes(),
                                 (headers / C_API_HEADER).read_bytes(),
                                 " ".join([compiler, platform.machine(), *flags]).encode()])).hexdigest()[:12]
    folder = cache_root() / "ort_ops" / key
    library = folder / "libedgediag_ort_ops.so"
    folder.mkdir(parents=True, exist_ok=True)
    with build_lock(folder):
        if library.is_file():
            return library
        partial = folder / f".{library.name}.{os.getpid()}"
        cmd = [compiler, *flags, f"-I{headers}", f"-I{KERNELS}", str(SOURCE), "-o", str(partial)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:300])
            raise CustomOpsUnavailable(f"building the custom op failed: {first}")
        os.replace(partial, library)
    return library


def library_path() -> Path:
    """The built library (built on first call, then cached); CustomOpsUnavailable says why not."""
    global _library
    with _lock:
        if _library is None or not _library.is_file():
            _library = _build()
        return _library


def available() -> str | None:
    """None when the custom op can be built and loaded here, else the reason it cannot."""
    try:
        library_path()
    except CustomOpsUnavailable as exc:
        return str(exc)
    return None


def _needs_library(exc: Exception) -> bool:
    text = str(exc)
    return f"{DOMAIN}:{OP}" in text or f"domain '{DOMAIN}'" in text or f'domain "{DOMAIN}"' in text


def open_session(model, options=None, providers=("CPUExecutionProvider",)):
    """``onnxruntime.InferenceSession`` of a path or serialised graph, with the custom-op
    library registered when the graph uses ``edgediag::SelectiveScan`` (built on first need)."""
    import onnxruntime as ort

    options = options if options is not None else ort.SessionOptions()
    payload = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(payload, options, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - only an unregistered edgediag op is handled here
        if not _needs_library(exc):
            raise
    try:
        library = library_path()
    except CustomOpsUnavailable as exc:
        name = f"{model} uses" if isinstance(model, (str, Path)) else "the graph uses"
        raise CustomOpsUnavailable(f"{name} the {DOMAIN}::{OP} op, which cannot be loaded here: {exc}") from None
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(payload, options, providers=list(providers))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = argv[0] if argv else ""
    if verb not in ("fetch-headers", "build"):
        print("usage: python -m edgediag.runtime.custom_ops fetch-headers|build", file=sys.stderr)
        return 2
    try:
        if verb == "fetch-headers":
            print(f"ONNX Runtime headers: {fetch_headers()}")
        else:
            print(f"edgediag::{OP} library: {library_path()}")
    except CustomOpsUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
