"""Per-layer latency for latency-aware structured pruning: eager time per module (forward
hooks) or ONNX Runtime's profile mapped back to module paths, and the importance wrapper
that prunes time-heavy layers first."""

from __future__ import annotations

import statistics
import time

import torch
import torch_pruning as tp
from torch import nn

from edgediag.errors import UserError
from edgediag.measure.timing import eval_mode, torch_threads
from edgediag.nn.pruning import root_module_types


@torch.inference_mode()
def layer_latency(module: nn.Module, x: torch.Tensor, runs: int = 5, threads: int = 1) -> dict[str, float]:
    """Eager CPU time (ms, median over ``runs``) spent in each leaf module and in each
    registered root leaf (the Mamba mixers, SS2D), measured with forward pre/post hooks on
    ``module(x)``. Hooks, not measure.timing's loops: the time is split by module."""
    roots = tuple(root_module_types())
    leaves = {n: m for n, m in module.named_modules() if not list(m.children()) or isinstance(m, roots)}
    times: dict[str, list[float]] = {n: [] for n in leaves}
    start: dict[str, float] = {}
    handles = []
    for name, m in leaves.items():
        handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: start.__setitem__(n, time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda _m, _a, _o, n=name: times[n].append((time.perf_counter() - start.pop(n, time.perf_counter())) * 1e3)))
    try:
        with torch_threads(threads), eval_mode(module):
            module(x)  # warm-up
            for ts in times.values():
                ts.clear()
            for _ in range(runs):
                module(x)
    finally:
        for h in handles:
            h.remove()
    # median over runs (robust to a hiccup of a shared CPU); a module called several times
    # per forward (shared layers) gets its mean time per run
    return {n: (statistics.median(ts) if len(ts) == runs else sum(ts) / runs) for n, ts in times.items() if ts}


def _n_outputs(module, x) -> int:
    with torch.no_grad():
        out = module(x)
    return len(out) if isinstance(out, (tuple, list)) else 1


def ort_layer_latency(module: nn.Module, x: torch.Tensor, runs: int = 5) -> dict[str, float]:
    """Per-module ms on ONNX Runtime (one thread): ORT's profiler times every node; the
    TorchScript exporter names nodes ``/a/b/Op_N`` after the module path ``a.b``."""
    import json
    import os
    import tempfile

    import onnxruntime as ort

    from edgediag.deploy.onnx import export_graph, tracing_context

    with tempfile.TemporaryDirectory() as tmp, eval_mode(module):
        path = os.path.join(tmp, "m.onnx")
        with tracing_context():
            export_graph(module, (x,), path, ["x"], [f"out{i}" for i in range(_n_outputs(module, x))], 17,
                         False, "torchscript")
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        sess.run(None, feed)
        for _ in range(runs):
            sess.run(None, feed)
        prof = sess.end_profiling()
        with open(prof) as fh:
            events = json.load(fh)
    out: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        node = ev["name"][: -len("_kernel_time")]
        # "/model/blocks/blocks.0/conv2/Conv": each scope names the child either alone
        # ("conv2") or qualified by its parent's last name ("blocks.0"); the op goes last
        name = ""
        for part in [p for p in node.split("/") if p][:-1]:
            last = name.rsplit(".", 1)[-1]
            if name and part.startswith(last + "."):
                name = name[: len(name) - len(last)] + part
            else:
                name = f"{name}.{part}" if name else part
        name = name or "(graph)"
        out[name] = out.get(name, 0.0) + ev.get("dur", 0) / 1e3 / (runs + 1)
    return out


def module_latency(model, backend: str = "eager") -> dict[str, float]:
    """ms per module name of ``export_module()`` at batch 1 on ``backend``: eager (forward
    hooks) or onnxruntime (ORT's profiler, node names mapped back to module paths)."""
    module = model.export_module()
    x = model.example_input(1)
    prefix = "model." if hasattr(module, "model") and module.model is model else ""
    if backend == "eager":
        ms = layer_latency(module, x)
    elif backend == "onnxruntime":
        ms = ort_layer_latency(module, x)
    else:
        raise UserError(f"--latency-backend must be eager or onnxruntime, not {backend!r}")
    return {n[len(prefix):] if n.startswith(prefix) else n: v for n, v in ms.items()}


class LatencyAwareImportance(tp.importance.Importance):
    """Wraps an importance: each group's scores are divided by (1 + alpha * its layers'
    share of the measured time / the mean share), so under global ranking the channels of
    time-heavy layers go first. ``module_ms``: ms per module object."""

    def __init__(self, base, module_ms: dict[nn.Module, float], alpha: float = 1.0):
        self.base, self.module_ms, self.alpha = base, module_ms, float(alpha)
        total = sum(module_ms.values()) or 1.0
        self.share = {m: v / total for m, v in module_ms.items()}
        self.mean_share = 1.0 / max(1, len(module_ms))

    def __call__(self, group, **kwargs):
        imp = self.base(group, **kwargs)
        if imp is None:
            return None
        share = sum(self.share.get(m, 0.0) for m in {dep.target.module for dep, _ in group})
        return imp / (1.0 + self.alpha * share / self.mean_share)


__all__ = ["layer_latency", "ort_layer_latency", "module_latency", "LatencyAwareImportance"]
