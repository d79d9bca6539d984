"""The bench flow of `python -m edgediag.bench` (the verb parses, :func:`run` measures):
params, FLOPs and latency against accuracy, as a report.

    python -m edgediag.bench --checkpoint runs/a/best.pt export/a/model.onnx --data DIR --out bench/ \\
        [--backends eager,onnxruntime,tensorrt] [--threads N] [--batch 1,8] [--warmup W --latency-runs I]
        [--rounds R]   # interleave the timed runs of all artifacts in R rounds (shared machines)

Each artifact runs on its own backend: a checkpoint (.pt) in eager PyTorch, an ONNX
graph (.onnx) in ONNX Runtime, a TensorRT engine (.engine/.plan) in TensorRT (needs
tensorrt and a CUDA GPU; otherwise its rows say why they were skipped). A checkpoint and
a graph with the same model name and config are one model (the same ``group``).

Writes into --out: ``report.json`` (one row per artifact x backend x batch, every figure
with the machine, library versions and thread count it was taken with), ``report.md``,
``pareto.png`` (accuracy vs median latency) and ``plots/<artifact>/`` (ROC/confusion
plots of each evaluation).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from edgediag import __version__, cli, runtime
from edgediag.data import build_data, labelled_items, resolve_data_config
from edgediag.deploy.metadata import read_metadata
from edgediag.engine.checkpoint import load_model
from edgediag.errors import UserError
from edgediag.measure.accuracy import accuracy
from edgediag.measure.cost import FLOPS_DEFINITION, PARAMS_DEFINITION, scoring_costs
from edgediag.measure.memory import peak_rss_mb
from edgediag.measure.report import BENCH_COLUMNS, bench_notes, bench_table_rows, markdown, pareto_png
from edgediag.measure.timing import latency_stats, protocol, timed_rounds
from edgediag.utils import atomic_path, write_json

log = logging.getLogger("edgediag.bench")

# Backends by artifact suffix: the runtime's map, with the bench's name for PyTorch ("eager",
# what --backends and the reports say).
_NAMES = {"pytorch": "eager"}
SUFFIX_BACKEND = {suffix: _NAMES.get(b, b) for suffix, b in runtime.SUFFIX_BACKEND.items()}
BACKENDS = tuple(dict.fromkeys(SUFFIX_BACKEND.values()))


def backend_of(path: Path) -> str:
    """The bench's backend name for an artifact (the runtime refuses unknown suffixes)."""
    backend = runtime.backend_of(path)
    return _NAMES.get(backend, backend)


# --- environment -------------------------------------------------------------------------------
def environment(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
           "torch": torch.__version__, "numpy": np.__version__, "edgediag": __version__,
           "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    try:
        import onnxruntime as ort
        env["onnxruntime"] = ort.__version__
    except ImportError:
        env["onnxruntime"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env




# --- artifacts ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Artifact:
    path: Path
    backend: str
    model_name: str
    config: dict
    threshold: float
    data_kind: str
    data_config: dict  # the data description recorded with the model (root may be overridden)
    model: Any = None  # eager: the loaded model
    meta: dict = dataclasses.field(default_factory=dict)
    params: dict | None = None  # PARAMS_DEFINITION: the same for a checkpoint and its graph
    flops: dict | None = None
    graph_numbers: int | None = None  # a graph: every float number it stores (weights after folding + constants)
    group: str = ""
    variant: str = "original"
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.model_name}:{json.dumps(self.config, sort_keys=True)}"

    @property
    def slug(self) -> str:
        parts = self.path.resolve().parts[-2:]
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts))


def load_artifact(path: Path) -> Artifact:
    if not path.exists():
        raise UserError(f"artifact not found: {path}")
    backend = backend_of(path)
    if backend == "eager":
        model, ckpt = load_model(path)
        data = ckpt.get("data") or {}
        art = Artifact(path, backend, ckpt["model_name"], dict(ckpt.get("model_config") or {}),
                       float(ckpt.get("threshold", float("nan"))), data.get("kind") or model.data_kind,
                       dict(data.get("config") or {}), model=model, meta=dict(ckpt.get("meta") or {}))
        return art
    graph_path = path if backend == "onnxruntime" else path.with_name("model.onnx")
    meta = read_metadata(graph_path) if graph_path.is_file() else {}
    if backend == "onnxruntime" and "model_name" not in meta:
        raise UserError(f"{path} has no edgediag metadata (model_name); export it with python -m edgediag.export")
    try:
        config = json.loads(meta.get("model_config", "{}"))
        threshold = float(meta.get("threshold", "nan"))
    except ValueError:
        raise UserError(f"{graph_path}: unreadable model_config/threshold metadata") from None
    art = Artifact(path, backend, meta.get("model_name", path.stem), config, threshold,
                   meta.get("data_kind", ""), {}, meta=meta)
    try:
        counted = json.loads(meta.get("export", "{}"))
    except ValueError:
        counted = {}
    if isinstance(counted, dict):  # export counted the module it traced, as attach_costs counts a checkpoint
        art.params = counted.get("params") if isinstance(counted.get("params"), dict) else None
        flops = counted.get("flops_per_item")
        art.flops = {"flops": flops, "macs": flops // 2, "scan_flops": counted.get("scan_flops_per_item")} \
            if isinstance(flops, int) else None
    if backend == "onnxruntime":
        art.graph_numbers = _graph_numbers(path)
    return art




def _graph_numbers(path: Path) -> int:
    """Every float number a graph stores: its float initializers and Constant nodes (weights
    with BatchNorm folded in, and constants: filterbanks, DFT matrices, kNN banks). Not its
    parameter count (PARAMS_DEFINITION), which export records in the metadata."""
    import onnx

    graph = onnx.load(str(path)).graph
    tensors = list(graph.initializer) + [a.t for n in graph.node if n.op_type == "Constant"
                                         for a in n.attribute if a.name == "value"]
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    return int(sum(int(np.prod(t.dims)) for t in tensors if t.data_type in floats))


def link_and_label(arts: list[Artifact]) -> None:
    """Same model name + config = one model (group); the pruned variant is the one whose
    checkpoint records pruning, or that is smaller than another of its model family."""
    groups: dict[str, str] = {}
    for art in arts:
        art.group = groups.setdefault(art.key, f"{art.model_name}#{len(groups) + 1}")
    for art in arts:  # a graph reuses its checkpoint's data description and FLOPs
        twin = next((a for a in arts if a.key == art.key and a.backend == "eager"), None)
        if twin is not None and art is not twin:
            art.data_config = art.data_config or twin.data_config
            art.data_kind = art.data_kind or twin.data_kind
            art.meta.setdefault("pruning", twin.meta.get("pruning"))
    sizes: dict[str, int] = {}
    for art in arts:
        if art.params:
            sizes[art.group] = art.params["total"] if art.backend == "eager" else sizes.get(art.group, art.params["total"])
    for art in arts:
        family = [sizes[a.group] for a in arts if a.model_name == art.model_name and a.group in sizes]
        if art.meta.get("pruning") or art.meta.get("pruned_from"):
            art.variant = "pruned"
        elif art.group in sizes and family and sizes[art.group] < max(family):
            art.variant = "pruned"


def attach_costs(arts: list[Artifact]) -> None:
    """Parameters and FLOPs per item by one definition (edgediag.measure.cost.scoring_costs:
    ``export_module()`` on one item): a checkpoint counted here; a graph as export counted
    it (its metadata), else as its twin checkpoint, else as the architecture rebuilt from the
    metadata's config (parameter totals by shape; non-zero counts unknown)."""
    from edgediag.models import create_model

    by_key: dict[str, dict] = {}
    for art in sorted(arts, key=lambda a: a.backend != "eager"):
        if art.params is not None and art.flops is not None:
            continue
        if art.model is None and art.key in by_key:
            counted = by_key[art.key]
        else:
            try:
                model = art.model if art.model is not None else create_model(art.model_name, art.config).eval()
                counted = scoring_costs(model)
            except Exception as exc:  # noqa: BLE001 - e.g. a model that needs fitted statistics to run
                art.note = f"params/FLOPs not counted: {type(exc).__name__}: {str(exc)[:120]}"
                continue
            by_key.setdefault(art.key, counted)
        # a graph counted on other weights (its twin's, or none): its total by shape, non-zeros unknown
        art.params = art.params or (counted["params"] if art.model is not None
                                    else {**counted["params"], "nonzero": None})
        art.flops = art.flops or counted["flops"]


# --- data --------------------------------------------------------------------------------------
def load_dataset(art: Artifact, args, cache: dict):
    """The items every row of this artifact is measured on: the split's first --max-items
    items whose anomaly flag is known (the same items for every backend), and a note on
    those left out."""
    from edgediag.models import create_model

    cfg = resolve_data_config(art.data_config, args.data, args.overrides, source=str(art.path))
    split = args.split
    model_cfg = art.model.config if art.model is not None else create_model(art.model_name, art.config).config
    kind = art.data_kind or getattr(art.model, "data_kind", "")
    key = (kind, json.dumps(dataclasses.asdict(cfg), sort_keys=True), json.dumps(art.config, sort_keys=True))
    if key not in cache:
        bundle = build_data(kind, cfg, model_cfg)
        dataset = getattr(bundle, split)
        if dataset is None or len(dataset) == 0:
            raise UserError(f"{cfg.root} has no {split} split to measure accuracy on")
        keep, unknown = labelled_items(dataset, args.max_items)
        if not keep:
            raise UserError(f"{cfg.root}: no item of the {split} split has a known normal/anomalous label")
        note = (f"{unknown} items with no normal/anomalous label ({', '.join(cfg.ignore_labels) or 'unknown'}) "
                "left out of the accuracy figures" if unknown else "")
        cache[key] = (Subset(dataset, keep), note)
    return cache[key]


def batch_input(dataset, art: Artifact, batch: int) -> torch.Tensor:
    """A real batch of items (repeated when the split is smaller than the batch)."""
    xs = [dataset[i % len(dataset)]["x"] for i in range(batch)]
    return torch.stack([torch.as_tensor(x) for x in xs]).float()


def scoring_module(model) -> torch.nn.Module:
    """What export traces (the base default wraps ``model.score``)."""
    return model.export_module().eval()


# --- runners -----------------------------------------------------------------------------------
class Skip(Exception):
    """This artifact x backend x batch cannot run here; the message says why."""


def runner(art: Artifact, threads: int, device: torch.device) -> tuple[Callable, int | None]:
    """``run(x) -> scores`` through ``edgediag.runtime`` (the one inference interface: eager
    PyTorch for a checkpoint, ONNX Runtime for a graph, TensorRT for an engine) and the
    graph's static batch (None = any)."""
    if art.backend == "eager":
        torch.set_num_threads(threads)
        ckpt = {"model_name": art.model_name, "model_config": art.config, "threshold": art.threshold,
                "data": {"kind": art.data_kind}}
        pred = runtime.from_model(art.model, ckpt, art.path, threads=threads, device=str(device))
    elif art.backend == "onnxruntime":
        pred = runtime.load(art.path, threads=threads)
    else:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise Skip("tensorrt is not installed here") from None
        if not torch.cuda.is_available():
            raise Skip("no CUDA GPU here")
        pred = runtime.load(art.path)

    def run(x: torch.Tensor) -> np.ndarray:
        return pred.score(x).astype(np.float32)

    run.predictor = pred  # accuracy() reads a classifier graph's class outputs through it
    return run, pred.batch


# --- measuring ---------------------------------------------------------------------------------
def time_runs(run: Callable, x: torch.Tensor, warmup: int, iters: int, cuda: bool, clock: str = "wall") -> dict:
    """One row's figures by the timing protocol (edgediag.measure.timing), with the GPU's
    peak memory of the row's calls on CUDA (the process's resident memory is not per row:
    every artifact lives in this one process)."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = timed_rounds([lambda: run(x)], iters, warmup=warmup)[0]
    out = latency_stats(times, len(x), clock)
    if cuda:
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


REFERENCE = "fp32 matmul 384x384x384 (torch, the bench's threads)"


def reference_kernel() -> tuple[Callable, torch.Tensor]:
    """A fixed workload timed with the artifacts: how fast the machine's plain compute was at
    the time. ``p50 / reference`` removes a uniform slow-down (CPU clock, thermal), but not
    all drift: on the shared 2-core VM the models' speed swung 0.7-1.2x within minutes
    while the matmul's correlated with it at only 0.46 (a small-operator chain: 0.56;
    docs/benchmarks.md)."""
    a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
    return (lambda x: torch.matmul(x, x)), a


def time_interleaved(jobs: list[tuple[dict, Callable, torch.Tensor]], warmup: int, iters: int, rounds: int,
                     clock: str = "wall") -> dict:
    """Time every (row, run, x) in ``rounds`` rounds that go through all of them in turn, so
    a shared machine's drift (other jobs, clock changes) hits every row alike instead of
    whichever artifact happened to be timed at the time; fills each row's latency fields,
    ``relative_p50`` included (p50 over the reference kernel's p50, timed in the same
    rounds). Returns the reference kernel's figures."""
    ref_row: dict = {}
    jobs = [(ref_row, *reference_kernel()), *jobs]
    calls = [lambda run=run, x=x: run(x) for _, run, x in jobs]
    timed_rounds(calls, 0, warmup=warmup)  # warm-up outside the span the rows report
    started = datetime.datetime.now()
    samples = timed_rounds(calls, iters, rounds)
    span = {"start": started.isoformat(timespec="milliseconds"),
            "end": datetime.datetime.now().isoformat(timespec="milliseconds"), "interleaved": True}
    reference = {"what": REFERENCE, **latency_stats(samples[0], 1, clock)["latency_ms"]}
    for (row, _, x), times in zip(jobs[1:], samples[1:]):
        row.update(latency_stats(times, len(x), clock), span=span, rounds=rounds)
        row["relative_p50"] = row["latency_ms"]["p50"] / reference["p50"]
    return reference


def attach_power(rows: list[dict], log: str, interval_ms: float | None, iters: int) -> dict:
    """Power summary of the whole tegrastats log, and per timed row of the samples within its
    span (whole seconds: tegrastats stamps lines to the second) with energy per item."""
    from edgediag.runtime import tegrastats

    samples = tegrastats.read_log(log)
    for r in rows:
        if r.get("status") != "ok" or "span" not in r:
            continue
        start = datetime.datetime.fromisoformat(r["span"]["start"]).replace(microsecond=0)
        end = datetime.datetime.fromisoformat(r["span"]["end"])
        inside = [s for s in samples if s.time is not None and start <= s.time <= end]
        if inside:
            r["power"] = tegrastats.summarize(inside, interval_ms, inferences=iters * int(r["batch"]))
        else:
            r["power"] = {"note": "no timestamped tegrastats line within this row's span (log with "
                                  "--logfile and a short --interval, or run more --latency-runs)"}
    return tegrastats.summarize(samples, interval_ms)


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None



# --- main --------------------------------------------------------------------------------------
def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"--{what} must be comma-separated positive integers, not {text!r}")
    return values


def _print_row(row: dict, art: Artifact, acc: dict) -> None:
    """Progress while the bench runs (the table comes at the end)."""
    lat = row["latency_ms"]
    log.info("%s %s %s batch %s: p50 %.3f ms, %.1f items/s, %s %s", art.model_name, art.variant, art.backend,
             row["batch"], lat["p50"], row["items_per_s"], acc.get("metric_name"),
             "n/a" if acc.get("metric") is None else f"{acc['metric']:.4f}")


def run(args) -> int:
    """The bench the command line ``args`` (the verb's parser) asks for; the exit code."""
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UserError(f"unknown backend {', '.join(unknown) or repr(args.backends)} "
                            f"(choose from {', '.join(BACKENDS)})")
    batches = _int_list(args.batch, "batch")
    if not 1 <= args.rounds <= max(args.latency_runs, 1):
        raise UserError(f"--rounds must be between 1 and --latency-runs ({args.latency_runs}), not {args.rounds}")
    if args.threads < 1 or args.latency_runs < 1 or args.warmup < 0:
        raise UserError("--threads and --latency-runs must be >= 1, --warmup >= 0")
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        raise UserError("--clock cpu times one CPU thread: use it with --threads 1 on the cpu device")
    if args.data and not Path(args.data).exists():
        raise UserError(f"data folder not found: {args.data}")
    arts = [load_artifact(Path(p)) for p in args.checkpoint]
    attach_costs(arts)
    link_and_label(arts)
    out = Path(args.out)
    env = environment(args.threads)
    timing = protocol(args.threads, args.warmup, args.latency_runs, args.rounds, args.clock)
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    cache: dict = {}
    rows = []
    interleaved: list[tuple[dict, Callable, torch.Tensor]] = []  # --rounds > 1: timed together
    for art in arts:
        base = {"artifact": str(art.path), "model": art.model_name, "model_name": art.model_name,
                "group": art.group, "variant": art.variant, "backend": art.backend, "threads": args.threads,
                "clock": args.clock, "warmup": args.warmup, "runs": args.latency_runs,
                "params_total": (art.params or {}).get("total"), "params_trainable": (art.params or {}).get("trainable"),
                "params_nonzero": (art.params or {}).get("nonzero"),
                "flops_per_item": art.flops["flops"] if art.flops else None,
                "macs_per_item": art.flops["macs"] if art.flops else None,
                "scan_flops_per_item": art.flops.get("scan_flops") if art.flops else None}
        if art.graph_numbers is not None:
            base["graph_numbers"] = art.graph_numbers
        if art.note:
            base["note"] = art.note
        if art.backend not in backends:
            continue  # this backend was not asked for
        try:
            run, static = runner(art, args.threads, device)
        except Skip as exc:
            rows += [{**base, "batch": b, "status": "skipped", "reason": str(exc), "env": env} for b in batches]
            log.info("skip %s (%s): %s", art.path, art.backend, exc)
            continue
        dataset, data_note = load_dataset(art, args, cache)
        plot_dir = out / "plots" / f"{art.slug}-{art.backend}"
        acc = accuracy(art, run, static, dataset, plot_dir)
        if data_note:
            base["note"] = "; ".join(filter(None, [base.get("note"), data_note]))
            acc["items_left_out"] = data_note
        acc["items"] = len(dataset)
        for b in batches:
            row = {**base, "batch": b, **acc, "env": env, "plots": str(plot_dir.relative_to(out))}
            if static and b != static:
                rows.append({**row, "status": "skipped", "reason": f"the graph has a static batch of {static}"})
                continue
            x = batch_input(dataset, art, b)
            if args.rounds > 1:  # timed below, all rows together
                rows.append({**row, "status": "ok"})
                interleaved.append((rows[-1], run, x))
                continue
            started = datetime.datetime.now()  # local time, as tegrastats stamps its lines
            rows.append({**row, "status": "ok", **time_runs(run, x, args.warmup, args.latency_runs, device.type == "cuda", args.clock),
                         "span": {"start": started.isoformat(timespec="milliseconds"),
                                  "end": datetime.datetime.now().isoformat(timespec="milliseconds")}})
            _print_row(rows[-1], art, acc)
    reference = None
    if interleaved:
        reference = time_interleaved(interleaved, args.warmup, args.latency_runs, args.rounds, args.clock)
        for row, _, _ in interleaved:
            _print_row(row, next(a for a in arts if str(a.path) == row["artifact"]), row)
    for r in rows:
        if args.threads != 1 or r.get("backend") == "tensorrt" or device.type != "cpu":
            for k in ("cpu_p50_ms", "cpu_share"):  # one thread's CPU time is not the latency there
                r.pop(k, None)
        for k in ("auc", "pauc", "metric", "decision_accuracy"):
            if k in r:
                r[k] = _finite(r[k])
    power = attach_power(rows, args.tegrastats, args.tegrastats_interval_ms, args.latency_runs) if args.tegrastats else None
    memory = {"rss_peak_mb": round(peak_rss_mb(), 1),
              "what": "the bench process's peak resident memory (every artifact, runtime and data in one process)"}
    write_json(out / "report.json", {"edgediag_version": __version__, "env": env,
                                     "settings": {"warmup": args.warmup, "iters": args.latency_runs, "rounds": args.rounds,
                                                  "clock": args.clock,
                                                  "batches": batches,
                                                  "threads": args.threads, "split": args.split,
                                                  "data": args.data, "tegrastats": args.tegrastats},
                                     "protocol": timing, "definitions": {"params": PARAMS_DEFINITION,
                                                                         "flops": FLOPS_DEFINITION},
                                     "memory": memory, "reference": reference, "power": power, "rows": rows})
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown(rows, env, reference, timing, memory))
    pareto_png(out / "pareto.png", rows)
    files = {"report_md": str(out / "report.md"), "report_json": str(out / "report.json"),
             "pareto_png": str(out / "pareto.png")}
    table = bench_table_rows(rows)
    text = "\n".join([cli.format_table(table, BENCH_COLUMNS), "", *bench_notes(rows, timing),
                      f"report: {files['report_md']} ({len(rows)} rows), {files['report_json']}, {files['pareto_png']}"])
    cli.show(cli.table_report(table, BENCH_COLUMNS, verb="bench", protocol=timing, env=env, files=files,
                      skipped=[{k: r[k] for k in ("artifact", "backend", "batch", "reason")}
                               for r in rows if r["status"] != "ok"]), text)
    return 0
