"""`python -m edgediag.monitor`: Monitor a stream (wav, folder, microphone, video, CSV) with an exported model.

Not available yet: tracked in issue 11. The verb exists so the CLI is complete.
"""

from __future__ import annotations

from edgediag import cli


def main(argv=None) -> int:
    cli.make_parser("monitor", "Monitor a stream (wav, folder, microphone, video, CSV) with an exported model. (not available yet: issue 11)").parse_args(argv)
    raise cli.UserError("'monitor' is not available yet (tracked in issue 11)")


if __name__ == "__main__":
    cli.entry(main)
