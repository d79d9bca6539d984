"""Selective-scan backends side by side: forward and forward+backward latency, speed-ups, errors.

    python benchmarks/scan_report.py                 # the full matrix below, then the ONNX table
    python benchmarks/scan_report.py --seqlens 1024 --dstates 16 --threads 1 --rounds 20
    python benchmarks/scan_report.py --baseline 972c70f   # also the kernel as issue 24 found it

Part 1, for every L in --seqlens, d_state in --dstates and thread count in --threads
(b=1, d=256, fp32, a Mamba block's scan: variable B/C, D, z, softplus bias): forward and
forward+backward medians of ref (mamba-ssm's selective_scan_ref, autograd through it),
chunked (autograd through the pure-PyTorch scan) and native (the C++ kernel and its
backward); for d_state <= 4 also 'native padded', the kernel forced to pad the state to
the vector width (the layout every d_state had before the channel-lane path). Speed-ups
are medians' ratios within one run; grad err is max over u, delta, A, B, C, D, z and
delta_bias of max|g - g_ref| / max|g_ref|.
Part 2 (--onnx-seqlens, --onnx-dstates): the exported scan in ONNX Runtime against eager
native forward at the same size, both ways it is exported: the chunked scan in standard ops
(``--scan-op graph``, what TensorRT reads) and one edgediag::SelectiveScan node run by the
fused kernel as an ONNX Runtime custom op (``--scan-op custom``).
Part 3 (--split-seqlens): a d_state-1 forward on one thread with and without softplus and
the z gate, channel lanes against padded: what bounds the small-state layout's gain.

Backends and thread counts run interleaved round by round, so a load change on a shared
machine hits them alike; the table shows medians. Within a round each backend runs a short
burst (``--burst``: one untimed call, then timed calls back to back): in a model the scan's
inputs come warm from the layer before it, while a call right after another backend's runs
on caches that call evicted (``--cold`` times that). The process keeps freed memory as
the training engine does (``train.keep_freed_memory``; ``--default-malloc`` leaves glibc's
defaults), so a call that follows another backend's large frees does not page its outputs in
again. The error column is norm-wise: max|out - out_ref| / max|out_ref| (outputs), and the
same for the last state. The ONNX rows are exported with the TorchScript exporter (opset 17) and run in
ONNX Runtime with as many threads as torch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from edgediag.ops import (  # noqa: E402
    _cpu_ext,
    available_backends,
    scan_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_cpu,
    selective_scan_ref,
)
from edgediag.ops.scan_onnx_op import OPSET as SCAN_OPSET  # noqa: E402
from edgediag.runtime import custom_ops  # noqa: E402
from edgediag.utils import keep_freed_memory  # noqa: E402

GOALS = ("goals (issue 24): f+b native >= 10x chunked at d_state 16; d_state 1 forward >= 4x padded; "
         "grad err <= 1e-4; 1 -> 2 threads >= 1.7x at L >= 1024; ORT no slower than eager native")


def make_inputs(batch=1, dim=256, dstate=16, seqlen=1024, seed=0, device="cpu"):
    """A Mamba-block-like scan: variable B/C, D, z gate, dt bias with softplus."""
    g = torch.Generator().manual_seed(seed)
    dt_bias = torch.log(torch.expm1(torch.exp(torch.rand(dim, generator=g) * (2.3026 * 2) - 6.9078)))
    inputs = dict(
        u=torch.randn(batch, dim, seqlen, generator=g),
        delta=0.5 * torch.randn(batch, dim, seqlen, generator=g),
        A=-torch.exp(torch.log(torch.arange(1, dstate + 1, dtype=torch.float32)).repeat(dim, 1)
                     + 0.1 * torch.randn(dim, dstate, generator=g)),
        B=torch.randn(batch, dstate, seqlen, generator=g),
        C=torch.randn(batch, dstate, seqlen, generator=g),
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, dim, seqlen, generator=g),
        delta_bias=dt_bias,  # softplus(dt_bias) log-uniform in [1e-3, 1e-1], as mamba's init
    )
    return {k: v.to(device) for k, v in inputs.items()}


class ScanModule(torch.nn.Module):
    """The scan as a module with A, D, delta_bias as weights, for export: the chunked scan
    (chunk ``chunk_size``) in standard ops, or (``custom_op``) the dispatcher under the
    ``onnx_op`` backend, one edgediag::SelectiveScan node."""

    def __init__(self, inputs, chunk_size=32, custom_op=False):
        super().__init__()
        self.A = torch.nn.Parameter(inputs["A"].clone())
        self.D = torch.nn.Parameter(inputs["D"].clone())
        self.delta_bias = torch.nn.Parameter(inputs["delta_bias"].clone())
        self.chunk_size, self.custom_op = chunk_size, custom_op

    def forward(self, u, delta, B, C, z):
        if self.custom_op:
            return selective_scan(u, delta, self.A, B, C, self.D, z, self.delta_bias, delta_softplus=True)
        return selective_scan_chunked(u, delta, self.A, B, C, self.D, z, self.delta_bias, delta_softplus=True,
                                      chunk_size=self.chunk_size)


ONNX_INPUTS = ("u", "delta", "B", "C", "z")


def export_scan_onnx(inputs, chunk_size=32, custom_op=False) -> bytes:
    """The scan exported as standard ops (chunked, ``chunk_size``) or as the custom op."""
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), scan_backend("onnx_op" if custom_op else "chunked"):
        warnings.simplefilter("ignore")
        torch.onnx.export(ScanModule(inputs, chunk_size, custom_op).eval(),
                          tuple(inputs[k] for k in ONNX_INPUTS), f, dynamo=False, opset_version=17,
                          input_names=list(ONNX_INPUTS), output_names=["y"],
                          custom_opsets=SCAN_OPSET if custom_op else None)
    return f.getvalue()


def ort_session(proto: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # ONNX Runtime's pool spins after each call by default; interleaved with torch's OpenMP
    # pool (which spins too) on two cores, each would steal the other's next call's time
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return custom_ops.open_session(proto, opts)


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).float().cpu(), b.float().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


def _median_ms(ts) -> float:
    return statistics.median(ts) * 1e3


def _grad_inputs(inputs):
    return {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}


def _fwd_bwd(fn, inputs, g, **kw):
    out = fn(**inputs, delta_softplus=True, **kw)
    return torch.autograd.grad(out, list(inputs.values()), g)


def _runners(inputs, g, dstate, ext, baseline=None):
    """Forward and forward+backward callables per backend for one input set; ``baseline``:
    an older build of the kernel (--baseline), forward only."""
    fwd = {
        "ref": lambda: selective_scan_ref(**inputs, delta_softplus=True),
        "chunked": lambda: selective_scan_chunked(**inputs, delta_softplus=True),
    }
    # the same leaf tensors for every call (autograd.grad accumulates nothing into them):
    # copying 1-3 MB of inputs per call is not the scan's time
    leaves = _grad_inputs(inputs)
    fb = {
        "ref": lambda: _fwd_bwd(selective_scan_ref, leaves, g),
        "chunked": lambda: _fwd_bwd(selective_scan_chunked, leaves, g),
    }
    if ext is not None:
        args = list(inputs.values())
        fwd["native"] = lambda: selective_scan_cpu(**inputs, delta_softplus=True)
        fb["native"] = lambda: _fwd_bwd(selective_scan_cpu, leaves, g)
        if dstate <= 4:
            fwd["native padded"] = lambda: ext.fwd(*args, True, False, False)
            # the kernel's own passes, without autograd (the forward saving what the backward reads,
            # as the autograd function does): its gradients come back in the inputs' order
            fb["native padded"] = lambda: ext.bwd(*args, True, g, False, *ext.fwd(*args, True, False, False, True)[-2:])
        if baseline is not None:  # fwd(u, delta, A, B, C, D, z, delta_bias, softplus, last_state) since 972c70f
            fwd["baseline"] = lambda: baseline.fwd(*args, True, False)
    return fwd, fb


def build_baseline(rev: str):
    """The native kernel as it was at git revision ``rev`` (its .cpp, and its .h where it had
    one), built as a separate extension with today's flags."""
    import subprocess
    import tempfile

    from torch.utils.cpp_extension import load

    root = Path(__file__).resolve().parents[1]
    folder = Path(tempfile.mkdtemp(prefix="scan_baseline_"))
    for name in ("selective_scan_cpu.cpp", "selective_scan_cpu.h"):
        res = subprocess.run(["git", "-C", str(root), "show", f"{rev}:kernels/{name}"], capture_output=True)
        if res.returncode == 0:
            (folder / name).write_bytes(res.stdout)
        elif name.endswith(".cpp"):
            raise SystemExit(f"scan_report: --baseline {rev}: {res.stderr.decode().strip() or 'git failed'}")
    tag = "".join(c for c in rev if c.isalnum())[:12]
    return load(name=f"edgediag_scan_baseline_{tag}", sources=[str(folder / "selective_scan_cpu.cpp")],
                extra_cflags=_cpu_ext.compile_flags(), extra_ldflags=["-fopenmp"], build_directory=str(folder))


def timed_burst(fn, clock, burst: int) -> list[float]:
    """Seconds of each of ``burst`` back-to-back calls of ``fn`` after one untimed call, so a
    call does not pay for re-reading inputs that the previous backend's call evicted from
    the caches (in a model the scan's inputs come straight from the layer before it).
    ``burst`` 0: one timed call, cold (the ref's seconds-long Python loop; ``--cold``)."""
    if burst == 0:
        t0 = clock()
        fn()
        return [clock() - t0]
    fn()
    times = []
    for _ in range(burst):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return times


def scan_matrix(seqlens, dstates, thread_counts, rounds, clock, dim=256, baseline=None, burst=3) -> list[dict]:
    """Part 1: one dict per (L, d_state, threads) with medians (ms) and gradient errors."""
    ext = _cpu_ext.load_extension()
    # compute-bound and threaded by torch: what two threads give on this machine right now
    mm = torch.randn(384, 384, generator=torch.Generator().manual_seed(2))
    calib = {"matmul": lambda: torch.mm(mm, mm)}
    rows = []
    for L in seqlens:
        for n in dstates:
            inputs = make_inputs(1, dim, n, L)
            g = torch.randn(1, dim, L, generator=torch.Generator().manual_seed(1))
            fwd, fb = _runners(inputs, g, n, ext, baseline)
            grads = {name: fn() for name, fn in fb.items()}  # warm-up, and the gradients to compare
            with torch.no_grad():
                for f in fwd.values():
                    f()
            ref_grads = grads["ref"]
            keys = [("fwd", k) for k in fwd] + [("fb", k) for k in fb]
            if len(thread_counts) > 1:  # the VM's own 1 -> 2 threads ceiling, in the same rounds
                keys.append(("cal", "matmul"))
            times = {(threads, key): [] for threads in thread_counts for key in keys}
            # thread counts interleaved too, round by round: the 1 -> 2 threads ratio is then as
            # side by side as the backends' (this VM's speed drifts by 10-40 % within minutes)
            for r in range(rounds):
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    for kind, name in keys:
                        if name == "ref" and r % 5:  # the Python loop: a fifth of the rounds
                            continue
                        fn = {"fwd": fwd, "fb": fb, "cal": calib}[kind][name]
                        with torch.no_grad() if kind != "fb" else contextlib.nullcontext():
                            times[threads, (kind, name)] += timed_burst(fn, clock, 0 if name == "ref" else burst)
            for threads in thread_counts:
                row = dict(L=L, dstate=n, threads=threads,
                           **{f"{kind} {name}": _median_ms(times[threads, (kind, name)]) for kind, name in keys})
                for name, gs in grads.items():
                    if name != "ref":
                        row[f"grad err {name}"] = max(rel_err(a, b) for a, b in zip(gs, ref_grads))
                rows.append(row)
    return rows


def print_matrix(rows) -> None:
    print("Part 1: forward (fwd) and forward+backward (f+b) medians in ms; x: speed-up\n")
    header = (f"{'L':>5} {'N':>3} {'thr':>3} | {'fwd ref':>8} {'chunked':>8} {'native':>7} {'padded':>7} | "
              f"{'f+b ref':>8} {'chunked':>8} {'native':>7} {'padded':>7} | {'f+b x chunked':>13} "
              f"{'fwd x padded':>12} {'grad err':>9}")
    print(header)
    print("-" * len(header))
    def cell(r, key, width):
        return f"{r[key]:>{width}.2f}" if key in r else f"{'-':>{width}}"

    for r in rows:
        fb_x = r["fb chunked"] / r["fb native"] if "fb native" in r else float("nan")
        pad_x = r["fwd native padded"] / r["fwd native"] if "fwd native padded" in r else None
        err = r.get("grad err native", float("nan"))
        print(f"{r['L']:>5} {r['dstate']:>3} {r['threads']:>3} | {cell(r, 'fwd ref', 8)} {cell(r, 'fwd chunked', 8)} "
              f"{cell(r, 'fwd native', 7)} {cell(r, 'fwd native padded', 7)} | {cell(r, 'fb ref', 8)} "
              f"{cell(r, 'fb chunked', 8)} {cell(r, 'fb native', 7)} {cell(r, 'fb native padded', 7)} | "
              f"{fb_x:>12.1f}x {(f'{pad_x:.1f}x' if pad_x else '-'):>12} {err:>9.1e}")
    scaling = {}
    for r in rows:
        scaling.setdefault((r["L"], r["dstate"]), {})[r["threads"]] = (r.get("fwd native"), r.get("cal matmul"))
    lines = [f"L={L} N={n}: {t[1][0] / t[2][0]:.2f}x (matmul {t[1][1] / t[2][1]:.2f}x)"
             for (L, n), t in scaling.items() if 1 in t and 2 in t and t[1][0] and t[1][1]]
    if lines:
        print("\nnative forward, 1 -> 2 threads, and in brackets a 384x384 matmul timed in the same rounds "
              "(compute-bound: what this machine's two cores give at that moment): " + ", ".join(lines))
    base = [f"L={r['L']} N={r['dstate']} thr={r['threads']}: {r['fwd baseline']:.2f} -> {r['fwd native']:.2f} ms "
            f"({r['fwd baseline'] / r['fwd native']:.2f}x)" for r in rows if "fwd baseline" in r]
    if base:
        print("\nnative forward against the kernel at --baseline: " + ", ".join(base))


def _bound_run(session, feeds, out_shape):
    """A call of ``session`` that writes y into a buffer allocated once (I/O binding): the
    copy of a 1-4 MB output into a new numpy array at every run() is not the scan's time."""
    import numpy as np
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    y = np.empty(out_shape, dtype=np.float32)
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(y))

    def run():
        session.run_with_iobinding(binding)
        return y
    return run


def onnx_table(seqlens, dstates, rounds, threads, chunk, clock, burst=3) -> None:
    """Part 2: the exported scan (standard ops; the custom op) in ONNX Runtime vs eager, forward."""
    import onnx

    torch.set_num_threads(threads)
    custom = custom_ops.available()
    print(f"\nPart 2: the exported scan in ONNX Runtime vs eager, threads={threads}, forward medians in ms; "
          f"graph: the chunked scan (chunk {chunk}) in standard ops; op: one edgediag::SelectiveScan node "
          f"(custom op: {'built' if custom is None else custom})\n")
    header = (f"{'L':>5} {'N':>3} | {'eager native':>12} {'eager chunked':>13} | {'ORT graph':>9} {'/ native':>8} "
              f"{'nodes':>6} | {'ORT op':>7} {'/ native':>8} | {'err graph':>9} {'err op':>8}")
    print(header)
    print("-" * len(header))
    native = "cpu" if "cpu" in available_backends() else "chunked"
    for L in seqlens:
        for n in dstates:
            inputs = make_inputs(1, 256, n, L)
            feeds = {k: inputs[k].numpy() for k in ONNX_INPUTS}
            graph = export_scan_onnx(inputs, chunk)
            sessions = {"ort graph": ort_session(graph, threads)}
            if custom is None:
                sessions["ort op"] = ort_session(export_scan_onnx(inputs, custom_op=True), threads)
            runners = {"native": lambda x=inputs: selective_scan(**x, delta_softplus=True, backend=native),
                       "chunked": lambda x=inputs: selective_scan_chunked(**x, delta_softplus=True, chunk_size=chunk),
                       **{k: _bound_run(s, feeds, (1, 256, L)) for k, s in sessions.items()}}
            with torch.no_grad():
                outs = {k: f() for k, f in runners.items()}
                times = {k: [] for k in runners}
                for _ in range(rounds):
                    for k, f in runners.items():
                        times[k] += timed_burst(f, clock, burst)
            ms = {k: _median_ms(v) for k, v in times.items()}
            ref = selective_scan_ref(**inputs, delta_softplus=True)
            op = (f"{ms['ort op']:>7.2f} {ms['ort op'] / ms['native']:>7.2f}x" if "ort op" in ms
                  else f"{'-':>7} {'-':>8}")
            op_err = f"{rel_err(outs['ort op'], ref):>8.1e}" if "ort op" in outs else f"{'-':>8}"
            print(f"{L:>5} {n:>3} | {ms['native']:>12.2f} {ms['chunked']:>13.2f} | {ms['ort graph']:>9.2f} "
                  f"{ms['ort graph'] / ms['native']:>7.1f}x {len(onnx.load_from_string(graph).graph.node):>6} | "
                  f"{op} | {rel_err(outs['ort graph'], ref):>9.1e} {op_err}")


def small_state_split(seqlens, rounds, clock, dim=256, burst=3) -> None:
    """Part 3: where a d_state-1 forward's time goes, one thread. The native kernel with and
    without the z gate (silu) and the softplus of delta, in the channel-lane layout and
    forced to pad the state: both functions cost the same per (channel, step) at any
    d_state, so they bound what the channel lanes can gain over padding."""
    ext = _cpu_ext.load_extension()
    if ext is None:
        return
    torch.set_num_threads(1)
    print("\nPart 3: d_state 1 forward, one thread, medians in ms: lanes (channel-lane layout) and padded, "
          "with and without softplus and the z gate\n")
    variants = {"softplus + z": (True, True), "z only": (False, True), "softplus only": (True, False),
                "neither": (False, False)}
    header = f"{'L':>5} | " + " | ".join(f"{v:^27}" for v in variants)
    print(header)
    print(f"{'':>5} | " + " | ".join(f"{'lanes':>8} {'padded':>8} {'ratio':>9}" for _ in variants))
    print("-" * len(header))
    for L in seqlens:
        x = make_inputs(1, dim, 1, L)
        calls = {}
        for name, (softplus, gate) in variants.items():
            args = [x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"] if gate else None, x["delta_bias"]]
            for narrow in (True, False):
                calls[name, narrow] = lambda a=args, sp=softplus, nw=narrow: ext.fwd(*a, sp, False, nw)
        times = {k: [] for k in calls}
        for f in calls.values():
            f()
        for _ in range(rounds * 3):  # 0.3-8 ms calls: more rounds for the same time
            for k, f in calls.items():
                times[k] += timed_burst(f, clock, burst)
        ms = {k: _median_ms(v) for k, v in times.items()}
        print(f"{L:>5} | " + " | ".join(f"{ms[v, True]:>8.3f} {ms[v, False]:>8.3f} {ms[v, False] / ms[v, True]:>8.2f}x"
                                         for v in variants))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--seqlens", type=ints, default=[256, 1024, 4096], help="comma-separated L values of part 1; 0 skips part 1")
    p.add_argument("--dstates", type=ints, default=[1, 16], help="comma-separated d_state values of part 1")
    p.add_argument("--threads", type=ints, default=[1, 2], help="comma-separated thread counts of part 1")
    p.add_argument("--rounds", type=int, default=10, help="rounds of calls per backend (ref: a fifth of them)")
    p.add_argument("--burst", type=int, default=3,
                   help="timed back-to-back calls per backend and round, after one untimed call (ref: one)")
    p.add_argument("--cold", action="store_true",
                   help="one timed call per backend and round, right after another backend's (caches cold)")
    p.add_argument("--onnx-seqlens", type=ints, default=[1024, 4096],
                   help="comma-separated L values of part 2 (ONNX Runtime vs eager); 0 skips part 2")
    p.add_argument("--onnx-dstates", type=ints, default=[16, 1], help="comma-separated d_state values of part 2")
    p.add_argument("--chunk", type=int, default=32, help="chunk size of the exported scan in part 2")
    p.add_argument("--split-seqlens", type=ints, default=[1024, 4096],
                   help="comma-separated L values of part 3 (a d_state-1 forward's time split); 0 skips part 3")
    p.add_argument("--baseline", metavar="REV",
                   help="also time the forward of the native kernel as it was at this git revision (e.g. 972c70f, "
                        "the kernel when issue 24 was filed), built beside today's")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is instead of keeping freed memory, as training does")
    args = p.parse_args(argv)
    # Training keeps freed memory (TrainConfig.keep_freed_memory): measure the scans under the same
    # allocator. Without it, a call that follows a large free (chunked, ref) page-faults its outputs in
    # again, and which backend pays depends on the interleaving order.
    malloc = "glibc default" if args.default_malloc or not keep_freed_memory() else "freed memory kept, as in training"
    clock = time.perf_counter  # wall: a 2-thread run's time is not one thread's CPU time
    print(f"selective scan, b=1 d=256 fp32, {platform.machine()}, torch {torch.__version__}, "
          f"native kernel: {'built' if _cpu_ext.load_extension() is not None else _cpu_ext.build_error()}, "
          f"malloc: {malloc}")
    if hasattr(os, "getloadavg"):
        print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    burst = 0 if args.cold else args.burst
    print(f"timing: {args.rounds} rounds; per round and backend "
          + ("one call, right after the previous backend's (--cold)" if burst == 0 else
             f"one untimed call, then {burst} timed (ref: one timed call)") + "\n")
    baseline = build_baseline(args.baseline) if args.baseline else None
    if args.seqlens != [0]:
        print_matrix(scan_matrix(args.seqlens, args.dstates, args.threads, args.rounds, clock, baseline=baseline,
                                 burst=burst))
    if args.onnx_seqlens != [0]:
        onnx_table(args.onnx_seqlens, args.onnx_dstates, args.rounds, max(args.threads), args.chunk, clock, burst)
    if args.split_seqlens != [0]:
        small_state_split(args.split_seqlens, args.rounds, clock, burst=burst)
    print("\n" + GOALS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
