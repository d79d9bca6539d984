"""The one definition of latency timing, used by every verb that reports a latency (bench,
export's ORT/eager comparison, prune's before/after figures, latency-aware pruning).

The protocol: ``THREADS`` CPU threads (torch intra-op threads pinned, ONNX Runtime sessions
made with the same count), ``WARMUP`` untimed calls, then ``RUNS`` timed calls, the median
reported; several functions timed together go in turn, so the load of a shared machine hits
them alike. Each verb's ``--threads``, ``--warmup`` and ``--latency-runs`` change these
(:func:`add_timing_args`), and every report that shows a latency gives the
settings it was taken with (:func:`protocol`). Two clocks: wall time and the calling
thread's CPU time (at one thread, the latency without preemption or stolen time: the
steadier figure on a shared machine, docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from edgediag import cli

CLOCKS = ("wall", "cpu")
# One thread: on a shared machine the least noisy figure, and what one small edge core gives
# (two threads on the 2-core VM: ldmamba_small 19.7 ms against 10.3 ms with one).
THREADS = 1
WARMUP = 5  # untimed calls before the timed ones
RUNS = 30  # timed calls per figure; the median (p50) is reported


def protocol(threads: int, warmup: int, runs: int, rounds: int | None = None, clock: str = "wall") -> dict:
    """The settings a latency was taken with, as every report records them."""
    out = {"threads": int(threads), "warmup": int(warmup), "runs": int(runs), "statistic": "median", "clock": clock}
    if rounds is not None:
        out["rounds"] = int(rounds)
    return out


def protocol_line(p: dict) -> str:
    """``1 thread, 5 warm-up + 30 timed runs, median of wall time``."""
    clock = "the CPU time of the timing thread" if p.get("clock") == "cpu" else "wall time"
    return (f"{p['threads']} thread{'s' if p['threads'] != 1 else ''}, {p['warmup']} warm-up + {p['runs']} timed runs, "
            f"median of {clock}")


def timed_calls(fn: Callable[[], object], n: int) -> dict[str, list[float]]:
    """Seconds per call of ``fn()``, n calls, on both clocks."""
    import time

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
    """Seconds per call of each of ``fns`` (``iters`` calls each, after ``warmup`` untimed ones
    each), on both clocks. The calls are split into ``rounds`` rounds that go through all
    functions in turn (``rounds == iters``: one call of each in turn), so a shared machine's
    drift (other jobs, clock changes) hits every function alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[dict[str, list[float]]] = [{c: [] for c in CLOCKS} for _ in fns]
    rounds = max(1, min(rounds, iters)) if iters else 1
    for r in range(rounds):
        n = iters // rounds + (1 if r < iters % rounds else 0)
        for k, fn in enumerate(fns):
            for clock, t in timed_calls(fn, n).items():
                times[k][clock] += t
    return times


def latency_stats(times: dict[str, list[float]], batch: int = 1, clock: str = "wall") -> dict:
    """Percentiles of ``clock`` in ms (``latency_ms``: p50, p90, p99, mean, min), throughput,
    and both clocks' p50. The timing thread's CPU time is the whole compute latency only at
    one thread; ``cpu_share`` (CPU p50 / wall p50) under ~0.9 there says the thread waited:
    preempted, or its virtual CPU stolen."""
    ms = np.asarray(times[clock]) * 1e3
    wall_p50, cpu_p50 = (float(np.percentile(np.asarray(times[k]) * 1e3, 50)) for k in CLOCKS)
    return {"latency_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                           "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()),
                           "min": float(ms.min())},
            "items_per_s": float(batch * len(ms) / max(ms.sum() / 1e3, 1e-12)),
            "wall_p50_ms": wall_p50, "cpu_p50_ms": cpu_p50, "cpu_share": cpu_p50 / max(wall_p50, 1e-12)}


def time_functions(fns: Sequence[Callable[[], object]], threads: int = THREADS, warmup: int = WARMUP,
                   runs: int = RUNS, batch: int = 1) -> list[dict]:
    """The protocol for functions timed side by side: torch at ``threads`` intra-op threads
    (ONNX Runtime sessions among ``fns`` must be made with the same count), inference mode,
    ``warmup`` untimed calls of each, then ``runs`` timed calls of each in turn. One
    :func:`latency_stats` per function."""
    with torch_threads(threads), torch.inference_mode():
        times = timed_rounds(fns, runs, rounds=runs, warmup=warmup)
    return [latency_stats(t, batch) for t in times]


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


def median_latency_ms(module: nn.Module, x: torch.Tensor, runs: int = RUNS, warmup: int = WARMUP,
                      threads: int | None = THREADS, clock: str = "wall") -> float:
    """Median time of one ``module(x)`` in eval mode, in ms, by the protocol."""
    with eval_mode(module):
        stats = time_functions([lambda: module(x)], threads or torch.get_num_threads(), warmup, runs)[0]
    return stats["wall_p50_ms"] if clock == "wall" else stats["cpu_p50_ms"]


def add_timing_args(parser: argparse.ArgumentParser, threads_help: str | None = None,
                    with_threads: bool = True) -> dict[str, argparse.Action]:
    """``--threads``, ``--warmup`` and ``--latency-runs``: the timing protocol of
    :mod:`edgediag.measure.timing`, with its defaults, the same in every verb that times
    (``with_threads=False``: a verb whose --threads means more than timing adds its own)."""
    if with_threads:
        cli.add_threads_arg(parser, THREADS, threads_help or
                        f"CPU threads for torch and ONNX Runtime (intra-op), pinned for every latency figure "
                        f"(default {THREADS}, as every verb times)")
    return {"warmup": parser.add_argument("--warmup", type=cli.count_arg(0), default=WARMUP, metavar="N",
                                          help=f"untimed calls before the timed ones of each latency figure "
                                               f"(default {WARMUP})"),
            "latency_runs": parser.add_argument("--latency-runs", type=cli.count_arg(1), default=RUNS, metavar="N",
                                                help="timed calls per latency figure; the report gives their "
                                                     f"median (default {RUNS})")}
