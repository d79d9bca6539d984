"""Mamba building blocks: MambaMixer (+ streaming step), BiMambaMixer, SS2D.

Tolerances (|a - b| <= atol + rtol * |b|), fp32:

    what                                          rtol    atol
    backends against each other (ref/chunked/cpu) 1e-5    1e-5
    step() over a sequence vs forward()           1e-5    1e-5
    independent re-implementations (Vim, VMamba)  1e-5    1e-5
    ONNX Runtime vs PyTorch                       1e-5    1e-5
    gradients, chunked vs ref                     1e-4    1e-4
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from edgediag.nn import SS2D, BiMambaMixer, MambaMixer
from edgediag.ops import _cpu_ext, selective_scan_ref

TOL = dict(rtol=1e-5, atol=1e-5)
GRAD = dict(rtol=1e-4, atol=1e-4)


def _backends():
    names = ["ref", "chunked"]
    if _cpu_ext.load_extension() is not None:
        names.append("cpu")
    return names


@pytest.fixture
def mixer():
    torch.manual_seed(0)
    return MambaMixer(d_model=24, d_state=8, d_conv=4, expand=2, scan_backend="ref").eval()


# --------------------------------------------------------------------------- MambaMixer


def test_mixer_structure_and_init():
    torch.manual_seed(0)
    m = MambaMixer(d_model=32, d_state=16, dt_min=0.001, dt_max=0.1)
    assert (m.d_inner, m.d_state, m.dt_rank) == (64, 16, 2)
    assert m.in_proj.weight.shape == (128, 32)
    assert m.conv1d.weight.shape == (64, 1, 4) and m.conv1d.groups == 64
    assert m.x_proj.weight.shape == (2 + 32, 64)
    assert m.dt_proj.weight.shape == (64, 2)
    assert m.A_log.shape == (64, 16) and m.D.shape == (64,)
    assert m.out_proj.weight.shape == (32, 64)
    torch.testing.assert_close(m.A_log[5], torch.log(torch.arange(1, 17, dtype=torch.float32)))
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert torch.all(m.D == 1)
    small = MambaMixer(d_model=32, d_inner=40)
    assert small.d_inner == 40 and small.in_proj.out_features == 80 and small.A_log.shape == (40, 16)


def test_mixer_backends_agree(mixer):
    x = torch.randn(2, 37, 24)
    with torch.no_grad():
        ref = mixer(x)
        for backend in _backends():
            mixer.scan_backend = backend
            torch.testing.assert_close(mixer(x), ref, **TOL, msg=backend)
    assert ref.shape == (2, 37, 24)


def test_step_matches_forward(mixer):
    x = torch.randn(2, 29, 24)
    with torch.no_grad():
        full = mixer(x)
        conv_state, ssm_state = mixer.allocate_states(2)
        outs = []
        for t in range(x.shape[1]):
            y, conv_state, ssm_state = mixer.step(x[:, t], conv_state, ssm_state)
            outs.append(y)
        torch.testing.assert_close(torch.stack(outs, dim=1), full, **TOL)
        # the states forward() reports are the ones step() reached
        _, conv_f, ssm_f = mixer(x, return_states=True)
        torch.testing.assert_close(conv_f, conv_state, **TOL)
        torch.testing.assert_close(ssm_f, ssm_state, **TOL)


def test_prefill_then_stream(mixer):
    x = torch.randn(1, 40, 24)
    with torch.no_grad():
        full = mixer(x)
        head, conv_state, ssm_state = mixer(x[:, :2], return_states=True)  # shorter than d_conv
        torch.testing.assert_close(head, full[:, :2], **TOL)
        for t in range(2, 40):
            y, conv_state, ssm_state = mixer.step(x[:, t:t + 1], conv_state, ssm_state)  # (B, 1, C) form
            torch.testing.assert_close(y[:, 0], full[:, t], **TOL)


def test_step_is_functional(mixer):
    conv_state, ssm_state = mixer.allocate_states(3)
    conv_state.normal_()
    ssm_state.normal_()
    before = (conv_state.clone(), ssm_state.clone())
    with torch.no_grad():
        mixer.step(torch.randn(3, 24), conv_state, ssm_state)
    assert torch.equal(conv_state, before[0]) and torch.equal(ssm_state, before[1])
    assert conv_state.shape == (3, 48, 4) and ssm_state.shape == (3, 48, 8)


def test_mixer_gradients_chunked_vs_ref(mixer):
    x = torch.randn(2, 21, 24)
    grads = {}
    for backend in ("ref", "chunked"):
        m = copy.deepcopy(mixer).train()
        m.scan_backend = backend
        m(x).square().sum().backward()
        grads[backend] = {n: p.grad for n, p in m.named_parameters()}
    for name, g in grads["ref"].items():
        torch.testing.assert_close(grads["chunked"][name], g, **GRAD, msg=name)
    # 'auto' with parameters that need gradients must pick a differentiable backend
    m = copy.deepcopy(mixer).train()
    m.scan_backend = "auto"
    m(x).sum().backward()
    assert m.A_log.grad is not None and torch.isfinite(m.A_log.grad).all()


def test_inner_width_follows_parameters_after_pruning(mixer):
    """Channels removed in place (as a structured pruner does) and a module
    rebuilt with d_inner= from the pruned state dict give the same outputs."""
    keep = torch.arange(0, mixer.d_inner, 2)  # drop every second inner channel
    di = mixer.d_inner
    pruned = copy.deepcopy(mixer)
    with torch.no_grad():
        rows = torch.cat([keep, keep + di])  # x and z halves of in_proj
        pruned.in_proj.weight = torch.nn.Parameter(mixer.in_proj.weight[rows])
        conv = torch.nn.Conv1d(len(keep), len(keep), 4, groups=len(keep), padding=3)
        conv.weight.copy_(mixer.conv1d.weight[keep])
        conv.bias.copy_(mixer.conv1d.bias[keep])
        pruned.conv1d = conv
        pruned.x_proj.weight = torch.nn.Parameter(mixer.x_proj.weight[:, keep])
        pruned.dt_proj.weight = torch.nn.Parameter(mixer.dt_proj.weight[keep])
        pruned.dt_proj.bias = torch.nn.Parameter(mixer.dt_proj.bias[keep])
        pruned.A_log = torch.nn.Parameter(mixer.A_log[keep])
        pruned.D = torch.nn.Parameter(mixer.D[keep])
        pruned.out_proj.weight = torch.nn.Parameter(mixer.out_proj.weight[:, keep])
    rebuilt = MambaMixer(d_model=24, d_state=8, d_conv=4, scan_backend="ref", d_inner=len(keep)).eval()
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    x = torch.randn(2, 15, 24)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), rebuilt(x), rtol=0, atol=0)
        # streaming also works on the pruned module
        cs, ss = pruned.allocate_states(2)
        y, cs, ss = pruned.step(x[:, 0], cs, ss)
        torch.testing.assert_close(y, rebuilt(x[:, :1])[:, 0], **TOL)


# --------------------------------------------------------------------------- ONNX


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_mixer_forward_onnx(mixer):
    ort = pytest.importorskip("onnxruntime")
    mixer.scan_backend = "auto"  # must resolve to 'chunked' under export
    x = torch.randn(1, 50, 24)
    f = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(mixer, (x,), f, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
        ref = mixer(x)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), ref, **TOL)


class _Step(torch.nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, x_t, conv_state, ssm_state):
        return self.mixer.step(x_t, conv_state, ssm_state)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_step_onnx_with_states_as_io(mixer):
    ort = pytest.importorskip("onnxruntime")
    conv_state, ssm_state = mixer.allocate_states(2)
    f = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(_Step(mixer), (torch.randn(2, 24), conv_state, ssm_state), f, dynamo=False,
                          opset_version=17, input_names=["x_t", "conv_state", "ssm_state"],
                          output_names=["y_t", "new_conv_state", "new_ssm_state"])
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 12, 24)
    cs, ss = conv_state.numpy(), ssm_state.numpy()
    outs = []
    for t in range(12):
        y, cs, ss = sess.run(None, {"x_t": x[:, t].numpy(), "conv_state": cs, "ssm_state": ss})
        outs.append(torch.from_numpy(y))
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(outs, 1), mixer(x), **TOL)


# --------------------------------------------------------------------------- BiMambaMixer


def _direction(bi, suffix):
    """A MambaMixer holding one direction's parameters of a BiMambaMixer (shared projections)."""
    m = MambaMixer(bi.d_model, bi.d_state, bi.d_conv, bi.expand, dt_rank=bi.dt_rank, scan_backend="ref")
    m.in_proj, m.out_proj = bi.in_proj, bi.out_proj
    m.conv1d = getattr(bi, f"conv1d{suffix}")
    m.x_proj = getattr(bi, f"x_proj{suffix}")
    m.dt_proj = getattr(bi, f"dt_proj{suffix}")
    m.A_log = bi.A_log if not suffix else bi.A_b_log
    m.D = getattr(bi, f"D{suffix}")
    return m


@pytest.mark.parametrize("divide_out", [True, False])
def test_bimamba_is_mean_of_both_directions(divide_out):
    torch.manual_seed(1)
    bi = BiMambaMixer(d_model=16, d_state=4, divide_out=divide_out, scan_backend="ref").eval()
    x = torch.randn(2, 19, 16)
    with torch.no_grad():
        # out_proj has no bias: out_proj((y_f + y_b) / k) = (out_f + out_b) / k
        expected = _direction(bi, "")(x) + _direction(bi, "_b")(x.flip(1)).flip(1)
        if divide_out:
            expected = expected / 2
        torch.testing.assert_close(bi(x), expected, **TOL)
        ref = bi(x)
        for backend in _backends():
            bi.scan_backend = backend
            torch.testing.assert_close(bi(x), ref, **TOL, msg=backend)


def test_bimamba_has_no_step():
    bi = BiMambaMixer(d_model=16)
    with pytest.raises(TypeError, match="backward scan"):
        bi.step(torch.randn(1, 16), None, None)
    with pytest.raises(TypeError, match="backward scan"):
        bi.allocate_states(1)
    names = {n for n, _ in bi.named_parameters()}
    assert {"A_log", "A_b_log", "D", "D_b", "conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.bias"} <= names


# --------------------------------------------------------------------------- SS2D


def _ss2d_by_direction(m: SS2D, x_img: torch.Tensor) -> torch.Tensor:
    """SS2D written out direction by direction with explicit index orders and
    the reference scan, to check the packed cross-scan / cross-merge."""
    B, H, W, _ = x_img.shape
    L, d, N, R = H * W, m.d_inner, m.d_state, m.dt_rank
    xz = m.in_proj(x_img)
    x, z = xz.chunk(2, dim=-1)
    x = F.silu(m.conv2d(x.permute(0, 3, 1, 2))).reshape(B, d, L)  # row-major positions
    row_major = torch.arange(L)
    col_major = torch.arange(L).reshape(H, W).t().reshape(-1)     # visit column by column
    orders = [row_major, col_major, row_major.flip(0), col_major.flip(0)]
    y = torch.zeros(B, d, L)
    for k, order in enumerate(orders):
        xs = x[:, :, order]                                          # sequence in scan order
        x_dbl = torch.einsum("cd,bdl->bcl", m.x_proj_weight[k], xs)
        dt, Bk, Ck = torch.split(x_dbl, [R, N, N], dim=1)
        dt = torch.einsum("dr,brl->bdl", m.dt_projs_weight[k], dt)
        rows = slice(k * d, (k + 1) * d)
        yk = selective_scan_ref(xs, dt, -torch.exp(m.A_logs[rows]), Bk, Ck, m.Ds[rows],
                                delta_bias=m.dt_projs_bias[k], delta_softplus=True)
        y[:, :, order] += yk                                         # back to row-major positions
    y = m.out_norm(y.transpose(1, 2).reshape(B, H, W, d))
    return m.out_proj(y * F.silu(z))


def test_ss2d_structure():
    m = SS2D(d_model=32, d_state=8)
    d, K, R, N = 64, 4, 2, 8
    assert m.x_proj_weight.shape == (K, R + 2 * N, d)
    assert m.dt_projs_weight.shape == (K, d, R) and m.dt_projs_bias.shape == (K, d)
    assert m.A_logs.shape == (K * d, N) and m.Ds.shape == (K * d,)
    assert m.conv2d.weight.shape == (d, 1, 3, 3)
    assert SS2D(d_model=32, d_inner=20).A_logs.shape == (80, 16)


@pytest.mark.parametrize("hw", [(5, 7), (4, 4), (1, 6)])
def test_ss2d_matches_direction_by_direction(hw):
    torch.manual_seed(2)
    m = SS2D(d_model=12, d_state=4, scan_backend="ref").eval()
    x = torch.randn(2, *hw, 12)
    with torch.no_grad():
        out = m(x)
        assert out.shape == (2, *hw, 12)
        torch.testing.assert_close(out, _ss2d_by_direction(m, x), **TOL)
        for backend in _backends():
            m.scan_backend = backend
            torch.testing.assert_close(m(x), out, **TOL, msg=backend)


def test_ss2d_backward_runs():
    m = SS2D(d_model=8, d_state=4)
    m(torch.randn(1, 3, 4, 8)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (1, 2), (2, 1), (4, 4)])
def test_ss2d_training_path_matches_inference_path(hw):
    """On maps of at most 2 x 2, training takes the dense depthwise product and K products of
    B*L columns (edgediag.nn.depthwise, SS2D._per_direction); evaluation keeps the Conv and
    the batched matmul. Both give the same outputs and gradients."""
    torch.manual_seed(3)
    m = SS2D(d_model=16, d_state=1, scan_backend="chunked")
    x = torch.randn(5, *hw, 16)
    grads = {}
    for mode in ("train", "eval"):
        getattr(m, mode)()
        m.zero_grad()
        out = m(x)
        out.square().sum().backward()
        # A has no gradient on one position: the scan starts from a zero state
        grads[mode] = (out.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()})
    torch.testing.assert_close(grads["train"][0], grads["eval"][0], **TOL)
    assert sum(g is not None for g in grads["eval"][1].values()) >= len(grads["eval"][1]) - 1
    for name, g in grads["eval"][1].items():
        if g is None:
            assert grads["train"][1][name] is None, name
        else:
            torch.testing.assert_close(grads["train"][1][name], g, **GRAD, msg=name)
