"""Selective-scan backends side by side: latency, speed-up over ref, error vs ref.

    python benchmarks/scan_report.py                 # b=1, d=256, n=16, L=1024, fp32
    python benchmarks/scan_report.py --seqlen 4096 --rounds 20

Backends run interleaved, one call each per round, so a load change on a
shared machine hits them alike; the table shows medians. The error column is
norm-wise: max|out - out_ref| / max|out_ref| (outputs), and the same for the
last state. The ONNX row is the 'chunked' scan exported with the TorchScript
exporter (opset 17) and run in ONNX Runtime with as many threads as torch.
"""

from __future__ import annotations

import argparse
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

from edgediag.ops import available_backends, selective_scan, selective_scan_chunked  # noqa: E402

GOALS = "goals: cpu <= 4 ms and >= 20x ref; chunked >= 5x ref; ORT <= chunked eager, < 1000 nodes; errors <= 1e-5"


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


class ChunkedScan(torch.nn.Module):
    """The scan as a module with A, D, delta_bias as weights, for export."""

    def __init__(self, inputs, chunk_size=32):
        super().__init__()
        self.A = torch.nn.Parameter(inputs["A"].clone())
        self.D = torch.nn.Parameter(inputs["D"].clone())
        self.delta_bias = torch.nn.Parameter(inputs["delta_bias"].clone())
        self.chunk_size = chunk_size

    def forward(self, u, delta, B, C, z):
        return selective_scan_chunked(u, delta, self.A, B, C, self.D, z, self.delta_bias, delta_softplus=True,
                                      return_last_state=True, chunk_size=self.chunk_size)


ONNX_INPUTS = ("u", "delta", "B", "C", "z")


def export_chunked_onnx(inputs, chunk_size=32) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(ChunkedScan(inputs, chunk_size).eval(), tuple(inputs[k] for k in ONNX_INPUTS), f,
                          dynamo=False, opset_version=17, input_names=list(ONNX_INPUTS),
                          output_names=["y", "last_state"])
    return f.getvalue()


def ort_session(proto: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).float().cpu(), b.float().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dstate", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=32, help="chunk size of the 'chunked' backend and its export")
    p.add_argument("--rounds", type=int, default=30, help="timed calls per backend (ref: a fifth of it)")
    p.add_argument("--threads", type=int, default=None, help="torch and ORT threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="'thread': CPU time of the calling thread, a load-robust proxy on a shared "
                        "machine; needs --threads 1 (everything then runs on that thread)")
    p.add_argument("--no-onnx", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.clock == "thread" and threads != 1:
        p.error("--clock thread needs --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter

    inputs = make_inputs(args.batch, args.dim, args.dstate, args.seqlen)
    backends = available_backends()
    runners = {}
    for name in backends:
        dev_inputs = make_inputs(args.batch, args.dim, args.dstate, args.seqlen,
                                 device="cuda" if name == "cuda" else "cpu")
        kw = dict(delta_softplus=True, return_last_state=True)
        if name == "chunked":
            def run(dev_inputs=dev_inputs, kw=kw):
                return selective_scan_chunked(**dev_inputs, **kw, chunk_size=args.chunk)
        else:
            def run(dev_inputs=dev_inputs, kw=kw, name=name):
                return selective_scan(**dev_inputs, **kw, backend=name)
        runners[name] = run
    nodes = None
    if not args.no_onnx:
        import onnx

        proto = export_chunked_onnx(inputs, args.chunk)
        nodes = len(onnx.load_from_string(proto).graph.node)
        sess = ort_session(proto, threads)
        feeds = {k: inputs[k].numpy() for k in ONNX_INPUTS}
        runners["onnxruntime"] = lambda: sess.run(None, feeds)

    with torch.no_grad():
        outputs = {name: run() for name, run in runners.items()}  # warm-up, and the outputs to compare
        times = {name: [] for name in runners}
        for r in range(args.rounds):
            for name, run in runners.items():
                if name == "ref" and r % 5:
                    continue
                if name == "cuda":
                    torch.cuda.synchronize()
                t0 = clock()
                run()
                if name == "cuda":
                    torch.cuda.synchronize()
                times[name].append(clock() - t0)

    ref_out, ref_state = outputs["ref"]
    ref_ms = statistics.median(times["ref"]) * 1e3
    print(f"selective scan  b={args.batch} d={args.dim} n={args.dstate} L={args.seqlen} fp32, "
          f"chunk={args.chunk}, threads={threads}, clock={args.clock}, {platform.machine()}")
    if hasattr(os, "getloadavg"):
        print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("error = max|out - ref| / max|ref|\n")
    header = f"{'backend':<12} {'median ms':>10} {'min ms':>8} {'speed-up':>9} {'err out':>10} {'err state':>10}  note"
    print(header)
    print("-" * len(header))
    for name in runners:
        out, state = outputs[name]
        med, best = statistics.median(times[name]) * 1e3, min(times[name]) * 1e3
        note = f"{nodes} ONNX nodes" if name == "onnxruntime" else ""
        print(f"{name:<12} {med:>10.2f} {best:>8.2f} {ref_ms / med:>8.1f}x {rel_err(out, ref_out):>10.2e} "
              f"{rel_err(state, ref_state):>10.2e}  {note}")
    print("\n" + GOALS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
