"""Parameters and FLOPs of a model, with the selective scan counted by its formula.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions, but it
cannot see the selective scan: depending on the backend it is a C++ loop, a CUDA
kernel or a chunk of cumsum/exp ops that the counter ignores or miscounts. So while
counting, every module-level ``selective_scan`` name (``edgediag.nn.mamba`` and any other
module that imported it) is replaced by a wrapper that runs the real scan with the
counter paused and adds :func:`scan_flops` to the enclosing modules instead.

FLOPs are counted as the counter does: a multiply-add is 2 FLOPs (MACs = FLOPs / 2).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode

from edgediag.nn.features import stft_method

# the module, not the function of the same name that edgediag.ops re-exports
_scan_module = importlib.import_module("edgediag.ops.selective_scan")

SCAN_KEY = "selective_scan"  # the op name the scan's FLOPs are filed under
OUTSIDE = "(outside modules)"


def scan_flops(u: torch.Tensor, A: torch.Tensor, D=None, z=None) -> int:
    """The selective scan's FLOPs: about 9·B·L·D·N for the recurrence (discretise dt·A,
    exp, dt·B·u, state update, C·state), plus B·D·L for the skip term D·u and B·D·L for
    the gate by z. u: (B, D, L); A: (D, N)."""
    batch, channels, length = u.shape
    flops = 9 * batch * length * channels * A.shape[-1]
    if D is not None:
        flops += batch * channels * length
    if z is not None:
        flops += batch * channels * length
    return int(flops)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, trainable and non-zero parameter counts (non-zero shows unstructured sparsity)."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "nonzero": int(sum(int(torch.count_nonzero(p.detach())) for p in params))}


@contextlib.contextmanager
def _counting_scans(counter: _Counter) -> Iterator[list[int]]:
    """Swap every imported ``selective_scan`` for a counting wrapper while inside."""
    original = _scan_module.selective_scan
    calls: list[int] = []

    def counted(u, delta, A, B, C, D=None, z=None, *args, **kwargs):
        # The real scan runs with the dispatch modes popped, so its inner ops are not
        # counted a second time on top of the formula.
        with _disable_current_modes():
            out = original(u, delta, A, B, C, D, z, *args, **kwargs)
        flops = scan_flops(u, A, D, z)
        calls.append(flops)
        for parent in set(counter.mod_tracker.parents):
            counter.flop_counts[parent][SCAN_KEY] += flops
        counter.add_own(flops)
        return out

    patched = [mod for mod in list(sys.modules.values())
               if mod is not None and getattr(mod, "selective_scan", None) is original]
    for mod in patched:
        mod.selective_scan = counted
    try:
        yield calls
    finally:
        for mod in patched:
            mod.selective_scan = original


def _total(ops: dict) -> int:
    return int(sum(ops.values()))


def _innermost(parents) -> str:
    """The module an op runs in: the deepest of the running modules' names."""
    inner = max(parents, key=lambda n: (n != "Global", n.count("."), len(n)))
    return OUTSIDE if inner == "Global" else inner


class _Counter(FlopCounterMode):
    """FlopCounterMode that also files every op under its innermost module only, so the
    per-module breakdown partitions the total. (The counter's own per-module figures
    include children, and a module called outside its parent's forward is not nested.)"""

    def __init__(self):
        super().__init__(display=False)
        self.own: dict[str, int] = {}

    def add_own(self, flops: int) -> None:
        name = _innermost(self.mod_tracker.parents)
        self.own[name] = self.own.get(name, 0) + int(flops)

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            self.add_own(self.flop_registry[func_packet](*args, **kwargs, out_val=out))
        return super()._count_flops(func_packet, out, args, kwargs)


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> dict:
    """FLOPs of one forward of ``module`` on ``inputs`` (no grad, eval mode as given), with the
    audio front end in its exported form (the factored DFT: torch.stft has no FLOP formula).

    Returns ``{"flops", "macs", "scan_flops", "scan_calls", "by_op": {op: flops},
    "by_module": {module name: own flops}, "by_module_total": {name: flops incl. children}}``.
    """
    counter = _Counter()
    with torch.no_grad(), stft_method("factored"), counter, _counting_scans(counter) as scans:
        module(*inputs)
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()
    by_op: dict[str, int] = {}
    for op, n in counts.get("Global", {}).items():
        key = str(op)
        by_op[key] = by_op.get(key, 0) + int(n)
    return {"flops": int(total), "macs": int(total) // 2, "scan_flops": int(sum(scans)), "scan_calls": len(scans),
            "by_op": by_op, "by_module": {k: v for k, v in counter.own.items() if v},
            "by_module_total": {k: _total(v) for k, v in counts.items() if k != "Global"}}
