"""One checkpoint file per model: name, config, weights, fitted statistics, threshold,
data description and training metadata. Written atomically, read with weights_only=True."""

from __future__ import annotations

import datetime
import pickle
import platform
import zipfile
from pathlib import Path
from typing import Any

import torch

from edgediag import __version__
from edgediag.config import to_dict
from edgediag.errors import UserError
from edgediag.utils import atomic_path, group_thresholds

FORMAT = "edgediag.checkpoint/1"


def make_checkpoint(model, *, data: dict | None = None, meta: dict | None = None,
                    train_state: dict | None = None) -> dict[str, Any]:
    """The checkpoint dict for ``model`` (a registered DiagnosisModel)."""
    threshold = float(model.threshold) if hasattr(model, "threshold") else float("nan")
    payload = {
        "format": FORMAT,
        "edgediag_version": __version__,
        "model_name": model.model_name,
        "model_config": to_dict(model.config),
        "state_dict": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                       for k, v in model.state_dict().items()},
        "threshold": threshold,
        "data": data or {},
        "meta": {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "torch": str(torch.__version__), "python": platform.python_version(), **(meta or {})},
    }
    if train_state is not None:
        payload["train_state"] = train_state
    return payload


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint; any problem is one clear UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix.lower() in (".onnx", ".engine", ".plan"):
        raise UserError(f"{path} is an exported graph, not a checkpoint: this step takes the model.pt "
                        "written by train or prune")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported operand" in str(exc):  # bytes no pickler wrote: not a checkpoint at all
            raise UserError(f"{path} is not a checkpoint (unreadable as one)") from None
        if "Weights only load failed" in str(exc):
            raise UserError(f"checkpoint {path} holds pickled objects; edgediag loads plain weights only "
                            "(torch.load weights_only=True)") from None
        raise UserError(f"checkpoint {path} is corrupt or truncated ({str(exc)[:160]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason.split(". ")[0].rstrip(".")  # torch appends a paragraph of advice to the first sentence
        raise UserError(f"checkpoint {path} is corrupt or truncated ({reason[:160]})") from None
    except Exception as exc:  # noqa: BLE001 - torch's legacy unpickler fails on other bytes in many ways
        raise UserError(f"{path} is not a checkpoint ({type(exc).__name__} while reading it)") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not an edgediag checkpoint")
    return payload


def model_from_checkpoint(payload: dict):
    from edgediag.engine.registry import create_model

    model = create_model(payload["model_name"], payload["model_config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint weights do not fit model {payload['model_name']}: "
                        f"{str(exc).splitlines()[0][:200]}") from None
    model.group_thresholds = group_thresholds((payload.get("meta") or {}).get("threshold_calibration"))
    return model.eval()


def load_model(path: str | Path):
    """(model in eval mode, checkpoint dict)."""
    payload = load_checkpoint(path)
    return model_from_checkpoint(payload), payload
