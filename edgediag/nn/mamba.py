"""Mamba building blocks on top of ``edgediag.ops.selective_scan``.

* ``MambaMixer``   - the Mamba (S6) mixer of mamba-ssm's ``Mamba`` block, with a
  functional ``step()`` for streaming inference / ONNX export with explicit states.
* ``BiMambaMixer`` - bidirectional variant in the Vision-Mamba ("bimamba v2") style.
* ``SS2D``         - VMamba's 2D selective scan over 4 cross-scan directions.

Parameter and attribute names follow mamba-ssm / Vim / VMamba so checkpoints
map over and structured pruners can address the inner-channel group: in a
``MambaMixer`` the x and z halves of ``in_proj``'s outputs, ``conv1d``
channels, ``x_proj`` inputs, ``dt_proj`` outputs (and bias), ``A_log`` rows,
``D`` and ``out_proj`` inputs all index the same ``d_inner`` channels. The
forward passes read sizes from the parameters, not from the constructor
arguments, so a module pruned in place keeps working; ``d_inner=`` rebuilds one
at a pruned width from a saved config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgediag.nn.depthwise import depthwise_conv_cl
from edgediag.ops import selective_scan

__all__ = ["MambaMixer", "BiMambaMixer", "SS2D", "inner_channel_tensors"]


def _resolve_dt_rank(dt_rank, d_model: int) -> int:
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


class _ScanMixer(nn.Module):
    """The size attributes every mixer keeps (mamba-ssm names) and its scan backend; d_inner
    overrides expand (pruned widths)."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: float, dt_rank, d_inner: int | None,
                 scan_backend: str):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(d_inner) if d_inner is not None else int(expand * d_model)
        self.dt_rank = _resolve_dt_rank(dt_rank, d_model)
        self.scan_backend = scan_backend


def _dt_bias(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float) -> Tensor:
    """mamba-ssm's dt init: dt ~ log-uniform in [dt_min, dt_max] (floored),
    returned as the bias b with softplus(b) = dt."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


def _A_log_init(d_inner: int, d_state: int) -> Tensor:
    # S4D-real init: A = -(1, 2, ..., N) for every channel
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1).contiguous()


def _init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_scale: float, dt_init: str,
                  dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    std = dt_rank ** -0.5 * dt_scale
    if dt_init == "constant":
        nn.init.constant_(dt_proj.weight, std)
    elif dt_init == "random":
        nn.init.uniform_(dt_proj.weight, -std, std)
    else:
        raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
    with torch.no_grad():
        dt_proj.bias.copy_(_dt_bias(dt_proj.out_features, dt_min, dt_max, dt_init_floor))
    dt_proj.bias._no_reinit = True  # mamba-ssm convention: keep through re-initialisation


def _direction(mixer: nn.Module, suffix: str, conv_bias: bool, dt_init_args: tuple) -> None:
    """One scan direction's parameters (conv1d, x_proj, dt_proj, A_log, D), suffixed as in
    Vim ("" forward, "_b" backward): MambaMixer has one direction, BiMambaMixer two."""
    d_inner, d_state, R = mixer.d_inner, mixer.d_state, mixer.dt_rank
    conv = nn.Conv1d(d_inner, d_inner, kernel_size=mixer.d_conv, groups=d_inner, padding=mixer.d_conv - 1,
                     bias=conv_bias)
    x_proj = nn.Linear(d_inner, R + 2 * d_state, bias=False)  # before dt_proj: the seeded init order
    dt_proj = nn.Linear(R, d_inner, bias=True)
    _init_dt_proj(dt_proj, R, *dt_init_args)
    A_log = nn.Parameter(_A_log_init(d_inner, d_state))
    A_log._no_weight_decay = True
    D = nn.Parameter(torch.ones(d_inner))
    D._no_weight_decay = True
    setattr(mixer, f"conv1d{suffix}", conv)
    setattr(mixer, f"x_proj{suffix}", x_proj)
    setattr(mixer, f"dt_proj{suffix}", dt_proj)
    setattr(mixer, "A_log" if not suffix else f"A{suffix}_log", A_log)
    setattr(mixer, f"D{suffix}", D)


# --- the inner (d_inner) channels -----------------------------------------------------------
# (parameter name, dim, stacked copies, ranks channels) of every tensor holding a mixer's
# d_inner channels. The one description that structured pruning, dynamic pruning's slicing
# and LDMamba's screening groups all use; a bias or norm affine is sliced but does not rank.
def _mixer_layout(mixer: nn.Module) -> list[tuple[str, int, int, bool]]:
    out = [("in_proj.weight", 0, 2, True), ("in_proj.bias", 0, 2, False)]  # x and z halves
    for sfx in mixer.directions:
        a_log = "A_log" if not sfx else f"A{sfx}_log"
        out += [(f"conv1d{sfx}.weight", 0, 1, True), (f"conv1d{sfx}.bias", 0, 1, False),
                (f"x_proj{sfx}.weight", 1, 1, True), (f"dt_proj{sfx}.weight", 0, 1, True),
                (f"dt_proj{sfx}.bias", 0, 1, False), (a_log, 0, 1, True), (f"D{sfx}", 0, 1, True)]
    return out + [("out_proj.weight", 1, 1, True)]


def _ss2d_layout(ss2d: nn.Module) -> list[tuple[str, int, int, bool]]:
    K = ss2d.K  # A_logs and Ds stack the same channel once per scan direction
    return [("in_proj.weight", 0, 2, True), ("in_proj.bias", 0, 2, False), ("conv2d.weight", 0, 1, True),
            ("conv2d.bias", 0, 1, False), ("x_proj_weight", 2, 1, True), ("dt_projs_weight", 1, 1, True),
            ("dt_projs_bias", 1, 1, False), ("A_logs", 0, K, True), ("Ds", 0, K, True),
            ("out_norm.weight", 0, 1, False), ("out_norm.bias", 0, 1, False), ("out_proj.weight", 1, 1, True)]


def inner_channel_tensors(mixer: nn.Module, ranking: bool = False) -> list[tuple[str, int, int]]:
    """(parameter name, dim, chunks) of every tensor of a MambaMixer / BiMambaMixer / SS2D with
    one entry per d_inner channel along ``dim``, in ``chunks`` stacked copies. ``ranking``:
    only the weights that rank channels (no biases, no norm affines)."""
    params = dict(mixer.named_parameters())
    return [(n, d, c) for n, d, c, ranks in mixer.inner_layout() if n in params and (ranks or not ranking)]


def _project(x: Tensor, x_proj: nn.Linear, dt_proj: nn.Linear) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., d_inner) channels-last -> (dt, B, C): dt through dt_proj without its bias (it
    goes into the scan as delta_bias), B and C (..., d_state). The mixers' shared projection."""
    R, N = dt_proj.in_features, (x_proj.out_features - dt_proj.in_features) // 2
    dt, B, C = torch.split(x_proj(x), [R, N, N], dim=-1)
    return F.linear(dt, dt_proj.weight), B, C


class MambaMixer(_ScanMixer):
    """Mamba mixer, mamba-ssm's ``Mamba`` (non-fused path). Input/output (B, L, d_model).

    in_proj -> (x, z); x -> depthwise causal conv1d -> silu -> x_proj -> (dt, B, C);
    dt -> dt_proj; y = selective_scan(x, dt, -exp(A_log), B, C, D, z,
    delta_bias=dt_proj.bias, delta_softplus=True) -> out_proj.
    """

    uses_selective_scan = True  # deploy asks this, not the class name, for scan export paths
    directions = ("",)  # attribute suffixes of the scan directions
    inner_layout = _mixer_layout

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank="auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, scan_backend: str = "auto", d_inner: int | None = None):
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, d_inner, scan_backend)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        _direction(self, "", conv_bias, (dt_scale, dt_init, dt_min, dt_max, dt_init_floor))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden_states: Tensor, return_states: bool = False):
        """(B, L, d_model) -> (B, L, d_model); with ``return_states`` also the
        (conv_state, ssm_state) after the last step, to continue with step()."""
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        xc = F.silu(self.conv1d(x)[..., :x.shape[-1]])  # causal: drop the right padding
        dt, B, C = _project(xc.transpose(1, 2), self.x_proj, self.dt_proj)  # (B, L, .)
        res = selective_scan(xc, dt.transpose(1, 2), -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
                             self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                             return_last_state=return_states, backend=self.scan_backend)
        if not return_states:
            return self.out_proj(res.transpose(1, 2))
        y, ssm_state = res
        k = self.conv1d.kernel_size[0]
        conv_state = F.pad(x, (k - x.shape[-1], 0)) if x.shape[-1] < k else x[..., -k:]
        return self.out_proj(y.transpose(1, 2)), conv_state, ssm_state

    def allocate_states(self, batch_size: int, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Zero (conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, d_state));
        ssm_state is fp32 unless a dtype is given (the scan accumulates in fp32)."""
        w = self.conv1d.weight
        device = w.device if device is None else device
        d_inner, k = w.shape[0], w.shape[-1]
        conv_state = torch.zeros(batch_size, d_inner, k, dtype=dtype or w.dtype, device=device)
        ssm_state = torch.zeros(batch_size, d_inner, self.A_log.shape[1], dtype=dtype or torch.float32,
                                device=device)
        return conv_state, ssm_state

    def step(self, x_t: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One time step, functionally: returns (y_t, new_conv_state, new_ssm_state).

        x_t: (B, d_model) or (B, 1, d_model); y_t has the same shape. Inputs are
        never modified in place, so the step exports to ONNX with the states
        as graph inputs and outputs.
        """
        squeeze = x_t.dim() == 3
        if squeeze:
            if x_t.shape[1] != 1:
                raise ValueError(f"step() takes one time step; got x_t of shape {tuple(x_t.shape)}")
            x_t = x_t[:, 0]
        x, z = self.in_proj(x_t).chunk(2, dim=-1)  # (B, d_inner) each
        conv_state = torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
        x = (conv_state * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = _project(x, self.x_proj, self.dt_proj)
        # the recurrence in fp32, as in the scan kernels
        dt = F.softplus(dt.float() + self.dt_proj.bias.float())
        A = -torch.exp(self.A_log.float())
        xf = x.float()
        dA = torch.exp(dt.unsqueeze(-1) * A)                       # (B, d_inner, N)
        dBx = (dt * xf).unsqueeze(-1) * B.float().unsqueeze(1)      # (B, d_inner, N)
        new_ssm = ssm_state.float() * dA + dBx
        y = (new_ssm * C.float().unsqueeze(1)).sum(-1) + self.D.float() * xf
        y = (y * F.silu(z.float())).to(x_t.dtype)
        out = self.out_proj(y)
        return (out.unsqueeze(1) if squeeze else out), conv_state, new_ssm.to(ssm_state.dtype)


class BiMambaMixer(_ScanMixer):
    """Bidirectional Mamba mixer, Vision-Mamba ("bimamba v2") style.

    One shared ``in_proj`` and ``out_proj``; each direction has its own conv,
    x_proj, dt_proj, A_log and D (backward ones suffixed ``_b`` as in Vim).
    The backward branch runs the same scan on the time-reversed sequence
    (x and z reversed) and its output is reversed back; the two gated outputs
    are averaged (``divide_out=True``, Vim's default) or summed, then
    projected. Input/output (B, L, d_model).

    There is no step(): the backward direction needs the whole future of the
    sequence, so streaming one step at a time is not defined.
    """

    uses_selective_scan = True
    directions = ("", "_b")
    inner_layout = _mixer_layout

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank="auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, divide_out: bool = True, scan_backend: str = "auto",
                 d_inner: int | None = None):
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, d_inner, scan_backend)
        self.divide_out = divide_out

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        for suffix in self.directions:
            _direction(self, suffix, conv_bias, (dt_scale, dt_init, dt_min, dt_max, dt_init_floor))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        L, d_inner = x.shape[-1], x.shape[1]
        # Both directions run as one scan over 2*d_inner channels (the backward ones on the
        # time-reversed sequence), as SS2D runs its four: half the exported scan nodes and
        # one kernel call in eager runs (ldmamba_small, batch 1: ONNX Runtime -8 %, eager
        # -6 %). The parameters stay per direction (Vim's names).
        xs = torch.cat([x, x.flip(-1)], dim=1)                                     # (B, 2D, L)
        zs = torch.cat([z, z.flip(-1)], dim=1)
        conv_bias = None if self.conv1d.bias is None else torch.cat([self.conv1d.bias, self.conv1d_b.bias])
        xs = F.silu(F.conv1d(xs, torch.cat([self.conv1d.weight, self.conv1d_b.weight]), conv_bias,
                             padding=self.conv1d.padding, groups=2 * d_inner)[..., :L])
        # x_proj / dt_proj per direction, through the modules: their forward hooks (LDMamba's
        # inner-channel screens) see each direction's channels
        dt, B, C = zip(*(_project(x_dir.transpose(1, 2), x_proj, dt_proj)          # each (B, L, .)
                         for x_dir, x_proj, dt_proj in zip(xs.chunk(2, dim=1), (self.x_proj, self.x_proj_b),
                                                           (self.dt_proj, self.dt_proj_b))))
        dt = torch.cat(dt, dim=-1).transpose(1, 2)                                  # (B, 2D, L)
        # (B, 2, N, L) as permuted views of (B, L, 2, N): the exported scan reads B/C as
        # (B, L, G, N), so the two transposes cancel in the graph
        B, C = (torch.stack(t, dim=2).permute(0, 2, 3, 1) for t in (B, C))
        A = -torch.exp(torch.cat([self.A_log, self.A_b_log]).float())
        y = selective_scan(xs, dt, A, B, C, torch.cat([self.D, self.D_b]).float(),
                           z=zs, delta_bias=torch.cat([self.dt_proj.bias, self.dt_proj_b.bias]).float(),
                           delta_softplus=True, backend=self.scan_backend)
        y = y[:, :d_inner] + y[:, d_inner:].flip(-1)
        if self.divide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))

    def step(self, *args, **kwargs):
        # A permanent property of the block, not missing code: refuse with the reason.
        raise TypeError(
            "BiMambaMixer has no step(): its backward scan reads the sequence from the end, so it "
            "cannot run one time step at a time. Run forward() on whole windows, or use MambaMixer "
            "for streaming.")

    allocate_states = step  # no streaming state either, for the same reason


class SS2D(_ScanMixer):
    """VMamba's 2D selective scan (SS2D). Input/output (B, H, W, C), channels-last.

    in_proj -> (x, z); x -> depthwise Conv2d -> silu -> cross-scan into K=4
    sequences of length L=H*W (row-major, column-major, and both reversed) ->
    per-direction x_proj / dt_proj (packed: ``x_proj_weight`` (K, R+2N, d_inner),
    ``dt_projs_weight`` (K, d_inner, R), ``dt_projs_bias`` (K, d_inner)) ->
    one selective scan over (B, K*d_inner, L) with grouped B/C (B, K, N, L),
    ``A_logs`` (K*d_inner, N), ``Ds`` (K*d_inner) -> cross-merge (undo the
    reversals/transposes, sum the 4) -> LayerNorm(d_inner) -> * silu(z) -> out_proj.
    """

    K = 4
    uses_selective_scan = True
    inner_layout = _ss2d_layout

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: float = 2,
                 dt_rank="auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, scan_backend: str = "auto", d_inner: int | None = None):
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, d_inner, scan_backend)
        K, d_inner, R, N = self.K, self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2,
                                groups=d_inner, bias=conv_bias)
        # as K stacked nn.Linear(d_inner, R + 2N, bias=False) with default init
        bound = 1 / math.sqrt(d_inner)
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, d_inner).uniform_(-bound, bound))
        dt_projs = [nn.Linear(R, d_inner, bias=True) for _ in range(K)]
        for proj in dt_projs:
            _init_dt_proj(proj, R, dt_scale, dt_init, dt_min, dt_max, dt_init_floor)
        self.dt_projs_weight = nn.Parameter(torch.stack([p.weight.data for p in dt_projs]))  # (K, d_inner, R)
        self.dt_projs_bias = nn.Parameter(torch.stack([p.bias.data for p in dt_projs]))      # (K, d_inner)
        self.A_logs = nn.Parameter(_A_log_init(K * d_inner, N))                              # (K*d_inner, N)
        self.A_logs._no_weight_decay = True
        self.Ds = nn.Parameter(torch.ones(K * d_inner))
        self.Ds._no_weight_decay = True
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def _per_direction(self, weight: Tensor, x: Tensor) -> Tensor:
        """(K, O, I) @ (B, K, I, L) -> (B, K, O, L). In training on at most four positions
        (maps of 2 x 2 and less) as K products of B*L columns: B*K products of one to four
        columns are slow to batch (1 x 1, batch 32: 5.2 ms forward + backward against 0.4; at
        batch 1 the plain matmul is the faster, so inference and exports keep it)."""
        L = x.shape[-1]
        if not (self.training and torch.is_grad_enabled() and L <= 4):
            return torch.matmul(weight, x)
        K, n_in = x.shape[1], x.shape[2]
        y = torch.matmul(weight, x.permute(1, 2, 0, 3).reshape(K, n_in, -1))
        return y.reshape(K, weight.shape[1], -1, L).permute(2, 0, 1, 3)

    def cross_scan_core(self, x: Tensor) -> Tensor:
        """x: (B, d_inner, H, W) after conv+silu -> merged scan output (B, H, W, d_inner), fp32."""
        _, D, H, W = x.shape  # the batch stays -1 in reshapes: dynamic-batch graphs
        L, K = H * W, self.K
        R, N = self.dt_projs_weight.shape[-1], self.A_logs.shape[1]
        # cross-scan: row-major, column-major, then both reversed
        x_hwwh = torch.stack([x.reshape(-1, D, L), x.transpose(2, 3).reshape(-1, D, L)], dim=1)
        xs = torch.cat([x_hwwh, x_hwwh.flip(-1)], dim=1)                  # (B, K, D, L)
        x_dbl = self._per_direction(self.x_proj_weight, xs)               # (B, K, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = self._per_direction(self.dt_projs_weight, dts)              # (B, K, D, L)
        As = -torch.exp(self.A_logs.float())
        out_y = selective_scan(xs.reshape(-1, K * D, L), dts.reshape(-1, K * D, L), As, Bs, Cs,
                               self.Ds.float(), z=None, delta_bias=self.dt_projs_bias.float().reshape(-1),
                               delta_softplus=True, backend=self.scan_backend).float()
        out_y = out_y.reshape(-1, K, D, L)
        # cross-merge: undo the reversals, then the transposition of the column-major pair
        inv_y = out_y[:, 2:4].flip(-1)
        wh_y = out_y[:, 1].reshape(-1, D, W, H).transpose(2, 3).reshape(-1, D, L)
        invwh_y = inv_y[:, 1].reshape(-1, D, W, H).transpose(2, 3).reshape(-1, D, L)
        y = out_y[:, 0] + inv_y[:, 0] + wh_y + invwh_y
        return y.transpose(1, 2).reshape(-1, H, W, D)

    def forward(self, x: Tensor) -> Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)              # (B, H, W, d_inner) each
        x = F.silu(depthwise_conv_cl(self.conv2d, x)).permute(0, 3, 1, 2)  # (B, d_inner, H, W)
        y = self.out_norm(self.cross_scan_core(x).to(z.dtype))
        return self.out_proj(y * F.silu(z))
