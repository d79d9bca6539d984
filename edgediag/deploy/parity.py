"""Parity checks: how far ONNX Runtime (or a TensorRT engine) is from the PyTorch reference,
on window graphs and on streaming graphs stepped through a sequence (export/README.md,
"Parity")."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edgediag.deploy.onnx import as_tuple, ort_runner, ort_session, run_chunks, torch_runner
from edgediag.errors import UserError


def parity_metrics(ref: list[np.ndarray], test: list[np.ndarray], names: Sequence[str], threshold: float,
                   tolerance: float, score_index: int = 0) -> dict[str, Any]:
    """How far ``test`` outputs are from the PyTorch ``ref`` ones.

    The acceptance metric: max |test - ref| of the score output divided by the std of the
    reference scores over the batch (``max_abs_error_std``), plus identical normal/anomaly
    decisions (score > threshold) when the threshold is calibrated. Every output gets max
    abs and relative errors (relative to max(|ref|, 1e-8) elementwise) for the record.
    """
    outputs = {}
    for name, r, t in zip(names, ref, test):
        r64, t64 = r.astype(np.float64), np.asarray(t).astype(np.float64)
        if r64.shape != t64.shape:
            raise UserError(f"output {name}: shape {t64.shape} differs from PyTorch's {r64.shape}")
        err = np.abs(r64 - t64)
        finite = bool(np.isfinite(t64).all() == np.isfinite(r64).all())
        scale = float(r64.std())
        outputs[name] = {"max_abs_error": float(err.max()) if err.size else 0.0,
                         "max_rel_error": float((err / np.maximum(np.abs(r64), 1e-8)).max()) if err.size else 0.0,
                         "std": scale, "max_abs_error_std": float(err.max() / scale) if scale > 0 and err.size else None,
                         "nan_match": finite}
    score_name = names[score_index]
    r, t = ref[score_index].astype(np.float64).reshape(-1), np.asarray(test[score_index]).astype(np.float64).reshape(-1)
    scale, scale_kind = float(r.std()), "std of the PyTorch scores over the batch"
    if not scale > 1e-12:  # one item or constant scores: fall back to their magnitude
        scale, scale_kind = max(float(np.abs(r).max()), 1e-12), "max |PyTorch score| (std is 0)"
    std_err = float(np.abs(r - t).max() / scale)
    result: dict[str, Any] = {
        "score_output": score_name, "items": int(len(r)),
        "max_abs_error": outputs[score_name]["max_abs_error"], "max_rel_error": outputs[score_name]["max_rel_error"],
        "max_abs_error_std": std_err, "score_std": scale, "scale": scale_kind, "tolerance": tolerance,
        "threshold": threshold if math.isfinite(threshold) else None, "outputs": outputs}
    ok = std_err <= tolerance and bool(np.isfinite(t).all() or not np.isfinite(r).all())
    if math.isfinite(threshold):
        flipped = (r > threshold) != (t > threshold)
        mismatched = int(flipped.sum())
        result.update(decisions_identical=mismatched == 0, decision_mismatches=mismatched,
                      anomalies_flagged=int((r > threshold).sum()))
        if mismatched:  # how close to the threshold those items sat (numerical ties show here)
            result["mismatch_max_distance_to_threshold"] = float(np.abs(r[flipped] - threshold).max())
        ok = ok and mismatched == 0
    else:
        result.update(decisions_identical=None, decision_mismatches=None,
                      note="no calibrated threshold in the checkpoint: decisions not compared")
    result["passed"] = bool(ok)
    return result


def parity_line(p: dict) -> str:
    dec = ""
    if p.get("decisions_identical") is not None:
        dec = f", decisions {p['items'] - p['decision_mismatches']}/{p['items']} identical"
        if p["decision_mismatches"]:
            dec += f" (the others within {p['mismatch_max_distance_to_threshold']:.1e} of the threshold)"
    return (f"max |diff|/std {p['max_abs_error_std']:.2e} (tolerance {p['tolerance']:.0e}), "
            f"max |diff| {p['max_abs_error']:.2e}{dec}")



def stream_outputs(step_fn, seq: np.ndarray, states: list[np.ndarray], n_out: int) -> tuple[list, list]:
    """Step through ``seq`` (B, T, ...): per-step outputs stacked on axis 1, final states."""
    per_step = []
    for t in range(seq.shape[1]):
        res = step_fn([np.ascontiguousarray(seq[:, t]), *states])
        per_step.append(res[:n_out])
        states = list(res[n_out:])
    return [np.stack([s[k] for s in per_step], axis=1) for k in range(n_out)], states



def graph_parity(ref: list[np.ndarray], inputs: list[np.ndarray], names, threshold, tolerance, batch):
    """A function graph -> parity dict (with "error" when ONNX Runtime cannot run it)."""
    def check(graph: onnx.ModelProto) -> dict:
        try:
            test = run_chunks(ort_runner(ort_session(graph)), inputs, batch)
        except Exception as exc:  # noqa: BLE001 - an unrunnable graph is a parity failure, said precisely
            return {"passed": False, "error": f"ONNX Runtime cannot run the graph: {ort_error(exc)}"}
        return parity_metrics(ref, test, names, threshold, tolerance)
    return check


def streaming_parity(module, seq: torch.Tensor, example: tuple, n_out: int, names, threshold, tolerance):
    """Step-by-step ONNX Runtime against the PyTorch model over the whole sequence: its
    ``full_sequence(seq)`` (the full-sequence forward) when the streaming module has one,
    else the PyTorch step function itself."""
    states0 = [t.float().numpy() for t in example[1:]]
    seq_np = seq.float().numpy()
    torch_steps, torch_states = stream_outputs(torch_runner(module), seq_np, states0, n_out)
    full = None
    if hasattr(module, "full_sequence"):
        with torch.inference_mode():
            full = [o.float().numpy() for o in as_tuple(module.full_sequence(seq.float()))]

    def check(graph: onnx.ModelProto) -> dict:
        try:
            ort_steps, ort_states = stream_outputs(ort_runner(ort_session(graph)), seq_np, states0, n_out)
        except Exception as exc:  # noqa: BLE001
            return {"passed": False, "error": f"ONNX Runtime cannot run the graph: {ort_error(exc)}"}
        ref = full if full is not None else torch_steps
        flat = [r.reshape(r.shape[0] * r.shape[1], *r.shape[2:]) for r in ref]
        test = [t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]) for t in ort_steps]
        result = parity_metrics(flat, test, names[:n_out], threshold if flat[0].ndim == 1 else float("nan"),
                                tolerance)
        state_err = max((float(np.abs(a - b).max()) for a, b in zip(ort_states, torch_states)), default=0.0)
        result.update(reference="PyTorch full-sequence forward (module.full_sequence)" if full is not None
                      else "PyTorch step function", steps=int(seq_np.shape[1]), final_state_max_abs_error=state_err)
        if full is not None:  # the step function itself against the full sequence, for the record
            result["torch_steps_vs_full_max_abs_error"] = float(max(np.abs(a - b).max()
                                                                    for a, b in zip(torch_steps, full)))
        return result
    return check


def trt_parity(engine_path: Path, inputs: list[np.ndarray], ref: list[np.ndarray], names, threshold,
                tolerance, batch) -> dict:
    """The built engine against the same PyTorch outputs the ONNX graph was checked on."""
    from edgediag.deploy.trt_engine import EngineRunner

    runner = EngineRunner(str(engine_path))
    test = run_chunks(lambda a: [runner({runner.inputs[0]: a[0]})[n] for n in names], inputs, batch)
    return {"reference": "PyTorch eager", **parity_metrics(ref, test, names, threshold, tolerance)}


def ort_error(exc: BaseException) -> str:
    """ONNX Runtime's error without its source locations: the failing node and why."""
    text = " ".join(str(exc).split())
    m = re.search(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if not m:
        return first_line(exc)
    why = re.sub(r"\S+\.(?:h|cc):\d+ \S+?\(.*?\) ", "", m.group(3))  # "file.h:91 fn(args) "
    return f"{m.group(1)} node {m.group(2)!r}: {why}"[:400]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
