"""LDMamba and its baselines: sizes, shapes, the screening module, exact dynamic pruning,
FLOP counting, normal-data scores, checkpoints, and training through the real verbs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from edgediag.compress.budget import model_flops as count_flops
from edgediag.compress.budget import model_params as count_params
from edgediag.compress.dynamic import DynamicPruner, PruneConfig, prune_model
from edgediag.config import to_dict
from edgediag.data import DataConfig, build_data
from edgediag.data.synth_sequences import generate
from edgediag.engine.checkpoint import load_model, make_checkpoint, save_checkpoint
from edgediag.errors import UserError
from edgediag.models import create_model
from edgediag.models.ldmamba.model import DynamicScreening
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _close_random(model, fraction=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for grp in model.screening_groups():
            n = grp.gate.channels
            idx = torch.randperm(n, generator=g)[: int(fraction * n)]
            grp.gate.raw_scores[idx] = (float(grp.gate.tau) - 1.0) / grp.gate.gain


def _furnace_bundle(tmp_path, **model_kw):
    generate("furnace", tmp_path, n_train=3, n_test=1, seed=0, length=128)
    from edgediag.models import build_config
    from edgediag.models.ldmamba.model import LDMamba

    cfg = build_config("ldmamba_small", window=64, **model_kw)
    bundle = build_data("sequence", DataConfig(root=str(tmp_path)), cfg)
    return bundle, LDMamba.config_for_data(cfg, bundle)


def test_sizes_match_the_papers_range():
    # The paper: about 214 K parameters and 23 M MACs for 257 input channels.
    for n_features in (64, 257):
        m = create_model("ldmamba", n_classes=2, n_features=n_features)
        assert 0.2e6 <= count_params(m) <= 0.5e6
    m = create_model("ldmamba", n_classes=2, n_features=257)
    assert 10e6 <= count_flops(m) / 2 <= 40e6  # MACs for one 64-frame sequence
    plain = create_model("ldmamba_plain", n_classes=2, n_features=64)
    assert plain.screening_groups() == [] and all(b.static is None for b in plain.blocks)
    with pytest.raises(UserError, match="no screening gates"):
        DynamicPruner().on_epoch_end(plain, 0)
    assert count_params(create_model("seq_cnn", n_classes=2, n_features=64)) < 0.3e6


def test_forward_shapes_for_sequences_and_video():
    for name in ("ldmamba", "ldmamba_plain", "seq_cnn"):
        m = create_model(name, n_classes=3, n_features=20, seq_len=12).eval()
        score, probs, emb = m.export_module()(m.example_input(2))
        assert score.shape == (2,) and probs.shape == (2, 3) and emb.shape == (2, 64)
        assert torch.all((score >= 0) & (score <= 1))  # 1 - p(normal)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    video = create_model("ldmamba", n_classes=2, input_kind="video", seq_len=6, frame_size=32).eval()
    x = video.example_input(2)
    assert x.shape == (2, 6, 3, 32, 32) and video(x).shape == (2, 2)


def test_screening_is_hard_at_inference_and_learns_in_training():
    torch.manual_seed(0)
    screen = DynamicScreening(16, kernel=5)
    x = torch.randn(4, 30, 16)
    screen.eval()
    y, _ = screen(x)
    kept = (y.abs().sum(-1) > 0).float()
    assert 0.5 < kept.mean() < 1.0  # init threshold -1 sd: most, not all, tokens pass
    assert torch.all((y == x) | (y == 0))  # a token is kept whole or zeroed
    screen.train()
    y, keep = screen(x)
    (y.pow(2).sum() + keep).backward()
    assert screen.raw_tau.grad != 0 and screen.dw.weight.grad.abs().sum() > 0


def test_pruning_closed_channels_is_exact_and_checkpoints_rebuild_it(tmp_path):
    torch.manual_seed(0)
    model = create_model("ldmamba", n_classes=4, n_features=24, seq_len=20).eval()
    _close_random(model)
    x = model.example_input(3)
    ref = model.export_module()(x)
    keep = {g.name: g.gate.hard_mask().nonzero().flatten() for g in model.screening_groups()}
    small = prune_model(model, keep)
    assert small.config.d_inner == [len(keep["blocks.0.inner"]), len(keep["blocks.1.inner"])]
    assert small.config.stem_channels == [len(keep["stem.0"])]
    assert count_params(small) < 0.8 * count_params(model)
    score, probs, emb = small.export_module()(x)
    torch.testing.assert_close(score, ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probs, ref[1], rtol=1e-4, atol=1e-5)
    # The embedding loses exactly the closed head units (they were zero).
    torch.testing.assert_close(emb, ref[2][:, keep["head"]], rtol=1e-4, atol=1e-5)
    save_checkpoint(tmp_path / "small.pt", make_checkpoint(small))
    loaded, payload = load_model(tmp_path / "small.pt")
    assert payload["model_config"]["d_inner"] == small.config.d_inner
    torch.testing.assert_close(loaded(x), small(x))


def test_flops_include_the_selective_scan_by_formula():
    from torch.utils.flop_counter import FlopCounterMode

    from edgediag.ops import scan_backend

    m = create_model("ldmamba", n_classes=2, n_features=16, seq_len=10, d_inner=[32, 24]).eval()
    x = m.example_input(1)
    with scan_backend("chunked"), FlopCounterMode(display=False) as counter:
        m.export_module()(x)
    # Two blocks, each a bidirectional mixer: two scans of (d_inner, d_state=16) over 10 steps,
    # 9·L·D·N for the recurrence plus L·D for the skip term D·u and L·D for the gate by z.
    assert count_flops(m, x) - counter.get_total_flops() == 2 * (32 + 24) * (9 * 10 * 16 + 2 * 10)


def test_normal_statistics_scores_and_checkpoint(tmp_path):
    bundle, cfg = _furnace_bundle(tmp_path)
    model = create_model("ldmamba_small", config=to_dict(cfg)).eval()
    loader = DataLoader(bundle.train, batch_size=16)
    with torch.no_grad():  # stale running statistics, as after a short training run
        model.stem_norms[0].running_mean.fill_(5.0)
    model.fit_normal(loader)
    # BatchNorm statistics are recomputed over the training data with the final weights.
    x = torch.stack([bundle.train[i]["x"] for i in range(len(bundle.train))])
    with torch.no_grad():
        pre_bn = model.stem_convs[0](model.frames(x).transpose(1, 2))
    torch.testing.assert_close(model.stem_norms[0].running_mean, pre_bn.mean(dim=(0, 2)), rtol=1e-4, atol=1e-4)
    assert model.knn_bank.shape[1] == 64 and model.maha_precision.shape == (64, 64)
    normal = torch.stack([bundle.train[i]["x"] for i in range(len(bundle.train)) if bundle.train[i]["anomaly"] == 0])
    model.config.score_method = "knn"
    with torch.no_grad():
        assert float(model.score(normal[:4]).max()) < 1e-5  # training normals are in the bank
    save_checkpoint(tmp_path / "m.pt", make_checkpoint(model))
    loaded, _ = load_model(tmp_path / "m.pt")
    for method in ("knn", "mahalanobis", "softmax"):
        model.config.score_method = loaded.config.score_method = method
        torch.testing.assert_close(loaded.score(normal), model.score(normal))
    metrics = model.evaluate(DataLoader(bundle.test, batch_size=16), out_dir=tmp_path / "eval")
    assert {"acc", "macro_f1", "auc", "table"} <= set(metrics) and len(metrics["table"]) == 3
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 0 and (tmp_path / "eval" / "roc.png").exists()


def test_dynamic_pruning_during_training_reaches_the_budget(tmp_path):
    from edgediag.engine.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    bundle, cfg = _furnace_bundle(tmp_path)
    model = create_model("ldmamba_small", config=to_dict(cfg))
    base = count_params(model)
    pruner = DynamicPruner(PruneConfig(target=0.5, start_epoch=0, end_epoch=1))
    trainer = Trainer(model, TrainConfig(epochs=3, batch_size=12, device="cpu", threads=1), tmp_path / "run",
                      callbacks=[pruner], progress=False)
    final = trainer.fit(bundle.train)
    assert count_params(final) <= 0.5 * base and final.config.d_inner != [96, 96]
    # The pruned shape is what the checkpoint records, and it loads back.
    loaded, _ = load_model(tmp_path / "run" / "last.pt")
    assert loaded.config.d_inner == final.config.d_inner


def test_bad_configs_are_user_errors():
    with pytest.raises(UserError, match="stem_kernels needs 2 entries"):
        create_model("ldmamba", stem_kernels=[5])
    with pytest.raises(UserError, match="at least two classes"):
        create_model("ldmamba", n_classes=1)
    with pytest.raises(UserError, match="score_method"):
        create_model("seq_cnn", score_method="magic")
    with pytest.raises(UserError, match="one entry per block"):
        create_model("ldmamba", d_inner=[64, 64, 64])


def test_train_and_evaluate_verbs_on_generated_furnace_data(tmp_path):
    generate("furnace", tmp_path / "data", n_train=3, n_test=1, seed=0, length=128)
    res = run_cli("edgediag.train", "--model", "ldmamba_small", "--data", tmp_path / "data", "--out", tmp_path / "run",
                  "--epochs", "1", "--set", "train.threads=1", "--set", "model.window=64",
                  "--set", "train.batch_size=12", timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "macro_f1" in res.stdout and (tmp_path / "run" / "model.pt").exists()
    res = run_cli("edgediag.evaluate", "--checkpoint", tmp_path / "run" / "model.pt", timeout=300,
                  env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "acc" in res.stdout and (tmp_path / "run" / "eval" / "metrics.json").exists()


def _export_and_compare(model, tmp_path, dynamo: bool):
    import onnx
    import onnxruntime as ort

    from edgediag.ops import scan_backend

    mod = model.export_module()
    x = model.example_input(2)
    with scan_backend("chunked"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(mod, (x,), tmp_path / "m.onnx", opset_version=17, dynamo=dynamo, input_names=["x"],
                          output_names=list(mod.output_names))
    outs = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x.numpy()})
    for got, ref in zip(outs, mod(x)):
        np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-4, atol=1e-5)
    return onnx.load(str(tmp_path / "m.onnx"))


def test_onnx_opset17_export_matches_torch(tmp_path):
    """TorchScript exporter, fixed batch: a true opset-17 graph, hard screens and the kNN
    bank included, equal to the eager model in onnxruntime."""
    m = create_model("ldmamba_small", n_classes=3, n_features=16, seq_len=16).eval()
    _close_random(m)  # the hard screens are part of the graph
    m.fit_normal([{"x": m.example_input(4), "anomaly": torch.zeros(4)}])
    m.config.score_method = "knn"
    graph = _export_and_compare(m, tmp_path, dynamo=False)
    assert graph.opset_import[0].version == 17


@pytest.mark.slow
def test_onnx_export_of_video_model_and_dynamo_exporter(tmp_path):
    m = create_model("ldmamba_small", n_classes=3, input_kind="video", seq_len=4, frame_size=32).eval()
    _close_random(m)
    _export_and_compare(m, tmp_path, dynamo=False)
    _export_and_compare(m, tmp_path, dynamo=True)  # ~1-3 min; the graph comes out at opset 18


# --- the causal (streaming) form ----------------------------------------------------------------
_CAUSAL = dict(n_classes=3, n_features=8, seq_len=24, d_model=16, stem_channels=[16], d_inner=[16, 16],
               se_hidden=[8, 8], head_hidden=8, d_state=4)


def _causal_model(seed=0):
    torch.manual_seed(seed)
    m = create_model("ldmamba_causal", **_CAUSAL).eval()
    _close_random(m, 0.2)
    with torch.no_grad():  # the static branch starts as the identity: make it do something
        for blk in m.blocks:
            blk.static.fc2.weight.normal_(std=0.3)
    return m


def test_causal_form_is_causal_and_its_last_step_is_the_score():
    m = _causal_model()
    xs = torch.randn(3, 24, 8)
    sm = m.streaming_module()
    with torch.no_grad():
        score, probs, emb = sm.full_sequence(xs)
        assert score.shape == (3, 24) and probs.shape == (3, 24, 3) and emb.shape == (3, 24, 8)
        torch.testing.assert_close(score[:, -1], m.score(xs), rtol=0, atol=1e-6)
        future = xs.clone()
        future[:, 12:] += 5.0
        assert torch.equal(sm.full_sequence(future)[0][:, :12], score[:, :12])  # no step sees the future


def test_streaming_steps_equal_the_full_sequence_forward():
    """Tolerance 1e-5: the step keeps running sums where the full forward uses cumsum, and
    the scan's fp32 recurrence is reassociated; both are exact up to rounding."""
    m = _causal_model(1)
    sm = m.streaming_module()
    xs = torch.randn(2, 24, 8) * 2 + 1
    with torch.no_grad():
        full = sm.full_sequence(xs)
        inputs = sm.example_inputs(2)
        assert len(inputs) == len(sm.input_names) and len(sm.output_names) == 3 + len(inputs) - 1
        states = list(inputs[1:])
        steps = []
        for t in range(xs.shape[1]):
            out = sm(xs[:, t], *states)
            steps.append(out[:3])
            states = list(out[3:])
    for k in range(3):
        torch.testing.assert_close(torch.stack([s[k] for s in steps], 1), full[k], rtol=1e-5, atol=1e-5)


def test_only_the_causal_form_streams():
    with pytest.raises(UserError, match="causal"):
        create_model("ldmamba_small", **{k: v for k, v in _CAUSAL.items() if k != "d_inner"}).streaming_module()
    with pytest.raises(UserError, match="bidirectional"):
        create_model("ldmamba", causal=True)


def test_streaming_export_passes_parity_against_the_full_sequence(tmp_path):
    from edgediag import cli, export
    from edgediag.deploy.metadata import read_metadata

    m = _causal_model(2)
    m.threshold.fill_(0.5)
    save_checkpoint(tmp_path / "m.pt", make_checkpoint(m, data={"kind": "sequence", "classes": ["a", "b", "c"],
                                                               "normal_classes": ["a"]}))
    out = tmp_path / "stream"
    args = ["--checkpoint", tmp_path / "m.pt", "--streaming", "--out", out, "--stream-steps", "24",
            "--latency-runs", "2", "--threads", "1"]
    assert cli.run(export.main, [str(a) for a in args]) == 0
    import json

    report = json.loads((out / "export.json").read_text())
    parity = report["parity"]
    assert parity["passed"] and "full_sequence" in parity["reference"] and parity["steps"] == 24
    assert parity["final_state_max_abs_error"] < 1e-4
    meta = read_metadata(out / "model.onnx")
    stream = json.loads(meta["streaming"])
    assert stream["step_input"] == "x_t" and "block0_ssm" in stream["state_inputs"]
