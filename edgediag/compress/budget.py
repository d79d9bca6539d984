"""What pruning is measured by: a model's parameters, FLOPs (both counted by
:mod:`edgediag.measure.cost`) and eager latency (:mod:`edgediag.measure.timing`), and the
budget a pruning run stops at."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from edgediag.errors import NotFittedError, UserError
from edgediag.measure.cost import count_flops, count_parameters, scoring_parameter_count
from edgediag.measure.timing import RUNS, THREADS, eval_mode, median_latency_ms


def model_params(model: nn.Module) -> int:
    """Parameters of the deployed scoring graph (``export_module()`` at batch 1), as every verb
    counts them: a --ratio of 0.5 halves the figure the reports show. Training-only parts
    (AEGAN-AD's generator halves, classifier heads a score does not read) are pruned alongside
    but not counted. A plain module, or a model whose score is not fitted yet (no scoring graph
    to deploy): all its parameters."""
    if hasattr(model, "export_module"):
        try:
            return scoring_parameter_count(model)
        except NotFittedError:  # no scoring graph to deploy yet
            return int(count_parameters(model)["total"])
    return int(count_parameters(model)["total"])


def model_flops(model: nn.Module, x: torch.Tensor | None = None) -> int:
    """FLOPs of one forward of ``model.export_module()`` (a plain module: itself) on ``x``
    (default ``model.example_input(1)``), in eval mode."""
    module = model.export_module() if hasattr(model, "export_module") else model
    if x is None:
        x = model.example_input(1)
    x = x.to(next(model.parameters()).device)
    # the model's own flag restored last: a fresh export wrapper starts in training mode
    with eval_mode(model), eval_mode(module):
        return int(count_flops(module, x)["flops"])


def eager_latency_ms(model, runs: int = RUNS, threads: int = THREADS) -> float:
    """Median eager CPU latency of ``export_module()`` at batch 1, by the timing protocol
    (one thread: the least noisy figure on a shared machine, and what one edge core gives)."""
    return median_latency_ms(model.export_module(), model.example_input(1), runs=runs, threads=threads)


def model_cost(model, metric: str) -> float:
    """Dynamic pruning's cost: params, flops, or median eager latency (30 runs)."""
    if metric == "params":
        return float(model_params(model))
    if metric == "flops":
        return float(model_flops(model))
    if metric == "latency":
        return median_latency_ms(model.export_module(), model.example_input(1).to(next(model.parameters()).device))
    raise UserError(f"prune metric must be params, flops or latency, not {metric!r}")


@dataclasses.dataclass
class Budget:
    """Stop pruning at the first step where the chosen cost is at or below the target.
    ``both``: parameters and FLOPs, each with its own target (``targets``); the cost is the
    larger of the two as a multiple of its target, so the target is 1."""

    metric: str  # params | flops | latency | both
    target: float
    targets: dict[str, float] | None = None

    def cost(self, model) -> float:
        if self.metric == "both":
            return max(float(model_params(model)) / self.targets["params"],
                       float(model_flops(model)) / self.targets["flops"])
        if self.metric == "params":
            return float(model_params(model))
        if self.metric == "flops":
            return float(model_flops(model))
        return eager_latency_ms(model)

    def met(self, value: float) -> bool:
        return value <= self.target * (1 + 1e-9)


__all__ = ["model_params", "model_flops", "eager_latency_ms", "model_cost", "Budget"]
