"""One inference interface over the deployment backends: ``edgediag.runtime.load(path)``.

    pred = runtime.load("export/fan/model.onnx", threads=1)
    x = pred.prepare(raw_window)            # waveform / sensor window / frame -> graph input item
    scores = pred.score(np.stack([x]))      # (B,) anomaly scores
    pred.is_anomalous(scores)               # score > threshold (the artifact's calibrated one)

Backends by suffix: ``.pt`` (an edgediag checkpoint, eager PyTorch), ``.onnx`` (ONNX
Runtime) and ``.engine``/``.plan`` (TensorRT, with the ``model.onnx`` of the same export
folder beside it for the metadata). The threshold and the pre-processing come from the
artifact's metadata (export/README.md, "Metadata contract"), so a board needs nothing but
the artifact. This module imports neither torch nor onnx at import time: a board with the
``edgediag[board]`` extra (numpy, onnxruntime, soundfile, pyyaml) runs ONNX graphs of every
family: the sequence models' feature front end (their graphs take features) is numpy
(edgediag.runtime.features); torch is imported lazily for ``.pt`` checkpoints only.

Streaming graphs (``--streaming`` exports) are stepped: ``initial_states(batch)`` gives the
zero states, ``step(x_t, states) -> (outputs, new_states)`` one time step.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgediag.deploy.metadata import parse_metadata, read_metadata
from edgediag.errors import UserError
from edgediag.utils import group_key, group_thresholds

# The one map from artifact suffix to backend (bench derives its names from it).
SUFFIX_BACKEND = {".pt": "pytorch", ".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt"}


def backend_of(path: str | Path) -> str:
    """The backend that runs an artifact, by its suffix."""
    path = Path(path)
    backend = SUFFIX_BACKEND.get(path.suffix.lower())
    if backend is None:
        raise UserError(f"{path}: unknown artifact type {path.suffix!r} (expected .pt, .onnx, .engine or .plan)")
    return backend


def load(path: str | Path, threads: int | None = None, device: str | None = None,
         streaming: bool = False) -> Predictor:
    """A :class:`Predictor` for an artifact. ``threads``: CPU threads (ORT intra-op / torch);
    ``device``: ``cpu`` or ``cuda`` (ORT's CUDA provider or PyTorch on the GPU);
    ``streaming``: for a ``.pt`` checkpoint, run ``model.streaming_module()`` instead of the
    window graph (ONNX/TensorRT artifacts say themselves whether they are streaming)."""
    path = Path(path)
    backend = backend_of(path)
    if not path.is_file():
        raise UserError(f"artifact not found: {path}")
    if backend == "pytorch":
        return _TorchPredictor(path, threads, device, streaming)
    if backend == "onnxruntime":
        return _OrtPredictor(path, threads, device)
    return _TrtPredictor(path)


# --- pre-processing ----------------------------------------------------------------------------------
class Preprocess:
    """Raw stream data -> one graph input item, as the training data readers made it.

    ``unit`` says what a window is made of: ``samples`` (``window`` samples at ``rate``,
    ``channels`` values each: audio, vibration, sensor CSV) or ``frames`` (``window`` video
    frames; images are one frame). ``__call__(window)`` returns the float32 item; frames come
    as a stack ``(window, H, W[, 3])`` as OpenCV decodes them (``frame(img)`` for one image)."""

    def __init__(self, spec: dict, model_config: dict, threads: int | None = None):
        self.spec, self.cfg, self.threads = spec, model_config, threads
        kind = spec.get("kind", "")
        shape = [int(d) for d in spec.get("shape") or []]
        self.kind, self.shape = kind, shape
        self.frontend = None
        self.edge_frames = 0  # frames at a window's end whose STFT frame runs past it
        if kind == "audio":
            self.unit, self.channels = "samples", 1
            self.rate = int(spec.get("sample_rate") or model_config.get("sample_rate") or 16000)
            self.window = shape[-1]
            self.pad_mode = str(model_config.get("pad_mode", "wrap"))
        elif kind == "image":
            self.unit, self.window, self.channels, self.rate = "frames", 1, shape[0], 0
        elif kind == "sequence" and spec.get("input_kind") == "video":
            self.unit, self.window, self.channels, self.rate = "frames", shape[0], shape[1], 0
        elif kind == "sequence":
            self._sequence(spec, shape)
        else:
            raise UserError(f"unsupported input kind {kind!r} in the artifact's input_spec")

    def _sequence(self, spec: dict, shape: list[int]) -> None:
        frames, feats = shape[0], shape[1]
        kind = spec.get("frontend", "none")
        self.unit = "samples"
        self.rate = int(spec.get("sample_rate") or 0)
        if kind in ("logmel", "logspec", "frames"):
            hop = int(spec["hop_length"])
            self.channels = 1
            self.window = int(spec.get("window") or 0) or frames * hop
            # numpy, parity-tested against the training reader's torch front end (tests/test_runtime.py)
            from edgediag.runtime.features import SequenceFrontend

            params = {"seq_len": frames, "hop_length": hop}
            if kind != "frames":
                params.update(n_fft=int(spec["n_fft"]), n_mels=int(spec.get("n_mels") or 64), sample_rate=self.rate)
                # center=True: the last frames' FFT windows run past the window's end (padding)
                self.edge_frames = int(math.ceil(params["n_fft"] / 2 / hop))
            self.frontend = SequenceFrontend(kind, params)
            self.hop_length = hop
        else:  # sensor rows: (T, F) windows of raw values at the recorded rate
            self.channels, self.window, self.hop_length = feats, frames, 1

    def __call__(self, window: np.ndarray) -> np.ndarray:
        if self.unit == "frames":  # a stack of ``window`` frames (one for an image model)
            items = np.stack([self.frame(f) for f in window])
            return items if self.kind == "sequence" else items[0]
        x = np.asarray(window, dtype=np.float32)
        if self.kind == "audio":
            x = x.reshape(-1)
            if len(x) != self.window:  # a short window (end of a file) is padded like the reader does
                x = np.resize(x, self.window) if self.pad_mode == "wrap" else np.pad(x[: self.window], (0, max(0, self.window - len(x))))
            return x
        if self.frontend is not None:
            return self.frontend(x.reshape(-1)[: self.window])
        return x.reshape(self.window, self.channels)

    def frame(self, frame: np.ndarray) -> np.ndarray:
        """One video frame (H, W[, 3] BGR as OpenCV decodes it, uint8 or [0,1]) -> (C, H, W) in [0, 1]."""
        import cv2

        size = self.shape[-1]
        f = np.asarray(frame)
        scale = 255.0 if f.dtype == np.uint8 else 1.0
        f = f.astype(np.float32) / scale
        if f.ndim == 3 and self.channels == 1:
            f = cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)
        elif f.ndim == 2 and self.channels == 3:
            f = cv2.cvtColor(f, cv2.COLOR_GRAY2RGB)
        elif f.ndim == 3:
            f = cv2.cvtColor(f, cv2.COLOR_BGR2RGB)
        interp = cv2.INTER_AREA if max(f.shape[:2]) > size else cv2.INTER_LINEAR  # as the image reader
        f = cv2.resize(f, (size, size), interpolation=interp)
        if f.ndim == 2:
            f = f[:, :, None]
        return np.ascontiguousarray(f.transpose(2, 0, 1), dtype=np.float32)


# --- predictors ---------------------------------------------------------------------------------------
class Predictor(abc.ABC):
    """Common part: metadata, batching to a static graph batch, decisions, streaming.
    Each backend (ONNX Runtime, TensorRT, PyTorch) implements :meth:`_run`."""

    backend = ""

    def __init__(self, path: Path, metadata: dict[str, Any], input_names: Sequence[str],
                 output_names: Sequence[str], batch: int | None):
        self.path = path
        self.metadata = metadata
        self.input_spec: dict = dict(metadata.get("input_spec") or {})
        self.threshold = float(metadata.get("threshold", float("nan")))
        # Per section × domain thresholds where the calibration made them (DCASE data).
        self.group_thresholds = group_thresholds(metadata.get("threshold_calibration"))
        self.model_name = str(metadata.get("model_name", ""))
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.batch = batch  # the graph's static batch; None = any
        self.stream_info: dict | None = metadata.get("streaming") or None
        self.threads: int | None = None  # CPU threads the backend was given (pre-processing uses as many)
        self.streaming = bool(self.stream_info)
        self._prep: Preprocess | None = None

    # pre-processing from the metadata
    @property
    def preprocess(self) -> Preprocess:
        if self._prep is None:
            self._prep = Preprocess(self.input_spec, dict(self.metadata.get("model_config") or {}), self.threads)
        return self._prep

    def prepare(self, window: np.ndarray) -> np.ndarray:
        return self.preprocess(window)

    @abc.abstractmethod
    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One call with the graph's inputs in order -> its outputs in order."""

    def outputs(self, batch) -> dict[str, np.ndarray]:
        """All graph outputs for a batch of prepared items, chunked/padded to a static batch."""
        if self.streaming:
            raise UserError(f"{self.path} is a streaming graph: use step(x_t, states)")
        x = _as_numpy(batch)
        n = len(x)
        if n == 0:
            raise UserError("an empty batch: nothing to score")
        step = self.batch or max(n, 1)
        parts: list[list[np.ndarray]] = []
        for start in range(0, n, step):
            chunk = x[start:start + step]
            if self.batch and len(chunk) < self.batch:  # pad the static graph's last batch
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - len(chunk), axis=0)])
            outs = self._run([chunk])
            parts.append([np.asarray(o)[: min(step, n - start)] for o in outs])
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(self.output_names)}

    def score(self, batch) -> np.ndarray:
        """Anomaly scores (B,) of a batch of prepared items (the graph's first output)."""
        return self.outputs(batch)[self.output_names[0]].reshape(-1).astype(np.float64)

    def threshold_for(self, section: str = "", domain: str = "") -> float:
        """The threshold of an item of this section and domain (its group's, else the global)."""
        return self.group_thresholds.get(group_key(section or "", domain or ""), self.threshold)

    def is_anomalous(self, scores, threshold: float | None = None) -> np.ndarray:
        t = self.threshold if threshold is None else float(threshold)
        if not math.isfinite(t):
            raise UserError(f"{self.path} has no calibrated threshold; pass one (--threshold)")
        return np.asarray(scores) > t

    # streaming
    def initial_states(self, batch: int = 1) -> list[np.ndarray]:
        if not self.streaming:
            raise UserError(f"{self.path} is not a streaming graph")
        shapes = self.stream_info.get("state_shapes") or []
        names = self.stream_info.get("state_inputs") or []
        if isinstance(shapes, dict):
            shapes = [shapes[n] for n in names]
        return [np.zeros([batch if not isinstance(d, int) or i == 0 else d for i, d in enumerate(s)], np.float32)
                for s in shapes]

    def step(self, x_t, states: Sequence[np.ndarray]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """One time step: ``(x_t, *states) -> (step outputs by name, new states)``."""
        if not self.streaming:
            raise UserError(f"{self.path} is not a streaming graph")
        outs = self._run([_as_numpy(x_t), *[np.asarray(s, np.float32) for s in states]])
        n_states = len(states)
        names = self.stream_info.get("step_outputs") or self.output_names[: len(outs) - n_states]
        return dict(zip(names, outs[: len(outs) - n_states])), list(outs[len(outs) - n_states:])


def _as_numpy(batch) -> np.ndarray:
    if hasattr(batch, "detach"):  # a torch tensor
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)


def check_graph_io(path: Path, meta: dict, inputs: Sequence[tuple[str, Sequence]], outputs: Sequence[str]) -> None:
    """The metadata's ``input_spec`` against the graph's real inputs/outputs (names, rank,
    static dims): a mismatch (metadata edited, or copied from another export) is one line
    naming it, not an ONNX Runtime error at the first batch. ``inputs``: (name, shape) with
    a dynamic dim anything but an int."""
    spec = meta.get("input_spec")
    if not isinstance(spec, dict):
        raise UserError(f"{path}: edgediag metadata input_spec is not an object")
    names = [n for n, _ in inputs]
    if not names or not outputs:
        raise UserError(f"{path}: the graph has no inputs or no outputs")

    def mismatch(what: str) -> UserError:
        return UserError(f"{path}: edgediag metadata does not match the graph: {what} (re-export the model)")

    listed = spec.get("inputs")
    if isinstance(listed, list) and listed:
        want = [str(v.get("name")) for v in listed if isinstance(v, dict)]
        if want != names:
            raise mismatch(f"input_spec.inputs names {want}, the graph's inputs are {names}")
        for v, (name, shape) in zip(listed, inputs):
            _same_dims(v.get("shape"), shape, f"input {name!r}", mismatch)
    listed = spec.get("outputs")
    if isinstance(listed, list) and listed:
        want = [str(v.get("name")) for v in listed if isinstance(v, dict)]
        if want != list(outputs):
            raise mismatch(f"input_spec.outputs names {want}, the graph's outputs are {list(outputs)}")
    score = spec.get("score_output")
    if score is not None and score != outputs[0]:
        raise mismatch(f"score_output {score!r} is not the graph's first output ({', '.join(outputs)})")
    item = spec.get("shape")
    if not isinstance(item, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in item):
        raise mismatch(f"input_spec.shape {item!r} is not a list of positive integers (one item's shape)")
    if not meta.get("streaming"):  # a streaming graph's input is one time step
        _same_dims([None, *item], inputs[0][1], f"input_spec.shape {item} (one item) vs input {names[0]!r}",
                   mismatch)


def _same_dims(want, have, what: str, mismatch) -> None:
    if not isinstance(want, list) or have is None:
        return
    have = list(have)
    if len(want) != len(have):
        raise mismatch(f"{what}: rank {len(want)} in the metadata, {len(have)} in the graph (shape {have})")
    for i, (a, b) in enumerate(zip(want, have)):
        if isinstance(a, int) and not isinstance(a, bool) and isinstance(b, int) and a != b:
            raise mismatch(f"{what}: dim {i} is {a} in the metadata, {b} in the graph (shape {have})")


class _OrtPredictor(Predictor):
    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None, device: str | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("onnxruntime is not installed (pip install 'edgediag[runtime]')") from None
        # imported here: edgediag.runtime must not load custom_ops, which also runs as
        # `python -m edgediag.runtime.custom_ops` (runpy warns about a module imported twice)
        from edgediag.runtime.custom_ops import open_session

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = open_session(path, opts, providers)
        except UserError:  # the graph needs the scan's custom-op library and it cannot be built here
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure is a bad input file
            raise UserError(f"{path} is not a loadable ONNX graph ({str(exc).splitlines()[0][:160]})") from None
        meta = parse_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        check_graph_io(path, meta, [(i.name, i.shape) for i in ins], [o.name for o in outs])
        b = ins[0].shape[0] if ins and ins[0].shape else None
        super().__init__(path, meta, [i.name for i in ins], [o.name for o in outs], b if isinstance(b, int) else None)
        self.threads = threads

    def _run(self, arrays):
        return self.session.run(None, dict(zip(self.input_names, arrays)))


class _TrtPredictor(Predictor):
    backend = "tensorrt"

    def __init__(self, path: Path):
        graph = path.with_name("model.onnx")
        if not graph.is_file():
            raise UserError(f"{path}: no model.onnx beside the engine to read the edgediag metadata from "
                            "(keep the export folder together)")
        meta = parse_metadata(read_metadata(graph), graph)
        try:
            # TensorRT I/O with CUDA buffers through torch, cuda-python or pycuda: the export's
            # own runner (edgediag/deploy/trt_engine.py, torch-free), shared with its engine parity check
            from edgediag.deploy.trt_engine import EngineRunner
        except ImportError:
            raise UserError("tensorrt is not installed here (JetPack brings it: python3 -c 'import tensorrt')") from None
        self.runner = EngineRunner(str(path))
        shapes = (meta.get("input_spec") or {}).get("inputs") or []
        b = shapes[0]["shape"][0] if shapes and shapes[0].get("shape") else None
        super().__init__(path, meta, self.runner.inputs, self.runner.outputs, b if isinstance(b, int) else None)

    def _run(self, arrays):
        out = self.runner(dict(zip(self.input_names, arrays)))
        return [out[n] for n in self.output_names]


class _TorchPredictor(Predictor):
    backend = "pytorch"

    def __init__(self, path: Path, threads: int | None, device: str | None, streaming: bool, loaded=None):
        import torch

        from edgediag.engine.checkpoint import load_model

        if threads:
            torch.set_num_threads(int(threads))
        try:
            self.device = torch.device(device or "cpu")
        except (RuntimeError, TypeError):
            raise UserError(f"--device {device!r} is not a device: cpu or cuda") from None
        model, ckpt = loaded if loaded is not None else load_model(path)
        self.model = model.to(self.device).eval()
        data = ckpt.get("data") or {}
        threshold = float(ckpt.get("threshold", float(model.threshold)))
        meta: dict[str, Any] = {
            "model_name": ckpt["model_name"], "model_config": dict(ckpt.get("model_config") or {}),
            "input_spec": dict(model.input_spec()), "threshold": threshold,
            "classes": list(data.get("classes") or []), "normal_classes": list(data.get("normal_classes") or []),
            "data_kind": str(data.get("kind") or model.data_kind), "data": dict(data),
            "threshold_calibration": (ckpt.get("meta") or {}).get("threshold_calibration") or {}}
        if streaming:
            self.module = model.streaming_module().to(self.device).eval()
            names = list(self.module.input_names)
            example = self.module.example_inputs(1)
            outs = list(self.module.output_names)
            n_states = len(names) - 1
            meta["streaming"] = {"step_input": names[0], "state_inputs": names[1:],
                                 "step_outputs": outs[: len(outs) - n_states],
                                 "state_outputs": outs[len(outs) - n_states:],
                                 "state_shapes": [list(s.shape) for s in example[1:]], "initial_states": "zeros"}
            super().__init__(path, meta, names, outs, None)
        else:
            self.module = model.export_module().to(self.device).eval()
            outs = list(getattr(self.module, "output_names", ("score",)))
            super().__init__(path, meta, ["input"], outs, None)
        self._torch = torch
        self.threads = threads

    def _run(self, arrays):
        torch = self._torch
        with torch.inference_mode():
            out = self.module(*[torch.from_numpy(a).to(self.device) for a in arrays])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().float().cpu().numpy() for o in out]  # .cpu() waits for a CUDA device


def from_model(model, ckpt: dict, path: str | Path = "<memory>", threads: int | None = None,
               device: str | None = None) -> Predictor:
    """A PyTorch predictor over a model already loaded with ``checkpoint.load_model``
    (bench evaluates and times the same model object)."""
    return _TorchPredictor(Path(path), threads, device, False, loaded=(model, ckpt))


__all__ = ["load", "from_model", "backend_of", "Predictor", "Preprocess", "parse_metadata", "SUFFIX_BACKEND"]
