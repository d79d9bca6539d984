"""`python -m edgediag.prune`: Structured (torch-pruning) and dynamic pruning of a checkpoint, then fine-tuning.

Not available yet: tracked in issue 8. The verb exists so the CLI is complete.
"""

from __future__ import annotations

from edgediag import cli


def main(argv=None) -> int:
    cli.make_parser("prune", "Structured (torch-pruning) and dynamic pruning of a checkpoint, then fine-tuning. (not available yet: issue 8)").parse_args(argv)
    raise cli.UserError("'prune' is not available yet (tracked in issue 8)")


if __name__ == "__main__":
    cli.entry(main)
