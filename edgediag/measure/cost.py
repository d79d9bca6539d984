"""Parameters and FLOPs of a model, with the selective scan counted by its formula.

Every report counts the same thing for a checkpoint and for its exported graph
(:data:`PARAMS_DEFINITION`, :func:`scoring_costs`): the module export traces
(``model.export_module()``), on one item. A graph cannot be counted from its own
initializers: ONNX folds BatchNorm into the convolutions (two vectors of parameters become
one of bias) and stores constant buffers (mel filterbanks, DFT matrices, kNN banks, fitted
statistics) beside the weights, so export records these counts in the graph's metadata.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions, but it
cannot see the selective scan (a C++ loop, a CUDA kernel or cumsum/exp ops it ignores or
miscounts). So while counting, the scan's observer hook (:mod:`edgediag.ops.flops`) runs
each scan with the counter paused and files :func:`~edgediag.ops.flops.scan_flops` under
the enclosing modules instead.

FLOPs are counted as the counter does: a multiply-add is 2 FLOPs (MACs = FLOPs / 2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode

from edgediag.nn.features import stft_method
from edgediag.ops.flops import SCAN_KEY, observing_scans

OUTSIDE = "(outside modules)"
PARAMS_DEFINITION = ("parameters of the deployed scoring graph: the trainable parameters one forward of "
                     "export_module() reads (what export traces); training-only parts (a GAN's generator "
                     "decoder, auxiliary heads) and constant buffers (mel filterbanks, kNN banks, fitted "
                     "statistics) are not counted")
FLOPS_DEFINITION = "FLOPs of one forward of export_module() per item (a multiply-add is 2 FLOPs)"


def count_parameters(model: nn.Module, only: set[int] | None = None) -> dict[str, int]:
    """Total, trainable and non-zero parameter counts (non-zero shows unstructured sparsity);
    ``only``: just the parameters whose storage (``untyped_storage().data_ptr()``) is in it."""
    params = [p for p in model.parameters() if only is None or _storage(p) in only]
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "nonzero": int(sum(int(torch.count_nonzero(p.detach())) for p in params))}


class _Reads(TorchDispatchMode):
    """Records the storage of every tensor an op reads."""

    def __init__(self):
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in _pytree.tree_leaves((args, kwargs or {})):
            if isinstance(t, torch.Tensor):
                self.storages.add(_storage(t))
        return func(*args, **(kwargs or {}))


def _storage(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (views share it), or -1 for a tensor without one."""
    if t.layout is not torch.strided:  # sparse, mkldnn, jagged: torch has no storage to give
        return -1
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # tensor subclasses that wrap another (functional tensors in tracing)
        return -1


def scoring_parameters(module: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """:func:`count_parameters` of only the parameters that one forward of ``module`` on
    ``inputs`` reads, run as export traces it (the exportable scan backend, the factored DFT
    front end, no grad): what the exported graph of ``module`` holds as weights."""
    from edgediag.ops import scan_backend

    reads = _Reads()
    with torch.no_grad(), stft_method("factored"), scan_backend("chunked"), reads:
        module(*inputs)
    return count_parameters(module, only={s for s in reads.storages if s > 0})


@contextlib.contextmanager
def _scoring_graph(model, x: torch.Tensor | None) -> Iterator[tuple[nn.Module, torch.Tensor]]:
    """``model.export_module()`` and its input (default ``model.example_input(1)`` on the
    model's device), both in eval mode for the duration."""
    from edgediag.measure.timing import eval_mode

    module = model.export_module()
    if x is None:
        weight = next(iter(model.parameters()), None)  # a statistics-only model has none
        x = model.example_input(1)
        x = x if weight is None else x.to(weight.device)
    with eval_mode(model), eval_mode(module):  # the model's own flag restored last
        yield module, x


def scoring_costs(model, x: torch.Tensor | None = None) -> dict:
    """``{"params": scoring_parameters, "flops": count_flops}`` of ``model.export_module()``
    on ``x`` (default ``model.example_input(1)``; FLOPs are per call: per item at batch 1),
    in eval mode: the counts every verb reports for a checkpoint and for its graph."""
    with _scoring_graph(model, x) as (module, x):
        return {"params": scoring_parameters(module, x), "flops": count_flops(module, x)}


def scoring_parameter_count(model, x: torch.Tensor | None = None) -> int:
    """The "params" figure of :func:`scoring_costs` alone (no FLOP count): what prune's
    budgets measure after every step."""
    with _scoring_graph(model, x) as (module, x):
        return int(scoring_parameters(module, x)["total"])


@contextlib.contextmanager
def _counting_scans(counter: _Counter) -> Iterator[list[int]]:
    """Count every selective scan run inside by its formula; yields the per-call FLOPs."""
    calls: list[int] = []

    def count(run, flops: int):
        # The real scan runs with the dispatch modes popped, so its inner ops are not
        # counted a second time on top of the formula.
        with _disable_current_modes():
            out = run()
        calls.append(flops)
        for parent in set(counter.mod_tracker.parents):
            counter.flop_counts[parent][SCAN_KEY] += flops
        counter.add_own(flops)
        return out

    with observing_scans(count):
        yield calls


def _total(ops: dict) -> int:
    return int(sum(ops.values()))


def _innermost(parents) -> str:
    """The module an op runs in: the deepest of the running modules' names."""
    inner = max(parents, key=lambda n: (n != "Global", n.count("."), len(n)))
    return OUTSIDE if inner == "Global" else inner


class _Counter(FlopCounterMode):
    """FlopCounterMode that also files every op under its innermost module only, so the
    per-module breakdown partitions the total. (The counter's own per-module figures
    include children, and a module called outside its parent's forward is not nested.)"""

    def __init__(self):
        super().__init__(display=False)
        self.own: dict[str, int] = {}

    def add_own(self, flops: int) -> None:
        name = _innermost(self.mod_tracker.parents)
        self.own[name] = self.own.get(name, 0) + int(flops)

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            self.add_own(self.flop_registry[func_packet](*args, **kwargs, out_val=out))
        return super()._count_flops(func_packet, out, args, kwargs)


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> dict:
    """FLOPs of one forward of ``module`` on ``inputs`` (no grad, eval mode as given), with the
    audio front end in its exported form (the factored DFT: torch.stft has no FLOP formula).

    Returns ``{"flops", "macs", "scan_flops", "scan_calls", "by_op": {op: flops},
    "by_module": {module name: own flops}, "by_module_total": {name: flops incl. children}}``.
    """
    counter = _Counter()
    with torch.no_grad(), stft_method("factored"), counter, _counting_scans(counter) as scans:
        module(*inputs)
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()
    by_op: dict[str, int] = {}
    for op, n in counts.get("Global", {}).items():
        key = str(op)
        by_op[key] = by_op.get(key, 0) + int(n)
    return {"flops": int(total), "macs": int(total) // 2, "scan_flops": int(sum(scans)), "scan_calls": len(scans),
            "by_op": by_op, "by_module": {k: v for k, v in counter.own.items() if v},
            "by_module_total": {k: _total(v) for k, v in counts.items() if k != "Global"}}
