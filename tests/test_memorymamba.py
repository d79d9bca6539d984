"""MemoryMamba (edgediag.models.memorymamba) and the image_cnn baseline."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from edgediag.data import DataConfig, build_data
from edgediag.data.synth_images import CLASSES, generate_defect_images
from edgediag.engine.checkpoint import load_model, make_checkpoint, save_checkpoint
from edgediag.models import build_config, create_model
from edgediag.models.image_cnn.model import ImageCNN  # noqa: F401 - registers image_cnn
from edgediag.models.memorymamba.model import MemoryMamba, MemSSMBlock, similarity
from tests.conftest import run_cli, shared_data

# A small MemoryMamba that runs in a fraction of a second on a CPU.
SMALL = dict(image_size=32, in_chans=1, n_classes=3, dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], d_state=1,
             mlp_ratio=2.0, mem_mlp_ratio=1.0, coarse_slots=4, fine_slots=4, drop_path=0.0,
             classes=["good", "pit", "scratch"], normal_classes=["good"])


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def small(**kw) -> MemoryMamba:
    torch.manual_seed(0)
    return create_model("memorymamba", {**SMALL, **kw})


def open_residuals(model: MemoryMamba) -> MemoryMamba:
    """Give the zero-initialised post-SS2D LayerNorms unit gain, as after some training,
    so the SS2D and memory branches reach the output."""
    with torch.no_grad():
        for blocks in model.stages:
            for block in blocks:
                block.ssm_norm.weight.fill_(1.0)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small: one intra-op thread is faster than two fighting over
    shared cores (and keeps the file well under a minute on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("defects")
    generate_defect_images(root, n_per_class=6, size=64, seed=1)
    return root


@pytest.mark.parametrize("n_classes, published", [(10, 49.68e6), (1000, 50.44e6)])
def test_memorymamba_t_has_the_published_size(n_classes, published):
    model = create_model("memorymamba_t", n_classes=n_classes)
    assert model.config.depths == [2, 2, 5, 2] and model.config.dims == [96, 192, 384, 768]
    assert model.config.d_state == 1 and model.config.image_size == 224
    assert abs(n_params(model) - published) / published < 0.02


def test_edge_variants_are_small_and_give_class_probabilities():
    for name, size, patch in (("memorymamba_nano", 64, 8), ("memorymamba_micro", 160, 4)):
        cfg = build_config(name)
        assert cfg.image_size == size and cfg.patch_size == patch and cfg.dims[0] == 32
        assert n_params(create_model(name, n_classes=6)) < 4e6
    model = small().eval()
    x = model.example_input(3)
    assert x.shape == (3, 1, 32, 32)
    module = model.export_module()
    score, probs = module(x)
    assert module.output_names == ("score", "probs")  # the score first, as export expects
    assert probs.shape == (3, 3) and score.shape == (3,)
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    # Anomaly score = 1 - p(normal class "good").
    assert torch.allclose(score, 1 - probs[:, 0], atol=1e-6)
    assert torch.allclose(model.score(x), score, atol=1e-6)
    spec = model.input_spec()
    assert spec["shape"] == [1, 32, 32] and spec["value_range"] == [0.0, 1.0] and spec["normalised_inside"]
    assert spec["classes"] == ["good", "pit", "scratch"] and spec["channels"] == "grey"


def test_ablation_switches_remove_the_memory_parts():
    full = small()
    block = full.stages[0][0]
    assert isinstance(block, MemSSMBlock) and block.coarse is not None and block.fine is not None
    no_cmn, no_fmn = small(use_coarse=False), small(use_fine=False)
    assert no_cmn.stages[0][0].coarse is None and no_fmn.stages[0][0].fine is None
    assert n_params(no_cmn) < n_params(full) and n_params(no_fmn) < n_params(full)
    assert n_params(small(use_fusion=False)) == n_params(full)  # fusion is parameter-free
    batch = {"x": full.example_input(6), "y": torch.tensor([0, 1, 2, 0, 1, 2])}
    losses = {name: m.train().training_step(batch) for name, m in
              (("full", full), ("no_cmn", no_cmn), ("no_fmn", no_fmn))}
    assert losses["full"]["l_coarse"] > 0 and losses["full"]["l_fine"] > 0
    assert losses["no_cmn"]["l_coarse"] == 0 and losses["no_fmn"]["l_fine"] == 0
    # Without fusion the memories are added unweighted: a different function of the input.
    open_residuals(full)
    unfused = small(use_fusion=False)
    unfused.load_state_dict(full.state_dict())
    x = full.example_input(2)
    assert not torch.allclose(full.eval()(x), unfused.eval()(x))


def test_losses_train_the_memories():
    model = open_residuals(small(lambda_c=1.0, lambda_f=1.0)).train()
    batch = {"x": model.example_input(6), "y": torch.tensor([0, 1, 2, 0, 1, 2])}
    out = model.training_step(batch)
    assert set(out) >= {"loss", "ce", "l_coarse", "l_fine", "acc"}
    assert torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], out["ce"] + out["l_coarse"] + out["l_fine"], atol=1e-5)
    out["loss"].backward()
    block = model.stages[1][0]
    for memory in (block.coarse, block.fine):
        assert memory.keys.grad.abs().sum() > 0 and memory.values.grad.abs().sum() > 0
    assert block.ssm.out_proj.weight.grad.abs().sum() > 0


def test_untrained_blocks_start_as_the_identity():
    """Zero-init residual: the post-SS2D LayerNorm starts with gain 0, so a fresh block
    without MLP passes its input through unchanged (and from-scratch training can start)."""
    model = small(mlp_ratio=0.0).eval()
    block = model.stages[0][0]
    x = torch.randn(2, 8, 8, 8)
    y, aux = block(x)
    assert torch.equal(y, x) and aux["q_c"].shape == (2, 8) and aux["m_f"].shape == (2, 8)


def test_learns_a_local_defect_from_scratch_in_a_few_steps():
    """A bright 8x8 square on noise, at a random place: the memories and SS2D must carry a
    local feature to the pooled head. (With a unit-gain post-SS2D LayerNorm the network stays
    at chance on this task.)"""
    torch.manual_seed(0)
    model = small(n_classes=2, classes=["good", "bad"], normal_classes=["good"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    accs = []
    for _ in range(60):
        x = 0.5 + 0.1 * torch.randn(16, 1, 32, 32, generator=g)
        y = torch.arange(16) % 2
        for i in range(1, 16, 2):
            r, c = torch.randint(0, 24, (2,), generator=g).tolist()
            x[i, :, r:r + 8, c:c + 8] += 0.3
        out = model.training_step({"x": x.clamp(0, 1), "y": y})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        accs.append(float(out["acc"]))
    assert sum(accs[-20:]) / 20 > 0.75  # chance: 0.5


def test_contrastive_and_infonce_losses_behave():
    model = small(margin=0.5, temperature=0.5)
    y = torch.tensor([0, 0, 1, 1])
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    separated = torch.stack([e0, e0, e1, e1])  # classes orthogonal (distance 1 > margin), pairs identical
    collapsed = torch.stack([e0, e0, e0, e0])  # every class on one point
    assert model.coarse_contrastive(separated, y) < 1e-6
    assert model.coarse_contrastive(collapsed, y) == pytest.approx(0.25)  # (margin - 0)^2
    z = torch.randn(8, 16)
    aligned = model.fine_infonce(z, z)
    shuffled = model.fine_infonce(z, z[torch.randperm(8, generator=torch.Generator().manual_seed(0))])
    assert aligned < shuffled and aligned < math.log(8)


def test_similarity_measures():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    for kind in ("cosine", "l1", "l2"):
        s = similarity(a, b, kind)
        assert s.shape == (4,)
        assert torch.allclose(similarity(a, a, kind), torch.ones(4), atol=1e-5)
    for kind in ("l1", "l2"):
        assert (similarity(a, b, kind) > 0).all() and (similarity(a, b, kind) < 1).all()
    with pytest.raises(Exception, match="similarity"):
        small(similarity="dot")


def test_bad_configs_are_user_errors():
    from edgediag.errors import UserError
    with pytest.raises(UserError, match="multiple of 32"):
        small(image_size=48)
    with pytest.raises(UserError, match="same"):
        small(depths=[1, 1])
    with pytest.raises(UserError, match="power of two"):
        small(stem="convbn", patch_size=6, image_size=48)
    with pytest.raises(UserError, match="stem_blocks and stem_width are for stem 'convbn'"):
        small(stem_blocks=1)


@pytest.mark.parametrize("patch", [2, 4, 8])
@pytest.mark.parametrize("blocks", [0, 1])
def test_convbn_stem_reaches_the_patch_grid(patch, blocks):
    """The BatchNorm conv stem downsamples by the patch size in log2(patch) stride-2 convs,
    so the token grid (and everything after it) is the patch stem's. Its residual blocks sit
    after every strided conv but the first, at the width of that conv."""
    from edgediag.models.image_cnn.model import BasicBlock

    model = small(stem="convbn", patch_size=patch, image_size=8 * patch, stem_blocks=blocks, stem_width=12).eval()
    convs = [m for m in model.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == int(math.log2(patch)) and convs[-1].out_channels == SMALL["dims"][0]
    assert [c.out_channels for c in convs[:-1]] == [12] * (len(convs) - 1)
    residual = [m for m in model.patch_embed if isinstance(m, BasicBlock)]
    assert len(residual) == blocks * (len(convs) - 1)
    assert [b.conv2.out_channels for b in residual] == [c.out_channels for c in convs[1:]][:len(residual)]
    h = model.patch_embed(model.example_input(2))
    assert h.shape == (2, SMALL["dims"][0], 8, 8)
    assert model(model.example_input(2)).shape == (2, 3)


def test_checkpoint_round_trip_keeps_normalisation_and_threshold(tmp_path, synth_root):
    bundle = build_data("image", DataConfig(root=str(synth_root)), build_config("memorymamba", SMALL))
    cfg = MemoryMamba.config_for_data(build_config("memorymamba", SMALL), bundle)
    assert cfg.classes == sorted(CLASSES) and cfg.normal_classes == ["normal"] and cfg.n_classes == 6
    assert cfg.in_chans == 1 and cfg.pixel_mean == bundle.info["pixel_mean"]
    model = MemoryMamba(cfg).eval()
    assert torch.allclose(model.pixel_mean.flatten(), torch.tensor(bundle.info["pixel_mean"]))
    model.threshold.fill_(0.25)
    save_checkpoint(tmp_path / "m.pt", make_checkpoint(model))
    loaded, _ = load_model(tmp_path / "m.pt")  # torch.load(weights_only=True) inside
    x = model.example_input(2)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert float(loaded.threshold) == 0.25 and torch.equal(loaded.pixel_std, model.pixel_std)


def test_a_checkpoint_from_before_the_stem_blocks_still_loads(tmp_path):
    """memorymamba_nano turned its stem blocks on after checkpoints were written without the
    stem_blocks / stem_width fields: such a checkpoint rebuilds the plain stem it was trained
    with (a checkpoint names the family, whose defaults fill new fields, not the variant)."""
    torch.manual_seed(0)
    model = create_model("memorymamba_nano", in_chans=1, n_classes=3, stem_blocks=0, stem_width=0).eval()
    payload = make_checkpoint(model)
    for key in ("stem_blocks", "stem_width"):
        del payload["model_config"][key]
    save_checkpoint(tmp_path / "old.pt", payload)
    loaded, _ = load_model(tmp_path / "old.pt")
    assert loaded.config.stem_blocks == 0 and n_params(loaded) == n_params(model)
    x = model.example_input(2)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert create_model("memorymamba_nano", in_chans=1, n_classes=3).config.stem_blocks == 1  # the variant's own


@pytest.mark.parametrize("name", ["memorymamba", "memorymamba_convbn", "image_cnn"])
def test_onnx_export_matches_pytorch(tmp_path, name):
    import onnxruntime as ort

    if name == "memorymamba":
        model = small().eval()
    elif name == "memorymamba_convbn":
        model = open_residuals(small(stem="convbn", stem_blocks=1)).eval()
        with torch.no_grad():  # trained-looking BatchNorm statistics, which the export folds
            for bn in (m for m in model.patch_embed.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    else:
        model = create_model("image_cnn", n_classes=3, in_chans=1, image_size=32, widths=[8, 16],
                             depths=[1, 1], classes=["good", "pit", "scratch"], normal_classes=["good"]).eval()
    module, x = model.export_module(), model.example_input(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Static shapes: the pure-PyTorch scan unrolls over the traced sequence length and batch.
        torch.onnx.export(module, (x,), str(tmp_path / "m.onnx"), opset_version=17, dynamo=False,
                          input_names=["image"], output_names=list(module.output_names))
    assert not model.training  # exporting must not flip the model into training mode
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x2 = model.example_input(2)
    score, probs = session.run(None, {"image": x2.numpy()})
    with torch.no_grad():
        ref_score, ref_probs = module(x2)
    np.testing.assert_allclose(probs, ref_probs.numpy(), atol=1e-4)
    np.testing.assert_allclose(score, ref_score.numpy(), atol=1e-4)


def test_evaluate_reports_classification_metrics_and_plots(tmp_path, synth_root):
    from torch.utils.data import DataLoader

    bundle = build_data("image", DataConfig(root=str(synth_root)), build_config("memorymamba", SMALL))
    model = MemoryMamba(MemoryMamba.config_for_data(build_config("memorymamba", SMALL), bundle))
    metrics = model.evaluate(DataLoader(bundle.test, batch_size=4), out_dir=tmp_path)
    for key in ("acc", "macro_precision", "macro_recall", "macro_f1", "auc", "pauc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["n"] == len(bundle.test) and len(metrics["table"]) == 6
    assert sum(row["n"] for row in metrics["table"]) == len(bundle.test)
    assert np.asarray(metrics["confusion"]).sum() == len(bundle.test)
    assert (tmp_path / "confusion.png").stat().st_size > 0 and (tmp_path / "roc.png").stat().st_size > 0
    model.threshold.fill_(0.5)
    assert "anomaly_f1" in model.evaluate(DataLoader(bundle.test, batch_size=4))
    assert model.training  # evaluate restores the mode it found


def test_image_cnn_learns_synthetic_defects(synth_root):
    """The data pipeline and the shared classifier code are sound: the CNN baseline fits the
    synthetic defects well beyond chance within a few quick epochs."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    cfg = build_config("image_cnn", image_size=64, widths=[16, 32, 64], depths=[1, 1, 1])
    bundle = build_data("image", DataConfig(root=str(synth_root), test_fraction=0.34), cfg)
    model = ImageCNN(ImageCNN.config_for_data(cfg, bundle))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(12):
        for batch in DataLoader(bundle.train, batch_size=8, shuffle=True):
            opt.zero_grad()
            model.training_step(batch)["loss"].backward()
            opt.step()
    # Precise BatchNorm statistics, as the models' own fit does: after 36 steps the running
    # averages trail the weights (eval accuracy 0.50-0.83 by seed without this, 0.75-0.83 with it).
    model.recalibrate_batchnorm(DataLoader(bundle.train, batch_size=8), forward=model)
    train_acc = model.evaluate(DataLoader(bundle.train, batch_size=16))["acc"]
    assert train_acc > 0.5  # chance: 1/6


def test_train_and_evaluate_cli_on_synthetic_images(tmp_path, synth_root):
    out = tmp_path / "run"
    res = run_cli("edgediag.train", "--model", "memorymamba_nano", "--data", synth_root, "--out", out,
                  "--epochs", 1, "--batch-size", 8, "--set", "model.image_size=64", "--set", "model.dims=[8,16,32,64]",
                  "--set", "train.threads=1", "--set", "data.val_fraction=0.2", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "train.json").read_text())
    assert {"acc", "macro_f1", "auc"} <= set(summary["test_metrics"])
    assert math.isfinite(summary["threshold"]) and (out / "eval" / "confusion.png").exists()
    res = run_cli("edgediag.evaluate", "--checkpoint", out / "model.pt", "--out", tmp_path / "eval", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # Same data settings from the checkpoint -> the same test split and the same numbers.
    assert metrics["items"] == summary["test_metrics"]["n"]
    assert metrics["acc"] == pytest.approx(summary["test_metrics"]["acc"])


@pytest.mark.slow
def test_nano_trains_on_magnetic_tile_from_the_cli(tmp_path):
    """A short CPU run on the real MT set (6 grey classes, 71 % "Free"): the training loss
    falls, and the checkpoint scores the whole stratified test split of 336 tiles. (From
    scratch in a few epochs every model here stays near always-Free: see the docs.)"""
    root = shared_data("magnetic_tile")
    out = tmp_path / "mt"
    res = run_cli("edgediag.train", "--model", "memorymamba_nano", "--data", root, "--out", out,
                  "--epochs", 4, "--set", "train.threads=2", "--set", "data.val_fraction=0.1", timeout=3600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "train.json").read_text())
    history, metrics = summary["history"], summary["test_metrics"]
    assert history[-1]["ce"] < history[0]["ce"]
    assert metrics["n"] == 336 and len(metrics["table"]) == 6 and metrics["acc"] >= 0.6
