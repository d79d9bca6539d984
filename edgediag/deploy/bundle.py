"""The self-verifying export bundle (export/README.md, "Self-verifying bundle"): golden inputs
with their PyTorch reference outputs (``golden.npz``), the tolerances they are checked with
(``verify.json``) and a manifest of sha256 digests of every file (``manifest.json``, written
last, atomically). ``python -m edgediag.verify`` (edgediag/runtime/verify.py) reads them."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

GOLDEN = "golden.npz"
VERIFY = "verify.json"
MANIFEST = "manifest.json"
GOLDEN_ITEMS = 4  # at most this many items (rounded up to whole static batches)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_golden(stage: Path, x: np.ndarray, ref: Sequence[np.ndarray], input_name: str,
                 output_names: Sequence[str], threshold: float, tolerance: float, score_scale: float,
                 static: int | None, trt_tolerance: dict[str, float], source: str,
                 reduced: dict | None = None) -> None:
    """``golden.npz`` (the first items of the parity batch and PyTorch's outputs for them) and
    ``verify.json`` (tolerances, threshold, names).

    ``reduced``: the fp16/int8 graph's ``file``, ``precision`` and ``score`` on the same items.
    It is checked against the fp32 references within its own measured error (x 1.5 + 1e-3
    std, room for another CPU's rounding) and must reproduce its own decisions; an engine of
    that precision gets the TensorRT tolerance on top, and the same decisions."""
    n = min(GOLDEN_ITEMS, len(x))
    if static:
        n = min(len(x), math.ceil(n / static) * static)
    arrays = {f"input/{input_name}": np.ascontiguousarray(x[:n], dtype=np.float32)}
    for name, r in zip(output_names, ref):
        arrays[f"output/{name}"] = np.ascontiguousarray(np.asarray(r)[:n])
    scores = arrays[f"output/{output_names[0]}"].astype(np.float64).reshape(-1)
    if math.isfinite(threshold):
        arrays["decisions"] = scores > threshold
    graphs: list = ["model.onnx"]
    engine_tolerance, engine_decisions = dict(trt_tolerance), {}
    if reduced is not None:
        got = np.asarray(reduced["score"], dtype=np.float64).reshape(-1)[:n]
        err = float(np.abs(got - scores).max() / max(score_scale, 1e-12))
        own = 1.5 * err + 1e-3
        entry = {"file": reduced["file"], "precision": reduced["precision"], "tolerance": own,
                 "measured_error": err}
        if math.isfinite(threshold):
            key = f"decisions@{reduced['file']}"
            arrays[key] = got > threshold
            entry["decisions"] = engine_decisions[reduced["precision"]] = key
        graphs.append(entry)
        engine_tolerance[reduced["precision"]] = trt_tolerance.get(reduced["precision"], 0.0) + own
    np.savez(stage / GOLDEN, **arrays)
    info = {"golden": GOLDEN, "graphs": graphs, "inputs": [input_name], "outputs": list(output_names),
            "score_output": output_names[0], "items": int(n), "batch": static, "source": source,
            "threshold": threshold if math.isfinite(threshold) else None,
            "metric": "max |out - ref| of the score / score_scale <= tolerance; identical decisions "
                      "(score > threshold); other outputs reported, not gating",
            "score_scale": float(score_scale), "tolerance": {"onnx": float(tolerance), **engine_tolerance},
            "engine_decisions": engine_decisions}
    (stage / VERIFY).write_text(json.dumps(info, indent=2) + "\n")


def write_manifest(stage: Path) -> dict:
    """``manifest.json``: every file of the bundle (but itself and TensorRT's ``*.cache`` files,
    which a rebuild on the board rewrites) with its sha256 and size, written under a temporary
    name and renamed, so a manifest that exists is complete."""
    files = {}
    for p in sorted(stage.rglob("*")):
        rel = p.relative_to(stage).as_posix()
        if p.is_file() and rel != MANIFEST and not rel.startswith(".manifest") and p.suffix != ".cache":
            files[rel] = {"sha256": sha256(p), "size": p.stat().st_size}
    manifest = {"format": "edgediag-bundle/1", "algorithm": "sha256", "files": files}
    tmp = stage / f".manifest.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")  # the user's umask, as every output
    os.replace(tmp, stage / MANIFEST)
    return manifest
