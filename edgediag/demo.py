"""`python -m edgediag.demo`: The whole pipeline on synthetic data the project generates.

Not available yet: tracked in issue 10. The verb exists so the CLI is complete.
"""

from __future__ import annotations

from edgediag import cli


def main(argv=None) -> int:
    cli.make_parser("demo", "The whole pipeline on synthetic data the project generates. (not available yet: issue 10)").parse_args(argv)
    raise cli.UserError("'demo' is not available yet (tracked in issue 10)")


if __name__ == "__main__":
    cli.entry(main)
