"""edgediag: industrial anomaly-diagnosis models from training to Jetson.

Pipeline: train -> compress (prune) -> export -> bench -> deploy/monitor,
each stage a module named after it and runnable as ``python -m edgediag.<verb>``.
"""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that wait for work spin for GOMP_SPINCOUNT iterations (libgomp default 300 000)
# before sleeping. On a 2-core machine with another job running, torch's second thread spins
# while the core it needs is taken: tastgram_mfn_small trained 20 epochs in 91 s beside one
# CPU-bound job, against 16.7 s idle. 20 000 spins: 34.5 s loaded, 16.6 s idle (unchanged);
# OMP_WAIT_POLICY=PASSIVE: 27 s loaded but 18.5 s idle. Set before torch loads libgomp (the
# verbs import edgediag first); a value the user set wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "20000")

VERBS = {
    "train": "train a model on a data folder (one engine for every model)",
    "evaluate": "score a checkpoint on a data folder, print metrics, write JSON and plots",
    "predict": "score every item of a folder with any artifact (.pt/.onnx/.engine), write a CSV",
    "prune": "structured (torch-pruning) and dynamic pruning, then fine-tuning",
    "export": "export to ONNX / TensorRT with parity checks",
    "bench": "params, FLOPs and latency against accuracy, as a report",
    "monitor": "on-device monitoring of a stream with an exported model",
    "verify": "check an export folder without torch: digests, golden inputs, decisions",
    "demo": "the whole pipeline on synthetic data the project generates",
    "tegrastats": "summarise a Jetson tegrastats log: input power, energy per inference, loads",
}

# The board side (runtime, verify, monitor, tegrastats and the deploy files they read) runs on
# JetPack 5's Python 3.8 with the `board` extra; everything else (training, pruning, export,
# the models) needs Python >= 3.10 and torch. On an older Python, importing a training-side
# module fails at once with one line saying so, instead of a SyntaxError deep inside it.
BOARD_MODULES = ("runtime", "verify", "monitor", "tegrastats", "errors", "utils", "cli", "__main__", "deploy",
                 "deploy.metadata", "deploy.bundle", "deploy.trt_engine")
MIN_TRAINING_PYTHON = (3, 10)


def needs_newer_python(module: str, version=None) -> str:
    """The error for importing edgediag ``module`` on Python ``version`` ("" if it is fine)."""
    import sys

    version = tuple(version or sys.version_info[:2])
    parts = module.split(".")
    if parts[0] != "edgediag" or len(parts) < 2 or version >= MIN_TRAINING_PYTHON:
        return ""
    if ".".join(parts[1:3]) in BOARD_MODULES or (parts[1] in BOARD_MODULES and parts[1] != "deploy"):
        return ""
    return (f"{module} needs Python >= {'.'.join(map(str, MIN_TRAINING_PYTHON))} (this is "
            f"{'.'.join(map(str, version))}); on this Python edgediag runs its board side only: "
            f"python -m edgediag.verify / monitor / tegrastats and edgediag.runtime")


def _install_board_guard() -> None:
    import importlib.abc
    import sys

    class BoardOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            message = needs_newer_python(fullname)
            if message:
                raise ImportError(message)
            return None

    sys.meta_path.insert(0, BoardOnly())


if needs_newer_python("edgediag.train"):
    _install_board_guard()
