"""Selective scan (the S6 operator of Mamba) with interchangeable backends.

Semantics follow mamba-ssm's ``selective_scan_fn`` / ``selective_scan_ref``::

    u, delta: (B, D, L)         A: (D, N) real
    B, C: (D, N) time-invariant, (B, N, L) variable, or (B, G, N, L) grouped
          (group g drives the D/G consecutive channels g*D/G ... (g+1)*D/G - 1)
    D, delta_bias: (D,)         z: (B, D, L)

    delta = softplus(delta + delta_bias)        (bias / softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   h_0 = 0
    y_t   = sum_n h_t[n] * C_t[n] + D * u_t,    out = y * silu(z)

computed in fp32 and cast back to ``u.dtype``; with ``return_last_state`` the
result is ``(out, h_L)`` with ``h_L`` of shape (B, D, N), fp32.

Backends (``available_backends()`` lists the usable ones):

``ref``      the sequential loop, ground truth (``selective_scan_ref``).
``chunked``  pure PyTorch, differentiable, ONNX-exportable (``selective_scan_chunked``).
``cpu``      native C++ kernel, forward only (``selective_scan_cpu``).
``cuda``     mamba-ssm's CUDA kernel when importable (``selective_scan_cuda``).

``backend="auto"`` picks: ``chunked`` while tracing/exporting or when a
gradient is needed, ``cuda`` for CUDA tensors when mamba-ssm is installed,
``cpu`` for CPU tensors when the extension builds, ``chunked`` otherwise.
The choice made by ``auto`` can be forced with the ``EDGEDIAG_SCAN_BACKEND``
environment variable or the ``scan_backend(...)`` context manager (the
context manager wins over the variable); an explicit ``backend=`` argument
other than ``auto`` always wins.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from edgediag.ops import _cpu_ext
from edgediag.utils import context_value

BACKENDS = ("ref", "chunked", "cpu", "cuda")
DEFAULT_CHUNK_SIZE = 32

_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgediag_scan_backend", default=None)


# --------------------------------------------------------------------------- checks


def _shape(x: Tensor) -> tuple[int, ...]:
    """Sizes as Python ints. While tracing they are tensors, and the scan is
    specialised to static shapes on purpose, so the TracerWarning is noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(int(s) for s in x.shape)


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D, z, delta_bias) -> None:
    if u.dim() != 3 or _shape(delta) != _shape(u):
        raise ValueError(f"u and delta must both be (batch, dim, L); got {_shape(u)} and {_shape(delta)}")
    batch, dim, L = _shape(u)
    if L < 1:
        raise ValueError("the sequence length L must be >= 1")
    if A.dim() != 2 or _shape(A)[0] != dim:
        raise ValueError(f"A must be (dim={dim}, N); got {_shape(A)}")
    if A.is_complex():
        raise ValueError("complex A is not supported")
    N = _shape(A)[1]
    for name, X in (("B", B), ("C", C)):
        shape = _shape(X)
        if len(shape) == 2:
            ok = shape == (dim, N)
        elif len(shape) == 3:
            ok = shape == (batch, N, L)
        elif len(shape) == 4:
            ok = shape[0] == batch and shape[2:] == (N, L) and shape[1] > 0 and dim % shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be (dim, N), (batch, N, L) or (batch, G, N, L) with G dividing dim "
                             f"(dim={dim}, N={N}, L={L}); got {shape}")
    for name, X in (("D", D), ("delta_bias", delta_bias)):
        if X is not None and _shape(X) != (dim,):
            raise ValueError(f"{name} must be ({dim},); got {_shape(X)}")
    if z is not None and _shape(z) != _shape(u):
        raise ValueError(f"z must be {_shape(u)}; got {_shape(z)}")


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype: torch.dtype) -> Tensor:
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype)


# --------------------------------------------------------------------------- ref


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The readable sequential scan: one step per time index, fp32 throughout."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u = u.float()
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    batch, dim, L = u.shape
    A = A.float()
    B, C = B.float(), C.float()
    # grouped (B, G, N, L): channel d uses group d // (dim / G)
    if B.dim() == 4:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
    if C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)

    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 2:
        deltaB_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)

    x = u.new_zeros((batch, dim, A.shape[1]))
    ys = []
    for i in range(L):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        if C.dim() == 2:
            y = torch.einsum("bdn,dn->bd", x, C)
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        ys.append(y)
    out = _finish(torch.stack(ys, dim=2), u, D, z, dtype_in)
    return (out, x) if return_last_state else out


# --------------------------------------------------------------------------- chunked


def _pad_time(x: Tensor, pad: int) -> Tensor:
    """Zeros appended on the last (time) axis. torch.cat rather than F.pad:
    the TorchScript ONNX exporter turns F.pad into ~8 unfolded shape nodes."""
    if not pad:
        return x
    # zeros shaped from x itself (not from traced sizes), so dynamic-batch graphs run at any batch
    zeros = (x[..., :1] * 0).expand(*([-1] * (x.dim() - 1)), pad)
    return torch.cat([x, zeros], dim=-1)


def _bc_time_major(X: Tensor, groups: int, heads: int, n_chunks: int, chunk: int, pad: int) -> Tensor:
    """B or C in the chunked layout (T, batch, G, H, N, n_chunks), broadcastable.

    Time-invariant (D, N) becomes (1, 1, G, H, N, 1); variable inputs become
    (T, batch, G, 1, N, n_chunks), a group's row shared by its H channels.
    """
    X = X.float()
    if X.dim() == 2:
        return X.reshape(1, 1, groups, heads, _shape(X)[-1], 1)
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if _shape(X)[1] != groups:  # a coarser grouping than the layout's: repeat groups
        X = X.repeat_interleave(groups // _shape(X)[1], dim=1)
    X = _pad_time(X, pad)
    N = _shape(X)[2]
    # -1, not the traced batch size: a graph exported with a dynamic batch axis must
    # run at any batch
    return X.reshape(-1, groups, N, n_chunks, chunk).permute(4, 0, 1, 2, 3).unsqueeze(3).contiguous()


_scratch = threading.local()
SCRATCH_LIMIT_BYTES = 512 * 2**20


def _scratch_pair(shape: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Two fp32 buffers for the decays and inputs of a no-grad eager call,
    kept per thread for the last shape used (up to SCRATCH_LIMIT_BYTES).

    They hold 2 x D*N*L floats (32 MB at d=256, L=1024). glibc returns freed
    blocks that large to the OS, and faulting fresh pages in again on every
    call cost more than the scan itself on the 2-core VM (~10k page faults,
    about 2x the run time); reusing the pair avoids it.
    """
    if 2 * 4 * math.prod(shape) > SCRATCH_LIMIT_BYTES:
        return torch.empty(shape, device=device), torch.empty(shape, device=device)
    key = (shape, device)
    cached = getattr(_scratch, "pair", None)
    if cached is None or cached[0] != key:
        # normal tensors even under inference_mode, so later no_grad calls may write them
        with torch.inference_mode(False):
            cached = (key, torch.empty(shape, device=device), torch.empty(shape, device=device))
        _scratch.pair = cached
    return cached[1], cached[2]


def _softplus_traceable(x: Tensor) -> Tensor:
    """softplus for exported graphs, to ~1 ulp with plain ONNX ops.

    ONNX Runtime's Softplus is slow and inaccurate for negative inputs
    (log(1 + e^x) rounds 1 + e^x: delta = 1e-3 loses 5 digits), and ONNX has
    no Log1p. With y = e^-|x| and w = fl(1 + y), the rounding error of w is
    exactly (w - 1) - y, and log1p(y) = log(w) - ((w - 1) - y) / w to second
    order in that error.
    """
    y = torch.exp(-x.abs())
    w = 1 + y
    return torch.relu(x) + (torch.log(w) - ((w - 1) - y) / w)


def export_chunk_size(L: int) -> int:
    """Chunk size of exported scans: the power of two nearest sqrt(L / 4), in [2, 64].

    An exported scan has ~10 nodes per step of a chunk (two passes) plus ~2 per chunk, so
    the node count is smallest near T = sqrt(L / 4), and at the batch sizes of edge
    inference ONNX Runtime's time follows the node count, not the FLOPs (equal for every T).
    Measured in ONNX Runtime (one exported scan, b1 d64 n16, one thread): L 64:
    T 4 1.1 ms vs T 32 5.5 ms; L 256: T 8 1.8 ms vs T 32 2.6 ms; L 1024 (d256): T 16 18.4 ms
    vs T 32 20.3 ms. Eager runs keep DEFAULT_CHUNK_SIZE (fewer, larger kernels win there).
    """
    return int(min(64, max(2, 2 ** round(math.log2(max(1.0, L / 4) ** 0.5)))))


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, chunk_size: int | None = None):
    """Pure-PyTorch scan, vectorised over all chunks at once, for autograd and ONNX export.

    L is padded to n_chunks * T (T = min(chunk_size, L)); padded steps have
    delta = 0, i.e. decay 1 and no input, so the final state is unchanged.
    Three passes, each a Python loop whose length is T or n_chunks, never L:

    1. every chunk scanned from a zero state, all chunks in parallel
       (T steps of (batch, D, N, n_chunks) work) -> each chunk's local end state;
    2. the carried state, chunk by chunk: h_in[c+1] = exp(A * sum_c delta) * h_in[c] + local_end[c]
       (n_chunks steps of (batch, D, N) work);
    3. the chunks re-scanned from their true initial states, emitting y_t.
       (Adding C_t . exp(A * cumsum(delta)) h_in to pass 1's outputs instead, by linearity,
       was 2.2-2.6x slower in ONNX Runtime: an extra exp over all D*N*L decays.)

    Only products of exp(delta * A) factors appear, as in the reference
    recurrence; nothing is divided by a decay, so there is no exp(-cumsum)
    overflow whatever delta * A is. (A masked T x T segment-sum form would
    need a (D, L, T, N) tensor: T times the work of the recurrence itself.)

    Exported, the graph has about 10 nodes per step of a chunk plus 2 per
    chunk (~560 at L=1024, T=32); ``chunk_size=None`` takes :func:`export_chunk_size`
    while tracing (the smallest graph) and ``DEFAULT_CHUNK_SIZE`` in eager runs.
    Layout (T, batch, G, H, N, n_chunks), H = D / G: the chunk index innermost
    keeps the per-step slabs dense and the broadcast multiplies on contiguous
    rows (measured faster, eager and in ONNX Runtime, than N or H innermost).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    tracing = is_tracing()
    if chunk_size is None:
        chunk_size = export_chunk_size(_shape(u)[2]) if tracing else DEFAULT_CHUNK_SIZE
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = _softplus_traceable(delta) if tracing else F.softplus(delta)
    # Python ints: the loop bounds must be static while tracing (the exported
    # graph is specialised to this L, which is what unrolling means)
    batch, dim, L = _shape(u)
    N = _shape(A)[1]
    T = min(int(chunk_size), L)
    n_chunks = -(-L // T)
    pad = n_chunks * T - L

    # Layout groups: the grouping of the variable B/C (lcm if they differ).
    gb = (_shape(B)[1] if B.dim() == 4 else 1) if B.dim() > 2 else None
    gc = (_shape(C)[1] if C.dim() == 4 else 1) if C.dim() > 2 else None
    groups = math.lcm(*[g for g in (gb, gc) if g is not None]) if (gb or gc) else 1
    heads = dim // groups

    delta_p = _pad_time(delta, pad)
    u_p = _pad_time(u, pad)

    def time_major(x: Tensor) -> Tensor:  # (batch, D, L') -> (T, batch, G, H, 1, n_chunks)
        # contiguous, so that each step t below reads one dense slab
        return x.reshape(-1, groups, heads, n_chunks, T).permute(4, 0, 1, 2, 3).unsqueeze(4).contiguous()

    A6 = A.float().reshape(1, 1, groups, heads, N, 1)
    dt = time_major(delta_p)
    du = time_major(delta_p * u_p)
    Bm = _bc_time_major(B, groups, heads, n_chunks, T, pad)
    Cm = _bc_time_major(C, groups, heads, n_chunks, T, pad)

    def steps(x: Tensor) -> list[Tensor]:
        # T slabs (1, b, G, H|1, N, c): split() is one ONNX Split node where
        # T indexing ops would be 2T nodes; time-invariant B/C: one slab for all t
        return list(x.split(1, dim=0)) if _shape(x)[0] > 1 else [x] * T

    inference = not tracing and not _needs_grad(u, delta, A, B, C)
    if tracing:
        # Per-step slabs from the small dt / B rows: in ONNX, splitting one big
        # (T, ...) tensor copies it, 2 x D*N*L floats. (Eager slices are views.)
        dA = [torch.exp(dt_t * A6) for dt_t in steps(dt)]
        dBu = [du_t * B_t for du_t, B_t in zip(steps(du), steps(Bm))]
    elif inference:
        dA, dBu = _scratch_pair((T, batch, groups, heads, N, n_chunks), u.device)
        dA = steps(torch.mul(dt, A6, out=dA).exp_())          # T x (1, b, G, H, N, c)
        dBu = steps(torch.mul(du, Bm, out=dBu))
    else:
        dA = steps((dt * A6).exp_())
        dBu = steps(du * Bm)
    Cs = steps(Cm)

    def step(t: int, h: Tensor) -> Tensor:  # dA_t * h + dBu_t, in place when nothing records it
        return torch.addcmul(dBu[t], dA[t], h, out=h) if inference else torch.addcmul(dBu[t], dA[t], h)

    # linalg.vecdot is one fused kernel in eager but has no ONNX symbolic
    if tracing:
        def dot(a, b):
            # d_state 1 (VMamba/MemoryMamba): a sum over one element is a squeeze, not a
            # ReduceSum node (ONNX Runtime copies through its generic reduction kernel)
            return (a * b).squeeze(-2) if N == 1 else (a * b).sum(-2)
    else:
        def dot(a, b):
            return torch.linalg.vecdot(a, b, dim=-2)

    h = dBu[0].clone() if inference else dBu[0]
    if n_chunks == 1:
        # One chunk starts from the zero state: passes 1 and 2 would only repeat pass 3
        # (half the work, and half the exported graph, for sequences up to chunk_size).
        ys = [dot(h, Cs[0])]
        for t in range(1, T):
            h = step(t, h)
            ys.append(dot(h, Cs[t]))
        state = h
    else:
        # 1. local end state of every chunk, from a zero state
        for t in range(1, T):
            h = step(t, h)
        # 2. carried state between chunks; a chunk's total decay is exp(A * sum(delta))
        chunk_decay = torch.exp(A6 * dt.sum(0, keepdim=True))     # (1, b, G, H, N, c)
        decays, local_ends = chunk_decay.split(1, dim=-1), h.split(1, dim=-1)
        state = torch.zeros_like(local_ends[0])
        starts = []
        for c in range(n_chunks):
            starts.append(state)
            state = decays[c] * state + local_ends[c]
        # 3. rescan each chunk from its true initial state
        h = torch.cat(starts, dim=-1)
        ys = []
        for t in range(T):
            h = step(t, h)
            ys.append(dot(h, Cs[t]))                             # (1, b, G, H, c)
    # (T, b, G, H, c) -> (b, G, H, c, T) = (b, D, L')
    y = torch.cat(ys, dim=0).permute(1, 2, 3, 4, 0).reshape(-1, dim, n_chunks * T)
    if pad:
        y = y[..., :L]
    out = _finish(y, u, D, z, dtype_in)
    if return_last_state:
        return out, state.reshape(-1, dim, N)
    return out


# --------------------------------------------------------------------------- cpu


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def is_tracing() -> bool:
    """Inside torch.jit.trace / ONNX export / torch.compile: graph-friendly code paths apply."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and (compiler.is_compiling() or
                                          getattr(compiler, "is_exporting", lambda: False)()))


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Native C++ forward kernel (inference only: no autograd, not traceable)."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type != "cpu":
        raise RuntimeError("the 'cpu' selective-scan backend needs CPU tensors")
    if _needs_grad(u, delta, A, B, C, D, z, delta_bias):
        raise RuntimeError("the 'cpu' selective-scan backend is forward-only; use backend='chunked' "
                           "(or 'auto') when gradients are needed")
    if is_tracing():
        raise RuntimeError("the 'cpu' selective-scan backend cannot be traced or exported; use 'chunked'")
    ext = _cpu_ext.load_extension()
    if ext is None:
        raise RuntimeError(f"the native CPU selective scan is unavailable: {_cpu_ext.build_error()}")
    res = ext.fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state))
    out = res[0].to(u.dtype)
    return (out, res[1]) if return_last_state else out


# --------------------------------------------------------------------------- cuda


@functools.lru_cache(maxsize=1)
def _mamba_scan_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return selective_scan_fn


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    """mamba-ssm's fused CUDA kernel (differentiable)."""
    fn = _mamba_scan_fn()
    if fn is None:
        raise RuntimeError("the 'cuda' selective-scan backend needs the mamba-ssm package")
    if u.device.type != "cuda":
        raise RuntimeError("the 'cuda' selective-scan backend needs CUDA tensors")
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    # the kernel expects fp32 D and delta_bias
    D = D.float() if D is not None else None
    delta_bias = delta_bias.float() if delta_bias is not None else None
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# --------------------------------------------------------------------------- dispatch

_FUNCTIONS = {
    "ref": selective_scan_ref,
    "chunked": selective_scan_chunked,
    "cpu": selective_scan_cpu,
    "cuda": selective_scan_cuda,
}


def available_backends() -> list[str]:
    """Backends usable in this process. Checking 'cpu' builds the extension
    on first call (cached afterwards); 'cuda' needs mamba-ssm and a GPU."""
    names = ["ref", "chunked"]
    if _cpu_ext.load_extension() is not None:
        names.append("cpu")
    if torch.cuda.is_available() and _mamba_scan_fn() is not None:
        names.append("cuda")
    return names


def _validate_backend(name: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"unknown selective-scan backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name


def forced_backend() -> str | None:
    """The backend 'auto' is currently forced to (context manager, then env var), if any."""
    name = _forced_backend.get() or os.environ.get("EDGEDIAG_SCAN_BACKEND") or None
    if name is None or name == "auto":
        return None
    return _validate_backend(name)


def scan_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Force what backend='auto' resolves to inside the block, e.g. for export:
    ``with scan_backend("chunked"): torch.onnx.export(...)``."""
    return context_value(_forced_backend, _validate_backend(name))


def resolve_backend(backend: str, u: Tensor, *tensors) -> str:
    """The concrete backend selective_scan(..., backend=backend) would run."""
    _validate_backend(backend)
    if backend != "auto":
        return backend
    forced = forced_backend()
    if forced is not None:
        return forced
    if is_tracing() or _needs_grad(u, *tensors):
        return "chunked"
    if u.device.type == "cuda" and _mamba_scan_fn() is not None:
        return "cuda"
    if u.device.type == "cpu" and _cpu_ext.load_extension() is not None:
        return "cpu"
    return "chunked"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: str = "auto"):
    """mamba-ssm ``selective_scan_fn`` semantics, on the chosen backend (see module docs)."""
    name = resolve_backend(backend, u, delta, A, B, C, D, z, delta_bias)
    return _FUNCTIONS[name](u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                            delta_softplus=delta_softplus, return_last_state=return_last_state)
