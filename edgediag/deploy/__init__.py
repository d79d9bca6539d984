"""Deployment: ONNX export, TensorRT, board presets, the exported bundle and its metadata."""
