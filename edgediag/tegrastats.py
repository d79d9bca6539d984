"""`python -m edgediag.tegrastats`: summarise a Jetson tegrastats log: power, energy per inference."""

from edgediag import cli
from edgediag.runtime.tegrastats import main  # noqa: F401

if __name__ == "__main__":
    cli.entry(main)
