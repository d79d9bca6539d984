"""FLOP formulas of the operators ``torch.utils.flop_counter`` cannot see, and the hook a
counter uses to be told of them.

The selective scan is a C++ loop, a CUDA kernel or a chunk of cumsum/exp ops depending on
its backend, none of which the counter counts right. So :func:`~edgediag.ops.selective_scan`
hands each call to :func:`observed_scan`: with no observer installed it just runs; inside
:func:`observing_scans` the observer runs it instead and is given the call's FLOPs by the
formula (the counter pauses itself around the real scan and files the formula).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

SCAN_KEY = "selective_scan"  # the op name the scan's FLOPs are filed under

# observer(run, flops) -> run()'s result; None: no one counts
_observer: contextvars.ContextVar[Callable[[Callable[[], Any], int], Any] | None] = contextvars.ContextVar(
    "edgediag_scan_observer", default=None)


def scan_flops(u, A, D=None, z=None) -> int:
    """The selective scan's FLOPs: about 9·B·L·D·N for the recurrence (discretise dt·A,
    exp, dt·B·u, state update, C·state), plus B·D·L for the skip term D·u and B·D·L for
    the gate by z. u: (B, D, L); A: (D, N). A multiply-add is 2 FLOPs, as the counter has it."""
    batch, channels, length = u.shape
    flops = 9 * batch * length * channels * A.shape[-1]
    if D is not None:
        flops += batch * channels * length
    if z is not None:
        flops += batch * channels * length
    return int(flops)


def observed_scan(run: Callable[[], Any], u, A, D=None, z=None) -> Any:
    """``run()`` (one selective scan over ``u``), through the installed observer if any."""
    observer = _observer.get()
    return run() if observer is None else observer(run, scan_flops(u, A, D, z))


@contextmanager
def observing_scans(observer: Callable[[Callable[[], Any], int], Any]) -> Iterator[None]:
    """Inside the block every selective scan is run by ``observer(run, flops)``."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)
