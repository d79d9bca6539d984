"""AEGAN-AD: published sizes, WGAN-GP, windows and scaling, every score against
scikit-learn, calibration, checkpoints, export (eager and ONNX)."""

from __future__ import annotations

import dataclasses

import librosa
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from edgediag.data import DataConfig, build_data
from edgediag.data.synth_audio import generate_machine_sounds
from edgediag.engine.checkpoint import load_model, make_checkpoint, save_checkpoint
from edgediag.engine.trainer import TrainConfig, Trainer
from edgediag.errors import UserError
from edgediag.models import create_model
from edgediag.models.aegan_ad import (
    AEGANAD,
    AEGANConfig,
    choose_score,
    gradient_penalty,
    lof_fit,
    lof_score,
    window_starts,
)
from edgediag.models.aegan_ad.scores import D_SCORES, G_SCORES, SCORE_NAMES

from .conftest import run_cli

# Published sizes (AEGAN-AD, channels 32 -> 512, 256-d latent, LayerNorm).
PUBLISHED_G, PUBLISHED_D = 10.78e6, 3.30e6
# A narrow network so that a training step takes a fraction of a second; 4.5 s clips are
# the shortest that hold one 128-frame window (141 frames) with room for several.
TINY = dict(channels=4, d_channels=4, latent_dim=16, window_hop=4, train_windows=2, lof_k=3)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- architecture --------------------------------------------------------------------
def test_parameter_counts_match_the_published_model():
    model = create_model("aegan_ad", clip_seconds=10.0)
    g, d = n_params(model.generator), n_params(model.discriminator)
    assert abs(g - PUBLISHED_G) / PUBLISHED_G < 0.02, g  # 10,781,696
    assert abs(d - PUBLISHED_D) / PUBLISHED_D < 0.02, d  # 3,303,425
    assert model.discriminator.embedding_dim == 512
    small = create_model("aegan_ad_small", clip_seconds=10.0)
    assert n_params(small.generator) < g / 3 and small.discriminator.embedding_dim == 256
    # BatchNorm has 2 parameters per channel instead of LayerNorm's 2 per C x H x W element.
    tiny = {n: n_params(AEGANAD(AEGANConfig(**TINY, clip_seconds=4.5, norm=n)).generator) for n in ("layer", "batch")}
    assert tiny["layer"] - tiny["batch"] == 2 * 2 * sum(4 * 2 ** i * (64 // 2 ** i) ** 2 - 4 * 2 ** i for i in range(5))


def test_shapes_of_generator_and_discriminator():
    model = AEGANAD(AEGANConfig(**TINY, clip_seconds=4.5))
    w = torch.randn(3, 1, 128, 128)
    z = model.generator.encode(w)
    rec = model.generator(w)
    assert z.shape == (3, 16, 1, 1) and rec.shape == w.shape and rec.abs().max() <= 1
    assert model.discriminator.embed(w).shape == (3, 64) and model.discriminator(w).shape == (3,)


# --- WGAN-GP -------------------------------------------------------------------------
def test_gradient_penalty_is_zero_for_a_unit_linear_critic():
    torch.manual_seed(0)
    w = torch.randn(128 * 128)
    real, fake = torch.randn(6, 1, 128, 128), torch.randn(6, 1, 128, 128)
    # f(x) = w.x with ||w|| = 1: the gradient norm is 1 everywhere, so the penalty is 0.
    assert float(gradient_penalty(lambda x: x.flatten(1) @ (w / w.norm()), real, fake)) < 1e-8
    # ||w|| = 3: (3 - 1)^2 = 4 at every interpolate.
    assert float(gradient_penalty(lambda x: x.flatten(1) @ (3 * w / w.norm()), real, fake)) == pytest.approx(4, rel=1e-4)


def test_gradient_penalty_is_taken_at_the_interpolates():
    torch.manual_seed(1)
    real, fake = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    critic = lambda x: 0.5 * x.flatten(1).pow(2).sum(1)  # noqa: E731 - gradient = x itself
    eps = torch.tensor([0.0, 0.25, 1.0])
    x_hat = eps.view(-1, 1, 1, 1) * real + (1 - eps.view(-1, 1, 1, 1)) * fake
    want = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    torch.testing.assert_close(gradient_penalty(critic, real, fake, eps), want)
    # Random eps: every point the critic sees lies on the segment between real and fake.
    seen = []
    gradient_penalty(lambda x: seen.append(x.detach()) or critic(x), real, fake)
    t = ((seen[0] - fake) / (real - fake)).flatten(1)  # the same eps across each sample's elements
    assert torch.allclose(t, t[:, :1].expand_as(t), atol=1e-4) and bool(((t >= 0) & (t <= 1)).all())


# --- windows and scaling ---------------------------------------------------------------
def test_window_starts_cover_the_clip():
    assert len(window_starts(313, 1)) == 186  # the published count for 10 s clips
    starts = window_starts(313, 8)
    assert starts[:3] == [0, 8, 16] and starts[-1] == 313 - 128 and len(starts) == 25
    assert window_starts(128, 8) == [0]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("machines")
    generate_machine_sounds(root, n_train=8, n_test=8, seconds=4.5, seed=0)
    cfg = AEGANConfig(**TINY)
    bundle = build_data("audio", DataConfig(root=str(root / "fan")), cfg)
    return root / "fan", bundle, AEGANAD.config_for_data(cfg, bundle)


def test_scaling_is_fitted_on_the_training_clips(synth):
    _, bundle, cfg = synth
    assert cfg.clip_seconds == 4.5 and cfg.input_max > cfg.input_min
    dbs = [librosa.power_to_db(librosa.feature.melspectrogram(y=bundle.train[i]["x"].numpy(), sr=16000, n_fft=2048,
                                                              hop_length=512, n_mels=128), top_db=80)
           for i in range(len(bundle.train))]
    assert cfg.input_min == pytest.approx(min(d.min() for d in dbs), abs=1e-2)
    assert cfg.input_max == pytest.approx(max(d.max() for d in dbs), abs=1e-2)
    model = AEGANAD(cfg)
    feats = model.features(torch.stack([bundle.train[i]["x"] for i in range(len(bundle.train))]))
    assert feats.min() == pytest.approx(-1, abs=1e-4) and feats.max() == pytest.approx(1, abs=1e-4)
    assert float(model.input_min) == pytest.approx(cfg.input_min)  # a buffer: checkpoints carry it


def test_windows_are_slices_of_the_log_mel(synth):
    _, bundle, cfg = synth
    model = AEGANAD(cfg)
    mel = model.features(torch.stack([bundle.test[i]["x"] for i in range(2)]))
    w = model.windows(mel)
    starts = window_starts(mel.shape[-1], cfg.window_hop)
    assert w.shape == (2 * len(starts), 1, 128, 128)
    torch.testing.assert_close(w[len(starts) + 1, 0], mel[1, :, starts[1]:starts[1] + 128])
    torch.manual_seed(0)
    r = model.random_windows(mel, 3)
    assert r.shape == (6, 1, 128, 128)
    start = int((mel[1, 0] == r[4, 0, 0, 0]).nonzero()[0])  # locate window 4 (clip 1) by its first value
    torch.testing.assert_close(r[4, 0], mel[1, :, start:start + 128])


def test_unfitted_scaling_falls_back_to_the_first_batch(synth, caplog):
    _, bundle, cfg = synth
    model = AEGANAD(dataclasses.replace(cfg, input_min=0.0, input_max=0.0))
    with pytest.raises(RuntimeError, match="scaling"):
        model.score(bundle.train[0]["x"][None])
    batch = next(iter(DataLoader(bundle.train, batch_size=4)))
    model.training_step(batch, "disc")
    assert float(model.input_max) > float(model.input_min) and "first training batch" in caplog.text


# --- training ----------------------------------------------------------------------------
def test_each_phase_steps_only_its_network(synth):
    _, bundle, cfg = synth
    model = AEGANAD(cfg)
    batch = next(iter(DataLoader(bundle.train, batch_size=4)))
    for phase, mine, other in (("disc", model.discriminator, model.generator),
                               ("gen", model.generator, model.discriminator)):
        model.zero_grad(set_to_none=True)
        losses = model.training_step(batch, phase)
        losses["loss"].backward()
        assert torch.isfinite(losses["loss"])
        assert all(p.grad is not None for p in mine.parameters())
        assert all(p.grad is None for p in other.parameters()), phase
        assert {p.data_ptr() for p in model.phase_parameters(phase)} == {p.data_ptr() for p in mine.parameters()}
    assert all(p.requires_grad for p in model.discriminator.parameters())  # restored after the gen step
    assert set(losses) == {"loss", "rec", "match_mean", "match_std"}


@pytest.fixture(scope="module")
def fitted(synth):
    """Two engine steps (both phases), then the normal statistics of the D scores."""
    _, bundle, cfg = synth
    torch.manual_seed(0)
    model = AEGANAD(cfg)
    train_cfg = TrainConfig(**{**AEGANAD.train_defaults, "epochs": 1, "batch_size": 4, "device": "cpu"})
    trainer = Trainer(model, train_cfg, None, progress=False)
    model = trainer.fit(bundle.train)
    assert trainer.step == 2 and np.isfinite(trainer.history[0]["disc/gp"])
    model.eval()
    model.fit_normal(DataLoader(bundle.train, batch_size=4))
    return model


# --- scores ------------------------------------------------------------------------------
def test_lof_matches_scikit_learn():
    from sklearn.neighbors import LocalOutlierFactor

    rng = np.random.default_rng(0)
    bank, query = rng.normal(size=(30, 6)), rng.normal(size=(12, 6)) * 1.5
    kdist, lrd = lof_fit(torch.from_numpy(bank), 5)
    ours = lof_score(torch.from_numpy(query), torch.from_numpy(bank), kdist, lrd, 5).numpy()
    ref = -LocalOutlierFactor(n_neighbors=5, novelty=True).fit(bank).score_samples(query)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_d_scores_match_scikit_learn(fitted, synth):
    from sklearn.covariance import LedoitWolf
    from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors

    _, bundle, _ = synth
    model = fitted
    bank = model.bank.double().numpy()
    assert bank.shape == (len(bundle.train), 64)
    x = torch.stack([bundle.test[i]["x"] for i in range(len(bundle.test))])
    with torch.no_grad():
        emb = model.clip_embeddings(x)
        got = {k: v.numpy() for k, v in model.d_scores(emb, D_SCORES).items()}
    e = emb.double().numpy()
    np.testing.assert_allclose(got["D-maha"], np.sqrt(LedoitWolf().fit(bank).mahalanobis(e)), rtol=2e-3)
    np.testing.assert_allclose(got["D-KNN"], NearestNeighbors(n_neighbors=1).fit(bank).kneighbors(e)[0][:, 0],
                               rtol=2e-3, atol=1e-4)
    lof = -LocalOutlierFactor(n_neighbors=3, novelty=True).fit(bank).score_samples(e)
    np.testing.assert_allclose(got["D-LOF"], lof, rtol=2e-3)
    cos = 1 - (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (bank / np.linalg.norm(bank, axis=1, keepdims=True)).T
    np.testing.assert_allclose(got["D-cos"], cos.min(1), atol=1e-5)


def test_every_score_and_its_aggregates(fitted, synth):
    _, bundle, _ = synth
    model = fitted
    x = torch.stack([bundle.train[i]["x"] for i in range(3)])
    with torch.no_grad():
        s = model.clip_scores(x)
        assert set(s) == set(SCORE_NAMES) and len(SCORE_NAMES) == 28
        assert all(v.shape == (3,) and torch.isfinite(v).all() for v in s.values())
        # Training clips are in the bank: distance 0 to themselves.
        assert torch.allclose(s["D-KNN"], torch.zeros(3), atol=1e-2 * float(model.bank.norm(dim=1).mean()))
        assert torch.allclose(s["D-cos"], torch.zeros(3), atol=1e-5)
        n_win = model.window_index.shape[0]
        for space in ("x", "z"):
            for dist in ("L1", "L2", "cos"):
                key = f"G-{space}-{dist}"
                torch.testing.assert_close(s[f"{key}-sum"], s[f"{key}-mean"] * n_win)
                assert bool((s[f"{key}-min"] <= s[f"{key}-mean"] + 1e-7).all())
                assert bool((s[f"{key}-mean"] <= s[f"{key}-max"] + 1e-7).all())
        w = model.windows(model.features(x))
        mse = (w - model.generator(w)).pow(2).flatten(1).mean(1).view(3, -1)
        torch.testing.assert_close(s["G-x-L2-mean"], mse.mean(1))
        model.config.score = "G-z-cos-max"
        torch.testing.assert_close(model.score(x), s["G-z-cos-max"])
        model.config.score = "D-maha"


@pytest.fixture(scope="module")
def report(fitted, synth, tmp_path_factory):
    _, bundle, _ = synth
    out = tmp_path_factory.mktemp("eval")
    fitted.threshold.fill_(0.0)
    try:
        return fitted.evaluate(DataLoader(bundle.test, batch_size=4), out_dir=out), out
    finally:
        fitted.threshold.fill_(float("nan"))


def test_evaluate_reports_every_score_and_the_chosen_one(report):
    report, out = report
    rows = {r["score"]: r for r in report["table"]}
    assert list(rows) == list(SCORE_NAMES) and report["score_name"] == "D-maha"
    assert rows["D-maha"]["chosen"] == "*" and sum(r["chosen"] == "*" for r in rows.values()) == 1
    assert report["auc"] == rows["D-maha"]["auc"] and 0 <= report["auc"] <= 1
    assert all(0 <= r["auc"] <= 1 and "official_score" in r for r in rows.values())
    assert report["groups"][0]["machine"] == "fan" and "official_score" in report and "f1" in report
    assert (out / "roc.png").is_file()


def test_evaluate_before_fit_normal_has_g_scores_only(synth):
    _, bundle, cfg = synth
    model = AEGANAD(cfg).eval()
    some = [0, 1, len(bundle.test) - 2, len(bundle.test) - 1]  # normal and anomalous clips
    report = model.evaluate(DataLoader(Subset(bundle.test, some), batch_size=4))
    assert [r["score"] for r in report["table"]] == list(G_SCORES)
    assert np.isnan(report["auc"]) and "fit_normal" in report["note"]
    with pytest.raises(RuntimeError, match="fit_normal"):
        model.score(bundle.test[0]["x"][None])


# --- calibration -----------------------------------------------------------------------
def test_choose_score_by_auc_or_keep_the_default():
    a = np.array([0, 0, 0, 1, 1, 1, -1])
    scores = {"D-maha": np.array([3, 2, 1, 4, 5, 0, 9.0]), "G-x-L2-mean": np.array([1, 2, 3, 4, 5, 6, 0.0]),
              "D-KNN": np.array([1, 2, 3, 4, 5, 6, 0.0])}
    chosen = choose_score(scores, a, "D-maha")
    assert chosen["score"] == "G-x-L2-mean" and chosen["val_auc"] == 1.0  # the tie goes to the earlier name
    kept = choose_score(scores, np.zeros(7, dtype=int), "D-maha")
    assert kept["score"] == "D-maha" and "no anomalous" in kept["selected_by"]


def test_calibrate_uses_validation_auc_only_when_it_has_anomalies(fitted, synth, report):
    _, bundle, _ = synth
    model = fitted
    normal = [i for i in range(len(bundle.test)) if bundle.test[i]["anomaly"] == 0]
    kept = model.calibrate(DataLoader(Subset(bundle.test, normal[:2]), batch_size=4))
    assert kept["score"] == "D-maha" == model.config.score and "no anomalous" in kept["selected_by"]
    chosen = model.calibrate(DataLoader(bundle.test, batch_size=4))
    aucs = {r["score"]: r["auc"] for r in report[0]["table"]}  # evaluate's AUCs on the same clips
    assert chosen["score"] == model.config.score and chosen["val_auc"] == pytest.approx(max(aucs.values()))
    assert aucs[chosen["score"]] == pytest.approx(max(aucs.values()))
    model.config.score = "D-maha"


# --- checkpoints and export -----------------------------------------------------------
def test_checkpoint_carries_scaling_statistics_and_the_chosen_score(fitted, synth, tmp_path):
    _, bundle, _ = synth
    model = fitted
    model.config.score = "D-LOF"
    try:
        path = save_checkpoint(tmp_path / "model.pt", make_checkpoint(model))
        clone, _ = load_model(path)  # torch.load(weights_only=True)
    finally:
        model.config.score = "D-maha"
    assert clone.config.score == "D-LOF" and clone.bank.shape == model.bank.shape
    assert float(clone.input_max) == float(model.input_max)
    x = torch.stack([bundle.test[i]["x"] for i in range(3)])
    with torch.no_grad():
        want, got = model.clip_scores(x), clone.clip_scores(x)
    for name in SCORE_NAMES:
        torch.testing.assert_close(got[name], want[name], msg=name)


@pytest.mark.parametrize("score", ["D-LOF", "G-z-cos-max"])
def test_export_module_matches_eager_scores(fitted, synth, score):
    _, bundle, _ = synth
    model = fitted
    model.config.score = score
    try:
        exp = model.export_module().eval()
        x = torch.stack([bundle.test[i]["x"] for i in range(3)])
        with torch.no_grad():
            torch.testing.assert_close(exp(x), model.score(x), atol=1e-3, rtol=1e-3)  # conv STFT vs torch.stft
    finally:
        model.config.score = "D-maha"
    assert exp.output_names == ("score",) and model.example_input(2).shape == (2, model.n_samples)


def test_onnx_export_needs_no_stft_and_matches(fitted, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = fitted
    model.config.score = "D-LOF"  # the D path, LOF included, exports
    try:
        exp = model.export_module().eval()
    finally:
        model.config.score = "D-maha"
    path = tmp_path / "aegan.onnx"
    torch.onnx.export(exp, (model.example_input(2),), str(path), opset_version=17, input_names=["waveform"],
                      output_names=list(exp.output_names), dynamic_axes={"waveform": {0: "batch"}}, dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"STFT", "DFT"} and "Conv" in ops
    x = model.example_input(3) * torch.tensor([[1.0], [2.0], [0.5]])  # another batch size than traced
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"waveform": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, exp(x).numpy(), rtol=1e-3, atol=1e-3)


# --- configuration -------------------------------------------------------------------
def test_bad_configs_are_user_errors():
    for bad in ({"score": "D-lof"}, {"norm": "group"}, {"d_norm": "batch"}, {"n_mels": 64},
                {"window_hop": 0}, {"clip_seconds": 2.0}):
        with pytest.raises(UserError):
            AEGANAD(AEGANConfig(**{**TINY, "clip_seconds": 4.5, **bad}))


def test_mu_per_machine_is_applied_from_the_data(synth):
    _, bundle, _ = synth
    cfg = AEGANAD.config_for_data(AEGANConfig(**TINY, mu_per_machine={"fan": [0.5, 2.0], "pump": [9, 9]}), bundle)
    assert (cfg.mu_mean, cfg.mu_std) == (0.5, 2.0)
    with pytest.raises(UserError, match="mu1, mu2"):
        AEGANAD.config_for_data(AEGANConfig(**TINY, mu_per_machine={"fan": [1.0]}), bundle)


@pytest.mark.slow
def test_train_and_evaluate_verbs(synth, tmp_path):
    root, _, _ = synth
    tiny = [f"--set=model.{k}={v}" for k, v in TINY.items()]
    res = run_cli("edgediag.train", "--model", "aegan_ad", "--data", root, "--out", tmp_path, *tiny,
                  "--set=train.epochs=1", "--set=train.batch_size=4", "--set=data.val_fraction=0.25",
                  "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "G-z-cos-max" in res.stdout and (tmp_path / "model.pt").is_file()
    model, ckpt = load_model(tmp_path / "model.pt")
    assert "no anomalous" in ckpt["meta"]["calibration"]["selected_by"] and np.isfinite(float(model.threshold))
    assert model.bank.shape[0] == 6  # the training split less the validation quarter
    res = run_cli("edgediag.evaluate", "--checkpoint", tmp_path / "model.pt", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "D-LOF" in res.stdout and "official_score" in res.stdout
