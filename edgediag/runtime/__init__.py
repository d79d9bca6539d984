"""What runs on the board: one predictor over PyTorch / ONNX Runtime / TensorRT, stream
sources, the monitor and tegrastats. Importable without torch (torch loads lazily for .pt)."""

from edgediag.runtime.predictor import (
    SUFFIX_BACKEND,
    Predictor,
    Preprocess,
    backend_of,
    from_model,
    load,
    parse_metadata,
)

__all__ = ["SUFFIX_BACKEND", "Predictor", "Preprocess", "backend_of", "from_model", "load", "parse_metadata"]
