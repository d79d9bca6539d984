"""Deployment: ONNX export, parity, TensorRT, board presets, the exported bundle and its metadata.

Imports nothing itself: the board-side runtime imports ``edgediag.deploy.metadata`` (and
``tensorrt``) without torch."""
