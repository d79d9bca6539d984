"""The one training engine: the model interface, the registry, the training loop (resume,
DDP), checkpoints, and the metrics and calibration every model reports with."""
