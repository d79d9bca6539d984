"""`python -m edgediag.bench`: params, FLOPs and latency against accuracy, as a report.

    python -m edgediag.bench --checkpoint runs/a/best.pt export/a/model.onnx --data DIR --out bench/ \\
        [--backends eager,onnxruntime,tensorrt] [--threads N] [--batch 1,8] [--warmup W --latency-runs I]
        [--rounds R]   # interleave the timed runs of all artifacts in R rounds (shared machines)
        [--json]     # the table as one JSON object on stdout

``--model`` (for ``--checkpoint``) and ``--iters`` (for ``--latency-runs``) are the old spellings,
still accepted.

The measuring is :mod:`edgediag.measure.bench`; it writes report.json, report.md, pareto.png
and plots/ into --out.
"""

from __future__ import annotations

from edgediag import cli
from edgediag.measure.bench import run
from edgediag.measure.timing import add_timing_args
from edgediag.runtime.tegrastats import read_log
from edgediag.utils import select_device


def parser():
    p = cli.make_parser("bench", "Params, FLOPs and latency against accuracy, as a report.")
    artifacts = p.add_argument("--checkpoint", nargs="+", required=True, metavar="PATH",
                               help="the artifacts to measure: checkpoints (.pt), ONNX graphs (.onnx) and "
                                    "TensorRT engines (.engine/.plan)")
    cli.add_alias(p, artifacts, "--model")  # the old spelling
    cli.add_data_args(p, "split for accuracy")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for report.json, report.md, pareto.png, plots/")
    p.add_argument("--backends", default="eager,onnxruntime,tensorrt",
                   help="comma-separated subset of eager,onnxruntime,tensorrt (default: all)")
    timing_args = add_timing_args(p)
    cli.add_alias(p, timing_args["latency_runs"], "--iters")  # the old spelling
    p.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8 (default 1)")
    p.add_argument("--rounds", type=int, default=1, metavar="R",
                   help="not a count of timed runs: how the measurement is ordered. The --latency-runs of every "
                        "figure are split into R rounds that each go through every artifact in turn, so the "
                        "machine's drift hits every row alike (1 <= R <= --latency-runs; RSS is then the peak "
                        "over all rows; default 1: each artifact timed in one block, as power logs need)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time (default); cpu: the timing thread's CPU time, which leaves out "
                        "time the thread was preempted or its virtual CPU stolen (a shared or virtual "
                        "machine); needs --threads 1, where it equals the compute latency")
    p.add_argument("--max-items", type=int, default=0, help="score at most this many items (0 = all)")
    p.add_argument("--device", default="cpu", help="eager device: cpu or cuda (default cpu)")
    p.add_argument("--tegrastats", metavar="LOG",
                   help="a tegrastats log written during this run (tegrastats --interval 100 --logfile LOG): "
                        "each timed row gets the power summary of its time span, energy per item")
    p.add_argument("--tegrastats-interval-ms", type=float, help="the --interval of that log (default: from its timestamps)")
    cli.add_json_arg(p)
    return p



def main(argv=None) -> int:
    args = parser().parse_args(argv)
    cli.output_folder(args.out)  # before the timing runs, not after them
    if args.tegrastats_interval_ms is not None and not args.tegrastats_interval_ms > 0:
        raise cli.UserError(f"--tegrastats-interval-ms must be positive, not {args.tegrastats_interval_ms}")
    select_device(args.device)  # a bad --device fails now
    if args.tegrastats:  # a bad log fails now, not after the timing runs
        read_log(args.tegrastats)
    with cli.json_stdout(args.json), cli.locked_output(args.out):
        return run(args)


if __name__ == "__main__":
    cli.entry(main)
