"""`python -m edgediag.export`: export to ONNX / TensorRT with parity checks."""

from edgediag import cli
from edgediag.deploy.onnx import main, parser  # noqa: F401

if __name__ == "__main__":
    cli.entry(main)
