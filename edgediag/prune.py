"""`python -m edgediag.prune`: compress a trained checkpoint - structured pruning
(torch-pruning), dynamic pruning (screening gates) or both - then fine-tune it with the
model's own losses on the shared engine and recalibrate it like the train verb.

Writes to --out: ``model.pt`` (an ordinary checkpoint: the config records the pruned
widths, so ``create_model(config)`` rebuilds the shape and ``torch.load(weights_only=True)``
reads it) and ``prune.json`` (method, budget, widths, params, FLOPs, batch-1 CPU latency
of eager PyTorch and ONNX Runtime, and the test metrics before pruning, after pruning and
after fine-tuning). Nothing is written when the input is bad.

Methods (docs/pruning.md):
* ``structured``: :func:`edgediag.compress.structured.prune_structured` - torch-pruning's
  dependency graph with edgediag's custom pruners, pruned in small steps until the budget
  is met. Models whose config has no ``pruned_widths`` (LDMamba) are pruned on their
  screening groups (the width fields of their config) with the same importance.
* ``dynamic``: the screening-gate training of :class:`edgediag.compress.dynamic.DynamicPruner`
  for ``--finetune-epochs`` epochs: the gates close channels under the sparsity term and
  closed channels are removed between epochs until the budget is met.
* ``both``: dynamic first (the gates pick what the task does not need), then structured
  pruning for whatever part of the budget is still missing, then fine-tuning.

``--remove-blocks N`` (any method) first removes the N residual blocks that change their
input least (:mod:`edgediag.compress.depth`); the channel pruning then covers what the
budget still asks. Fewer blocks means fewer operator calls, which is what batch-1 eager
latency on a CPU pays for; fewer channels mostly is not.
"""

from __future__ import annotations

from pathlib import Path

from edgediag import cli
from edgediag.compress.importance import IMPORTANCES
from edgediag.compress.pipeline import METHODS, run
from edgediag.measure.timing import add_timing_args, torch_threads


def parser():
    p = cli.make_parser("prune", "Structured (torch-pruning) and dynamic pruning of a checkpoint, then fine-tuning.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="model.pt of a trained model")
    p.add_argument("--data", metavar="DIR", required=True,
                   help="the data folder the model was trained on (fine-tuning, evaluation)")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder: model.pt + prune.json")
    p.add_argument("--method", default="structured", choices=METHODS,
                   help="structured (torch-pruning), dynamic (screening gates) or both (default structured)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="fraction of the model's cost to remove (default: the model's "
                        "prune recipe, chosen to halve batch-1 latency, e.g. 0.85 for tastgram_mfn; else 0.5); parameters "
                        "are the deployed scoring graph's, as every report counts them")
    budget.add_argument("--target-params", type=float,
                        help="stop at this many parameters (of the deployed scoring graph)")
    budget.add_argument("--target-latency-ms", type=float,
                        help="stop at this eager CPU latency (batch 1, one thread; the default timing protocol)")
    p.add_argument("--ratio-metric", default="params", choices=("params", "flops", "both"),
                   help="what --ratio is a fraction of (default params)")
    p.add_argument("--importance", default="magnitude", help="magnitude | taylor | lamp")
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank channels across layers (global pruning) instead of the same ratio per layer")
    p.add_argument("--round-to", type=int, default=None,
                   help="keep channel counts multiples of this (default: the model's recipe, 16 or 8: the CPU's "
                        "vector width; 8 for TensorRT; 1 = no rounding)")
    p.add_argument("--latency-aware", action="store_true",
                   help="measure per-layer latency and prune time-heavy layers first (implies --global)")
    p.add_argument("--latency-backend", default="eager", choices=("eager", "onnxruntime"),
                   help="--latency-aware: time the layers in eager PyTorch or ONNX Runtime (default eager)")
    p.add_argument("--remove-blocks", type=int, default=None, metavar="N",
                   help="depth pruning first: remove the N residual blocks that change their input least "
                        "(default: the model's recipe without a budget flag, e.g. 4 for memorymamba; else 0)")
    p.add_argument("--max-channel-ratio", type=float, default=0.9, help="never remove more than this per group")
    p.add_argument("--steps", type=int, default=18, help="pruning steps up to the max channel ratio")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="fine-tuning epochs (dynamic: gate-training epochs); default: the model's recipe "
                        "(prune_recipe: e.g. 8 for tastgram_mfn); 0 skips fine-tuning")
    p.add_argument("--distill", type=float, default=None,
                   help="weight of knowledge distillation from the unpruned model during fine-tuning "
                        "(default: the model's recipe; 0 = off)")
    p.add_argument("--max-drop", type=float, default=None,
                   help="refuse the result (exit 4, nothing written) when the primary metric (AUC/accuracy) "
                        "falls by more than this after fine-tuning; without it a drop above 0.02 is a warning")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: a tenth of the model's)")
    p.add_argument("--batch-size", type=int,
                   help="fine-tuning batch size (default: --config's, else the one the checkpoint was trained with)")
    p.add_argument("--max-steps-per-epoch", type=int, default=0,
                   help="cap on the optimiser steps of each fine-tuning epoch (default 0 = whole epochs)")
    add_timing_args(p, with_threads=False)
    cli.add_threads_arg(p, None, "CPU threads of the latency figures (default 1, as every verb times) and of "
                                 "evaluation and fine-tuning (sets train.threads; default: --config's, else torch's)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency figures (params/FLOPs only)")
    p.add_argument("--seed", type=int, metavar="N", default=0,
                   help="seed of the data split, the importance batches and fine-tuning (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite an earlier result in --out")
    cli.add_config_args(p)
    cli.add_json_arg(p)
    return p


def _check_args(args) -> None:
    if args.ratio is not None and not 0.0 < args.ratio < 1.0:
        raise cli.UserError(f"--ratio must be in (0, 1), not {args.ratio}")
    if args.target_params is not None and args.target_params <= 0:
        raise cli.UserError("--target-params must be positive")
    if args.target_latency_ms is not None and args.target_latency_ms <= 0:
        raise cli.UserError("--target-latency-ms must be positive")
    if args.importance not in IMPORTANCES:
        raise cli.UserError(f"--importance must be one of {', '.join(IMPORTANCES)}, not {args.importance!r}")
    if args.round_to is not None and args.round_to < 1:
        raise cli.UserError("--round-to must be >= 1")
    if not 0.0 < args.max_channel_ratio < 1.0:
        raise cli.UserError("--max-channel-ratio must be in (0, 1)")
    if (args.remove_blocks or 0) < 0:
        raise cli.UserError("--remove-blocks must be >= 0")
    if args.steps < 1 or (args.finetune_epochs or 0) < 0 or (args.distill or 0) < 0:
        raise cli.UserError("--steps must be >= 1, --finetune-epochs and --distill >= 0")
    if args.max_drop is not None and args.max_drop < 0:
        raise cli.UserError("--max-drop must be >= 0")
    if args.method == "dynamic" and args.ratio_metric == "both":
        raise cli.UserError("--ratio-metric both needs structured pruning after the gates: use --method both")
    if args.method in ("dynamic", "both") and args.finetune_epochs is not None and args.finetune_epochs < 2:
        raise cli.UserError("--method dynamic/both trains the gates: give --finetune-epochs >= 2")
    if not Path(args.checkpoint).is_file():
        raise cli.UserError(f"checkpoint not found: {args.checkpoint}")
    out = cli.output_folder(args.out)
    if (out / "model.pt").exists() and not args.force:
        raise cli.UserError(f"{out} already holds a pruned model: pass --force to overwrite")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _check_args(args)
    if args.threads:  # what train --threads sets: the fine-tuning Trainer's threads
        args.overrides = [*args.overrides, f"train.threads={args.threads}"]
    with cli.json_stdout(args.json), cli.locked_output(args.out), torch_threads(args.threads):
        return run(args)


if __name__ == "__main__":
    cli.entry(main)
