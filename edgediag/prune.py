"""`python -m edgediag.prune`: structured (torch-pruning), dynamic and depth pruning, then fine-tuning."""

from edgediag import cli
from edgediag.compress.pipeline import main, parser  # noqa: F401

if __name__ == "__main__":
    cli.entry(main)
