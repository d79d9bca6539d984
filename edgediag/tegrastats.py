"""`python -m edgediag.tegrastats`: summarise a Jetson tegrastats log: input power, energy
(per inference), loads. Parsing and summary: :mod:`edgediag.runtime.tegrastats`."""

from __future__ import annotations

import json
import sys

from edgediag import cli
from edgediag.runtime.tegrastats import read_log, summarize


def parser():
    p = cli.make_parser("tegrastats", "Summarise a tegrastats log: input power, energy (per inference), loads.")
    p.add_argument("log", help="tegrastats output (tegrastats --logfile FILE, or its stdout saved)")
    p.add_argument("--interval-ms", type=float, help="tegrastats --interval used (default: from timestamps, else 1000)")
    p.add_argument("--inferences", type=int, help="inferences run during the log: energy per inference")
    p.add_argument("--idle-mw", type=float, help="idle input power of the board, for energy above idle")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.interval_ms is not None and not args.interval_ms > 0:
        raise cli.UserError(f"--interval-ms must be positive, not {args.interval_ms}")
    if args.inferences is not None and args.inferences < 1:
        raise cli.UserError(f"--inferences must be at least 1, not {args.inferences}")
    if args.idle_mw is not None and not args.idle_mw >= 0:
        raise cli.UserError(f"--idle-mw must be >= 0, not {args.idle_mw}")
    summary = summarize(read_log(args.log), args.interval_ms, args.inferences, args.idle_mw)
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    cli.entry(main)
