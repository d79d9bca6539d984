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

import copy
import dataclasses
import itertools
import logging
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from edgediag import cli
from edgediag.config import from_dict, load_tree, to_dict
from edgediag.data import DataConfig, build_data
from edgediag.engine.checkpoint import load_model
from edgediag.engine.trainer import DeviceLoader, TrainConfig, Trainer
from edgediag.models import create_model
from edgediag.utils import seed_everything, write_json

log = logging.getLogger("edgediag.prune")

METHODS = ("structured", "dynamic", "both")


def parser():
    p = cli.make_parser("prune", "Structured (torch-pruning) and dynamic pruning of a checkpoint, then fine-tuning.")
    p.add_argument("--checkpoint", required=True, help="model.pt of a trained model")
    p.add_argument("--data", required=True, help="the data folder the model was trained on (fine-tuning, evaluation)")
    p.add_argument("--out", required=True, help="output folder: model.pt + prune.json")
    p.add_argument("--method", default="structured", choices=METHODS)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="fraction of the model's cost to remove (default 0.5)")
    budget.add_argument("--target-params", type=float, help="stop at this many parameters")
    budget.add_argument("--target-latency-ms", type=float, help="stop at this eager CPU latency (batch 1, 1 thread)")
    p.add_argument("--ratio-metric", default="params", choices=("params", "flops", "both"),
                   help="what --ratio is a fraction of (default params)")
    p.add_argument("--importance", default="magnitude", help="magnitude | taylor | lamp")
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank channels across layers (global pruning) instead of the same ratio per layer")
    p.add_argument("--round-to", type=int, default=None, help="keep channel counts multiples of this (8 for TensorRT)")
    p.add_argument("--latency-aware", action="store_true",
                   help="measure per-layer latency and prune time-heavy layers first (implies --global)")
    p.add_argument("--latency-backend", default="eager", choices=("eager", "onnxruntime"))
    p.add_argument("--remove-blocks", type=int, default=0, metavar="N",
                   help="depth pruning first: remove the N residual blocks that change their input least "
                        "(default 0)")
    p.add_argument("--max-channel-ratio", type=float, default=0.9, help="never remove more than this per group")
    p.add_argument("--steps", type=int, default=18, help="pruning steps up to the max channel ratio")
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs (dynamic: gate-training epochs)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of knowledge distillation from the unpruned model during fine-tuning (0 = off)")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: a tenth of the model's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-steps-per-epoch", type=int, default=0)
    p.add_argument("--latency-runs", type=int, default=20, help="timed runs per latency figure")
    p.add_argument("--no-latency", action="store_true", help="skip the latency figures (params/FLOPs only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an earlier result in --out")
    cli.add_config_args(p)
    return p


def _check_args(args) -> None:
    if args.ratio is not None and not 0.0 < args.ratio < 1.0:
        raise cli.UserError(f"--ratio must be in (0, 1), not {args.ratio}")
    if args.target_params is not None and args.target_params <= 0:
        raise cli.UserError("--target-params must be positive")
    if args.target_latency_ms is not None and args.target_latency_ms <= 0:
        raise cli.UserError("--target-latency-ms must be positive")
    from edgediag.compress.structured import IMPORTANCES

    if args.importance not in IMPORTANCES:
        raise cli.UserError(f"--importance must be one of {', '.join(IMPORTANCES)}, not {args.importance!r}")
    if args.round_to is not None and args.round_to < 1:
        raise cli.UserError("--round-to must be >= 1")
    if not 0.0 < args.max_channel_ratio < 1.0:
        raise cli.UserError("--max-channel-ratio must be in (0, 1)")
    if args.remove_blocks < 0:
        raise cli.UserError("--remove-blocks must be >= 0")
    if args.steps < 1 or args.finetune_epochs < 0 or args.distill < 0:
        raise cli.UserError("--steps must be >= 1, --finetune-epochs and --distill >= 0")
    if args.method == "dynamic" and args.ratio_metric == "both":
        raise cli.UserError("--ratio-metric both needs structured pruning after the gates: use --method both")
    if args.method in ("dynamic", "both") and args.finetune_epochs < 2:
        raise cli.UserError("--method dynamic/both trains the gates: give --finetune-epochs >= 2")
    if not Path(args.checkpoint).is_file():
        raise cli.UserError(f"checkpoint not found: {args.checkpoint}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise cli.UserError(f"--out {out} exists and is not a folder")
    if (out / "model.pt").exists() and not args.force:
        raise cli.UserError(f"{out} already holds a pruned model: pass --force to overwrite")


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


def latency_figures(model, runs: int) -> dict:
    """Batch-1 CPU latency (1 thread) of ``export_module()``: eager PyTorch and ONNX Runtime,
    timed alternately (edgediag.export.latency) on a TorchScript export of opset 17."""
    from edgediag.deploy.onnx import latency

    with tempfile.TemporaryDirectory() as tmp:
        module, x, proto = _onnx_of(model, Path(tmp), "m")
    res = latency(module, proto, [x.numpy()], threads=1, runs=runs)
    return {"eager_ms": res["pytorch_eager_ms"], "onnxruntime_ms": res["onnxruntime_ms"]}


def paired_latency(before, after, runs: int) -> dict:
    """Speed-up of ``after`` over ``before`` with both timed in one interleaved loop (eager
    and ONNX Runtime, batch 1, one thread): on a shared CPU the load then hits both alike,
    which separate measurements minutes apart cannot promise."""
    import statistics

    from edgediag.deploy.onnx import ort_session
    from edgediag.measure.timing import timed_alternately, torch_threads

    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, model in (("before", before), ("after", after)):
            module, x, proto = _onnx_of(model, Path(tmp), tag)
            sess = ort_session(proto, 1)
            feeds = {sess.get_inputs()[0].name: x.numpy()}
            fns[f"{tag}_eager_ms"] = (lambda m=module, x=x: m(x))
            fns[f"{tag}_onnxruntime_ms"] = (lambda s=sess, f=feeds: s.run(None, f))
    with torch_threads(1), torch.inference_mode():
        times = timed_alternately(list(fns.values()), runs, warmup=2)["wall"]
    out = {k: statistics.median(t) for k, t in zip(fns, times)}
    out["speedup_eager"] = out["before_eager_ms"] / out["after_eager_ms"]
    out["speedup_onnxruntime"] = out["before_onnxruntime_ms"] / out["after_onnxruntime_ms"]
    out["runs"] = runs
    return out


def costs(model, with_latency: bool, runs: int) -> dict:
    from edgediag.compress.structured import model_params
    from edgediag.measure.cost import count_flops

    model.eval()
    module = model.export_module()
    fl = count_flops(module, model.example_input(1))
    # The fixed feature front ends (log-mel by a matrix DFT) are no pruning's business but can
    # dominate the total: report the network's own FLOPs as well.
    front = sum(v for k, v in fl["by_module_total"].items()
                if k.split(".")[-1] in ("logmel",) and k.count(".") <= 2)
    out = {"params": model_params(model), "flops": fl["flops"], "flops_network": fl["flops"] - front}
    if with_latency:
        out.update(latency_figures(model, runs))
    return out


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def evaluate(model, bundle, batch_size: int, device) -> dict:
    if bundle.test is None or not len(bundle.test):
        return {}
    loader = DeviceLoader(DataLoader(bundle.test, batch_size=batch_size, shuffle=False), device)
    return _scalars(model.evaluate(loader))


def refit(model, bundle, train_cfg: TrainConfig, device) -> None:
    """What the train verb does after training, without writing: fit_normal, calibrate,
    threshold (edgediag.train.finalize minus the checkpoint), so a pruned model's
    metrics are measured like a trained one's."""
    from edgediag.engine.metrics import calibrate_threshold
    from edgediag.train import normal_subset, scores_of

    loader = DataLoader(bundle.train, batch_size=train_cfg.batch_size, shuffle=False)
    model.eval()
    model.fit_normal(DeviceLoader(loader, device))
    calib = bundle.val if bundle.val is not None and len(bundle.val) else bundle.train
    if calib is bundle.val:
        model.calibrate(DeviceLoader(DataLoader(bundle.val, batch_size=train_cfg.batch_size), device))
    scores = scores_of(model, normal_subset(calib), device, train_cfg.batch_size)
    if len(scores):
        model.threshold.fill_(calibrate_threshold(scores, train_cfg.threshold_method, train_cfg.threshold_quantile))


def train_batches(bundle, seed: int, batch_size: int, n: int) -> list[dict]:
    """The first ``n`` batches of the training set, shuffled with a fixed seed."""
    loader = DataLoader(bundle.train, batch_size=min(batch_size, len(bundle.train)), shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return list(itertools.islice(loader, n))


# --- distillation ----------------------------------------------------------------------------
class Distilled:
    """Adds ``weight`` x the mean, over the exported outputs whose shapes match (scores,
    class scores/logits, embeddings), of the student's MSE to the frozen teacher relative
    to the teacher's mean square, to the model's own loss. Relative, so each output counts
    alike whatever its scale (ArcFace class scores are ~100x an embedding's entries).
    Installed on the instance, removed before saving."""

    def __init__(self, model, teacher, weight: float):
        self.model, self.teacher, self.weight = model, teacher.eval(), float(weight)
        self.original = model.training_step
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, batch, phase="main"):
        out = self.original(batch, phase)
        if phase != self.model.phases[-1]:
            return out
        x = batch["x"]
        with torch.no_grad():
            t_out = self.teacher.export_module()(x)
        s_out = self.model.export_module()(x)
        t_out = t_out if isinstance(t_out, (tuple, list)) else (t_out,)
        s_out = s_out if isinstance(s_out, (tuple, list)) else (s_out,)
        terms = [F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-8)
                 for s, t in zip(s_out, t_out) if s.shape == t.shape]
        if terms:
            kd = torch.stack(terms).mean()
            out = {**out, "loss": out["loss"] + self.weight * kd, "distill": kd.detach()}
        return out

    def install(self):
        self.model.training_step = self

    def remove(self):
        self.model.__dict__.pop("training_step", None)


# --- pruning on screening groups (models without pruned_widths: LDMamba) ---------------------------
def prune_groups(model, budget, importance: str, max_ratio: float, steps: int, round_to: int | None,
                 batches) -> tuple[object, dict]:
    """Structured pruning on the model's screening groups (the width fields of its config):
    each step keeps the (1 - r) most important channels of every group (L2 norm over the
    group's tensors, or |w x grad| for taylor), rebuilt with dynamic_pruning.prune_model."""
    from edgediag.compress.dynamic import prune_model
    from edgediag.compress.structured import accumulate_loss_grads, channel_importance

    groups = model.screening_groups()
    base = {g.name: g.gate.channels for g in groups}
    record = {"importance": importance, "groups": True, "steps": []}
    cost = budget.cost(model)
    record["cost_start"] = cost
    for step in range(1, steps + 1):
        if budget.met(cost):
            break
        r = max_ratio * step / steps
        if importance == "taylor":
            accumulate_loss_grads(model, batches)
        state = dict(model.named_parameters())
        state.update(dict(model.named_buffers()))
        keep = {}
        for g in model.screening_groups():
            n = g.gate.channels
            target = max(min(g.min_channels, n), int(round(base[g.name] * (1 - r))))
            if round_to and target >= round_to:
                target -= target % round_to
            if target >= n:
                continue
            imp = channel_importance([(state[key], dim, chunks) for key, dim, chunks in g.slices], n, importance)
            keep[g.name] = torch.argsort(imp, descending=True)[:target].sort().values
        model.zero_grad(set_to_none=True)
        if keep:
            model = prune_model(model, keep)
        cost = budget.cost(model)
        record["steps"].append({"step": step, "channel_ratio": r, "cost": cost})
        log.info("group pruning step %d: channel ratio %.2f, %s %.4g (target %.4g)", step, r, budget.metric,
                 cost, budget.target)
    record["cost_end"], record["met"] = cost, budget.met(cost)
    return model, record


def widths_of(model) -> dict:
    from edgediag.compress.structured import module_sizes

    if hasattr(model, "screening_groups") and "pruned_widths" not in to_dict(model.config):
        return {g.name: g.gate.channels for g in model.screening_groups()}
    return module_sizes(model)


# --- main ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _check_args(args)
    from edgediag.compress import structured as sp

    model, ckpt = load_model(args.checkpoint)
    name = ckpt["model_name"]
    cls = type(model)
    tree = load_tree(args.config, args.overrides, {"train", "data"})
    train_meta = (ckpt.get("meta") or {}).get("train_config") or {}
    flags = {k: v for k, v in {"batch_size": args.batch_size, "seed": args.seed,
                               "max_steps_per_epoch": args.max_steps_per_epoch}.items() if v is not None}
    base_train = {**cls.train_defaults, **{k: v for k, v in train_meta.items()
                                          if k in ("batch_size", "threshold_method", "threshold_quantile", "optimizer",
                                                   "betas", "weight_decay", "schedule", "grad_clip", "lr")}}
    # fine-tuning a trained model: a tenth of its training learning rate
    lr = args.lr if args.lr is not None else float(base_train.get("lr", 1e-3)) / 10
    train_cfg = from_dict(TrainConfig, {**base_train, **(tree.get("train") or {}), **flags, "lr": lr,
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
    before = costs(model, with_lat, args.latency_runs)
    metrics_before = evaluate(model, bundle, train_cfg.batch_size, device)
    widths_before = widths_of(model)
    log.info("before: %s | %s", before, {k: metrics_before.get(k) for k in (model.primary_metric,)})

    # the budget
    if args.target_params is not None:
        budget = sp.Budget("params", args.target_params)
        start = before["params"]
    elif args.target_latency_ms is not None:
        budget = sp.Budget("latency", args.target_latency_ms)
        start = sp.eager_latency_ms(model)
    else:
        ratio = 0.5 if args.ratio is None else args.ratio
        if args.ratio_metric == "both":
            budget = sp.Budget("both", 1.0, {k: (1.0 - ratio) * before[k] for k in ("params", "flops")})
            start = 1.0 / (1.0 - ratio)
        else:
            start = before[args.ratio_metric]
            budget = sp.Budget(args.ratio_metric, (1.0 - ratio) * start)
    if budget.target >= start:
        raise cli.UserError(f"the target {budget.target:g} {budget.metric} is not smaller than the model's "
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
            records["structured"] = sp.prune_structured(
                model, budget=budget, importance=args.importance, global_pruning=args.global_pruning,
                round_to=args.round_to, max_ratio=args.max_channel_ratio, steps=args.steps,
                loss_batches=loss_batches, latency_aware=args.latency_aware, latency_backend=args.latency_backend)
        elif hasattr(model, "screening_groups") and model.screening_groups():
            model, records["structured"] = prune_groups(model, budget, args.importance, args.max_channel_ratio,
                                                        args.steps, args.round_to, loss_batches)
        else:
            raise cli.UserError(f"{name} has neither a pruned_widths config field nor screening groups: "
                                "it cannot be structurally pruned")
    model = _with_recorded_widths(model, name)
    refit(model, bundle, train_cfg, device)
    after_prune = costs(model, with_lat, args.latency_runs)
    metrics_pruned = evaluate(model, bundle, train_cfg.batch_size, device)
    log.info("after pruning: %s | %s", after_prune, {k: metrics_pruned.get(k) for k in (model.primary_metric,)})

    metrics_tuned = metrics_pruned
    history = []
    if args.finetune_epochs > 0 and args.method != "dynamic":
        if hasattr(model, "sparsity_weight"):
            model.sparsity_weight = 0.0  # the budget is met: no more pressure on the gates
        model, history = finetune(model, bundle, train_cfg, teacher, args.distill)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from edgediag.train import finalize

    checkpoint_data = ckpt.get("data") or {}
    checkpoint_data = {**checkpoint_data, "config": to_dict(data_cfg)}
    metrics_tuned = _scalars(finalize(model, bundle, train_cfg, device, out_dir, checkpoint_data))
    # the saved file must load as any checkpoint does (weights_only, rebuilt from config)
    reloaded, _ = load_model(out_dir / "model.pt")
    final = costs(reloaded, False, args.latency_runs)
    paired = paired_latency(original, reloaded, args.latency_runs) if with_lat else {}
    if paired:
        final.update(eager_ms=paired["after_eager_ms"], onnxruntime_ms=paired["after_onnxruntime_ms"])
    pm = model.primary_metric
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
        "reduction": {k: 1.0 - final[k] / before[k] for k in ("params", "flops", "flops_network") if before.get(k)},
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
    print(f"{name}: params {before['params']:,} -> {final['params']:,} "
          f"(-{100 * report['reduction']['params']:.1f} %), FLOPs -{100 * report['reduction']['flops']:.1f} %"
          + (f", eager x{report['speedup']['eager_ms']:.2f}, onnxruntime x{report['speedup']['onnxruntime_ms']:.2f}"
             if with_lat else "")
          + f", {pm} {metrics_before.get(pm, float('nan')):.4f} -> {metrics_tuned.get(pm, float('nan')):.4f}")
    print(f"checkpoint: {out_dir / 'model.pt'}")
    return 0


def _with_recorded_widths(model, name: str):
    """Write the pruned sizes into the config (``pruned_widths``), so the checkpoint
    rebuilds this shape. Models pruned on their config's own width fields have them already."""
    from edgediag.compress.structured import record_widths
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
    channel groups (dynamic_pruning.GroupGates), taken off again afterwards."""
    from edgediag.compress.dynamic import DynamicPruner, GroupGates, PruneConfig, is_prunable

    gates = None
    if not (is_prunable(model) and model.screening_groups()):
        gates = GroupGates(model)
        if not gates.entries:
            raise cli.UserError(f"{model.model_name} has no prunable channel groups")
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


if __name__ == "__main__":
    cli.entry(main)
