"""The metadata contract of an exported graph (``metadata_props`` of ``model.onnx``,
export/README.md "Metadata contract"): the one writer (export) and the one reader (runtime,
bench, tests). Torch-free and onnx imported lazily, so the board-side runtime can use it with
only onnxruntime installed."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgediag import __version__
from edgediag.errors import UserError

# Keys whose string values are JSON: encoded by the writer, decoded by parse_metadata.
JSON_KEYS = ("model_config", "input_spec", "classes", "normal_classes", "export", "normalisation", "streaming",
             "threshold_calibration")
_NORMALISATION = re.compile(r"^(pixel|in|input|feature)_(mean|std|min|max)$")


# --- writing (export) ----------------------------------------------------------------------------
def graph_io(values: Sequence) -> list[dict]:
    """``[{"name", "shape", "dtype"}]`` of graph inputs/outputs (ValueInfoProto); a dynamic
    axis is its name (``"batch"``)."""
    import onnx

    out = []
    for v in values:
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]
        out.append({"name": v.name, "shape": dims,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name})
    return out


def normalisation_stats(model) -> dict[str, list[float]]:
    """Input statistics the model holds as buffers (pixel/in/input/feature mean/std/min/max)."""
    stats = {}
    for name, buf in model.named_buffers():
        if _NORMALISATION.match(name.rsplit(".", 1)[-1]) and buf.numel() <= 4096:
            stats[name] = [float(v) for v in buf.detach().float().reshape(-1)]
    return stats


def build_metadata(model, ckpt: dict, graph, export_info: dict, streaming: dict | None) -> dict[str, str]:
    """The contract's values for ``model`` exported as ``graph`` (an onnx.ModelProto)."""
    data = ckpt.get("data") or {}
    spec = dict(model.input_spec())
    spec.update(inputs=graph_io(graph.graph.input), outputs=graph_io(graph.graph.output),
                score_output=graph.graph.output[0].name)
    threshold = float(ckpt.get("threshold", float(model.threshold)))
    values: dict[str, Any] = {
        "edgediag_version": __version__,
        "model_name": str(ckpt.get("model_name", model.model_name)),
        "model_config": ckpt.get("model_config") or {},
        "input_spec": spec,
        "threshold": repr(threshold) if math.isfinite(threshold) else "nan",
        "classes": list(data.get("classes") or []),
        "normal_classes": list(data.get("normal_classes") or []),
        "data_kind": str(data.get("kind") or model.data_kind),
        "export": export_info,
    }
    calibration = (ckpt.get("meta") or {}).get("threshold_calibration")
    if calibration:  # the promise the threshold makes: target FAR, on how many normals, its interval
        values["threshold_calibration"] = calibration
    stats = normalisation_stats(model)
    if stats:
        values["normalisation"] = stats
    if streaming:
        values["streaming"] = streaming
    return {k: json.dumps(v) if k in JSON_KEYS else v for k, v in values.items()}


def set_metadata(graph, meta: dict[str, str]) -> None:
    """Replace the graph's metadata_props by ``meta`` and stamp edgediag as its producer."""
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name = "edgediag"
    graph.producer_version = __version__


# --- reading (runtime, bench, tests) --------------------------------------------------------------
def read_metadata(path: str | Path) -> dict[str, str]:
    """metadata_props of an exported graph as a dict (values are strings, several JSON).
    Reads with onnx where installed, else with ONNX Runtime (a board may have only that)."""
    path = Path(path)
    try:
        import onnx
    except ImportError:
        onnx = None
    try:
        if onnx is not None:
            return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        import onnxruntime  # noqa: F401 - the ImportError below names the extra

        from edgediag.runtime.custom_ops import open_session

        return dict(open_session(path).get_modelmeta().custom_metadata_map)
    except ImportError:
        raise UserError("reading ONNX metadata needs onnx or onnxruntime (pip install 'edgediag[runtime]')") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise UserError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None


def parse_metadata(raw: dict[str, str], where: Path) -> dict[str, Any]:
    """The contract's string values -> Python values (JSON fields decoded, threshold a float)."""
    if "model_name" not in raw or "input_spec" not in raw:
        raise UserError(f"{where} has no edgediag metadata (model_name, input_spec); "
                        "export it with python -m edgediag.export")
    meta: dict[str, Any] = dict(raw)
    try:
        for key in JSON_KEYS:
            if key in raw:
                meta[key] = json.loads(raw[key])
        meta["threshold"] = float(raw.get("threshold", "nan"))
    except ValueError as exc:
        raise UserError(f"{where}: unreadable edgediag metadata ({str(exc)[:100]})") from None
    return meta
