"""`python -m edgediag.monitor`: on-device monitoring of a stream with an exported model."""

from edgediag import cli
from edgediag.runtime.monitor import main, parser  # noqa: F401

if __name__ == "__main__":
    cli.entry(main)
