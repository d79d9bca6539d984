"""Structured pruning (edgediag.compress.structured) and the prune verb.

Custom pruners: after pruning, the module runs and its shapes agree; pruning channels
whose influence was zeroed leaves the output unchanged (exactness, explicit tolerances).
The verb: a pruned checkpoint loads with weights_only=True, rebuilds from its config,
exports with ONNX parity; bad input is one line, exit 2, nothing written.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgediag import cli, export
from edgediag import prune as prune_verb
from edgediag.compress import structured as sp
from edgediag.compress.budget import Budget, model_params
from edgediag.config import to_dict
from edgediag.engine.checkpoint import load_model
from edgediag.models import create_model
from edgediag.models.memorymamba import pruning as mm_pruning
from edgediag.models.tastgram_mfn import pruning as tg_pruning
from edgediag.nn import pruning as registry
from edgediag.nn.mamba import SS2D, BiMambaMixer, MambaMixer
from edgediag.nn.mamba_pruning import MambaMixerPruner, SS2DPruner
from tests.toy import trained_image_checkpoint

ATOL = 1e-5  # float32, outputs of order 1


pytestmark = pytest.mark.usefixtures("one_thread")


def _zero_(t: torch.Tensor, dim: int, idx: list[int]) -> None:
    with torch.no_grad():
        t.index_fill_(dim, torch.tensor(idx), 0.0)


# --- custom pruners: exactness ---------------------------------------------------------------
@pytest.mark.parametrize("cls", [MambaMixer, BiMambaMixer])
def test_mamba_mixer_inner_group_pruned_exactly(cls):
    torch.manual_seed(0)
    m = cls(16, d_state=4, d_inner=24, scan_backend="chunked").eval()
    drop = [1, 5, 6, 20]
    # A channel whose x_proj columns (its share of dt/B/C) and out_proj column are zero
    # influences nothing: removing the whole group (in_proj x and z rows, conv, dt_proj,
    # A_log rows, D) must not change the output.
    for sfx in ("", "_b") if cls is BiMambaMixer else ("",):
        _zero_(getattr(m, f"x_proj{sfx}").weight, 1, drop)
    _zero_(m.out_proj.weight, 1, drop)
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        ref = m(x)
    pruner = registry.customized_pruners()[cls]
    pruner.prune_inner_channels(m, drop)
    assert m.d_inner == 20 and m.in_proj.out_features == 40 and m.conv1d.groups == 20
    assert m.A_log.shape == (20, 4)  # rows = d_inner, d_state untouched
    assert m.dt_proj.weight.shape == (20, m.dt_rank) and m.D.shape == (20,) and m.out_proj.in_features == 20
    with torch.no_grad():
        out = m(x)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


def test_mamba_mixer_step_runs_after_pruning():
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=4, d_inner=32, scan_backend="chunked").eval()
    MambaMixerPruner().prune_inner_channels(m, list(range(0, 32, 4)))
    conv, ssm = m.allocate_states(2)
    y, conv, ssm = m.step(torch.randn(2, 16), conv, ssm)
    assert y.shape == (2, 16) and conv.shape == (2, 24, 4) and ssm.shape == (2, 24, 4)


def test_mixer_d_model_sides_pruned_exactly():
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=4, scan_backend="chunked").eval()
    drop_in, drop_out = [0, 3], [2, 7, 9]
    _zero_(m.in_proj.weight, 1, drop_in)  # input channels the mixer ignores
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        ref = m(x)
    p = MambaMixerPruner()
    p.prune_in_channels(m, drop_in)
    p.prune_out_channels(m, drop_out)
    keep_in = [i for i in range(16) if i not in drop_in]
    keep_out = [i for i in range(16) if i not in drop_out]
    with torch.no_grad():
        out = m(x[..., keep_in])
    assert p.get_in_channels(m) == 14 and p.get_out_channels(m) == 13
    torch.testing.assert_close(out, ref[..., keep_out], atol=ATOL, rtol=1e-5)


def test_ss2d_packed_per_direction_parameters_pruned_exactly():
    torch.manual_seed(0)
    m = SS2D(8, d_state=4, d_inner=16, scan_backend="chunked").eval()
    drop = [2, 3, 11]
    # Zeroed x_proj columns in all four directions: the dropped channels no longer feed
    # the shared dt/B/C, so the kept channels' scan outputs must not change.
    _zero_(m.x_proj_weight, 2, drop)
    keep = [i for i in range(16) if i not in drop]
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        ref = m.cross_scan_core(x)[..., keep]
    SS2DPruner().prune_inner_channels(m, drop)
    assert m.x_proj_weight.shape[2] == 13 and m.dt_projs_weight.shape[1] == 13 and m.dt_projs_bias.shape == (4, 13)
    assert m.A_logs.shape == (4 * 13, 4) and m.Ds.shape == (4 * 13,)
    assert m.out_norm.normalized_shape == (13,) and m.conv2d.groups == 13
    with torch.no_grad():
        out = m.cross_scan_core(x[:, keep])
        full = m(torch.randn(2, 5, 6, 8))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    assert full.shape == (2, 5, 6, 8)


def test_arcface_pruned_on_embedding_dim_only():
    from edgediag.models.tastgram_mfn.model import ArcMarginProduct

    torch.manual_seed(0)
    head = ArcMarginProduct(12, 5)
    drop = [0, 4, 11]
    _zero_(head.weight, 1, drop)
    emb = torch.randn(3, 12)
    emb[:, drop] = 0.0  # embedding channels that are always zero
    ref = head.class_scores(head.cosine(emb))
    p = tg_pruning.ArcFacePruner()
    assert p.get_out_channels(head) is None  # the class count is never a pruning root
    p.prune_in_channels(head, drop)
    keep = [i for i in range(12) if i not in drop]
    assert head.weight.shape == (5, 9)
    torch.testing.assert_close(head.class_scores(head.cosine(emb[:, keep])), ref, atol=1e-4, rtol=1e-5)
    with pytest.raises(cli.UserError):
        p.prune_out_channels(head, [0])


def test_channel_layernorm_prunes_channels_not_width():
    ln = nn.LayerNorm([6, 4, 4])
    with torch.no_grad():
        ln.weight.copy_(torch.arange(6.0).view(6, 1, 1).expand(6, 4, 4))
    registry.ChannelLayerNormPruner().prune_out_channels(ln, [1, 3])
    assert ln.normalized_shape == (4, 4, 4) and ln.weight.shape == (4, 4, 4)
    assert ln.weight[:, 0, 0].tolist() == [0.0, 2.0, 4.0, 5.0]
    flat = nn.LayerNorm(10)
    registry.ChannelLayerNormPruner().prune_out_channels(flat, [0])
    assert flat.normalized_shape == (9,)


def test_tgram_and_memory_network_inner_groups_pruned_exactly():
    from edgediag.models.memorymamba.model import MemoryNetwork
    from edgediag.models.tastgram_mfn.model import TgramNet

    torch.manual_seed(0)
    tg = TgramNet(n_mels=16, win=64, hop=32, n_frames=17, layers=2).eval()
    p = tg_pruning.TgramPruner()
    convs = p.convs(tg)
    _zero_(convs[1].weight, 1, [0, 5])  # the extractor's channels 0 and 5 are not read
    wave = torch.randn(2, 1, 512)
    with torch.no_grad():
        ref = tg(wave)
        p.prune_inner_channels(tg, [0, 5], "0")
        out = tg(wave)
    assert p.inner_channels(tg, "0") == 14 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)

    mem = MemoryNetwork(8, slots=3, key_dim=8, hidden=10, local=True).eval()
    mp = mm_pruning.MemoryNetworkPruner()
    _zero_(mem.query[2].weight, 1, [2, 7])
    z = torch.randn(2, 4, 4, 8)
    with torch.no_grad():
        ref, _ = mem(z)
        mp.prune_inner_channels(mem, [2, 7], "hidden")
        out, _ = mem(z)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


# --- the whole-model pruning and rebuilding ------------------------------------------------------
def _small_cnn():
    return create_model("image_cnn", n_classes=3, in_chans=1, image_size=32, widths=[16, 32], depths=[1, 1])


def test_prune_to_a_params_budget_rebuilds_from_config():
    torch.manual_seed(0)
    model = _small_cnn().eval()
    p0 = model_params(model)
    model, rec = sp.prune_structured(model, budget=Budget("params", 0.5 * p0), round_to=4)
    assert rec["met"] and model_params(model) <= 0.5 * p0
    assert model.head[-1].out_features == 3  # the classifier keeps its classes
    sizes = registry.module_sizes(model)
    convs = [s[0] for n, s in sizes.items() if n.endswith("conv1") or n.endswith("conv2")]
    assert all(c % 4 == 0 for c in convs)  # round_to
    widths = registry.record_widths(model, _small_cnn())
    rebuilt = create_model("image_cnn", {**to_dict(model.config), "pruned_widths": widths})
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), model(x), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", ["channels", "groups"])
def test_a_step_that_overshoots_is_redone_to_land_near_the_target(kind):
    """--ratio means the fraction removed: three coarse steps of 30 % of the channels would
    remove far more than half the parameters; the overshooting step is bisected instead."""
    torch.manual_seed(0)
    if kind == "channels":
        model = create_model("image_cnn", n_classes=3, in_chans=1, image_size=32, widths=[64, 128],
                             depths=[1, 1]).eval()
    else:
        model = create_model("ldmamba_small").eval()
    p0 = model_params(model)
    x = model.example_input(2)
    with torch.no_grad():
        shape = _logits(model(x)).shape
    budget = Budget("params", 0.5 * p0)
    if kind == "channels":
        model, rec = sp.prune_structured(model, budget=budget, steps=3)
    else:
        model, rec = sp.prune_groups(model, budget, "magnitude", 0.9, 3, None, [])
    assert rec["met"] and rec["steps"][-1].get("refined")
    assert 0.5 * p0 * (1 - sp.LAND_TOLERANCE) <= model_params(model) <= 0.5 * p0
    assert rec["cost_end"] == model_params(model)
    with torch.no_grad():
        out = _logits(model.eval()(x))
    assert out.shape == shape and torch.isfinite(out).all()


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out


def test_apply_widths_rejects_unknown_modules():
    with pytest.raises(cli.UserError, match="pruned_widths"):
        create_model("image_cnn", n_classes=3, in_chans=1, image_size=32, widths=[16, 32], depths=[1, 1],
                     pruned_widths={"no.such.layer": [4, 4]})


@pytest.mark.parametrize("importance, backend", [("taylor", "eager"), ("lamp", "onnxruntime")])
def test_importances_and_global_latency_aware(importance, backend):
    torch.manual_seed(0)
    model = _small_cnn()
    batches = [{"x": torch.rand(4, 1, 32, 32), "y": torch.tensor([0, 1, 2, 0])}]
    p0 = model_params(model)
    model, rec = sp.prune_structured(model, budget=Budget("params", 0.6 * p0), importance=importance,
                              loss_batches=batches, latency_aware=True, latency_backend=backend)
    assert rec["met"] and rec["global"]
    # per-layer times, keyed by the model's module names on both backends
    assert "blocks.0.conv1" in rec["layer_latency_ms_before"] or "blocks.0.conv2" in rec["layer_latency_ms_before"]
    assert rec["layer_latency_ms_after"]
    assert model.eval()(torch.rand(1, 1, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("stem", ["patch", "convbn"])
def test_memorymamba_keeps_its_residual_stream_and_prunes_inside_blocks(stem):
    torch.manual_seed(0)
    model = create_model("memorymamba", n_classes=3, in_chans=1, image_size=32, patch_size=4, depths=[1, 1],
                         dims=[16, 32], d_state=1, coarse_slots=2, fine_slots=2, mlp_ratio=2.0,
                         stem=stem).eval()
    p0 = model_params(model)
    before = registry.module_sizes(model)
    model, _ = sp.prune_structured(model, budget=Budget("params", 0.6 * p0), steps=6)
    after = registry.module_sizes(model)
    assert model_params(model) <= 0.6 * p0
    assert after["stages.0.0.ssm"][:2] == before["stages.0.0.ssm"][:2]  # d_model in/out kept
    assert after["stages.0.0.ssm"][2] < before["stages.0.0.ssm"][2]  # d_inner pruned
    x = model.example_input(2)
    ref = create_model("memorymamba", {**to_dict(model.config), "pruned_widths": registry.record_widths(
        model, create_model("memorymamba", {**to_dict(model.config), "pruned_widths": {}}))})
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(ref.eval()(x), model(x), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name, kwargs", [
    ("tastgram_mfn_small", dict(n_classes=3, clip_seconds=1.0)),
    ("aegan_ad_small", dict(clip_seconds=4.5, input_min=-80.0, input_max=0.0, score="G-x-L2-mean")),
])
def test_audio_models_keep_their_outputs_and_rebuild_from_config(name, kwargs):
    """TASTgram (Tgram inner groups, MobileFaceNet; embedding and ArcFace fixed) and AEGAN-AD
    (encoder/decoder with (C, H, W) LayerNorms; image and D embedding fixed)."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    x = model.example_input(1)
    with torch.no_grad():
        shapes = [o.shape for o in _outputs(model, x)]
    p0 = model_params(model)
    model, rec = sp.prune_structured(model, budget=Budget("params", 0.5 * p0))
    assert rec["met"]
    widths = registry.record_widths(model, create_model(name, **kwargs))
    rebuilt = create_model(name, {**to_dict(model.config), "pruned_widths": widths}).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours, theirs = _outputs(model, x), _outputs(rebuilt, x)
    assert [o.shape for o in ours] == shapes  # exported outputs keep their sizes
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


def _outputs(model, x):
    out = model.export_module()(x)
    return out if isinstance(out, tuple) else (out,)


# --- the verb ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """An image_cnn checkpoint (a few training steps) on generated defect images."""
    root = tmp_path_factory.mktemp("prune")
    path, data = trained_image_checkpoint(root, "image_cnn", n_classes=3, in_chans=1, image_size=32,
                                          widths=[16, 32], depths=[1, 1])
    return root, path, data


def run_prune(*args) -> int:
    return cli.run(prune_verb.main, [str(a) for a in args])


def test_prune_verb_writes_a_loadable_checkpoint_that_exports(cnn_run, tmp_path):
    root, ckpt, data = cnn_run
    out = tmp_path / "pruned"
    assert run_prune("--checkpoint", ckpt, "--data", data, "--out", out, "--ratio", "0.5", "--round-to", "4",
                     "--finetune-epochs", "1", "--latency-runs", "3", "--distill", "0.5") == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["reduction"]["params"] >= 0.5
    assert report["before"]["params"] > report["after_finetune"]["params"]
    for stage in ("before", "after_pruning", "after_finetune"):
        assert "acc" in report["metrics"][stage]
        assert report[stage]["eager_ms"] > 0 and report[stage]["onnxruntime_ms"] > 0
    payload = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert payload["model_config"]["pruned_widths"]
    model, _ = load_model(out / "model.pt")
    assert model_params(model) == report["after_finetune"]["params"]
    # the pruned model goes through export unchanged: ONNX parity
    exp = tmp_path / "export"
    assert cli.run(export.main, ["--checkpoint", str(out / "model.pt"), "--out", str(exp), "--latency-runs", "2",
                                 "--parity-items", "4", "--threads", "1"]) == 0
    assert json.loads((exp / "export.json").read_text())["parity"]["passed"]
    # ... and through bench: the pruned checkpoint and its graph side by side with the original
    from edgediag import bench

    rc = cli.run(bench.main, ["--checkpoint", str(ckpt), str(out / "model.pt"), str(exp / "model.onnx"), "--data", str(data),
                              "--out", str(tmp_path / "bench"), "--backends", "eager,onnxruntime", "--latency-runs", "3",
                              "--warmup", "1", "--threads", "1"])
    assert rc == 0
    rows = json.loads((tmp_path / "bench" / "report.json").read_text())["rows"]
    params = {r["artifact"]: r["params_total"] for r in rows if r["status"] == "ok"}
    assert params[str(out / "model.pt")] == report["after_finetune"]["params"] < params[str(ckpt)]


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.5"], "--ratio must be in (0, 1)"),
    (["--ratio", "0"], "--ratio must be in (0, 1)"),
    (["--importance", "random"], "--importance must be one of"),
    (["--target-params", "1e12"], "is not smaller than the model"),
    (["--target-latency-ms", "1e6"], "is not smaller than the model"),
    (["--method", "dynamic", "--finetune-epochs", "1"], "--finetune-epochs >= 2"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cnn_run, tmp_path, capsys, args, message):
    _, ckpt, data = cnn_run
    out = tmp_path / "o"
    assert run_prune("--checkpoint", ckpt, "--data", data, "--out", out, "--no-latency", *args) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (out / "model.pt").exists() and not (out / "prune.json").exists()


def test_missing_checkpoint(cnn_run, tmp_path, capsys):
    _, _, data = cnn_run
    assert run_prune("--checkpoint", tmp_path / "none.pt", "--data", data, "--out", tmp_path / "o") == cli.EXIT_USAGE
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["dynamic", "both"])
def test_dynamic_and_both_methods_on_a_model_without_own_gates(cnn_run, tmp_path, method):
    """image_cnn has no screening gates of its own: the verb puts gates on its channel
    groups, trains them with the sparsity term, removes closed channels and takes the
    gates off again - the checkpoint is an ordinary one."""
    _, ckpt, data = cnn_run
    out = tmp_path / method
    assert run_prune("--checkpoint", ckpt, "--data", data, "--out", out, "--method", method, "--ratio", "0.5",
                     "--finetune-epochs", "2", "--max-steps-per-epoch", "2", "--no-latency") == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["reduction"]["params"] >= 0.5 and report["records"]["dynamic"]["generic_gates"]
    model, payload = load_model(out / "model.pt")
    assert not any("gate" in k for k in payload["state_dict"])
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)


def test_prune_fine_tunes_by_default_with_the_model_recipe(cnn_run, tmp_path, capsys):
    _, ckpt, data = cnn_run
    out = tmp_path / "default"
    assert run_prune("--checkpoint", ckpt, "--data", data, "--out", out, "--ratio", "0.5", "--round-to", "4",
                     "--max-steps-per-epoch", "1", "--no-latency") == 0
    report = json.loads((out / "prune.json").read_text())
    recipe = load_model(ckpt)[0].prune_recipe
    assert report["finetune_epochs"] == recipe["finetune_epochs"] > 0 and report["distill"] == recipe["distill"]
    assert "prune recipe" in report["finetune_recipe"] and len(report["finetune_history"]) == recipe["finetune_epochs"]
    assert f"fine-tuning {recipe['finetune_epochs']} epochs" in capsys.readouterr().out
    assert report["ratio_asked"] == 0.5 and report["reduction"]["params"] >= 0.5


@pytest.fixture(scope="module")
def accurate_cnn(tmp_path_factory):
    """An image_cnn trained long enough to be above chance (pruning can cost it accuracy)."""
    from edgediag.config import to_dict
    from edgediag.data import DataConfig, build_data
    from edgediag.data.synth_images import generate_defect_images
    from edgediag.engine.checkpoint import make_checkpoint, save_checkpoint
    from edgediag.engine.trainer import TrainConfig, Trainer
    from edgediag.models import create_model

    root = tmp_path_factory.mktemp("accurate")
    data = root / "images"
    generate_defect_images(data, n_per_class=16, size=32, classes=("normal", "scratch", "pit"))
    torch.manual_seed(0)
    model = create_model("image_cnn", n_classes=3, in_chans=1, image_size=32, widths=[16, 32], depths=[1, 1])
    data_cfg = DataConfig(root=str(data), test_fraction=0.25)
    bundle = build_data("image", data_cfg, model.config)
    model = type(model)(type(model).config_for_data(model.config, bundle))
    model = Trainer(model, TrainConfig(epochs=25, batch_size=8, device="cpu", lr=3e-3), progress=False).fit(bundle.train)
    model.eval().threshold.fill_(0.5)
    save_checkpoint(root / "model.pt", make_checkpoint(model, data={
        "kind": "image", "config": to_dict(data_cfg), "classes": list(bundle.classes),
        "normal_classes": list(bundle.normal_classes)}))
    return root / "model.pt", data


def test_max_drop_refuses_a_pruned_model_that_lost_accuracy(accurate_cnn, tmp_path, capsys):
    """90 % of the parameters gone and no fine-tuning: the accuracy falls; --max-drop refuses
    it (exit 4, nothing written) and says by how much; without --max-drop it is a warning."""
    ckpt, data = accurate_cnn
    args = ["--checkpoint", ckpt, "--data", data, "--ratio", "0.9", "--max-channel-ratio", "0.95",
            "--finetune-epochs", "0", "--no-latency"]
    out = tmp_path / "warned"
    assert run_prune(*args, "--out", out) == 0
    report = json.loads((out / "prune.json").read_text())
    before, after = report["metrics"]["before"]["acc"], report["metrics"]["after_finetune"]["acc"]
    assert before - after > 0.02, (before, after)  # the setting must cost accuracy (0.42 -> 0.33 here)
    assert "WARNING: acc fell by" in capsys.readouterr().out
    refused = tmp_path / "refused"
    assert run_prune(*args, "--out", refused, "--max-drop", "0.01") == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than --max-drop 0.01" in err[0] and "nothing written" in err[0]
    assert not (refused / "model.pt").exists() and not (refused / "prune.json").exists()


def test_every_pruner_with_inner_groups_implements_the_whole_interface():
    """A layer with inner groups registers an InnerGroupPruner, whose inner-group methods are
    abstract: every registered pruner that lists inner groups implements all of them, and one
    that leaves one out cannot be instantiated."""
    import edgediag.models  # noqa: F401 - registers the families' pruners
    from edgediag.nn.pruning import ChannelPruner, InnerGroupPruner, customized_pruners

    methods = ("inner_channels", "inner_tensors", "prune_inner_channels", "inner_hooks")
    with_groups = [p for p in customized_pruners().values()
                   if isinstance(p, ChannelPruner) and type(p).inner_names is not ChannelPruner.inner_names]
    assert len(with_groups) >= 3  # Mamba mixer, MemoryMamba memory network, TASTgram Tgram
    for pruner in with_groups:
        assert isinstance(pruner, InnerGroupPruner), type(pruner).__name__
        missing = [m for m in methods if getattr(getattr(type(pruner), m), "__isabstractmethod__", False)]
        assert not missing, f"{type(pruner).__name__} lists inner groups but leaves {missing} unimplemented"

    class Partial(InnerGroupPruner):  # the torch-pruning half and inner_names, no inner methods
        prune_out_channels = prune_in_channels = get_out_channels = get_in_channels = None

        def inner_names(self, layer):
            return ["hidden"]

    with pytest.raises(TypeError, match="abstract"):
        Partial()


# --- the families' prune recipes (issue 24.5: the default ratio halves batch-1 latency) -------
def _recipe_args(*argv):
    return prune_verb.parser().parse_args(["--checkpoint", "c.pt", "--data", "d", "--out", "o", *argv])


class _Recipe:
    model_name = "fake"
    prune_recipe = {"ratio": 0.8, "round_to": 16, "remove_blocks": 2, "finetune_epochs": 5, "distill": 0.5,
                    "lr_scale": 0.5}


def test_recipe_fills_ratio_widths_blocks_and_fine_tuning_left_unset():
    from edgediag.compress.pipeline import resolve_recipe

    args = _recipe_args()
    words = resolve_recipe(args, _Recipe)
    assert (args.ratio, args.round_to, args.remove_blocks, args.finetune_epochs, args.distill, args.lr_scale) == (
        0.8, 16, 2, 5, 0.5, 0.5)
    assert "fake's prune recipe" in words and "ratio 0.8" in words and "remove_blocks 2" in words


@pytest.mark.parametrize("argv", [["--ratio", "0.3"], ["--target-params", "1000"], ["--ratio-metric", "flops"]])
def test_a_budget_flag_replaces_the_recipe_ratio_and_its_blocks(argv):
    """The recipe's ratio and blocks removed go together: a budget of one's own takes neither
    (removing blocks could alone overshoot it); the widths' rounding still applies."""
    from edgediag.compress.pipeline import resolve_recipe

    args = _recipe_args(*argv)
    resolve_recipe(args, _Recipe)
    assert args.remove_blocks == 0 and args.round_to == 16
    assert args.ratio == (0.3 if "--ratio" in argv else None)


def test_flags_given_win_over_the_recipe():
    from edgediag.compress.pipeline import resolve_recipe

    args = _recipe_args("--round-to", "1", "--remove-blocks", "0", "--lr", "1e-3", "--finetune-epochs", "0",
                        "--distill", "0")
    resolve_recipe(args, _Recipe)
    assert (args.round_to, args.remove_blocks, args.finetune_epochs, args.distill) == (1, 0, 0, 0.0)
    assert not hasattr(args, "lr_scale") and args.ratio == 0.8


@pytest.mark.parametrize("name", ["tastgram_mfn", "aegan_ad", "ldmamba_small", "memorymamba_nano"])
def test_every_family_recipe_is_one_prune_can_run(name):
    """Each family's recipe: known keys, a ratio in (0, 1), widths rounded to whole vectors
    (multiples of 8: AVX and the scan's channel lanes) and no more blocks than it has."""
    from edgediag.models import get_model_class

    recipe = get_model_class(name)[0].prune_recipe
    assert set(recipe) <= {"ratio", "round_to", "remove_blocks", "finetune_epochs", "distill", "lr_scale"}
    assert 0.0 < recipe["ratio"] < 1.0 and recipe["round_to"] % 8 == 0 and recipe["finetune_epochs"] > 0
    if recipe.get("remove_blocks"):
        assert recipe["remove_blocks"] <= len(create_model(name).removable_blocks())
