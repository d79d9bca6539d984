"""The scan kernels without torch (kernels/scan_harness.cpp): forward vs a double-precision
reference and gradients vs finite differences, for every vector width the source compiles to.

- native x86 with the loader's flags (AVX2: 8 lanes), and plain SSE (4 lanes, NEON's shape);
- the older-GCC shuffle spelling (JetPack 5 ships GCC 9, without __builtin_shufflevector);
- aarch64 (Jetson's NEON build), cross-compiled and run under qemu-aarch64, when
  aarch64-linux-gnu-g++ and qemu-aarch64 are installed (`make arm64-check` installs them
  on Debian; CI does).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgediag.ops import _cpu_ext

HARNESS = Path(__file__).resolve().parents[1] / "kernels" / "scan_harness.cpp"


def _build_and_run(tmp_path, compiler, flags, runner=()):
    exe = tmp_path / "scan_harness"
    build = subprocess.run([compiler, "-std=c++17", "-O2", *flags, str(HARNESS), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "PASSED" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    return run.stdout


def _host_compiler():
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    return cxx


def test_harness_with_the_loaders_flags(tmp_path):
    flags = [f for f in _cpu_ext.compile_flags() if f.startswith("-m")]
    out = _build_and_run(tmp_path, _host_compiler(), flags)
    lanes = 8 if "-mavx2" in flags else 4
    assert f"{lanes} lanes of fp32" in out


def test_harness_four_lanes(tmp_path):
    """The 4-lane build (SSE here; the same code as NEON), the 4x4 transpose included."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the flag-less build is already the 4-lane one off x86")
    out = _build_and_run(tmp_path, _host_compiler(), [])
    assert "4 lanes of fp32" in out


def test_harness_with_the_older_gcc_shuffle(tmp_path):
    _build_and_run(tmp_path, _host_compiler(), ["-DEDGEDIAG_GCC_SHUFFLE"])


def test_onnx_runtime_op_builds_for_aarch64(tmp_path):
    """kernels/selective_scan_ort.cpp cross-compiled for the board: it reaches ONNX Runtime only
    through the C API's function table, so it links without an aarch64 onnxruntime."""
    from edgediag.runtime import custom_ops

    cross, headers = shutil.which("aarch64-linux-gnu-g++"), custom_ops.include_dir()
    if cross is None or headers is None:
        pytest.skip("needs aarch64-linux-gnu-g++ and the ONNX Runtime headers (make install fetches them)")
    lib = tmp_path / "libedgediag_ort_ops.so"
    build = subprocess.run([cross, "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", f"-I{headers}",
                            f"-I{custom_ops.KERNELS}", str(custom_ops.SOURCE), "-o", str(lib)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    symbols = subprocess.run(["readelf", "--dyn-syms", "-h", str(lib)], capture_output=True, text=True).stdout
    assert "AArch64" in symbols and " RegisterCustomOps" in symbols


def test_harness_on_aarch64_under_qemu(tmp_path):
    cross, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cross is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (`make arm64-check` installs them)")
    out = _build_and_run(tmp_path, cross, ["-static"], runner=[qemu])
    assert "4 lanes of fp32" in out
