"""The prune verb's mechanism (``python -m edgediag.prune``, whose docstring describes the
methods and outputs): load, measure, prune (depth, dynamic, structured), refit, fine-tune
(with :mod:`edgediag.compress.distill`), save ``model.pt`` and ``prune.json``."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from edgediag.cli import Column, format_table, show, table_report
from edgediag.compress import structured as sp
from edgediag.compress.budget import Budget, eager_latency_ms
from edgediag.compress.distill import Distilled
from edgediag.config import from_dict, load_tree, to_dict
from edgediag.data import DataConfig, build_data
from edgediag.engine.checkpoint import load_model
from edgediag.engine.fit import evaluate_test, finalize, refit, scalars
from edgediag.engine.trainer import TrainConfig, Trainer
from edgediag.errors import UserError
from edgediag.measure.cost import FLOPS_DEFINITION, PARAMS_DEFINITION, count_parameters, scoring_costs
from edgediag.measure.timing import THREADS, WARMUP, protocol, protocol_line, time_functions
from edgediag.models import create_model
from edgediag.nn.pruning import module_sizes, record_widths
from edgediag.utils import seed_everything, write_json

log = logging.getLogger("edgediag.prune")

METHODS = ("structured", "dynamic", "both")


# --- measurements ------------------------------------------------------------------------
def _onnx_of(model, tmp: Path, name: str):
    import onnx

    from edgediag.deploy.onnx import export_graph, tracing_context

    module = model.export_module().eval()
    x = model.example_input(1).cpu()
    names = tuple(getattr(module, "output_names", ("score",)))
    path = tmp / f"{name}.onnx"
    with tracing_context():
        export_graph(module, (x,), path, ["input"], names, 17, False, "torchscript")
    return module, x, onnx.load(str(path))


def latency_figures(model, runs: int, threads: int = THREADS, warmup: int = WARMUP) -> dict:
    """Batch-1 CPU latency of ``export_module()``: eager PyTorch and ONNX Runtime (a
    TorchScript export of opset 17), timed side by side by the timing protocol."""
    from edgediag.deploy.onnx import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        module, x, proto = _onnx_of(model, Path(tmp), "m")
    sess = ort_session(proto, threads)
    feeds = {sess.get_inputs()[0].name: x.numpy()}
    ort_s, eager_s = time_functions([lambda: sess.run(None, feeds), lambda: module(x)], threads, warmup, runs)
    return {"eager_ms": eager_s["wall_p50_ms"], "onnxruntime_ms": ort_s["wall_p50_ms"]}


def paired_latency(before, after, runs: int, threads: int = THREADS, warmup: int = WARMUP) -> dict:
    """Speed-up of ``after`` over ``before`` with both timed in one loop, in turn (eager and
    ONNX Runtime, batch 1, the timing protocol): on a shared CPU the load then hits both
    alike, which separate measurements minutes apart cannot promise."""
    from edgediag.deploy.onnx import ort_session

    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, model in (("before", before), ("after", after)):
            module, x, proto = _onnx_of(model, Path(tmp), tag)
            sess = ort_session(proto, threads)
            feeds = {sess.get_inputs()[0].name: x.numpy()}
            fns[f"{tag}_eager_ms"] = (lambda m=module, x=x: m(x))
            fns[f"{tag}_onnxruntime_ms"] = (lambda s=sess, f=feeds: s.run(None, f))
    stats = time_functions(list(fns.values()), threads, warmup, runs)
    out = {k: st["wall_p50_ms"] for k, st in zip(fns, stats)}
    out["speedup_eager"] = out["before_eager_ms"] / out["after_eager_ms"]
    out["speedup_onnxruntime"] = out["before_onnxruntime_ms"] / out["after_onnxruntime_ms"]
    out.update(protocol(threads, warmup, runs))
    return out


def stage_line(cost: dict, metric: str, metrics: dict) -> str:
    """One readable line of a stage's figures for the log (the report has the table)."""
    parts = [f"{cost['params']:,} params", f"{cost['flops'] / 1e6:.1f} MFLOPs"]
    parts += [f"{k.replace('_ms', '')} {cost[k]:.2f} ms" for k in ("eager_ms", "onnxruntime_ms") if k in cost]
    value = metrics.get(metric)
    parts.append(f"{metric} {float(value):.4f}" if value is not None else f"{metric} n/a")
    return ", ".join(parts)


def costs(model, with_latency: bool, args) -> dict:
    """Parameters and FLOPs counted as every verb counts them (edgediag.measure.cost.
    scoring_costs: the deployed scoring graph; what --ratio and --target-params count), the
    checkpoint's whole parameter count (training-only parts included, for information) and
    the latency."""
    model.eval()
    counted = scoring_costs(model)
    fl = counted["flops"]
    # The fixed feature front ends (log-mel by a matrix DFT) are no pruning's business but can
    # dominate the total: report the network's own FLOPs as well.
    front = sum(v for k, v in fl["by_module_total"].items()
                if k.split(".")[-1] in ("logmel",) and k.count(".") <= 2)
    out = {"params": counted["params"]["total"], "params_checkpoint": count_parameters(model)["total"], "flops": fl["flops"],
           "flops_network": fl["flops"] - front}
    if with_latency:
        out.update(latency_figures(model, args.latency_runs, timing_threads(args), args.warmup))
    return out


def timing_threads(args) -> int:
    """--threads, else the timing protocol's (one thread): the latency figures' threads."""
    return args.threads or THREADS


def evaluate(model, bundle, batch_size: int, device) -> dict:
    return scalars(evaluate_test(model, bundle, batch_size, device))


def train_batches(bundle, seed: int, batch_size: int, n: int) -> list[dict]:
    """The first ``n`` batches of the training set, shuffled with a fixed seed."""
    loader = DataLoader(bundle.train, batch_size=min(batch_size, len(bundle.train)), shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return list(itertools.islice(loader, n))


def widths_of(model) -> dict:
    if hasattr(model, "screening_groups") and "pruned_widths" not in to_dict(model.config):
        return {g.name: g.gate.channels for g in model.screening_groups()}
    return module_sizes(model)


# --- main ------------------------------------------------------------------------------------
def run(args) -> int:
    """The prune verb's work on checked arguments (edgediag.prune's parser): prune, refit,
    fine-tune, save model.pt and prune.json."""

    model, ckpt = load_model(args.checkpoint)
    name = ckpt["model_name"]
    cls = type(model)
    recipe = resolve_recipe(args, cls)
    tree = load_tree(args.config, args.overrides, {"train", "data"})
    train_meta = (ckpt.get("meta") or {}).get("train_config") or {}
    flags = {k: v for k, v in {"batch_size": args.batch_size, "seed": args.seed,
                               "max_steps_per_epoch": args.max_steps_per_epoch}.items() if v is not None}
    base_train = {**cls.train_defaults, **{k: v for k, v in train_meta.items()
                                          if k in ("batch_size", "threshold_method", "threshold_quantile", "target_far",
                                                   "calibration_folds", "optimizer",
                                                   "betas", "weight_decay", "schedule", "grad_clip", "lr")}}
    # fine-tuning a trained model: a tenth of its training learning rate unless its recipe says otherwise
    lr = args.lr if args.lr is not None else float(base_train.get("lr", 1e-3)) * getattr(args, "lr_scale", 0.1)
    train_cfg = from_dict(TrainConfig, {**base_train, "min_steps": 0, **(tree.get("train") or {}), **flags, "lr": lr,
                                        "epochs": max(1, args.finetune_epochs), "device": "cpu",
                                        "warmup": 0.0}, "train.")
    train_cfg.validate()
    data_values = {**((ckpt.get("data") or {}).get("config") or {}), **(tree.get("data") or {}), "root": args.data}
    data_cfg = from_dict(DataConfig, data_values, "data.")
    seed_everything(train_cfg.seed)
    bundle = build_data(cls.data_kind, data_cfg, model.config)
    device = torch.device("cpu")
    model = model.to(device)

    t0 = time.time()
    with_lat = not args.no_latency
    before = costs(model, with_lat, args)
    metrics_before = evaluate(model, bundle, train_cfg.batch_size, device)
    widths_before = widths_of(model)
    log.info("before: %s", stage_line(before, model.primary_metric, metrics_before))

    # the budget
    # a budget counts the deployed scoring graph's parameters (model_params), as the reports do
    if args.target_params is not None:
        budget = Budget("params", args.target_params)
        start = before["params"]
    elif args.target_latency_ms is not None:
        budget = Budget("latency", args.target_latency_ms)
        start = eager_latency_ms(model)
    else:
        ratio = 0.5 if args.ratio is None else args.ratio
        if args.ratio_metric == "both":
            budget = Budget("both", 1.0, {"params": (1.0 - ratio) * before["params"],
                                          "flops": (1.0 - ratio) * before["flops"]})
            start = 1.0 / (1.0 - ratio)
        else:
            start = before[args.ratio_metric]
            budget = Budget(args.ratio_metric, (1.0 - ratio) * start)
    if budget.target >= start:
        raise UserError(f"the target {budget.target:g} {budget.metric} is not smaller than the model's "
                            f"{start:g}: nothing to prune")
    original = copy.deepcopy(model).eval()
    teacher = original if args.distill > 0 else None
    # taylor: two small batches (the gradient is recomputed at every pruning step)
    loss_batches = (train_batches(bundle, train_cfg.seed, min(8, train_cfg.batch_size), 2)
                    if args.importance == "taylor" else [])

    records: dict = {}
    if args.remove_blocks:
        from edgediag.compress.depth import prune_depth

        # importance on up to 32 training inputs
        x = train_batches(bundle, train_cfg.seed, 32, 1)[0]["x"].float()
        records["depth"] = prune_depth(model, args.remove_blocks, x)
        records["depth"]["cost_after"] = budget.cost(model)
        log.info("depth pruning: removed %s, %s %.4g (target %.4g)", records["depth"]["removed_blocks"],
                 budget.metric, records["depth"]["cost_after"], budget.target)
    dynamic_history = None
    if args.method in ("dynamic", "both"):
        current = records["depth"]["cost_after"] if args.remove_blocks else start
        model, dynamic_history = run_dynamic(model, bundle, train_cfg, budget, current, args)
        records["dynamic"] = dynamic_history
    if args.method in ("structured", "both") and not budget.met(budget.cost(model)):
        if "pruned_widths" in to_dict(model.config):
            model, records["structured"] = sp.prune_structured(
                model, budget=budget, importance=args.importance, global_pruning=args.global_pruning,
                round_to=args.round_to, max_ratio=args.max_channel_ratio, steps=args.steps,
                loss_batches=loss_batches, latency_aware=args.latency_aware, latency_backend=args.latency_backend)
        elif hasattr(model, "screening_groups") and model.screening_groups():
            model, records["structured"] = sp.prune_groups(model, budget, args.importance, args.max_channel_ratio,
                                                        args.steps, args.round_to, loss_batches)
        else:
            raise UserError(f"{name} has neither a pruned_widths config field nor screening groups: "
                                "it cannot be structurally pruned")
    model = _with_recorded_widths(model, name)
    refit(model, bundle, train_cfg, device)
    after_prune = costs(model, with_lat, args)
    metrics_pruned = evaluate(model, bundle, train_cfg.batch_size, device)
    log.info("after pruning: %s", stage_line(after_prune, model.primary_metric, metrics_pruned))

    metrics_tuned = metrics_pruned
    history = []
    if args.finetune_epochs > 0 and args.method != "dynamic":
        print(f"fine-tuning {args.finetune_epochs} epochs, distillation weight {args.distill:g} ({recipe})", flush=True)
        if hasattr(model, "sparsity_weight"):
            model.sparsity_weight = 0.0  # the budget is met: no more pressure on the gates
        model, history = finetune(model, bundle, train_cfg, teacher, args.distill)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_data = ckpt.get("data") or {}
    checkpoint_data = {**checkpoint_data, "config": to_dict(data_cfg)}
    metrics_tuned = scalars(finalize(model, bundle, train_cfg, device, out_dir, checkpoint_data))
    pm = model.primary_metric
    drop = metrics_before.get(pm, float("nan")) - metrics_tuned.get(pm, float("nan"))
    if args.max_drop is not None and drop > args.max_drop:
        (out_dir / "model.pt").unlink(missing_ok=True)
        print(f"{name}: {pm} fell by {drop:.4f} ({metrics_before[pm]:.4f} -> {metrics_tuned[pm]:.4f}), more than "
              f"--max-drop {args.max_drop:g}; nothing written (more --finetune-epochs, --distill, or a smaller --ratio)",
              file=sys.stderr)
        return EXIT_DROP
    # the saved file must load as any checkpoint does (weights_only, rebuilt from config)
    reloaded, _ = load_model(out_dir / "model.pt")
    final = costs(reloaded, False, args)
    paired = paired_latency(original, reloaded, args.latency_runs, timing_threads(args), args.warmup) if with_lat else {}
    if paired:
        final.update(eager_ms=paired["after_eager_ms"], onnxruntime_ms=paired["after_onnxruntime_ms"])
    reached = 1.0 - final["params"] / before["params"]  # what the budget counted
    asked = args.ratio if args.ratio is not None else (0.5 if args.target_params is None
                                                        and args.target_latency_ms is None else None)
    report = {
        "model": name, "checkpoint": str(args.checkpoint), "method": args.method,
        "budget": {"metric": budget.metric, "target": budget.target, "start": start,
                   "ratio": args.ratio if args.ratio is not None else (0.5 if args.target_params is None
                                                                      and args.target_latency_ms is None else None),
                   "target_params": args.target_params, "target_latency_ms": args.target_latency_ms},
        "importance": args.importance, "global": args.global_pruning or args.latency_aware,
        "round_to": args.round_to, "remove_blocks": args.remove_blocks,
        "latency_aware": args.latency_aware, "latency_backend": args.latency_backend,
        "finetune_epochs": args.finetune_epochs, "distill": args.distill,
        "widths_before": widths_before, "widths_after": widths_of(reloaded),
        "before": before, "after_pruning": after_prune, "after_finetune": final,
        "reduction": {k: 1.0 - final[k] / before[k] for k in ("params", "params_checkpoint", "flops", "flops_network")
                      if before.get(k)},
        "ratio_asked": asked, "ratio_reached": reached, "ratio_metric": args.ratio_metric, "finetune_recipe": recipe,
        "definitions": {"params": PARAMS_DEFINITION, "params_checkpoint": "every parameter of the checkpoint, "
                        "training-only parts included", "flops": FLOPS_DEFINITION},
        "protocol": protocol(timing_threads(args), args.warmup, args.latency_runs) if with_lat else None,
        # speed-ups from one interleaved timing loop of both models (the before/after figures
        # above are separate measurements, minutes apart on a possibly busy machine)
        "speedup": ({"eager_ms": paired["speedup_eager"], "onnxruntime_ms": paired["speedup_onnxruntime"]}
                    if paired else {}),
        "latency_paired": paired,
        "metrics": {"before": metrics_before, "after_pruning": metrics_pruned, "after_finetune": metrics_tuned},
        "primary_metric": pm,
        "primary_change": (metrics_tuned.get(pm, float("nan")) - metrics_before.get(pm, float("nan")))
        if pm in metrics_before else None,
        "records": records, "finetune_history": history, "seconds": time.time() - t0,
    }
    write_json(out_dir / "prune.json", report)
    lines = [format_table(stage_rows(report), STAGE_COLUMNS), "",
             f"params: {PARAMS_DEFINITION} (what --ratio and --target-params count); checkpoint params: all of "
             "the checkpoint's, training-only parts included"]
    if with_lat:
        lines.append(f"latency: batch 1, {protocol_line(report['protocol'])}; after fine-tuning timed beside the "
                     f"original: eager x{report['speedup']['eager_ms']:.2f}, onnxruntime "
                     f"x{report['speedup']['onnxruntime_ms']:.2f}")
    lines.append(f"removed: {100 * reached:.1f} % of the parameters, {100 * report['reduction']['flops']:.1f} % of "
                 "the FLOPs" + (f" (--ratio {asked:g} of the {args.ratio_metric})" if asked is not None else ""))
    lines.append(f"checkpoint: {out_dir / 'model.pt'}; report: {out_dir / 'prune.json'}")
    warnings = []
    if asked is not None and args.ratio_metric == "params" and abs(reached - asked) > RATIO_SLACK:
        warnings.append(f"warning: --ratio {asked:g} asked for {100 * asked:.0f} % of the parameters "
                        f"removed; reached {100 * reached:.1f} % (whole blocks or --round-to channel steps are too coarse here)")
    if drop > DROP_WARNING:
        warnings.append(f"WARNING: {pm} fell by {drop:.4f} ({metrics_before[pm]:.4f} -> {metrics_tuned[pm]:.4f}): "
                        "fine-tune longer (--finetune-epochs), distil (--distill 1), or prune less; --max-drop makes "
                        "this an error")
    show(table_report(stage_rows(report), STAGE_COLUMNS, verb="prune", **report), "\n".join(lines), warnings)
    return 0


STAGE_COLUMNS = (Column("stage"), Column("params", fmt=",d"), Column("params_checkpoint", "checkpoint params", ",d"),
                 Column("mflops", "MFLOPs"), Column("eager_ms", "eager ms", ".3f"),
                 Column("onnxruntime_ms", "onnxruntime ms", ".3f"), Column("metric"), Column("value", fmt=".4f"))


def stage_rows(report: dict) -> list[dict]:
    """The prune report's before / after pruning / after fine-tuning figures, one row each."""
    pm = report["primary_metric"]
    return [{"stage": stage.replace("_", " "), "params": report[stage]["params"],
             "params_checkpoint": report[stage]["params_checkpoint"], "mflops": report[stage]["flops"] / 1e6,
             "eager_ms": report[stage].get("eager_ms"), "onnxruntime_ms": report[stage].get("onnxruntime_ms"),
             "metric": pm, "value": report["metrics"][stage].get(pm)}
            for stage in ("before", "after_pruning", "after_finetune")]


EXIT_DROP = 4  # --max-drop exceeded: nothing written
DROP_WARNING = 0.02  # a primary-metric drop above this is printed as a warning
RATIO_SLACK = 0.05  # --ratio is met within 5 points of the parameter fraction, or a warning says so


def resolve_recipe(args, cls) -> str:
    """Fill the settings left unset from the model's ``prune_recipe``: --finetune-epochs,
    --distill and the fine-tuning learning rate (``lr_scale`` x the checkpoint's), --round-to
    (channel counts kept multiples of the vector width) and, when no budget flag is given,
    the family's default --ratio and --remove-blocks (chosen so that batch-1 latency halves:
    README.md "Pruning"). The words that say where the settings came from."""
    recipe = dict(cls.prune_recipe)
    given = [f for f in ("finetune_epochs", "distill") if getattr(args, f) is not None]
    if args.finetune_epochs is None:
        args.finetune_epochs = int(recipe.get("finetune_epochs", 4))
        if args.method in ("dynamic", "both"):
            args.finetune_epochs = max(2, args.finetune_epochs)  # the gates need at least two epochs
    if args.distill is None:
        args.distill = float(recipe.get("distill", 0.0))
    taken = []
    if args.round_to is None and recipe.get("round_to"):
        args.round_to = int(recipe["round_to"])
        taken.append(f"round_to {args.round_to}")
    # the family's default budget: its ratio (of the parameters) and blocks go together
    default_budget = (args.ratio is None and args.target_params is None and args.target_latency_ms is None
                      and args.ratio_metric == "params")
    if default_budget and "ratio" in recipe:
        args.ratio = float(recipe["ratio"])
        taken.append(f"ratio {args.ratio:g}")
    if args.remove_blocks is None:
        args.remove_blocks = int(recipe.get("remove_blocks", 0)) if default_budget else 0
        if args.remove_blocks:
            taken.append(f"remove_blocks {args.remove_blocks}")
    if args.lr is None and "lr_scale" in recipe:
        args.lr_scale = float(recipe["lr_scale"])
        taken.append(f"lr {args.lr_scale:g} x the model's")
    if len(given) == 2 and not taken:
        return "as given"
    return (f"{cls.model_name or cls.__name__}'s prune recipe" + (f" ({', '.join(taken)})" if taken else "")
            + (" with " + ", ".join(given) + " as given" if given else ""))


def _with_recorded_widths(model, name: str):
    """Write the pruned sizes into the config (``pruned_widths``), so the checkpoint
    rebuilds this shape. Models pruned on their config's own width fields have them already."""
    from edgediag.config import replace

    values = to_dict(model.config)
    if "pruned_widths" not in values:
        return model
    reference = create_model(name, {**values, "pruned_widths": {}})
    widths = {**values.get("pruned_widths", {}), **record_widths(model, reference)}
    model.config = replace(model.config, pruned_widths=widths)
    return model


def finetune(model, bundle, train_cfg: TrainConfig, teacher, distill: float):
    kd = None
    if teacher is not None:
        kd = Distilled(model, teacher, distill)
        kd.install()
    trainer = Trainer(model, train_cfg, out_dir=None, progress=False)
    try:
        model = trainer.fit(bundle.train, None)
    finally:
        if kd is not None:
            kd.remove()
    return model.eval(), trainer.history


def run_dynamic(model, bundle, train_cfg: TrainConfig, budget, start: float, args):
    """Gate training with the sparsity term (DynamicPruner on the shared engine) until the
    budget, as a fraction of the starting cost, is met; closed channels are removed. Models
    without their own screening gates (LDMamba has them) get gates on their structured
    channel groups (compress.group_gates.GroupGates), taken off again afterwards."""
    from edgediag.compress.dynamic import DynamicPruner, PruneConfig
    from edgediag.compress.group_gates import GroupGates
    from edgediag.nn.gates import is_prunable

    gates = None
    if not (is_prunable(model) and model.screening_groups()):
        gates = GroupGates(model)
        if not gates.entries:
            raise UserError(f"{model.model_name} has no prunable channel groups")
        gates.install()
    # "both": the gates aim at the FLOPs fraction; structured pruning then meets the parameters
    metric = {"params": "params", "flops": "flops", "both": "flops"}.get(budget.metric, "latency")
    cfg = PruneConfig(target=min(1.0, budget.target / start), metric=metric, start_epoch=0,
                      end_epoch=max(0, int(0.6 * args.finetune_epochs) - 1))
    pruner = DynamicPruner(cfg, total_epochs=args.finetune_epochs)
    trainer = Trainer(model, dataclasses.replace(train_cfg, epochs=args.finetune_epochs), out_dir=None,
                      callbacks=[pruner], progress=False)
    try:
        model = trainer.fit(bundle.train, None)
    finally:
        if gates is not None:
            gates.uninstall()
    return model.eval(), {"history": pruner.history, "train": trainer.history, "generic_gates": gates is not None}

