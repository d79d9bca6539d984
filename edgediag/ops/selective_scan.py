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
``cpu``      native C++ kernel, fused forward and backward (``selective_scan_cpu``).
``cuda``     mamba-ssm's CUDA kernel when importable (``selective_scan_cuda``).
``onnx_op``  export only: one ``edgediag::SelectiveScan`` node, ONNX Runtime's custom op
             (``edgediag.ops.scan_onnx_op``; values computed by ``chunked``).

``backend="auto"`` picks: ``chunked`` while tracing/exporting; ``cuda`` for CUDA
tensors when mamba-ssm is installed; ``cpu`` for CPU tensors when the extension builds;
``chunked`` otherwise. Both kernels have a fused backward, so training takes them too.
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
from edgediag.ops.flops import observed_scan
from edgediag.ops.scan_onnx_op import selective_scan_onnx_op
from edgediag.utils import context_value

BACKENDS = ("ref", "chunked", "cpu", "cuda", "onnx_op")
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


def _grouped(X: Tensor, groups: int) -> Tensor:
    """Variable B or C as (batch, groups, N, L) fp32; a coarser grouping is repeated."""
    X = X.float()
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if _shape(X)[1] != groups:
        X = X.repeat_interleave(groups // _shape(X)[1], dim=1)
    return X


def _bc_time_major(X: Tensor, groups: int, heads: int, n_chunks: int, chunk: int, pad: int) -> Tensor:
    """B or C in the eager layout (T, batch, G, H, N, n_chunks), broadcastable.

    Time-invariant (D, N) becomes (1, 1, G, H, N, 1); variable inputs become
    (T, batch, G, 1, N, n_chunks), a group's row shared by its H channels.
    """
    if X.dim() == 2:
        return X.float().reshape(1, 1, groups, heads, _shape(X)[-1], 1)
    X = _pad_time(_grouped(X, groups), pad)
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
    the node count is smallest near T = sqrt(L / 4); every T does the same FLOPs.
    ONNX Runtime, one exported scan, batch 1, one thread, CPU-clock medians:
    L 32 (d 128, N 16): T 2 0.51, **T 4 0.48**, T 8 0.50 ms;
    L 64 (d 192, N 16, 2 groups, a BiMambaMixer): T 2 1.21, **T 4 1.09**, T 8 1.08, T 16 1.22 ms;
    L 256 (d 512, N 1, 4 groups, MemoryMamba's SS2D): T 4 2.92, **T 8 2.85**, T 16 3.04 ms.
    Eager runs keep DEFAULT_CHUNK_SIZE (fewer, larger kernels win there).
    """
    return int(min(64, max(2, 2 ** round(math.log2(max(1.0, L / 4) ** 0.5)))))


def _three_passes(dA: list[Tensor], dBu: list[Tensor], Cs: list[Tensor], dot, chunk_decay, chunk_dim: int,
                  n_chunks: int, in_place: bool) -> tuple[list[Tensor], Tensor]:
    """The chunked recurrence over per-step slabs that hold every chunk (any layout): the T
    outputs dot(h_t, C_t) and the final state. ``chunk_decay()`` gives each chunk's total
    decay exp(A * sum(delta)), chunks along ``chunk_dim`` as in the slabs."""
    T = len(dA)

    def step(t: int, h: Tensor) -> Tensor:  # dA_t * h + dBu_t, in place when nothing records it
        return torch.addcmul(dBu[t], dA[t], h, out=h) if in_place else torch.addcmul(dBu[t], dA[t], h)

    h = dBu[0].clone() if in_place else dBu[0]
    if n_chunks == 1:
        # One chunk starts from the zero state: passes 1 and 2 would only repeat pass 3
        # (half the work, and half the exported graph, for sequences up to chunk_size).
        ys = [dot(h, Cs[0])]
        for t in range(1, T):
            h = step(t, h)
            ys.append(dot(h, Cs[t]))
        return ys, h
    # 1. local end state of every chunk, from a zero state
    for t in range(1, T):
        h = step(t, h)
    # 2. carried state between chunks
    decays, local_ends = chunk_decay().split(1, dim=chunk_dim), h.split(1, dim=chunk_dim)
    state = torch.zeros_like(local_ends[0])
    starts = []
    for c in range(n_chunks):
        starts.append(state)
        state = decays[c] * state + local_ends[c]
    # 3. rescan each chunk from its true initial state
    h = torch.cat(starts, dim=chunk_dim)
    ys = []
    for t in range(T):
        h = step(t, h)
        ys.append(dot(h, Cs[t]))
    return ys, state


def _scan_eager_layout(delta: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor, groups: int, T: int,
                       n_chunks: int, pad: int, inference: bool) -> tuple[Tensor, Tensor]:
    """Eager runs: slabs (1, batch, G, H, N, n_chunks), the chunk index innermost (measured
    faster in eager than N or H innermost: dense slabs, broadcasts on contiguous rows).
    delta, du: padded (batch, D, L'). Returns y (batch, D, L') and the state (batch, D, N)."""
    dim, N = _shape(A)
    heads = dim // groups

    def time_major(x: Tensor) -> Tensor:  # (batch, D, L') -> (T, batch, G, H, 1, n_chunks)
        # contiguous, so that each step t below reads one dense slab
        return x.reshape(-1, groups, heads, n_chunks, T).permute(4, 0, 1, 2, 3).unsqueeze(4).contiguous()

    def steps(x: Tensor) -> list[Tensor]:  # T slabs; time-invariant B/C: one slab for all t
        return list(x.split(1, dim=0)) if _shape(x)[0] > 1 else [x] * T

    A6 = A.reshape(1, 1, groups, heads, N, 1)
    dt, du = time_major(delta), time_major(du)
    Bm = _bc_time_major(B, groups, heads, n_chunks, T, pad)
    if inference:
        dA, dBu = _scratch_pair((T, _shape(du)[1], groups, heads, N, n_chunks), du.device)
        dA = steps(torch.mul(dt, A6, out=dA).exp_())
        dBu = steps(torch.mul(du, Bm, out=dBu))
    else:
        dA = steps((dt * A6).exp_())
        dBu = steps(du * Bm)
    Cs = steps(_bc_time_major(C, groups, heads, n_chunks, T, pad))
    ys, state = _three_passes(dA, dBu, Cs, lambda h, c: torch.linalg.vecdot(h, c, dim=-2),
                              lambda: torch.exp(A6 * dt.sum(0, keepdim=True)), -1, n_chunks, inference)
    # (T, b, G, H, c) -> (b, G, H, c, T) = (b, D, L')
    return torch.cat(ys, dim=0).permute(1, 2, 3, 4, 0).reshape(-1, dim, n_chunks * T), state.reshape(-1, dim, N)


def _scan_export_layout(delta: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor, groups: int, T: int,
                        n_chunks: int, pad: int) -> tuple[Tensor, Tensor]:
    """Exported graphs: state slabs (batch, n_chunks, G, N, H), the channels innermost.

    ONNX Runtime runs a broadcast whose operand repeats along an inner axis span by span;
    with the chunk index innermost those spans are n_chunks long and every decay, input
    and output product costs ~3x a plain Mul. Here operands repeat along outer axes or
    over whole channel rows; the time steps are split out of channels-last (batch,
    chunks, T, D) tensors, copies of whole rows, with no 5-D transpose (the transposes
    to channels-last cancel against the mixers' own); and y_t = C_t . h_t is one batched
    MatMul, not a product and a ReduceSum over a middle axis (d_state 1: a product and a
    reshape). Measurements: export/README.md, "Latency measured".
    """
    dim, N = _shape(A)
    heads = dim // groups

    def steps(x: Tensor) -> list[Tensor]:  # (batch, D, L') -> T slabs (batch, n_chunks, G, 1, H)
        x = x.transpose(1, 2).reshape(-1, n_chunks, T, dim)
        return [s.reshape(-1, n_chunks, groups, 1, heads) for s in x.split(1, dim=2)]

    def bc_steps(X: Tensor, shape: tuple[int, int, int]) -> list[Tensor]:
        """T slabs (batch, n_chunks, *shape) of a variable B/C, shape (G, N, 1) or (G, 1, N);
        time-invariant (D, N): one (1, 1, G, N, H) slab for all t."""
        if X.dim() == 2:
            return [X.float().reshape(groups, heads, N).transpose(1, 2).reshape(1, 1, groups, N, heads)] * T
        X = _pad_time(_grouped(X, groups), pad).permute(0, 3, 1, 2).reshape(-1, n_chunks, T, groups, N)
        return [s.reshape(-1, n_chunks, *shape) for s in X.split(1, dim=2)]

    A5 = A.reshape(groups, heads, N).transpose(1, 2).reshape(1, 1, groups, N, heads)
    # per-step decays from the small delta rows: an exp over one big (T, ...) tensor
    # would then be split, i.e. copied (eager slices are views; ONNX splits copy)
    dA = [torch.exp(dt_t * A5) for dt_t in steps(delta)]
    dBu = [du_t * B_t for du_t, B_t in zip(steps(du), bc_steps(B, (groups, N, 1)))]
    Cs = bc_steps(C, (groups, 1, N))
    if N == 1:  # VMamba/MemoryMamba: nothing to sum (-9 % on memorymamba_nano's graph)
        def dot(h, c):
            return (h * c).reshape(-1, n_chunks, 1, dim)
    elif C.dim() > 2:
        def dot(h, c):  # (b, chunks, G, 1, N) @ (b, chunks, G, N, H): y_t = C_t . h_t as one MatMul
            return torch.matmul(c, h).reshape(-1, n_chunks, 1, dim)
    else:
        ones = torch.ones(1, N, device=A.device)

        def dot(h, c):  # time-invariant C, one row per channel: a product, then the sum over N
            return torch.matmul(ones, h * c).reshape(-1, n_chunks, 1, dim)

    def chunk_decay() -> Tensor:
        sums = delta.transpose(1, 2).reshape(-1, n_chunks, T, dim).sum(2)  # (batch, n_chunks, D)
        return torch.exp(sums.reshape(-1, n_chunks, groups, 1, heads) * A5)

    ys, state = _three_passes(dA, dBu, Cs, dot, chunk_decay, 1, n_chunks, in_place=False)
    y = torch.cat(ys, dim=2).reshape(-1, n_chunks * T, dim).transpose(1, 2)
    return y, state.reshape(-1, groups, N, heads).transpose(2, 3).reshape(-1, dim, N)


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
    The slabs' layout differs between eager runs and exported graphs, each the faster
    in its runtime (:func:`_scan_eager_layout`, :func:`_scan_export_layout`).
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
    L = _shape(u)[2]
    T = min(int(chunk_size), L)
    n_chunks = -(-L // T)
    pad = n_chunks * T - L

    # Layout groups: the grouping of the variable B/C (lcm if they differ).
    gb = (_shape(B)[1] if B.dim() == 4 else 1) if B.dim() > 2 else None
    gc = (_shape(C)[1] if C.dim() == 4 else 1) if C.dim() > 2 else None
    groups = math.lcm(*[g for g in (gb, gc) if g is not None]) if (gb or gc) else 1

    delta_p = _pad_time(delta, pad)
    du = delta_p * _pad_time(u, pad)
    if tracing:
        y, state = _scan_export_layout(delta_p, du, A.float(), B, C, groups, T, n_chunks, pad)
    else:
        inference = not _needs_grad(u, delta, A, B, C)
        y, state = _scan_eager_layout(delta_p, du, A.float(), B, C, groups, T, n_chunks, pad, inference)
    if pad:
        y = y[..., :L]
    out = _finish(y, u, D, z, dtype_in)
    if return_last_state:
        return out, state
    return out


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def is_tracing() -> bool:
    """Inside torch.jit.trace / ONNX export / torch.compile: graph-friendly code paths apply."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and (compiler.is_compiling() or
                                          getattr(compiler, "is_exporting", lambda: False)()))


class _CpuScanFunction(torch.autograd.Function):
    """The native kernel with its native backward. Saved: the inputs, the state entering
    each chunk of about 128 steps (N/128 of u's size) and, with z, the output before the
    gate (both None for d_state <= 4); the backward recomputes the states chunk by chunk
    from them (no B*D*L*N tensor between the passes), as mamba-ssm's CUDA backward does."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        ext = _cpu_ext.load_extension()
        res = ext.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, for_backward=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, *res[-2:])
        ctx.delta_softplus = delta_softplus
        out = res[0].to(u.dtype)
        if return_last_state:
            ctx.mark_non_differentiable(res[1])  # as mamba-ssm: no gradient through the last state
            return out, res[1]
        return out

    @staticmethod
    def backward(ctx, dout, *_):
        u, delta, A, B, C, D, z, delta_bias, chunk_states, pregate = ctx.saved_tensors
        grads = _cpu_ext.load_extension().bwd(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, dout,
                                              chunk_states=chunk_states, pregate=pregate)
        inputs = (u, delta, A, B, C, D, z, delta_bias)
        cast = [None if x is None else g.to(x.dtype) for g, x in zip(grads, inputs)]
        return (*cast, None, None)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Native C++ kernel: fused forward, and a fused backward when gradients are needed
    (not traceable: exported graphs use 'chunked')."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type != "cpu":
        raise RuntimeError("the 'cpu' selective-scan backend needs CPU tensors")
    if is_tracing():
        raise RuntimeError("the 'cpu' selective-scan backend cannot be traced or exported; use 'chunked'")
    ext = _cpu_ext.load_extension()
    if ext is None:
        raise RuntimeError(f"the native CPU selective scan is unavailable: {_cpu_ext.build_error()}")
    if _needs_grad(u, delta, A, B, C, D, z, delta_bias):
        return _CpuScanFunction.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                      bool(return_last_state))
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
    "onnx_op": functools.partial(selective_scan_onnx_op, selective_scan_chunked),
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
    if is_tracing():
        return "chunked"
    if u.device.type == "cuda" and _mamba_scan_fn() is not None:
        return "cuda"  # differentiable (its own fused backward): training takes it too
    if u.device.type == "cpu" and _cpu_ext.load_extension() is not None:
        return "cpu"  # with its native backward when gradients are needed
    return "chunked"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: str = "auto"):
    """mamba-ssm ``selective_scan_fn`` semantics, on the chosen backend (see module docs)."""
    name = resolve_backend(backend, u, delta, A, B, C, D, z, delta_bias)
    fn = _FUNCTIONS[name]
    # A FLOP counter (edgediag.measure.cost) observes the call: it counts the scan by formula.
    return observed_scan(lambda: fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                    delta_softplus=delta_softplus, return_last_state=return_last_state), u, A, D, z)
