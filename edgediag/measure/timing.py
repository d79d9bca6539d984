"""The one definition of latency timing. Every figure edgediag reports (export's ORT/eager
ratio, the prune verb's paired speed-ups, the bench, latency-aware pruning) is measured
here, on two clocks: wall time and the calling thread's CPU time (the latency at one
thread without preemption or stolen time: the steadier figure on a shared machine,
docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

CLOCKS = ("wall", "cpu")


def timed_calls(fn: Callable[[], object], n: int) -> dict[str, list[float]]:
    """Seconds per call of ``fn()``, n calls, on both clocks."""
    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(n):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        c1, w1 = time.thread_time(), time.perf_counter()
        times["wall"].append(w1 - w0)
        times["cpu"].append(c1 - c0)
    return times


def timed_rounds(fns: Sequence[Callable[[], object]], iters: int, rounds: int = 1,
                 warmup: int = 0) -> list[dict[str, list[float]]]:
    """Seconds per call of each of ``fns`` (``iters`` calls each, after ``warmup`` untimed ones),
    on both clocks. The calls are split into ``rounds`` rounds that go through all functions in
    turn, so a shared machine's drift (other jobs, clock changes) hits every function alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[dict[str, list[float]]] = [{c: [] for c in CLOCKS} for _ in fns]
    for r in range(rounds):
        n = iters // rounds + (1 if r < iters % rounds else 0)
        for k, fn in enumerate(fns):
            for clock, t in timed_calls(fn, n).items():
                times[k][clock] += t
    return times


def timed_alternately(fns: Sequence[Callable[[], Any]], runs: int, warmup: int = 3) -> dict[str, list[list[float]]]:
    """Per-run times (ms) of several functions, run in turn so that all see the same load on
    a shared machine: ``{"wall": [times of fns[0], ...], "cpu": [...]}``."""
    for _ in range(min(warmup, runs)):
        for fn in fns:
            fn()
    times: dict[str, list[list[float]]] = {"wall": [[] for _ in fns], "cpu": [[] for _ in fns]}
    for _ in range(max(1, runs)):
        for i, fn in enumerate(fns):
            for clock, t in timed_calls(fn, 1).items():
                times[clock][i].append(t[0] * 1e3)
    return times


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (None: unchanged)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block, its training flag restored after it."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


@torch.inference_mode()
def median_latency_ms(module: nn.Module, x: torch.Tensor, runs: int = 30, warmup: int = 5,
                      threads: int | None = 1, clock: str = "wall") -> float:
    """Median time of one ``module(x)`` in eval mode, in ms, with ``threads`` intra-op threads.
    One thread by default: on a shared machine it is the least noisy, and it is what a small
    edge CPU core gives."""
    with torch_threads(threads), eval_mode(module):
        times = timed_alternately([lambda: module(x)], runs, warmup=warmup)[clock][0]
    return statistics.median(times)
