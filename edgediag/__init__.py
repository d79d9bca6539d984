"""edgediag: industrial anomaly-diagnosis models from training to Jetson.

Pipeline: train -> compress (prune) -> export -> bench -> deploy/monitor,
each stage a module named after it and runnable as ``python -m edgediag.<verb>``.
"""

__version__ = "0.1.0"

VERBS = {
    "train": "train a model on a data folder (one engine for every model)",
    "evaluate": "score a checkpoint on a data folder, print metrics, write JSON and plots",
    "predict": "score every item of a folder with any artifact (.pt/.onnx/.engine), write a CSV",
    "prune": "structured (torch-pruning) and dynamic pruning, then fine-tuning",
    "export": "export to ONNX / TensorRT with parity checks",
    "bench": "params, FLOPs, latency and memory against accuracy, as a report",
    "monitor": "on-device monitoring of a stream with an exported model",
    "verify": "check an export folder without torch: digests, golden inputs, decisions",
    "demo": "the whole pipeline on synthetic data the project generates",
    "tegrastats": "summarise a Jetson tegrastats log: input power, energy per inference, loads",
}
