"""`python -m edgediag.export`: Export a checkpoint to ONNX or TensorRT with parity checks.

Not available yet: tracked in issue 9. The verb exists so the CLI is complete.
"""

from __future__ import annotations

from edgediag import cli


def main(argv=None) -> int:
    cli.make_parser("export", "Export a checkpoint to ONNX or TensorRT with parity checks. (not available yet: issue 9)").parse_args(argv)
    raise cli.UserError("'export' is not available yet (tracked in issue 9)")


if __name__ == "__main__":
    cli.entry(main)
