"""The native CPU scan's backward, and its two layouts (padded state / lanes across channels).

Tolerance table (torch.testing.assert_close: |a - b| <= atol + rtol * |b|):

    what                                               rtol     atol
    fp32 gradients, native vs ref autograd             1e-4     1e-4    (mamba-ssm's test: 6e-4 / 2e-3)
    fp64 gradients, native vs finite differences       gradcheck: eps 1e-6, atol 1e-7, rtol 1e-5
    narrow (channel lanes) vs wide (padded) layout     1e-5     1e-5    (the same fp32 arithmetic, reordered;
                                                                         gradients summed over L, dA dD dbias dB dC:
                                                                         1e-4 / 1e-4, the sums' order differs)
    2 threads vs 1 (per-thread sums reduced)           1e-5     1e-5    (summed gradients: 1e-4 / 1e-4)
    forward's saved chunk states vs ref's states       1e-5     1e-5
    fp32 gradients over L 300, native vs ref           max|g - g_ref| / max|g_ref| <= 1e-5 (sums cancel)
    forward's pre-gate output vs ref without z         1e-4     1e-4
    backward from the forward's saved tensors vs       0        0       (the same operations on the same states)
      the whole row recomputed

The kernel itself is also tested without torch, on x86 and on aarch64 under qemu:
tests/test_scan_kernel_harness.py.
"""

from __future__ import annotations

import pytest
import torch

from edgediag.ops import selective_scan, selective_scan_cpu, selective_scan_ref
from tests.test_selective_scan import GRAD, make_inputs

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
LAYOUT = dict(rtol=1e-5, atol=1e-5)

pytestmark = pytest.mark.usefixtures("cpu_ext")


@pytest.fixture(scope="module")
def cpu_ext():
    from edgediag.ops import _cpu_ext

    ext = _cpu_ext.load_extension()
    if ext is None:
        pytest.skip(f"native CPU selective scan could not be built: {_cpu_ext.build_error()}")
    return ext


def _grads(fn, inputs, g, **kw):
    names = [k for k in NAMES if inputs[k] is not None]
    out = fn(**inputs, **kw)
    out = out[0] if isinstance(out, tuple) else out
    return dict(zip(names, torch.autograd.grad(out, [inputs[k] for k in names], g)))


# d_state 1-4 with 8 channels per group take the narrow layout (lanes across channels),
# others the padded one; "grouped" with 2 groups of 4 channels is wide even at N = 1
CASES = [(bc, dstate, dim, opts) for bc in ("const", "var", "grouped", "mixed") for dstate in (1, 3, 16)
         for dim in (8, 16) for opts in ((True, True, True, True), (False, False, False, False))]
# the wide backward takes the state two vectors at a time: an odd count of vectors (20 states:
# 3 of 8 lanes, 5 of 4) leaves a single one at the end
CASES += [(bc, 20, 8, (True, True, True, True)) for bc in ("const", "var")]


@pytest.mark.parametrize("bc,dstate,dim,opts", CASES,
                         ids=[f"{c[0]}-N{c[1]}-d{c[2]}-{'all' if c[3][0] else 'bare'}" for c in CASES])
def test_native_gradients_match_ref(bc, dstate, dim, opts):
    D, z, bias, softplus = opts
    inputs = make_inputs(bc=bc, dstate=dstate, dim=dim, L=45, D=D, z=z, bias=bias, requires_grad=True)
    g = torch.randn(2, dim, 45, generator=torch.Generator().manual_seed(1))
    want = _grads(selective_scan_ref, inputs, g, delta_softplus=softplus)
    got = _grads(selective_scan_cpu, inputs, g, delta_softplus=softplus)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == inputs[name].shape and got[name].dtype == inputs[name].dtype
        torch.testing.assert_close(got[name], want[name], **GRAD, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("bc,dstate,dim", [("var", 16, 4), ("grouped", 1, 16), ("mixed", 3, 8), ("const", 5, 4),
                                            ("var", 20, 4)])
def test_gradcheck_float64(bc, dstate, dim):
    """fp64 inputs run the same kernels in fp64: torch.autograd.gradcheck against finite differences."""
    inputs = {k: (v.double().requires_grad_(True) if v is not None else None)
              for k, v in make_inputs(bc=bc, dstate=dstate, dim=dim, L=11).items()}
    names = [k for k in NAMES if inputs[k] is not None]

    def fn(*xs):
        return selective_scan_cpu(**{**inputs, **dict(zip(names, xs))}, delta_softplus=True)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in names), eps=1e-6, atol=1e-7, rtol=1e-5)


# (d_state, dtype): chunks of 128 steps (N 16), 256 (N 8), 64 (N 20: 24 padded lanes; N 16 in fp64)
CHUNKED = [(16, torch.float32), (8, torch.float32), (20, torch.float32), (16, torch.float64)]


@pytest.mark.parametrize("dstate,dtype", CHUNKED, ids=[f"N{n}-{str(t)[6:]}" for n, t in CHUNKED])
def test_forward_saves_what_the_backward_reads(cpu_ext, dstate, dtype):
    """for_backward=True: the chunk states, (batch, dim, n_chunks, N padded), chunk c holding
    h after c*chunk steps, i.e. the reference's last state of the first c*chunk steps (zeros
    for c = 0); and the output before the z gate, y + D u (the reference without z)."""
    L = 300
    inputs = {k: v.to(dtype) if v is not None else None
              for k, v in make_inputs(bc="grouped", dstate=dstate, dim=8, L=L).items()}
    _, last, states, pregate = cpu_ext.fwd(*(inputs[k] for k in NAMES), True, True, True, True)
    torch.testing.assert_close(pregate, selective_scan_ref(**{**inputs, "z": None}, delta_softplus=True).to(dtype),
                               **GRAD)
    chunk = cpu_ext.chunk_steps(dstate, dtype == torch.float64)
    assert chunk % 64 == 0 and states.shape[:3] == (2, 8, -(-L // chunk)) and states.dtype == dtype
    assert (states[:, :, :, dstate:] == 0).all()  # padded lanes stay inert
    torch.testing.assert_close(states[:, :, 0, :dstate], torch.zeros(2, 8, dstate, dtype=dtype))
    for c in range(1, states.shape[2]):
        t = c * chunk
        prefix = {k: (v[..., :t] if v is not None and v.dim() >= 3 else v) for k, v in inputs.items()}
        want = selective_scan_ref(**prefix, delta_softplus=True, return_last_state=True)[1]
        torch.testing.assert_close(states[:, :, c, :dstate], want.to(dtype), **LAYOUT,
                                   msg=lambda m, c=c: f"chunk {c}: {m}")
    torch.testing.assert_close(last, states.new_tensor(selective_scan_ref(**inputs, delta_softplus=True,
                                                                          return_last_state=True)[1]), **LAYOUT)


@pytest.mark.parametrize("bc", ["var", "const", "grouped"])
@pytest.mark.parametrize("dstate,dtype", CHUNKED, ids=[f"N{n}-{str(t)[6:]}" for n, t in CHUNKED])
@pytest.mark.parametrize("L", [300, 256, 40])  # a partial last chunk; whole chunks; one short chunk
def test_backward_from_saved_states_equals_the_whole_row(cpu_ext, bc, dstate, dtype, L):
    """With the forward's chunk states the backward recomputes chunk by chunk, and with its
    pre-gate output it does not sum y again; without them, the whole row from h = 0. The
    same operations on the same states: the same numbers."""
    inputs = {k: v.to(dtype) if v is not None else None
              for k, v in make_inputs(bc=bc, dstate=dstate, dim=8, L=L).items()}
    args = [inputs[k] for k in NAMES]
    states, pregate = cpu_ext.fwd(*args, True, False, True, True)[-2:]
    dout = torch.randn_like(inputs["u"])
    whole = cpu_ext.bwd(*args, True, dout, True)
    for saved in ((states, None), (states, pregate)):
        chunked = cpu_ext.bwd(*args, True, dout, True, *saved)
        for name, a, b in zip(NAMES, chunked, whole):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name: f"d{n}: {m}")


def test_backward_rejects_saved_tensors_of_other_inputs(cpu_ext):
    inputs = make_inputs(bc="var", dstate=16, dim=8, L=300)
    args = [inputs[k] for k in NAMES]
    states, pregate = cpu_ext.fwd(*args, True, False, True, True)[-2:]
    dout = torch.randn_like(inputs["u"])
    with pytest.raises(RuntimeError, match="chunk_states must be the forward's"):
        cpu_ext.bwd(*args, True, dout, True, states[:, :, :2])
    with pytest.raises(RuntimeError, match="pregate must be the forward's"):
        cpu_ext.bwd(*args, True, dout, True, states, pregate[..., 1:])


@pytest.mark.parametrize("dstate", [16, 20])
def test_native_gradients_match_ref_over_several_chunks(dstate):
    """Through the autograd function (which saves the chunk states): L 300 is 3-5 chunks.
    Sums over 600 steps (dA reaches 1e4) cancel: the error is norm-wise, as scan_report's."""
    inputs = make_inputs(bc="var", dstate=dstate, dim=8, L=300, requires_grad=True)
    g = torch.randn(2, 8, 300, generator=torch.Generator().manual_seed(1))
    want = _grads(selective_scan_ref, inputs, g, delta_softplus=True)
    got = _grads(selective_scan_cpu, inputs, g, delta_softplus=True)
    for name in want:
        err = ((got[name] - want[name]).abs().max() / want[name].abs().max()).item()
        assert err <= 1e-5, f"d{name}: max|g - g_ref| / max|g_ref| = {err:.1e}"


def test_gradcheck_float64_over_several_chunks():
    """fp64, d_state 5 (8 padded lanes): chunks of 128 steps, L 150 is two."""
    inputs = {k: (v.double().requires_grad_(True) if v is not None else None)
              for k, v in make_inputs(bc="var", dstate=5, dim=2, batch=1, L=150).items()}
    names = [k for k in NAMES if inputs[k] is not None]

    def fn(*xs):
        return selective_scan_cpu(**{**inputs, **dict(zip(names, xs))}, delta_softplus=True)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in names), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dstate", [1, 2, 4])
def test_narrow_layout_equals_padded(cpu_ext, dstate):
    """The channel-lane layout (d_state <= 4) against the padded one, forced with narrow=False."""
    inputs = make_inputs(bc="grouped", groups=2, dstate=dstate, dim=32, L=67)  # 16 channels per group
    args = [inputs[k] for k in NAMES]
    fwd = {n: cpu_ext.fwd(*args, True, True, n) for n in (True, False)}
    for a, b in zip(fwd[True], fwd[False]):
        torch.testing.assert_close(a, b, **LAYOUT)
    dout = torch.randn_like(inputs["u"])
    bwd = {n: cpu_ext.bwd(*args, True, dout, n) for n in (True, False)}
    for name, a, b in zip(NAMES, bwd[True], bwd[False]):
        tol = LAYOUT if name in ("u", "delta", "z") else GRAD  # others are sums over L in another order
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dstate", [1, 16])
def test_threads_give_the_same_gradients(dstate):
    """Shared parameters' gradients are summed per thread, then reduced: 1 and 2 threads agree."""
    inputs = make_inputs(bc="var", dstate=dstate, dim=32, L=50, requires_grad=True)
    g = torch.randn_like(inputs["u"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(selective_scan_cpu, inputs, g, delta_softplus=True)
        torch.set_num_threads(2)
        two = _grads(selective_scan_cpu, inputs, g, delta_softplus=True)
    finally:
        torch.set_num_threads(before)
    for name in one:
        tol = LAYOUT if name in ("u", "delta", "z") else GRAD
        torch.testing.assert_close(two[name], one[name], **tol, msg=lambda m, n=name: f"d{n}: {m}")


def test_training_step_through_auto_uses_the_native_backward(monkeypatch):
    """A Mamba-style parameter set trained through backend='auto' on the CPU: the native
    kernel runs (no chunked fallback) and the loss falls."""
    import importlib

    scan = importlib.import_module("edgediag.ops.selective_scan")
    monkeypatch.delenv("EDGEDIAG_SCAN_BACKEND", raising=False)
    calls = []
    real = scan._FUNCTIONS["cpu"]
    monkeypatch.setitem(scan._FUNCTIONS, "cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = make_inputs(bc="var", dstate=4, dim=16, L=32)
    A_log = torch.zeros(16, 4, requires_grad=True)
    D = torch.ones(16, requires_grad=True)
    target = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam([A_log, D], lr=0.05)
    losses = []
    for _ in range(20):
        out = selective_scan(inputs["u"], inputs["delta"], -torch.exp(A_log), inputs["B"], inputs["C"], D,
                             delta_softplus=True)
        loss = (out - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(calls) == 20
    assert losses[-1] < 0.9 * losses[0]


def test_last_state_is_returned_without_a_gradient():
    inputs = make_inputs(bc="var", requires_grad=True)
    out, last = selective_scan_cpu(**inputs, delta_softplus=True, return_last_state=True)
    assert not last.requires_grad
    ref_last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)[1]
    torch.testing.assert_close(last, ref_last.detach(), **LAYOUT)
    out.sum().backward()
    assert torch.isfinite(inputs["u"].grad).all()


def test_bf16_inputs_get_bf16_gradients():
    inputs = make_inputs(bc="var", requires_grad=False)
    inputs = {k: (v.to(torch.bfloat16).requires_grad_(True) if v is not None and k in ("u", "delta", "z") else v)
              for k, v in inputs.items()}
    out = selective_scan_cpu(**inputs, delta_softplus=True)
    out.float().sum().backward()
    for k in ("u", "delta", "z"):
        assert inputs[k].grad.dtype == torch.bfloat16 and torch.isfinite(inputs[k].grad.float()).all()
