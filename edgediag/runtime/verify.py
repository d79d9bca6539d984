"""Check an export bundle on the machine that will run it (``python -m edgediag.verify``):
the sha256 manifest, then the golden inputs through ONNX Runtime (every graph with golden
references) or a TensorRT engine, against the PyTorch reference outputs recorded at export,
within the recorded tolerance, and the normal/anomaly decisions. Torch-free: numpy,
onnxruntime, tensorrt (only for ``--engine``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgediag.deploy.bundle import GOLDEN, MANIFEST, VERIFY, sha256
from edgediag.errors import UserError
from edgediag.runtime.custom_ops import open_session

EXIT_OK, EXIT_MISMATCH, EXIT_NO_TENSORRT = 0, 1, 3
COLUMNS = ("check", "artifact", "max abs err", "max rel err", "tolerance", "decisions agree", "status")


class NoTensorRT(Exception):
    """``--engine`` where tensorrt cannot be imported."""


def check_manifest(folder: Path) -> list[dict]:
    """One row per problem (changed, missing or extra file), or one ``ok`` row."""
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: no {MANIFEST}: not a verifiable export bundle (re-export with this edgediag)")
    try:
        listed = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc})") from None
    rows = []
    for rel, entry in sorted(listed.items()):
        p = folder / rel
        if not p.is_file():
            rows.append(_row("digest", rel, status="FAIL: missing"))
        elif p.stat().st_size != entry.get("size") or sha256(p) != entry.get("sha256"):
            rows.append(_row("digest", rel, status="FAIL: sha256 differs (tampered)"))
    for p in sorted(folder.glob("*")):  # graphs and engines the manifest does not list
        if p.is_file() and p.suffix in (".onnx",) and p.name not in listed:
            rows.append(_row("digest", p.name, status="FAIL: not in the manifest"))
    return rows or [_row("digest", f"{len(listed)} files", status="ok")]


def _row(check: str, artifact: str, abs_err: float | None = None, rel_err: float | None = None,
         tol: str = "", decisions: str = "", status: str = "ok") -> dict:
    return {"check": check, "artifact": artifact, "max abs err": abs_err, "max rel err": rel_err,
            "tolerance": tol, "decisions agree": decisions, "status": status}


def compare(name: str, outputs: dict[str, np.ndarray], golden: Any, info: dict, tolerance: float,
            decisions: str = "decisions") -> list[dict]:
    """Rows comparing ``outputs`` with the golden references: the score gates (tolerance in
    units of the recorded score scale, plus the decisions recorded under ``decisions``: the
    fp32 ones, or an fp16/int8 graph's own); other outputs are reported."""
    rows, score = [], info["score_output"]
    threshold = info.get("threshold")
    for out in info["outputs"]:
        ref = np.asarray(golden[f"output/{out}"], dtype=np.float64)
        got = np.asarray(outputs[out], dtype=np.float64)
        if got.shape != ref.shape:
            rows.append(_row("golden", f"{name}:{out}", status=f"FAIL: shape {got.shape} != {ref.shape}"))
            continue
        err = np.abs(got - ref)
        abs_err = float(err.max()) if err.size else 0.0
        rel_err = float((err / np.maximum(np.abs(ref), 1e-8)).max()) if err.size else 0.0
        if out != score:
            rows.append(_row("golden", f"{name}:{out}", abs_err, rel_err, "reported", "", "ok (not gating)"))
            continue
        atol = tolerance * float(info.get("score_scale") or 1.0)
        ok = abs_err <= atol and bool(np.isfinite(got).all() or not np.isfinite(ref).all())
        dec = ""
        if threshold is not None and decisions in golden:
            flipped = int(((got.reshape(-1) > threshold) != np.asarray(golden[decisions]).reshape(-1)).sum())
            dec = f"{len(ref.reshape(-1)) - flipped}/{len(ref.reshape(-1))}"
            ok = ok and flipped == 0
        rows.append(_row("golden", f"{name}:{out}", abs_err, rel_err, f"{atol:.2e} ({tolerance:.0e} std)", dec, "ok" if ok else "FAIL: beyond tolerance" if abs_err > atol else "FAIL: decisions differ"))
    return rows


def _chunks(x: np.ndarray, batch: int | None):
    step = batch or len(x)
    for i in range(0, len(x), step):
        yield x[i:i + step]


def run_onnx(path: Path, x: np.ndarray, input_name: str, batch: int | None, threads: int | None) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = open_session(path, opts)
    names = [o.name for o in sess.get_outputs()]
    parts = [sess.run(None, {input_name: c}) for c in _chunks(x, batch)]
    return {n: np.concatenate([p[i] for p in parts]) for i, n in enumerate(names)}


def run_engine(path: Path, x: np.ndarray, input_name: str, batch: int | None) -> dict:
    if importlib.util.find_spec("tensorrt") is None:
        raise NoTensorRT("tensorrt is not installed here (JetPack brings it: python3 -c 'import tensorrt'); "
                         "verify the ONNX graphs without --engine, or run this on the board")
    from edgediag.deploy.trt_engine import EngineRunner

    runner = EngineRunner(str(path))
    parts = [runner({input_name: np.ascontiguousarray(c)}) for c in _chunks(x, batch)]
    return {n: np.concatenate([p[n] for p in parts]) for n in runner.outputs}


def verify(folder: Path, engine: Path | None = None, precision: str | None = None,
           threads: int | None = None) -> tuple[list[dict], int]:
    """All checks of the bundle in ``folder``: (table rows, exit code)."""
    if not folder.is_dir():
        raise UserError(f"export folder not found: {folder}")
    if engine is not None and not engine.is_file():
        raise UserError(f"--engine {engine}: no such file")
    rows = check_manifest(folder)
    if not (folder / VERIFY).is_file() or not (folder / GOLDEN).is_file():
        if _export_info(folder).get("streaming"):  # streaming graphs: no golden sequences yet
            rows.append(_row("golden", "-", status="ok (streaming export: no golden inputs, digests only)"))
        else:
            rows.append(_row("golden", "-", status=f"FAIL: no {VERIFY}/{GOLDEN}"))
        failed = any(not r["status"].startswith("ok") for r in rows)
        return rows, EXIT_MISMATCH if failed else EXIT_OK
    info = json.loads((folder / VERIFY).read_text())
    tol = info["tolerance"]
    with np.load(folder / GOLDEN) as z:
        golden = {k: z[k] for k in z.files}
    input_name = info["inputs"][0]
    x = golden[f"input/{input_name}"]
    if engine is None:
        for graph in info.get("graphs", ["model.onnx"]):
            entry = graph if isinstance(graph, dict) else {"file": graph}
            if not (folder / entry["file"]).is_file():
                continue  # reported by the manifest check
            out = run_onnx(folder / entry["file"], x, input_name, info.get("batch"), threads)
            rows += compare(entry["file"], out, golden, info, float(entry.get("tolerance", tol["onnx"])),
                            entry.get("decisions", "decisions"))
    else:
        prec = precision or _engine_precision(folder)
        out = run_engine(engine, x, input_name, info.get("batch"))
        rows += compare(f"{engine.name} ({prec})", out, golden, info, float(tol.get(prec, tol.get("fp16", 5e-2))),
                        info.get("engine_decisions", {}).get(prec, "decisions"))
    failed = any(not r["status"].startswith("ok") for r in rows)
    return rows, EXIT_MISMATCH if failed else EXIT_OK


def _export_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / "export.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _engine_precision(folder: Path) -> str:
    return str(_export_info(folder).get("precision") or "fp16")


def format_table(rows: list[dict]) -> str:
    """The checks as an aligned table (edgediag.measure.report: one table format everywhere)."""
    from edgediag.cli import Column
    from edgediag.cli import format_table as table

    errors = ("max abs err", "max rel err", "tolerance")
    return table(rows, [Column(c, fmt=".2e" if c in errors else "") for c in COLUMNS])
