"""`python -m edgediag.bench`: params, FLOPs, latency and memory against accuracy, as a report."""

from edgediag import cli
from edgediag.measure.bench import main, parser  # noqa: F401

if __name__ == "__main__":
    cli.entry(main)
