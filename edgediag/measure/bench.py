"""`python -m edgediag.bench`: params, FLOPs, latency and memory against accuracy, as a report.

    python -m edgediag.bench --model runs/a/best.pt export/a/model.onnx --data DIR --out bench/ \\
        [--backends eager,onnxruntime,tensorrt] [--threads N] [--batch 1,8] [--warmup W --iters I]
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

import collections
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from edgediag import __version__, cli, runtime
from edgediag.config import from_dict
from edgediag.data import DataConfig, build_data
from edgediag.engine.checkpoint import load_model
from edgediag.engine.metrics import auc_pauc, decision_report, save_roc_png
from edgediag.engine.trainer import DeviceLoader
from edgediag.measure.cost import count_flops, count_parameters
from edgediag.measure.timing import timed_calls
from edgediag.utils import atomic_path, write_json

BACKENDS = ("eager", "onnxruntime", "tensorrt")
SUFFIX_BACKEND = {".pt": "eager", ".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt"}


def parser():
    p = cli.make_parser("bench", "Params, FLOPs, latency and memory against accuracy, as a report.")
    p.add_argument("--model", nargs="+", required=True, metavar="ARTIFACT",
                   help="checkpoints (.pt), ONNX graphs (.onnx) and TensorRT engines (.engine/.plan)")
    p.add_argument("--data", help="data folder to measure accuracy on (default: a checkpoint's own data folder)")
    p.add_argument("--out", required=True, help="folder for report.json, report.md, pareto.png, plots/")
    p.add_argument("--backends", default="eager,onnxruntime,tensorrt",
                   help="comma-separated subset of eager,onnxruntime,tensorrt (default: all)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads for torch and ONNX Runtime (intra-op), pinned for every figure")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8 (default 1)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before timing (default 5)")
    p.add_argument("--iters", type=int, default=50, help="timed runs per figure (default 50)")
    p.add_argument("--rounds", type=int, default=1,
                   help="split the timed runs into R rounds that go through every artifact in turn, so "
                        "the machine's drift hits every row alike (RSS is then the peak over all rows; "
                        "default 1: each artifact timed in one block, as power logs need)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time (default); cpu: the timing thread's CPU time, which leaves out "
                        "time the thread was preempted or its virtual CPU stolen (a shared or virtual "
                        "machine); needs --threads 1, where it equals the compute latency")
    p.add_argument("--split", default="test", choices=["test", "val", "train"], help="split for accuracy")
    p.add_argument("--max-items", type=int, default=0, help="score at most this many items (0 = all)")
    p.add_argument("--device", default="cpu", help="eager device: cpu or cuda (default cpu)")
    p.add_argument("--tegrastats", metavar="LOG",
                   help="a tegrastats log written during this run (tegrastats --interval 100 --logfile LOG): "
                        "each timed row gets the power summary of its time span, energy per item")
    p.add_argument("--tegrastats-interval-ms", type=float, help="the --interval of that log (default: from its timestamps)")
    return p


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


# --- memory ------------------------------------------------------------------------------------
def reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS mark (Linux: clear_refs 5) so each figure has its own
    peak; where that is impossible the figure is the process's lifetime peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM after reset"
    except OSError:
        return "process lifetime peak (ru_maxrss)"


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
    params: dict | None = None
    flops: dict | None = None
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
        raise cli.UserError(f"artifact not found: {path}")
    backend = SUFFIX_BACKEND.get(path.suffix.lower())
    if backend is None:
        raise cli.UserError(f"{path}: unknown artifact type {path.suffix!r} (expected .pt, .onnx, .engine or .plan)")
    if backend == "eager":
        model, ckpt = load_model(path)
        data = ckpt.get("data") or {}
        art = Artifact(path, backend, ckpt["model_name"], dict(ckpt.get("model_config") or {}),
                       float(ckpt.get("threshold", float("nan"))), data.get("kind") or model.data_kind,
                       dict(data.get("config") or {}), model=model, meta=dict(ckpt.get("meta") or {}))
        art.params = count_parameters(model)
        return art
    graph_path = path if backend == "onnxruntime" else path.with_name("model.onnx")
    meta = _onnx_metadata(graph_path) if graph_path.is_file() else {}
    if backend == "onnxruntime" and "model_name" not in meta:
        raise cli.UserError(f"{path} has no edgediag metadata (model_name); export it with python -m edgediag.export")
    try:
        config = json.loads(meta.get("model_config", "{}"))
        threshold = float(meta.get("threshold", "nan"))
    except ValueError:
        raise cli.UserError(f"{graph_path}: unreadable model_config/threshold metadata") from None
    art = Artifact(path, backend, meta.get("model_name", path.stem), config, threshold,
                   meta.get("data_kind", ""), {}, meta=meta)
    if backend == "onnxruntime":
        art.params = _onnx_parameters(path)
    return art


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise cli.UserError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    return {p.key: p.value for p in graph.metadata_props}


def _onnx_parameters(path: Path) -> dict[str, int]:
    """Parameter counts of a graph: its float initializers (weights and folded constants)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path))
    arrays = [numpy_helper.to_array(t) for t in graph.graph.initializer]
    arrays = [a for a in arrays if a.dtype.kind == "f"]
    total = int(sum(a.size for a in arrays))
    return {"total": total, "trainable": total, "nonzero": int(sum(np.count_nonzero(a) for a in arrays))}


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


def attach_flops(arts: list[Artifact]) -> None:
    """FLOPs per item, counted at batch 1 on the eager model (a graph borrows its twin's;
    without one, the architecture rebuilt from the metadata's config is counted)."""
    from edgediag.models import create_model

    by_key: dict[str, dict] = {}
    for art in sorted(arts, key=lambda a: a.backend != "eager"):
        if art.key in by_key:
            art.flops = by_key[art.key]
            continue
        try:
            model = art.model if art.model is not None else create_model(art.model_name, art.config).eval()
            art.flops = count_flops(scoring_module(model), model.example_input(1))
            by_key[art.key] = art.flops
        except Exception as exc:  # noqa: BLE001 - e.g. a model that needs fitted statistics to run
            art.note = f"FLOPs not counted: {type(exc).__name__}: {str(exc)[:120]}"


# --- data --------------------------------------------------------------------------------------
def load_dataset(art: Artifact, data_root: str | None, split: str, cache: dict):
    from edgediag.models import create_model

    values = dict(art.data_config)
    if data_root:
        values["root"] = data_root
    if not values.get("root"):
        raise cli.UserError(f"{art.path}: no data folder recorded; pass --data")
    cfg = from_dict(DataConfig, values, "data.")
    model_cfg = art.model.config if art.model is not None else create_model(art.model_name, art.config).config
    kind = art.data_kind or getattr(art.model, "data_kind", "")
    key = (kind, json.dumps(dataclasses.asdict(cfg), sort_keys=True), json.dumps(art.config, sort_keys=True))
    if key not in cache:
        bundle = build_data(kind, cfg, model_cfg)
        dataset = getattr(bundle, split)
        if dataset is None or len(dataset) == 0:
            raise cli.UserError(f"{cfg.root} has no {split} split to measure accuracy on")
        cache[key] = dataset
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
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_method = reset_peak_rss()
    for _ in range(warmup):
        run(x)
    times = timed_calls(lambda: run(x), iters)
    out = {**latency_stats(times, len(x), clock), "rss_peak_mb": round(peak_rss_mb(), 1), "rss_method": rss_method}
    if cuda:
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def latency_stats(times: dict[str, list[float]], batch: int, clock: str = "wall") -> dict:
    """Percentiles of ``clock`` (``latency_ms``), throughput, and both clocks' p50. The timing
    thread's CPU time is the whole compute latency only at one thread; ``cpu_share`` (CPU p50
    / wall p50) under ~0.9 there says the thread waited: preempted, or its virtual CPU stolen."""
    ms = np.asarray(times[clock]) * 1e3
    wall_p50, cpu_p50 = (float(np.percentile(np.asarray(times[k]) * 1e3, 50)) for k in ("wall", "cpu"))
    return {"latency_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                           "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()),
                           "min": float(ms.min())},
            "items_per_s": float(batch * len(ms) / max(ms.sum() / 1e3, 1e-12)),
            "wall_p50_ms": wall_p50, "cpu_p50_ms": cpu_p50, "cpu_share": cpu_p50 / max(wall_p50, 1e-12)}


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
    rss_method = reset_peak_rss()
    ref_row: dict = {}
    jobs = [(ref_row, *reference_kernel()), *jobs]
    for _, run, x in jobs:
        for _ in range(warmup):
            run(x)
    samples: list[dict[str, list[float]]] = [{"wall": [], "cpu": []} for _ in jobs]
    started = datetime.datetime.now()
    for r in range(rounds):
        n = iters // rounds + (1 if r < iters % rounds else 0)
        for k, (_, run, x) in enumerate(jobs):
            for c, t in timed_calls(lambda run=run, x=x: run(x), n).items():
                samples[k][c] += t
    span = {"start": started.isoformat(timespec="milliseconds"),
            "end": datetime.datetime.now().isoformat(timespec="milliseconds"), "interleaved": True}
    peak = round(peak_rss_mb(), 1)  # the process's peak over all rows: they ran together
    reference = {"what": REFERENCE, **latency_stats(samples[0], 1, clock)["latency_ms"]}
    for (row, _, x), times in zip(jobs[1:], samples[1:]):
        row.update(latency_stats(times, len(x), clock), rss_peak_mb=peak, rss_method=rss_method, span=span,
                   rounds=rounds)
        row["relative_p50"] = row["latency_ms"]["p50"] / reference["p50"]
    return reference


def _batches(dataset, static_batch: int | None, max_items: int):
    """(input batch, its items) over the dataset; a static graph's last batch is padded."""
    n = len(dataset) if not max_items else min(max_items, len(dataset))
    step = static_batch or 32
    for start in range(0, n, step):
        items = [dataset[i] for i in range(start, min(start + step, n))]
        x = torch.stack([torch.as_tensor(it["x"]) for it in items]).float()
        if static_batch and len(items) < static_batch:
            x = torch.cat([x, x[-1:].expand(static_batch - len(items), *x.shape[1:])])
        yield x, items


def score_dataset(run: Callable, dataset, static_batch: int | None, max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every item by the runner; labels = the items' anomaly flags."""
    scores, labels = [], []
    for x, items in _batches(dataset, static_batch, max_items):
        scores.append(run(x)[: len(items)])
        labels += [int(it["anomaly"]) for it in items]
    return np.concatenate(scores), np.asarray(labels)


def class_accuracy(run: Callable, dataset, static_batch: int | None, max_items: int) -> float | None:
    """Accuracy of a classifier graph from its ``probs`` output (argmax vs the items' class),
    so a graph reports the same metric as its checkpoint; None when it has no such output."""
    pred = getattr(run, "predictor", None)
    if pred is None or "probs" not in getattr(pred, "output_names", ()):
        return None
    hits = total = 0
    for x, items in _batches(dataset, static_batch, max_items):
        probs = pred.outputs(x)["probs"][: len(items)]
        hits += int((probs.argmax(-1) == np.asarray([int(it["y"]) for it in items])).sum())
        total += len(items)
    return hits / total if total else None


def accuracy(art: Artifact, run: Callable, static_batch: int | None, dataset, args, plot_dir: Path) -> dict:
    """The model's own metric (model.evaluate) for a checkpoint; for a graph, the metrics its
    scores give (AUC, pAUC, decision accuracy at the calibrated threshold)."""
    from edgediag.models import get_model_class

    scores, labels = score_dataset(run, dataset, static_batch, args.max_items)
    auc, pauc = auc_pauc(labels, scores)
    result = {"auc": auc, "pauc": pauc}
    if math.isfinite(art.threshold):
        result["decision_accuracy"] = decision_report(labels, scores, art.threshold)["accuracy"]
    if len(np.unique(labels)) > 1:
        save_roc_png(plot_dir / "roc.png", {art.backend: (labels, scores)}, title=f"{art.model_name} ({art.backend})")
    try:
        primary = get_model_class(art.model_name)[0].primary_metric
    except Exception:  # noqa: BLE001 - an unknown model still has score metrics
        primary = "auc"
    if art.backend == "eager":
        loader = DeviceLoader(DataLoader(dataset, batch_size=32, shuffle=False), torch.device("cpu"))
        art.model.to("cpu")
        metrics = art.model.evaluate(loader, out_dir=plot_dir)
        write_json(plot_dir / "metrics.json", metrics)
        result["metric_name"], result["metric"] = primary, metrics.get(primary)
        if "auc" in metrics:
            result["auc"] = metrics["auc"]
        result["metric_source"] = "model.evaluate"
    elif primary in result:
        result["metric_name"], result["metric"] = primary, result[primary]
        result["metric_source"] = f"{art.backend} scores"
    elif primary == "acc" and (acc := class_accuracy(run, dataset, static_batch, args.max_items)) is not None:
        result["metric_name"], result["metric"] = "acc", acc
        result["metric_source"] = f"{art.backend} probs output"
    else:  # e.g. a classifier's accuracy needs its class outputs; the graph gives the score
        name = "decision_accuracy" if result.get("decision_accuracy") is not None else "auc"
        result["metric_name"], result["metric"] = name, result[name]
        result["metric_source"] = f"{art.backend} scores (the graph outputs scores, not {primary})"
    return result


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
                                  "--logfile and a short --interval, or run more --iters)"}
    return tegrastats.summarize(samples, interval_ms)


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


# --- report ------------------------------------------------------------------------------------
def markdown(rows: list[dict], env: dict, reference: dict | None = None) -> str:
    head = ["model", "variant", "backend", "batch", "params", "MFLOPs/item", "p50 ms", "p90 ms", "items/s",
            "RSS MB", "metric", "AUC"]
    lines = ["# edgediag benchmark", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, {env['threads']} threads; torch {env['torch']}, "
             f"onnxruntime {env['onnxruntime']}, numpy {env['numpy']}; load average {env['load_avg_1m']} "
             "when it started.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    skipped = []
    for r in rows:
        if r["status"] != "ok":
            skipped.append(f"- `{r['artifact']}` {r['backend']} batch {r['batch']}: skipped: {r['reason']}")
            continue
        lat = r["latency_ms"]
        metric = "n/a" if r.get("metric") is None else f"{r['metric_name']} {r['metric']:.4f}"
        mflops = "n/a" if r.get("flops_per_item") is None else f"{r['flops_per_item'] / 1e6:.2f}"
        params = "n/a" if r.get("params_total") is None else f"{r['params_total']:,}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['backend']} | {r['batch']} | {params} | {mflops} | "
                     f"{lat['p50']:.3f} | {lat['p90']:.3f} | {r['items_per_s']:.1f} | {r['rss_peak_mb']:.0f} | "
                     f"{metric} | {'n/a' if r.get('auc') is None else format(r['auc'], '.4f')} |")
    if skipped:
        lines += ["", "Skipped:", *skipped]
    clocks = {r.get("clock", "wall") for r in rows if r["status"] == "ok"}
    what = ("CPU time of the timing thread (one thread; preemption and stolen time left out)" if clocks == {"cpu"}
            else "wall time")
    lines += ["", f"Latency: {what} of one call on a prepared batch, after the warm-up; RSS: the process's "
              "peak resident memory during the timed runs (models, runtime and data included)."]
    shares = [(r["cpu_share"], r) for r in rows if r["status"] == "ok" and "cpu_share" in r]
    busy = [(share, r) for share, r in shares if share < 0.9]
    if busy:
        share, r = min(busy, key=lambda t: t[0])
        lines += ["", f"Contention: on {len(busy)} of {len(shares)} rows the timing thread ran less than 90 % of "
                  f"the wall time (least: {100 * share:.0f} %, {r['model']} {r['variant']} {r['backend']}): the "
                  "machine was busy or its virtual CPU stolen. `--clock cpu` leaves that time out."]
    elif shares:
        lines += ["", "The timing thread ran at least 90 % of the wall time on every row (no contention seen)."]
    if reference:
        lines += ["", f"Reference kernel ({reference['what']}), timed in the same rounds: p50 "
                  f"{reference['p50']:.3f} ms: how fast the machine's plain compute was (`relative_p50` in "
                  "report.json divides each p50 by it)."]
    return "\n".join(lines) + "\n"


def pareto_png(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    batch = min((r["batch"] for r in ok), default=1)
    ok = [r for r in ok if r["batch"] == batch]
    # One y axis for all points: AUC when every row has it (a checkpoint's own metric and a
    # graph's score metric can differ in kind), else each row's metric.
    y_key = "auc" if ok and all(r.get("auc") is not None for r in ok) else "metric"
    ok = [{**r, "y": r[y_key]} for r in ok if r.get(y_key) is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(dict.fromkeys(r["model_name"] for r in ok))}
    markers = {"eager": "o", "onnxruntime": "s", "tensorrt": "^"}
    biggest = max((r.get("params_total") or 1 for r in ok), default=1)
    for r in ok:  # colour: model, marker: backend, fill: original (filled) or pruned (hollow)
        size = 60 + 440 * math.sqrt((r.get("params_total") or 1) / biggest)
        pruned = r["variant"] == "pruned"
        ax.scatter(r["latency_ms"]["p50"], r["y"], s=size, marker=markers.get(r["backend"], "o"), alpha=0.8,
                   facecolors="white" if pruned else colours[r["model_name"]],
                   edgecolors=colours[r["model_name"]] if pruned else "black", linewidths=1.6 if pruned else 0.6)
    # Text only where colour, marker and fill leave two points ambiguous (two runs of a model):
    # their artifact folders; labels cycle through offsets so close points stay readable.
    seen = collections.Counter((r["model_name"], r["variant"], r["backend"]) for r in ok)
    offsets = [(10, 10), (10, -16), (-10, 22), (-10, -28)]
    ambiguous = [r for r in ok if seen[(r["model_name"], r["variant"], r["backend"])] > 1]
    for i, r in enumerate(sorted(ambiguous, key=lambda r: r["latency_ms"]["p50"])):
        dx, dy = offsets[i % len(offsets)]
        ax.annotate(Path(r["artifact"]).parent.name or r["artifact"], (r["latency_ms"]["p50"], r["y"]),
                    textcoords="offset points", xytext=(dx, dy), fontsize=7.5, ha="left" if dx > 0 else "right",
                    arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5})
    for name in colours:  # original -> pruned of one model family and backend, as a line
        for backend in markers:
            pts = sorted((r for r in ok if r["model_name"] == name and r["backend"] == backend),
                         key=lambda r: r["variant"] != "original")
            if len(pts) > 1 and {p["variant"] for p in pts} == {"original", "pruned"}:
                ax.plot([p["latency_ms"]["p50"] for p in pts], [p["y"] for p in pts], "--",
                        color=colours[name], linewidth=1.2)
    for name, colour in colours.items():
        ax.scatter([], [], color=colour, label=name, s=60)
    for backend, marker in markers.items():
        if any(r["backend"] == backend for r in ok):
            ax.scatter([], [], color="grey", marker=marker, label=backend, s=60)
    ax.scatter([], [], color="grey", edgecolors="black", linewidths=0.6, label="original", s=60)
    ax.scatter([], [], facecolors="white", edgecolors="grey", linewidths=1.6, label="pruned", s=60)
    names = ["AUC"] if y_key == "auc" else sorted({r["metric_name"] for r in ok})
    lat = [r["latency_ms"]["p50"] for r in ok]
    if lat and max(lat) > 10 * min(lat):  # latencies over decades: a log axis keeps all visible
        ax.set_xscale("log")
    ax.set_xlabel(f"median latency, batch {batch} (ms{', log scale' if ax.get_xscale() == 'log' else ''})")
    ax.set_ylabel("accuracy: " + ", ".join(names))
    ax.set_title("accuracy vs latency (marker size = parameters; dashed: original -> pruned)")
    ax.grid(alpha=0.3)
    if ok:
        ax.legend(loc="best", fontsize=8, framealpha=0.8)
        ax.margins(x=0.25, y=0.15)
    else:
        ax.text(0.5, 0.5, "no measured rows", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------
def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise cli.UserError(f"--{what} must be comma-separated positive integers, not {text!r}")
    return values


def _print_row(row: dict, art: Artifact, acc: dict) -> None:
    lat = row["latency_ms"]
    print(f"{art.model_name} {art.variant} {art.backend} batch {row['batch']}: p50 {lat['p50']:.3f} ms, "
          f"{row['items_per_s']:.1f} items/s, {acc.get('metric_name')} {acc.get('metric')}")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise cli.UserError(f"unknown backend {', '.join(unknown) or repr(args.backends)} "
                            f"(choose from {', '.join(BACKENDS)})")
    batches = _int_list(args.batch, "batch")
    if not 1 <= args.rounds <= max(args.iters, 1):
        raise cli.UserError(f"--rounds must be between 1 and --iters ({args.iters}), not {args.rounds}")
    if args.threads < 1 or args.iters < 1 or args.warmup < 0:
        raise cli.UserError("--threads and --iters must be >= 1, --warmup >= 0")
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        raise cli.UserError("--clock cpu times one CPU thread: use it with --threads 1 on the cpu device")
    if args.data and not Path(args.data).exists():
        raise cli.UserError(f"data folder not found: {args.data}")
    arts = [load_artifact(Path(p)) for p in args.model]
    link_and_label(arts)
    attach_flops(arts)
    out = Path(args.out)
    env = environment(args.threads)
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    cache: dict = {}
    rows = []
    interleaved: list[tuple[dict, Callable, torch.Tensor]] = []  # --rounds > 1: timed together
    for art in arts:
        base = {"artifact": str(art.path), "model": art.model_name, "model_name": art.model_name,
                "group": art.group, "variant": art.variant, "backend": art.backend, "threads": args.threads,
                "clock": args.clock,
                "params_total": (art.params or {}).get("total"), "params_trainable": (art.params or {}).get("trainable"),
                "params_nonzero": (art.params or {}).get("nonzero"),
                "flops_per_item": art.flops["flops"] if art.flops else None,
                "macs_per_item": art.flops["macs"] if art.flops else None,
                "scan_flops_per_item": art.flops["scan_flops"] if art.flops else None}
        if art.note:
            base["note"] = art.note
        if art.backend not in backends:
            continue  # this backend was not asked for
        try:
            run, static = runner(art, args.threads, device)
        except Skip as exc:
            rows += [{**base, "batch": b, "status": "skipped", "reason": str(exc), "env": env} for b in batches]
            print(f"skip {art.path} ({art.backend}): {exc}")
            continue
        dataset = load_dataset(art, args.data, args.split, cache)
        plot_dir = out / "plots" / f"{art.slug}-{art.backend}"
        acc = accuracy(art, run, static, dataset, args, plot_dir)
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
            rows.append({**row, "status": "ok", **time_runs(run, x, args.warmup, args.iters, device.type == "cuda", args.clock),
                         "span": {"start": started.isoformat(timespec="milliseconds"),
                                  "end": datetime.datetime.now().isoformat(timespec="milliseconds")}})
            _print_row(rows[-1], art, acc)
    reference = None
    if interleaved:
        reference = time_interleaved(interleaved, args.warmup, args.iters, args.rounds, args.clock)
        for row, _, _ in interleaved:
            _print_row(row, next(a for a in arts if str(a.path) == row["artifact"]), row)
    for r in rows:
        if args.threads != 1 or r.get("backend") == "tensorrt" or device.type != "cpu":
            for k in ("cpu_p50_ms", "cpu_share"):  # one thread's CPU time is not the latency there
                r.pop(k, None)
        for k in ("auc", "pauc", "metric", "decision_accuracy"):
            if k in r:
                r[k] = _finite(r[k])
    power = attach_power(rows, args.tegrastats, args.tegrastats_interval_ms, args.iters) if args.tegrastats else None
    write_json(out / "report.json", {"edgediag_version": __version__, "env": env,
                                     "settings": {"warmup": args.warmup, "iters": args.iters, "rounds": args.rounds,
                                                  "clock": args.clock,
                                                  "batches": batches,
                                                  "threads": args.threads, "split": args.split,
                                                  "data": args.data, "tegrastats": args.tegrastats},
                                     "reference": reference, "power": power, "rows": rows})
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown(rows, env, reference))
    pareto_png(out / "pareto.png", rows)
    print(f"report: {out / 'report.md'} ({len(rows)} rows), {out / 'report.json'}, {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    cli.entry(main)
