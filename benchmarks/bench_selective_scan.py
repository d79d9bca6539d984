"""pytest-benchmark suite for the selective scan and the Mamba blocks.

    pytest benchmarks/bench_selective_scan.py --benchmark-only

Scan size: b=1, d=256, n=16, L=1024, fp32 (variable B/C, D, z, softplus dt),
the shape of one Mamba block with d_model=128. ``scan_report.py`` prints the
same comparison as a table with errors against ``ref``.
"""

from __future__ import annotations

import pytest
import torch
from scan_report import ONNX_INPUTS, export_scan_onnx, make_inputs, ort_session  # beside this file

from edgediag.nn import SS2D, MambaMixer
from edgediag.ops import available_backends, selective_scan, selective_scan_chunked

BACKENDS = [name for name in ("ref", "chunked", "cpu", "cuda") if name in available_backends()]
BLOCK_BACKENDS = [name for name in ("chunked", "cpu", "cuda") if name in BACKENDS]


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


def _sync(backend, fn):
    if backend != "cuda":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out
    return synced


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan(benchmark, backend):
    inputs = make_inputs(device=_device(backend))
    benchmark.group = "selective_scan b1 d256 n16 L1024"
    fn = _sync(backend, lambda: selective_scan(**inputs, delta_softplus=True, backend=backend))
    with torch.no_grad():
        if backend == "ref":  # ~0.1 s a call: a few rounds are enough
            benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
        else:
            benchmark(fn)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_scan_chunk_sizes(benchmark, chunk_size):
    inputs = make_inputs()
    benchmark.group = "chunked: chunk size"
    with torch.no_grad():
        benchmark(lambda: selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=chunk_size))


def test_scan_onnxruntime(benchmark):
    pytest.importorskip("onnxruntime")
    inputs = make_inputs()
    sess = ort_session(export_scan_onnx(inputs), torch.get_num_threads())
    feeds = {k: inputs[k].numpy() for k in ONNX_INPUTS}
    benchmark.group = "selective_scan b1 d256 n16 L1024"
    benchmark(lambda: sess.run(None, feeds))


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_mamba_mixer(benchmark, backend):
    torch.manual_seed(0)
    block = MambaMixer(d_model=128, d_state=16, scan_backend=backend).eval().to(_device(backend))
    x = torch.randn(1, 1024, 128, device=_device(backend))
    benchmark.group = "MambaMixer d_model128 L1024"
    with torch.no_grad():
        benchmark(_sync(backend, lambda: block(x)))


def test_mamba_mixer_step(benchmark):
    torch.manual_seed(0)
    block = MambaMixer(d_model=128, d_state=16).eval()
    conv_state, ssm_state = block.allocate_states(1)
    x = torch.randn(1, 128)
    benchmark.group = "MambaMixer d_model128 one step"
    with torch.no_grad():
        benchmark(lambda: block.step(x, conv_state, ssm_state))


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_ss2d(benchmark, backend):
    torch.manual_seed(0)
    block = SS2D(d_model=64, d_state=16, scan_backend=backend).eval().to(_device(backend))
    x = torch.randn(1, 16, 16, 64, device=_device(backend))
    benchmark.group = "SS2D d_model64 16x16"
    with torch.no_grad():
        benchmark(_sync(backend, lambda: block(x)))
