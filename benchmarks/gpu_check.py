"""The GPU checks of `make gpu-check`, in one script sized for ~10 minutes on one CUDA GPU.

    python benchmarks/gpu_check.py [--out runs/gpu_check] [--families ldmamba ...] [--budget-s 600]
                                   [--train-steps 10]

What it checks, each step guarded (a failure becomes a row and the script goes on):

1. mamba-ssm's CUDA selective scan against ``selective_scan_ref``: forward (B/C time-invariant,
   variable, grouped; output and last state; fp32 rtol 6e-4 / atol 2e-3, mamba-ssm's own) and
   backward (gradients of u, delta, A, B, C, D; rtol 2e-3 / atol 5e-3), and that
   ``backend="auto"`` picks the kernel for CUDA tensors that need a gradient.
2. A few training steps of each family's small model (edgediag.demo's RUNS) on its synthetic
   data with the train verb on CUDA; for the Mamba models, the scan backends their training
   actually resolved (expected: "cuda").
3. Where tensorrt imports: for every family and fp32 / fp16 / int8, the export verb
   (``--target trt``: engine built and parity-checked; exit 4 = parity or agreement failed), the
   verify verb on the engine, and the latency (median ms, batch of the export) of the engine
   (EngineRunner, host to host) and of model.onnx on ONNX Runtime CPU, on the golden input.

Tables are printed at the end and written to --out as gpu_check.json and gpu_check.md. When
--budget-s runs out, the remaining steps are skipped with a note (a running step is not cut).
Exit code 0 when everything that ran passed, 1 otherwise. Without CUDA: one line
``gpu-check: no CUDA device here ...``, nothing written, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

FWD_TOL = dict(rtol=6e-4, atol=2e-3)  # fp32, mamba-ssm's own test
GRAD_TOL = dict(rtol=2e-3, atol=5e-3)
PRECISIONS = ("fp32", "fp16", "int8")
NO_MAMBA = "skipped: mamba-ssm not importable"
PARITY_COLS = [("check", "check"), ("shape", "shape"), ("rel_err", "norm-wise rel err"), ("status", "status")]
TRAIN_COLS = [("family", "family"), ("model", "model"), ("exit", "train exit"), ("seconds", "s"),
              ("scan_backend", "scan backend (training)"), ("status", "status")]
TRT_COLS = [("family", "family"), ("precision", "precision"), ("export_exit", "export exit"),
            ("verify_exit", "verify exit"), ("engine_ms", "engine ms"), ("ort_cpu_ms", "ORT-CPU ms"),
            ("status", "status")]


class Budget:
    """Wall-clock seconds for the whole check; ``spent()`` is the note of a skipped step, or ''."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def spent(self) -> str:
        over = time.monotonic() - self.start >= self.seconds
        return f"skipped: time budget ({self.seconds:g} s) spent" if over else ""


def failed(row: dict) -> bool:
    return str(row.get("status", "")).startswith("FAILED")


def _why(exc: BaseException) -> str:
    return f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def guarded(step, row: dict, with_checkpoints: bool = False):
    """``step()``, or one failed row (and no checkpoints) when it raises past its own guards."""
    try:
        return step()
    except Exception as exc:  # noqa: BLE001 - reported in the table
        rows = [{**row, "status": _why(exc)}]
        return (rows, {}) if with_checkpoints else rows


# --------------------------------------------------------------------------- 1. kernel parity


def _scan_inputs(bc, batch, dim, dstate, L, groups=2, seed=0, grad=False):
    """mamba-ssm test-style inputs on CUDA (as tests/test_selective_scan.py's make_inputs)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0, uniform=False: (torch.rand if uniform else torch.randn)(*s, generator=g) * scale  # noqa: E731
    bc_shape = {"const": (dim, dstate), "var": (batch, dstate, L), "grouped": (batch, groups, dstate, L)}[bc]
    x = dict(u=rnd(batch, dim, L), delta=rnd(batch, dim, L, scale=0.5, uniform=True), A=-0.5 * rnd(dim, dstate, uniform=True),
             B=rnd(*bc_shape), C=rnd(*bc_shape), D=rnd(dim), z=rnd(batch, dim, L),
             delta_bias=rnd(dim, scale=0.1, uniform=True))
    return {k: v.cuda().requires_grad_(grad and k in ("u", "delta", "A", "B", "C", "D")) for k, v in x.items()}


def _close(got, want, tol) -> tuple[float, str]:
    import torch

    # norm-wise, as benchmarks/scan_report.py: max |a - b| / max |b|, the worst tensor
    err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
              for a, b in zip(got, want))
    try:
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol)
    except AssertionError as exc:
        return err, f"FAILED: beyond rtol {tol['rtol']:g} / atol {tol['atol']:g}: {str(exc).splitlines()[0]}"
    return err, "ok"


def kernel_parity() -> list[dict]:
    """mamba-ssm's kernel against the reference, forward and backward; rows of the parity table."""
    import torch

    scan = importlib.import_module("edgediag.ops.selective_scan")
    if not torch.cuda.is_available():
        return [{"check": "mamba-ssm kernel", "status": "skipped: no CUDA device"}]
    if scan._mamba_scan_fn() is None:
        return [{"check": "mamba-ssm kernel", "status": NO_MAMBA}]
    small, large = dict(batch=2, dim=8, dstate=5, L=37), dict(batch=1, dim=256, dstate=16, L=1024)
    cases = [("forward", bc, small) for bc in ("const", "var", "grouped")]
    cases += [("forward", "var", large), ("backward", "var", small), ("backward", "grouped", small)]
    rows = []
    for kind, bc, size in cases:
        row = {"check": f"{kind} B/C {bc}", "shape": "b{batch} d{dim} n{dstate} L{L}".format(**size)}
        try:
            x = _scan_inputs(bc, grad=kind == "backward", **size)
            if kind == "forward":
                outs = [f(**x, delta_softplus=True, return_last_state=True)
                        for f in (scan.selective_scan_cuda, scan.selective_scan_ref)]
                row["rel_err"], row["status"] = _close(*outs, FWD_TOL)
            else:
                leaves = [x[k] for k in ("u", "delta", "A", "B", "C", "D")]
                grads = [torch.autograd.grad(f(**x, delta_softplus=True).square().sum(), leaves)
                         for f in (scan.selective_scan_cuda, scan.selective_scan_ref)]
                row["rel_err"], row["status"] = _close(*grads, GRAD_TOL)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row["status"] = _why(exc)
        rows.append(row)
    u = torch.zeros(1, 4, 8).cuda().requires_grad_()
    picked = scan.resolve_backend("auto", u)
    rows.append({"check": "auto backend, CUDA tensor needing a gradient", "shape": "-", "rel_err": None,
                 "status": "ok (cuda)" if picked == "cuda" else f"FAILED: resolved to {picked!r}, not 'cuda'"})
    return rows


# --------------------------------------------------------------------------- 2. training


def family_runs() -> dict:
    """{family: edgediag.demo.DemoRun}: each family's small model, data set and recipe."""
    from edgediag.demo import RUNS
    from edgediag.models import get_model_class

    return {get_model_class(r.model)[0].__module__.split(".")[2]: r for r in RUNS}


def _verb(verb: str, args: list) -> int:
    """A verb called in-process as from the shell (edgediag.cli.run: exceptions become exit codes)."""
    from edgediag import cli

    args = [str(a) for a in args]
    print(f"$ python -m edgediag.{verb} {' '.join(args)}", flush=True)
    try:
        return cli.run(importlib.import_module(f"edgediag.{verb}").main, args)
    except SystemExit as exc:  # argparse
        return exc.code if isinstance(exc.code, int) else 1


@contextlib.contextmanager
def recorded_scan_backends():
    """The backends selective_scan resolves inside the block, for calls that need a gradient."""
    scan = importlib.import_module("edgediag.ops.selective_scan")
    original, seen = scan.resolve_backend, set()

    def recording(backend, u, *tensors):
        name = original(backend, u, *tensors)
        if scan._needs_grad(u, *tensors):
            seen.add(name)
        return name

    scan.resolve_backend = recording
    try:
        yield seen
    finally:
        scan.resolve_backend = original


def train_steps(out: Path, families: list[str], budget: Budget, steps: int = 10,
                device: str = "cuda") -> tuple[list[dict], dict]:
    """A few optimiser steps per family on ``device``; (rows, {family: model.pt})."""
    from edgediag.data.synthetic import generate_once
    from edgediag.ops.selective_scan import _mamba_scan_fn

    runs, rows, checkpoints = family_runs(), [], {}
    for family in families:
        run = runs[family]
        row = {"family": family, "model": run.model}
        rows.append(row)
        if budget.spent():
            row["status"] = budget.spent()
            continue
        started = time.monotonic()
        try:
            data = generate_once(run.dataset, out / "data", 0)
            recipe = [o for o in run.train if not o.startswith("train.epochs=")]
            recipe += ["train.epochs=1", f"train.min_steps={steps}", f"train.max_steps_per_epoch={steps}",
                       f"train.device={device}"]
            with recorded_scan_backends() as seen:
                row["exit"] = _verb("train", ["--model", run.model, "--data", data, "--out", out / "runs" / family,
                                              "--force", "--seed", 0, *[x for o in recipe for x in ("--set", o)]])
            row["scan_backend"] = ",".join(sorted(seen)) or "n/a (no scan)"
            if row["exit"]:
                row["status"] = f"FAILED: train exit {row['exit']}"
            elif seen and _mamba_scan_fn() is None:  # trained (for the engines), the kernel untested
                row["status"] = f"ok; kernel {NO_MAMBA}"
            elif seen and seen != {"cuda"}:
                row["status"] = f"FAILED: the Mamba scan trained on {sorted(seen)}, not the CUDA kernel"
            else:
                row["status"] = "ok"
            if not row["exit"]:
                checkpoints[family] = out / "runs" / family / "model.pt"
        except Exception as exc:  # noqa: BLE001
            row["status"] = _why(exc)
        row["seconds"] = round(time.monotonic() - started, 1)
    return rows, checkpoints


# --------------------------------------------------------------------------- 3. TensorRT


def _median_ms(fn, runs: int = 50, warmup: int = 10) -> float:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    times = [timed() for _ in range(warmup + runs)][warmup:]
    return round(1e3 * statistics.median(times), 3)


def latencies(folder: Path) -> tuple[float, float]:
    """(engine ms, ONNX Runtime CPU ms of model.onnx) on the golden input, at the export's batch."""
    import numpy as np
    import onnxruntime as ort

    from edgediag.deploy.trt_engine import EngineRunner

    info = json.loads((folder / "verify.json").read_text())
    name = info["inputs"][0]
    x = np.load(folder / info["golden"])[f"input/{name}"][: info.get("batch") or 1]
    runner = EngineRunner(str(folder / "model.engine"))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return _median_ms(lambda: runner({name: x})), _median_ms(lambda: session.run(None, {name: x}))


def trt_rows(out: Path, checkpoints: dict, families: list[str], budget: Budget) -> list[dict]:
    """Export, verify and time one engine per family and precision; rows of the TensorRT table."""
    from edgediag.deploy.board import trt_here

    ok, why = trt_here()
    rows = []
    for family in families:
        for precision in PRECISIONS:
            row = {"family": family, "precision": precision}
            rows.append(row)
            if not ok:
                row["status"] = f"skipped: {why}"
                continue
            if family not in checkpoints:
                row["status"] = "skipped: no checkpoint (training failed or skipped)"
                continue
            if budget.spent():
                row["status"] = budget.spent()
                continue
            folder = out / "trt" / family / precision
            try:
                row["export_exit"] = _verb("export", ["--checkpoint", checkpoints[family], "--target", "trt",
                                                      "--precision", precision, "--out", folder, "--latency-runs", 5])
                if row["export_exit"]:
                    what = {4: "parity or fp32 agreement", 3: "no TensorRT build here"}.get(row["export_exit"], "export")
                    row["status"] = f"FAILED: {what} (export exit {row['export_exit']})"
                    continue
                row["verify_exit"] = _verb("verify", [folder, "--engine", folder / "model.engine",
                                                      "--precision", precision])
                row["engine_ms"], row["ort_cpu_ms"] = latencies(folder)
                row["status"] = "ok" if row["verify_exit"] == 0 else f"FAILED: verify exit {row['verify_exit']}"
            except Exception as exc:  # noqa: BLE001
                row["status"] = _why(exc)
    return rows


# --------------------------------------------------------------------------- report


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table; a value a row lacks (a skipped or failed step) shows as '-'."""
    def cell(value) -> str:
        text = "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    parts = [f"# gpu-check: {'passed' if report['passed'] else 'FAILED'}", "",
             f"{report.get('device', '?')}; torch {report.get('torch')}, mamba-ssm {report.get('mamba_ssm') or '-'}, "
             f"tensorrt {report.get('tensorrt') or '-'}; {report.get('seconds', 0):.0f} s of a "
             f"{report.get('budget_s', 0):g} s budget.",
             "", "## mamba-ssm kernel parity", "", format_table(report["kernel_parity"], PARITY_COLS),
             "", "## Training on CUDA", "", format_table(report["training"], TRAIN_COLS),
             "", "## TensorRT engines", "", format_table(report["trt"], TRT_COLS), ""]
    return "\n".join(parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_check", help="output folder (default runs/gpu_check)")
    p.add_argument("--families", nargs="+", help="subset of the families (default: all of edgediag.demo's)")
    p.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget in seconds (default 600)")
    p.add_argument("--train-steps", type=int, default=10, help="optimiser steps per family (default 10)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    known = list(family_runs())
    families = args.families or known
    if set(families) - set(known):
        p.error(f"unknown families {sorted(set(families) - set(known))} (known: {', '.join(known)})")
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here; skipped: mamba-ssm kernel parity (forward, backward), CUDA training "
              f"({', '.join(families)}), TensorRT fp32/fp16/int8 engines + verify + latency")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out, budget = Path(args.out), Budget(args.budget_s)
    out.mkdir(parents=True, exist_ok=True)
    parity = guarded(kernel_parity, {"check": "kernel_parity"})
    training, checkpoints = guarded(lambda: train_steps(out, families, budget, args.train_steps),
                                    {"family": "train_steps"}, with_checkpoints=True)
    trt = guarded(lambda: trt_rows(out, checkpoints, families, budget), {"family": "trt_rows"})
    versions = {}
    for module in ("mamba_ssm", "tensorrt"):
        with contextlib.suppress(Exception):
            versions[module] = str(importlib.import_module(module).__version__)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, **versions, "budget_s": args.budget_s,
              "seconds": round(time.monotonic() - budget.start, 1), "kernel_parity": parity, "training": training,
              "trt": trt}
    report["passed"] = not any(failed(r) for r in parity + training + trt)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = render_markdown(report)
    (out / "gpu_check.md").write_text(markdown)
    print("\n" + markdown)
    print(f"gpu-check: {'passed' if report['passed'] else 'FAILED'}; report: {out / 'gpu_check.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
