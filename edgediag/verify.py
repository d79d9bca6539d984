"""`python -m edgediag.verify`: check an export bundle before it is used (torch-free).

Checks the sha256 manifest (a changed, missing or unlisted graph is tampering), runs the
golden inputs through ONNX Runtime (or ``--engine FILE`` through TensorRT) and compares the
outputs and decisions with the PyTorch references within the recorded tolerance. Prints one
table. Exit codes: 0 all passed; 1 a mismatch or tampering; 2 bad input (no manifest, no
folder); 3 ``--engine`` where tensorrt is not installed.

    python -m edgediag.verify export/out
    python3 -m edgediag.verify export/orin --engine export/orin/model.engine
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgediag import cli
from edgediag.runtime.verify import NoTensorRT, format_table, verify


def parser():
    p = cli.make_parser("verify", "Check an export folder: digests, golden inputs, decisions.")
    p.add_argument("export_dir", help="the folder `python -m edgediag.export` wrote")
    p.add_argument("--engine", help="a TensorRT engine built from the bundle's model.onnx to check instead")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                   help="the engine's precision, for its tolerance (default: the export's)")
    cli.add_threads_arg(p, None, "ONNX Runtime threads (default: the runtime's)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        rows, code = verify(Path(args.export_dir), Path(args.engine) if args.engine else None, args.precision,
                            args.threads)
    except NoTensorRT as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(format_table(rows))
    failed = [r for r in rows if not r["status"].startswith("ok")]
    if failed:
        print(f"verify failed: {'; '.join(r['artifact'] + ': ' + r['status'] for r in failed)}", file=sys.stderr)
    else:
        print(f"verify: {args.export_dir} ok")
    return code


if __name__ == "__main__":
    cli.entry(main)
