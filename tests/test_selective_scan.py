"""Selective-scan backends against the sequential reference (mamba-ssm semantics).

Tolerance table (checked with torch.testing.assert_close, |a - b| <= atol + rtol * |b|):

    what                                    rtol     atol
    fp32 forward, every backend vs ref      1e-5     1e-5    (mamba-ssm's own test: 6e-4 / 2e-3)
    fp32 last_state vs ref                  1e-5     1e-5
    fp32 gradients, chunked vs ref          1e-4     1e-4    (mamba-ssm: 6e-4 / 2e-3)
    bf16 output (both cast from fp32)       1.6e-2   1e-2    (one bf16 ulp)
    ONNX Runtime vs PyTorch ref             1e-5     1e-5
    extreme inputs (delta up to 10,
        A down to -50)                      1e-5     1e-5, and everything finite

The three non-reference backends reorder the fp32 arithmetic (chunk
boundaries, a polynomial exp in the C++ kernel), so exact equality is not
expected; the benchmark script reports the norm-wise relative error
max|a - b| / max|ref| at the production size.
"""

from __future__ import annotations

import io
import itertools
import warnings

import pytest
import torch

from edgediag import ops
from edgediag.ops import (
    _cpu_ext,
    available_backends,
    resolve_backend,
    scan_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_cpu,
    selective_scan_cuda,
    selective_scan_ref,
)

FWD = dict(rtol=1e-5, atol=1e-5)
GRAD = dict(rtol=1e-4, atol=1e-4)
BF16 = dict(rtol=1.6e-2, atol=1e-2)

try:
    import mamba_ssm  # noqa: F401
    HAS_MAMBA = True
except Exception:
    HAS_MAMBA = False


def make_inputs(batch=2, dim=8, dstate=5, L=37, bc="var", groups=2, D=True, z=True, bias=True,
                seed=0, delta_scale=0.5, a_scale=0.5, requires_grad=False):
    """Inputs in the style of mamba-ssm's test_selective_scan.

    bc: "const" (D, N) B and C; "var" (B, N, L); "grouped" (B, G, N, L);
    "mixed" variable B with time-invariant C.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, uniform=False):
        t = (torch.rand(*shape, generator=g) if uniform else torch.randn(*shape, generator=g)) * scale
        return t.requires_grad_(requires_grad)

    def bc_tensor(kind):
        if kind == "const":
            return rnd(dim, dstate)
        if kind == "var":
            return rnd(batch, dstate, L)
        return rnd(batch, groups, dstate, L)

    kind_B = {"const": "const", "var": "var", "grouped": "grouped", "mixed": "var"}[bc]
    kind_C = {"const": "const", "var": "var", "grouped": "grouped", "mixed": "const"}[bc]
    return dict(
        u=rnd(batch, dim, L),
        delta=rnd(batch, dim, L, scale=delta_scale, uniform=True),
        A=(-a_scale * torch.rand(dim, dstate, generator=g)).requires_grad_(requires_grad),
        B=bc_tensor(kind_B),
        C=bc_tensor(kind_C),
        D=rnd(dim) if D else None,
        z=rnd(batch, dim, L) if z else None,
        delta_bias=rnd(dim, scale=0.1, uniform=True) if bias else None,
    )


@pytest.fixture(scope="module")
def cpu_ext():
    """The native kernel, built once per session (cached on disk across sessions)."""
    ext = _cpu_ext.load_extension()
    if ext is None:
        pytest.skip(f"native CPU selective scan could not be built: {_cpu_ext.build_error()}")
    return ext


def _run(backend, inputs, **kw):
    fn = {"chunked": selective_scan_chunked, "cpu": selective_scan_cpu, "ref": selective_scan_ref}[backend]
    return fn(**inputs, **kw)


# configurations: B/C layout x (D, z, bias+softplus) x return_last_state
CONFIGS = list(itertools.product(
    ["const", "var", "grouped", "mixed"],
    [(True, True, True, True), (False, False, False, False), (True, False, True, False), (False, True, False, True)],
    [False, True],
))


def _ids(cfg):
    bc, (D, z, bias, sp), last = cfg
    return f"{bc}-D{int(D)}z{int(z)}bias{int(bias)}sp{int(sp)}-last{int(last)}"


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_forward_matches_ref(backend, cfg, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_ext")
    bc, (D, z, bias, softplus), last = cfg
    inputs = make_inputs(bc=bc, D=D, z=z, bias=bias)
    kw = dict(delta_softplus=softplus, return_last_state=last)
    ref = _run("ref", inputs, **kw)
    out = _run(backend, inputs, **kw)
    if last:
        torch.testing.assert_close(out[0], ref[0], **FWD)
        torch.testing.assert_close(out[1], ref[1], **FWD)
        assert out[1].shape == (2, 8, 5)
    else:
        torch.testing.assert_close(out, ref, **FWD)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16, 32, 100])
@pytest.mark.parametrize("L", [1, 5, 32, 67])
def test_chunked_any_chunk_size(chunk_size, L):
    inputs = make_inputs(L=L, bc="grouped", groups=4)
    ref, ref_state = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    out, state = selective_scan_chunked(**inputs, delta_softplus=True, return_last_state=True,
                                        chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, **FWD)
    # padded steps have delta = 0: the final state must be that of step L
    torch.testing.assert_close(state, ref_state, **FWD)


def _traced_chunked(inputs: dict, **kw):
    """selective_scan_chunked on the exported graphs' path (its channels-last layout): run
    under torch.jit.trace, where is_tracing() holds, then the traced graph run again."""
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*tensors):
        return selective_scan_chunked(**dict(zip(names, tensors)), **kw)

    args = tuple(inputs[k].detach() for k in names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(fn, args, check_trace=False)
        return traced(*args)


@pytest.mark.parametrize("dstate", [1, 5])
@pytest.mark.parametrize("bc", ["const", "var", "grouped", "mixed"])
@pytest.mark.parametrize("chunk_size", [None, 4, 7, 64])
def test_export_layout_matches_ref(bc, dstate, chunk_size):
    """The exported graphs' layout (channels innermost, C_t . h_t as one batched MatMul; a
    product at d_state 1, as in MemoryMamba) against the reference: B/C time-invariant, variable,
    grouped and mixed, padded and unpadded lengths, batch 2, and the final state."""
    inputs = make_inputs(bc=bc, dstate=dstate, groups=4, L=37 if chunk_size != 64 else 64)
    ref, ref_state = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    out, state = _traced_chunked(inputs, delta_softplus=True, return_last_state=True, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, **FWD)
    torch.testing.assert_close(state, ref_state, **FWD)


def test_chunked_inference_scratch_is_not_aliased():
    """No-grad eager calls reuse per-thread scratch buffers: results must not
    alias them, and inference_mode / no_grad calls may alternate."""
    inputs, other = make_inputs(L=70, seed=1), make_inputs(L=70, seed=2)
    ref = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    with torch.inference_mode():
        first = selective_scan_chunked(**inputs, delta_softplus=True, return_last_state=True)
    with torch.no_grad():
        selective_scan_chunked(**other, delta_softplus=True, return_last_state=True)  # same shapes
    selective_scan_chunked(**other, delta_softplus=True)
    torch.testing.assert_close(first[0], ref[0], **FWD)
    torch.testing.assert_close(first[1], ref[1], **FWD)


@pytest.mark.parametrize("L", [1, 9, 64])
def test_cpu_lengths_and_state_sizes(cpu_ext, L):
    # N = 1, 8, 13, 40: one lane, one vector, padded vector, several vectors
    for dstate in (1, 8, 13, 40):
        inputs = make_inputs(L=L, dstate=dstate, bc="var")
        ref = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
        out = selective_scan_cpu(**inputs, delta_softplus=True, return_last_state=True)
        torch.testing.assert_close(out[0], ref[0], **FWD)
        torch.testing.assert_close(out[1], ref[1], **FWD)


@pytest.mark.parametrize("bc", ["const", "var", "grouped"])
def test_chunked_gradients_match_ref(bc):
    inputs = make_inputs(bc=bc, L=45, requires_grad=True)
    kw = dict(delta_softplus=True)
    out_ref = selective_scan_ref(**inputs, **kw)
    g = torch.randn_like(out_ref)
    names = [k for k, v in inputs.items() if v is not None]
    grads_ref = torch.autograd.grad(out_ref, [inputs[k] for k in names], g)
    out = selective_scan_chunked(**inputs, chunk_size=16, **kw)
    grads = torch.autograd.grad(out, [inputs[k] for k in names], g)
    for name, a, b in zip(names, grads, grads_ref):
        torch.testing.assert_close(a, b, **GRAD, msg=lambda m, name=name: f"d{name}: {m}")


def test_auto_is_differentiable():
    inputs = make_inputs(bc="var", requires_grad=True)
    want = "cpu" if _cpu_ext.load_extension() is not None else "chunked"  # the native backward when built
    assert resolve_backend("auto", inputs["u"], *inputs.values()) == want
    out = selective_scan(**inputs, delta_softplus=True)
    out.sum().backward()
    assert inputs["u"].grad is not None and torch.isfinite(inputs["u"].grad).all()


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
def test_extreme_inputs_finite_and_correct(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_ext")
    g = torch.Generator().manual_seed(3)
    for L in (1, 33, 100):  # L = 1, and L not a multiple of the chunk
        inputs = make_inputs(L=L, dim=16, bc="var", seed=L)
        # delta in [0, 10], A in [-50, 0]: delta*A down to -500, cumulative sums far past fp32 exp range
        inputs["delta"] = 10 * torch.rand(2, 16, L, generator=g)
        inputs["A"] = -50 * torch.rand(16, 5, generator=g)
        inputs["delta_bias"] = None
        ref = selective_scan_ref(**inputs, return_last_state=True)
        out = _run(backend, inputs, return_last_state=True)
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
        torch.testing.assert_close(out[0], ref[0], **FWD)
        torch.testing.assert_close(out[1], ref[1], **FWD)
        # softplus far above its threshold of 20, and far below 0
        inputs["delta_bias"] = torch.linspace(-40, 40, 16)
        ref = selective_scan_ref(**inputs, delta_softplus=True)
        out = _run(backend, inputs, delta_softplus=True)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, **FWD)


def test_naive_closed_form_would_overflow():
    """The reason for the chunked design: exp(-cumsum(delta*A)) overflows within one chunk."""
    inputs = make_inputs(L=32, dim=4, bc="var")
    inputs["delta"] = torch.full((2, 4, 32), 5.0)
    inputs["A"] = torch.full((4, 5), -10.0)
    cumsum = torch.cumsum(inputs["delta"][..., None] * inputs["A"][:, None, :], dim=2)
    assert torch.isinf(torch.exp(-cumsum)).any()  # what a closed form would divide by
    out = selective_scan_chunked(**inputs, chunk_size=32)
    torch.testing.assert_close(out, selective_scan_ref(**inputs), **FWD)


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
def test_low_precision_inputs(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_ext")
    inputs = make_inputs(bc="var")
    inputs = {k: (v.to(torch.bfloat16) if v is not None and k in ("u", "delta", "B", "C", "z") else v)
              for k, v in inputs.items()}
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    out = _run(backend, inputs, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), **BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_MAMBA,
                    reason="needs a CUDA device and the mamba-ssm package")
@pytest.mark.parametrize("bc", ["const", "var", "grouped"])
def test_cuda_matches_ref(bc):
    inputs = {k: (v.cuda() if v is not None else None) for k, v in make_inputs(bc=bc).items()}
    ref = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    out = selective_scan_cuda(**inputs, delta_softplus=True, return_last_state=True)
    # fused CUDA kernel: mamba-ssm's own fp32 tolerance
    torch.testing.assert_close(out[0], ref[0], rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(out[1], ref[1], rtol=6e-4, atol=2e-3)
    assert resolve_backend("auto", inputs["u"]) == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_MAMBA,
                    reason="needs a CUDA device and the mamba-ssm package")
def test_training_on_cuda_uses_the_kernel_and_its_gradients_match_ref():
    inputs = {k: (v.cuda().requires_grad_(k in ("u", "delta", "A", "B", "C", "D")) if v is not None else None)
              for k, v in make_inputs(bc="var").items()}
    assert resolve_backend("auto", inputs["u"], *inputs.values()) == "cuda"
    grads = []
    for fn in (selective_scan_cuda, selective_scan_ref):
        out = fn(**inputs, delta_softplus=True)
        g = torch.autograd.grad(out.square().sum(), [inputs[k] for k in ("u", "delta", "A", "B", "C", "D")])
        grads.append(g)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=5e-3)


def test_auto_sends_training_to_the_kernels(monkeypatch):
    """The dispatch rule alone (no GPU needed): a CUDA tensor that needs a gradient goes to
    mamba-ssm's differentiable kernel when it is importable; a CPU one to the native kernel
    (its own backward), or to the chunked scan where the extension is not built."""
    import importlib
    from types import SimpleNamespace

    scan = importlib.import_module("edgediag.ops.selective_scan")  # the module (the package exports the function)

    monkeypatch.delenv("EDGEDIAG_SCAN_BACKEND", raising=False)
    cuda_u = SimpleNamespace(device=SimpleNamespace(type="cuda"), requires_grad=True)
    monkeypatch.setattr(scan, "_mamba_scan_fn", lambda: object())
    assert resolve_backend("auto", cuda_u) == "cuda"
    cpu_u = torch.zeros(1, 2, 3, requires_grad=True)
    monkeypatch.setattr(scan._cpu_ext, "load_extension", lambda: object())
    assert resolve_backend("auto", cpu_u) == "cpu"
    monkeypatch.setattr(scan._cpu_ext, "load_extension", lambda: None)
    assert resolve_backend("auto", cpu_u) == "chunked"
    monkeypatch.setattr(scan, "_mamba_scan_fn", lambda: None)
    assert resolve_backend("auto", cuda_u) == "chunked"


# --------------------------------------------------------------------------- dispatch


def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv("EDGEDIAG_SCAN_BACKEND", raising=False)
    inputs = make_inputs()
    u = inputs["u"]
    assert resolve_backend("ref", u) == "ref"
    assert resolve_backend("auto", u) in ("cpu", "chunked")
    assert set(available_backends()) >= {"ref", "chunked"}
    monkeypatch.setenv("EDGEDIAG_SCAN_BACKEND", "ref")
    assert resolve_backend("auto", u) == "ref"
    with scan_backend("chunked"):  # the context manager wins over the variable
        assert resolve_backend("auto", u) == "chunked"
        assert resolve_backend("ref", u) == "ref"  # an explicit choice wins over both
    assert resolve_backend("auto", u) == "ref"
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        resolve_backend("fast", u)
    with pytest.raises(ValueError):
        with scan_backend("nope"):
            pass


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_auto_chunked_while_tracing(monkeypatch):
    monkeypatch.delenv("EDGEDIAG_SCAN_BACKEND", raising=False)
    inputs = make_inputs()
    seen = []

    def fn(u, delta):
        seen.append(resolve_backend("auto", u))
        return selective_scan(u, delta, inputs["A"], inputs["B"], inputs["C"])

    torch.jit.trace(fn, (inputs["u"], inputs["delta"]), check_trace=False)
    assert seen == ["chunked"]


def test_cpu_backend_refuses_tracing(cpu_ext):
    inputs = make_inputs()
    with pytest.raises(RuntimeError, match="cannot be traced"):
        torch.jit.trace(lambda u: selective_scan(u, *[inputs[k] for k in ("delta", "A", "B", "C")], backend="cpu"),
                        (inputs["u"],))


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    def broken_build(verbose):
        raise OSError("no compiler here")

    monkeypatch.setattr(_cpu_ext, "_build", broken_build)
    monkeypatch.setattr(_cpu_ext, "_module", None)
    monkeypatch.setattr(_cpu_ext, "_error", None)
    monkeypatch.setattr(_cpu_ext, "_warned", False)
    monkeypatch.delenv("EDGEDIAG_SCAN_BACKEND", raising=False)
    inputs = make_inputs()
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch 'chunked' backend"):
        assert resolve_backend("auto", inputs["u"]) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second time: silent
        out = selective_scan(**inputs)
    torch.testing.assert_close(out, selective_scan_ref(**inputs), **FWD)
    assert "cpu" not in available_backends()
    with pytest.raises(RuntimeError, match="no compiler here"):
        selective_scan(**inputs, backend="cpu")


def test_a_build_killed_while_holding_the_lock_does_not_block_the_next(tmp_path):
    """torch's lock file outlives a killed build (every later build then waited forever);
    the OS lock edgediag takes around the build is released with its dead holder, and the
    stale file is cleared under it."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys, time\nfrom pathlib import Path\nfrom edgediag.ops._cpu_ext import _exclusive\n"
            "with _exclusive(Path(sys.argv[1])):\n    (Path(sys.argv[1]) / 'lock').touch()\n"
            "    print('building', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        assert proc.stdout.readline().strip() == "building"
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "lock").exists()  # left behind, as by a killed torch build
    with _cpu_ext._exclusive(tmp_path):  # would block if the dead holder's lock were kept
        assert not (tmp_path / "lock").exists()


@pytest.mark.parametrize("bad", [
    dict(A=torch.zeros(7, 5)),
    dict(B=torch.zeros(2, 5, 36)),
    dict(C=torch.zeros(2, 3, 5, 37)),  # 3 groups do not divide 8 channels
    dict(D=torch.zeros(9)),
    dict(z=torch.zeros(2, 8, 36)),
])
def test_shape_errors(bad):
    inputs = make_inputs()
    inputs.update(bad)
    with pytest.raises(ValueError):
        selective_scan(**inputs, backend="chunked")


def test_public_names():
    for name in ("selective_scan", "selective_scan_ref", "selective_scan_chunked", "selective_scan_cpu",
                 "selective_scan_cuda", "available_backends", "scan_backend"):
        assert hasattr(ops, name)


# --------------------------------------------------------------------------- ONNX


class _ScanModule(torch.nn.Module):
    def __init__(self, dim, dstate, chunk_size=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(-0.5 * torch.rand(dim, dstate, generator=g) - 0.1)
        self.D = torch.nn.Parameter(torch.randn(dim, generator=g))
        self.delta_bias = torch.nn.Parameter(torch.linspace(-7, 1, dim))  # softplus down to 1e-3
        self.chunk_size = chunk_size

    def forward(self, u, delta, B, C, z):
        return selective_scan_chunked(u, delta, self.A, B, C, self.D, z, self.delta_bias, delta_softplus=True,
                                      return_last_state=True, chunk_size=self.chunk_size)


def _export(model, args):
    """Legacy TorchScript exporter (dynamo=False): it unrolls the Python chunk
    loops into a flat opset-17 graph with static shapes."""
    f = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, args, f, dynamo=False, opset_version=17,
                          input_names=["u", "delta", "B", "C", "z"], output_names=["y", "last_state"])
    return f.getvalue()


def _scan_args(dim, dstate, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, dim, L, generator=g), torch.randn(1, dim, L, generator=g),
            torch.randn(1, dstate, L, generator=g), torch.randn(1, dstate, L, generator=g),
            torch.randn(1, dim, L, generator=g))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_export_matches_pytorch():
    ort = pytest.importorskip("onnxruntime")
    model = _ScanModule(dim=16, dstate=6).eval()
    args = _scan_args(16, 6, L=75)  # not a multiple of the chunk
    proto = _export(model, args)
    sess = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    y, last = sess.run(None, {k: v.numpy() for k, v in zip(["u", "delta", "B", "C", "z"], args)})
    with torch.no_grad():
        ref_y, ref_last = selective_scan_ref(args[0], args[1], model.A, args[2], args[3], model.D, args[4],
                                             model.delta_bias, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(torch.from_numpy(y), ref_y, **FWD)
    torch.testing.assert_close(torch.from_numpy(last), ref_last, **FWD)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_node_count_grows_with_chunks_not_length():
    onnx = pytest.importorskip("onnx")
    counts = {}
    for L in (256, 512, 1024):
        model = _ScanModule(dim=4, dstate=4, chunk_size=32).eval()
        counts[L] = len(onnx.load_from_string(_export(model, _scan_args(4, 4, L))).graph.node)
    assert counts[1024] < 1000, counts
    per_chunk_512 = (counts[512] - counts[256]) / (512 // 32 - 256 // 32)
    per_chunk_1024 = (counts[1024] - counts[512]) / (1024 // 32 - 512 // 32)
    # affine in the number of chunks, a few nodes each (the carried-state update)
    assert per_chunk_512 == per_chunk_1024 and per_chunk_512 <= 8, counts


def test_export_chunk_size_minimises_the_graph():
    """While tracing, chunk_size=None takes export_chunk_size(L) ~ sqrt(L / 4): the exported
    graph is smaller than with the eager default (32) and stays exact."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    assert [ops.export_chunk_size(L) for L in (1, 16, 64, 256, 1024, 10 ** 6)] == [2, 2, 4, 8, 16, 64]
    args = _scan_args(8, 4, L=64)
    auto, fixed = _ScanModule(8, 4, chunk_size=None).eval(), _ScanModule(8, 4, chunk_size=32).eval()
    proto = _export(auto, args)
    assert len(onnx.load_from_string(proto).graph.node) < 0.5 * len(onnx.load_from_string(_export(fixed, args)).graph.node)
    y, _ = ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in zip(["u", "delta", "B", "C", "z"], args)})
    with torch.no_grad():
        ref = selective_scan_ref(args[0], args[1], auto.A, args[2], args[3], auto.D, args[4], auto.delta_bias,
                                 delta_softplus=True)
    torch.testing.assert_close(torch.from_numpy(y), ref, **FWD)
