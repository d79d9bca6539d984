"""TASTgram-MFN: features vs librosa, published size, losses, scores, checkpoints, export."""

from __future__ import annotations

import dataclasses
import io

import librosa
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from edgediag.data import DataConfig, build_data
from edgediag.data.synth_audio import generate_machine_sounds
from edgediag.errors import UserError
from edgediag.models.tastgram_mfn.model import (
    PUBLISHED_BOTTLENECKS,
    ArcMarginProduct,
    PReLU,
    TASTgramConfig,
    TASTgramMFN,
    change_rate,
    mixup_loss,
    random_roll,
    temporal_attention,
)
from edgediag.nn.features import LogMel

SR = 16000
# Small and short, so a test trains in seconds: 1 s clips, 32 mels, a narrow network
# (the published sizes are checked separately, without training).
TINY = dict(clip_seconds=1.0, n_fft=512, hop=256, n_mels=32, tgram_win=512, stem_channels=16,
            bottlenecks=[[2, 32, 1, 2], [2, 32, 1, 2], [2, 32, 1, 2]], head_channels=64, embedding_dim=32)

# The published TASTgramMFN (soonhyeon/NoisyArcMix model/net.py) for 41 classes, counted
# with sum(p.numel() for p in net.parameters()) on a module-for-module replica of it:
# 1,161,855. That includes MobileFaceNet.fc_out (Linear 128->41, 5,289 parameters), which
# the ArcFace model never calls; ours omits it.
PUBLISHED_PARAMS_41 = 1_161_855
PUBLISHED_UNUSED_FC_OUT_41 = 128 * 41 + 41


def machine_wave(seconds=1.0, f0=30.0, seed=0, batch=1):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    waves = []
    for _ in range(batch):
        y = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6)) / k for k in range(1, 12))
        waves.append(0.05 * y + 0.01 * rng.standard_normal(len(t)))
    return torch.tensor(np.stack(waves), dtype=torch.float32)


# --- features ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fft", "factored", "conv"])
def test_logmel_matches_librosa(method):
    """Every STFT path agrees with librosa to 1e-3 dB (measured: ~2e-5 dB)."""
    wave = machine_wave(2.0, seed=1)
    ref = librosa.feature.melspectrogram(y=wave[0].numpy(), sr=SR, n_fft=2048, hop_length=512, n_mels=128)
    ours = LogMel(SR, 2048, 512, 128, log="db")(wave, method)[0].numpy()
    assert ours.shape == ref.shape == (128, 1 + 32000 // 512)
    np.testing.assert_allclose(ours, 10 * np.log10(ref + np.finfo(float).eps), atol=1e-3)
    db = LogMel(SR, 2048, 512, 128, log="power_to_db", top_db=80)(wave, method)[0].numpy()
    np.testing.assert_allclose(db, librosa.power_to_db(ref, top_db=80), atol=1e-3)


@pytest.mark.parametrize("n_fft,hop,center,factored", [(512, 160, False, False), (512, 128, False, True),
                                                       (400, 100, True, True), (1024, 256, True, True),
                                                       (509, 100, True, False)])
def test_logmel_export_paths_on_other_sizes(n_fft, hop, center, factored):
    """The graph paths (factored where hop divides n_fft and n_fft is not prime, else the
    conv fallback) against librosa, with and without centring."""
    wave = machine_wave(0.5, seed=2)
    m = LogMel(SR, n_fft, hop, 40, center=center, log="none")
    ref = librosa.feature.melspectrogram(y=wave[0].numpy(), sr=SR, n_fft=n_fft, hop_length=hop, n_mels=40,
                                         center=center)
    assert m.factored is factored
    for method in ("factored", "conv"):
        out = m(wave, method)[0].numpy()
        assert out.shape == ref.shape and m.n_frames(8000) == ref.shape[1]
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-9 * ref.max())


def test_factored_dft_equals_the_dense_dft():
    """The two-factor matrices reproduce numpy's rfft of windowed frames (float32 tolerance)."""
    m = LogMel(SR, 2048, 512, 128)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 8192)).astype(np.float32))
    ours = m.spectrogram(x, "factored").numpy()
    frames = m.frames(x).double().numpy()
    ref = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    np.testing.assert_allclose(ours, ref.transpose(0, 2, 1), rtol=1e-4, atol=1e-4 * ref.max())


def test_feature_buffers_stay_out_of_checkpoints():
    assert LogMel().state_dict() == {}


# --- architecture --------------------------------------------------------------------
def test_parameter_count_matches_the_published_model():
    model = TASTgramMFN(TASTgramConfig(n_classes=41, clip_seconds=10.0, band_max=False))
    ours = sum(p.numel() for p in model.parameters())
    assert ours == PUBLISHED_PARAMS_41 - PUBLISHED_UNUSED_FC_OUT_41  # module for module
    assert abs(ours - PUBLISHED_PARAMS_41) / PUBLISHED_PARAMS_41 < 0.02
    assert model.backbone.linear7.conv.kernel_size == (8, 20)  # 128 mels x 313 frames
    assert model.tgram.conv_encoder[0][0].normalized_shape == (313,)
    assert TASTgramConfig().bottlenecks == PUBLISHED_BOTTLENECKS


def test_shapes_for_other_clip_lengths_and_stgram_ablation():
    for seconds, kernel in ((5.0, (8, 10)), (2.0, (8, 4))):
        m = TASTgramMFN(TASTgramConfig(n_classes=3, clip_seconds=seconds)).eval()
        assert m.backbone.linear7.conv.kernel_size == kernel
        cos, emb = m(machine_wave(seconds, batch=2))
        assert cos.shape == (2, 3) and emb.shape == (2, 128)
    st = TASTgramMFN(TASTgramConfig(n_classes=3, temporal_attention=False, **TINY))
    assert st.backbone.conv1.conv.in_channels == 2


def test_temporal_attention_weights_frames_by_their_energy():
    mel = torch.full((1, 4, 3), -50.0)
    mel[0, :, 1] = 5.0  # one loud frame
    out = temporal_attention(mel)
    assert torch.allclose(out[0, :, 1], torch.full((4,), 5.0 * torch.sigmoid(torch.tensor(10.0)).item()))
    assert torch.all(out[0, :, 0] == -50.0 * torch.sigmoid(torch.tensor(-100.0)))


@pytest.mark.parametrize("channels", [1, 6])
def test_prelu_exports_as_the_same_function(channels):
    """Traced (the exported graph), PReLU is relu(x) + a * min(x, 0): equal to nn.PReLU for
    slopes inside and outside [0, 1], one shared slope or one per channel."""
    prelu = PReLU(channels)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(-0.7, 1.8, channels))
    x = torch.randn(2, 6, 5, 3)
    with torch.no_grad():
        traced = torch.jit.trace(prelu, (x,))
        assert "aten::prelu" not in str(traced.graph) and "aten::relu" in str(traced.graph)
        torch.testing.assert_close(traced(x), F.prelu(x, prelu.weight), rtol=0, atol=0)
        torch.testing.assert_close(prelu(x), F.prelu(x, prelu.weight), rtol=0, atol=0)


# --- losses and scores -----------------------------------------------------------------
def test_class_scores_are_the_published_ce_for_every_class():
    torch.manual_seed(0)
    head = ArcMarginProduct(16, 5, scale=30.0, margin=0.7)
    cosine = head.cosine(torch.randn(7, 16))
    all_scores = head.class_scores(cosine)
    for c in range(5):
        y = torch.full((7,), c)
        expected = F.cross_entropy(head.logits(cosine, y), y, reduction="none")
        torch.testing.assert_close(all_scores[:, c], expected, atol=1e-4, rtol=1e-5)


def test_mixup_losses_follow_their_definitions():
    torch.manual_seed(0)
    head = ArcMarginProduct(16, 4)
    cosine = head.cosine(torch.randn(6, 16))
    y_a, y_b, lam = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 1, 3, 0, 2, 2]), 0.3
    ce = F.cross_entropy
    arcmix = lam * ce(head.logits(cosine, y_a), y_a) + (1 - lam) * ce(head.logits(cosine, y_b), y_b)
    noisy = lam * ce(head.logits(cosine, y_a), y_a) + (1 - lam) * ce(head.logits(cosine, y_a), y_b)
    torch.testing.assert_close(mixup_loss(head, cosine, y_a, y_b, lam, "arcmix"), arcmix)
    torch.testing.assert_close(mixup_loss(head, cosine, y_a, y_b, lam, "noisy_arcmix"), noisy)
    # The margin only ever lowers the target logit, so Noisy-ArcMix's y_b term (no margin
    # on y_b) is easier than ArcMix's: its loss is never larger.
    assert noisy <= arcmix
    # Without mixing partners all three losses are plain ArcFace.
    plain = ce(head.logits(cosine, y_a), y_a)
    for kind in ("arcface", "arcmix", "noisy_arcmix"):
        torch.testing.assert_close(mixup_loss(head, cosine, y_a, y_a, lam, kind), plain)


def test_change_rate():
    wave = torch.arange(8, dtype=torch.float32).unsqueeze(0)
    assert torch.equal(change_rate(wave, torch.tensor([1.0])), wave)
    assert change_rate(wave, torch.tensor([2.0])).tolist() == [[0, 2, 4, 6, 0, 2, 4, 6]]
    assert change_rate(wave, torch.tensor([0.5]))[0, :4].tolist() == [0, 0.5, 1, 1.5]


def test_random_roll_is_a_circular_shift():
    torch.manual_seed(0)
    wave = torch.arange(10, dtype=torch.float32).repeat(3, 1)
    rolled = random_roll(wave)
    for row in rolled:
        offset = int(row[0])
        assert row.tolist() == [(offset + i) % 10 for i in range(10)]


@pytest.mark.parametrize("loss", ["arcface", "arcmix", "noisy_arcmix"])
def test_training_step_backpropagates(loss):
    torch.manual_seed(0)
    model = TASTgramMFN(TASTgramConfig(n_classes=3, loss=loss, time_shift=loss == "arcmix", **TINY))
    out = model.training_step({"x": machine_wave(batch=4, seed=3), "y": torch.tensor([0, 1, 2, 0])})
    assert torch.isfinite(out["loss"]) and out["loss"] > 0 and 0 <= out["acc"] <= 1
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.tgram.conv_extractor.weight.grad.abs().sum() > 0  # the waveform branch learns too


def test_bad_config_and_labels_are_user_errors():
    with pytest.raises(UserError, match="loss"):
        TASTgramMFN(TASTgramConfig(loss="softmax", **TINY))
    with pytest.raises(UserError, match="score"):
        TASTgramMFN(TASTgramConfig(score="energy", **TINY))
    model = TASTgramMFN(TASTgramConfig(n_classes=2, **TINY))
    with pytest.raises(UserError, match="known class"):
        model.training_step({"x": machine_wave(batch=2), "y": torch.tensor([0, -1])})


# --- end to end on synthetic machine sounds ------------------------------------------------
@pytest.fixture(scope="module")
def synth_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("machines")
    generate_machine_sounds(root, n_train=16, n_test=16, seconds=1.0, seed=0)
    cfg = TASTgramConfig(**TINY)
    bundle = build_data("audio", DataConfig(root=str(root)), cfg)
    return bundle, TASTgramMFN.config_for_data(cfg, bundle)


def _train(model, dataset, steps=12, lr=3e-3, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
    losses = []
    model.train()
    while len(losses) < steps:
        for batch in loader:
            loss = model.training_step(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return losses


@pytest.fixture(scope="module")
def trained(synth_bundle):
    bundle, cfg = synth_bundle
    model = TASTgramMFN(dataclasses.replace(cfg, loss="arcface"))
    losses = _train(model, bundle.train, steps=20)
    model.eval()
    # Also recomputes BatchNorm statistics: after 20 steps the momentum averages still lag.
    model.fit_normal(DataLoader(bundle.train, batch_size=8))
    return model, losses


def test_precise_batchnorm_statistics(synth_bundle):
    bundle, cfg = synth_bundle
    model = TASTgramMFN(cfg).eval()
    seen = []
    hook = model.backbone.conv1.conv.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    model.recalibrate_batchnorm(DataLoader(bundle.train, batch_size=8))  # 16 clips: 2 equal batches
    hook.remove()
    conv1_out = torch.cat(seen)
    bn = model.backbone.conv1.bn
    torch.testing.assert_close(bn.running_mean, conv1_out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not model.training  # momentum and mode restored


def test_config_from_data(synth_bundle):
    bundle, cfg = synth_bundle
    assert cfg.n_classes == 4 and cfg.class_names == bundle.classes and cfg.clip_seconds == 1.0


def test_training_lowers_the_loss_and_learns_the_classes(trained, synth_bundle):
    model, losses = trained
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    bundle, _ = synth_bundle
    batch = next(iter(DataLoader(bundle.train, batch_size=16)))
    with torch.no_grad():
        cosine, _ = model(batch["x"])
    assert (cosine.argmax(1) == batch["y"]).float().mean() > 0.5  # chance: 0.25


def test_scores_knn_bank_and_evaluate(trained, synth_bundle, tmp_path):
    model, _ = trained
    bundle, _ = synth_bundle
    n_mels = model.config.n_mels
    assert model.knn_bank.shape == (16, 32 + n_mels)  # unit embedding + standardised band maxima
    train_batch = next(iter(DataLoader(bundle.train, batch_size=4)))
    x, y = train_batch["x"], train_batch["y"]
    model.config.score = "ce"
    with torch.no_grad():
        own = model.score(x, y)
        best = model.score(x)
        assert torch.all(best <= own + 1e-5)  # the best class's score is a lower bound
        model.config.score = "knn"
        # Training clips are in the bank: they skip themselves (leave-one-out distance).
        loo = model.score(x)
        mel = model.logmel(x)
        band = (mel.amax(-1) - model.band_mean) / model.band_std * (model.config.knn_band_weight / n_mels ** 0.5)
        feats = torch.cat([F.normalize(model.embed(x)), band], dim=1)
        dist = torch.cdist(feats, model.knn_bank)
        dist[dist < 1e-3] = float("inf")
        torch.testing.assert_close(loo, dist.min(dim=1).values, rtol=1e-4, atol=1e-4)
        assert torch.all(loo > 1e-2)
    model.config.score = "ce"
    model.threshold.fill_(float(best.max()))
    report = model.evaluate(DataLoader(bundle.test, batch_size=8), out_dir=tmp_path)
    for key in ("auc", "pauc", "official_score", "auc_source", "auc_target", "auc_knn", "f1", "table"):
        assert key in report, key
    assert report["score_mode"] == "ce" and 0 <= report["auc"] <= 1
    assert report["table"][0]["machine"] == "fan" and report["n_items"] == 16
    assert (tmp_path / "roc.png").is_file()
    model.config.score = "auto"


def test_auto_scores_by_knn_when_classes_have_few_clips(synth_bundle):
    """A classifier fitted on a few clips per class memorises them (valve: 6 per class): auto
    then takes the kNN score; with enough clips per class, or unknown counts, the CE score."""
    _, cfg = synth_bundle
    for clips, mode in ((6, "knn"), (49, "knn"), (50, "ce"), (0, "ce")):
        model = TASTgramMFN(dataclasses.replace(cfg, clips_per_class=clips))
        assert model.score_mode == mode, clips


def test_a_checkpoint_from_before_the_band_part_keeps_its_cosine_knn(trained, synth_bundle):
    """Old banks hold the unit embeddings alone and no band statistics: they load and keep
    scoring with the cosine distance their thresholds were calibrated on."""
    model, _ = trained
    bundle, cfg = synth_bundle
    state = {k: v for k, v in model.state_dict().items() if k not in ("band_mean", "band_std")}
    x = torch.stack([bundle.test[i]["x"] for i in range(4)])
    with torch.no_grad():
        state["knn_bank"] = F.normalize(model.embed(torch.stack([bundle.train[i]["x"] for i in range(16)])))
        old = TASTgramMFN(dataclasses.replace(cfg, score="knn"))
        old.load_state_dict(state)
        old.eval()
        dist = 1 - F.normalize(old.embed(x)) @ state["knn_bank"].t()
        torch.testing.assert_close(old.score(x), dist.min(dim=1).values)


def test_checkpoint_round_trip_carries_the_bank(trained, synth_bundle):
    model, _ = trained
    bundle, cfg = synth_bundle
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    clone = TASTgramMFN(cfg)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    clone.eval()
    x = torch.stack([bundle.test[i]["x"] for i in range(4)])
    assert torch.equal(clone.knn_bank, model.knn_bank)
    for mode in ("ce", "knn"):
        model.config.score = clone.config.score = mode
        with torch.no_grad():
            torch.testing.assert_close(clone.score(x), model.score(x))
    model.config.score = clone.config.score = "auto"


def test_one_normal_class_trains_on_pseudo_rates_and_scores_by_knn(synth_bundle):
    bundle, cfg = synth_bundle
    model = TASTgramMFN(dataclasses.replace(cfg, n_classes=1, class_names=["fan"]))
    assert model.score_mode == "knn" and model.arcface.weight.shape[0] == len(cfg.pseudo_rates)
    losses = _train(model, bundle.train, steps=4)
    assert all(np.isfinite(losses)) and losses[0] > 0
    model.eval()
    with pytest.raises(RuntimeError, match="fit_normal"):
        model.score(bundle.train[0]["x"][None])
    model.fit_normal(DataLoader(bundle.train, batch_size=8))
    assert model.knn_bank.shape[0] == len(bundle.train)
    scores = model.score(torch.stack([bundle.test[i]["x"] for i in range(4)]))
    assert scores.shape == (4,) and torch.all(scores >= 0) and torch.isfinite(scores).all()


# --- export ----------------------------------------------------------------------------
def test_export_module_matches_eager_scores(trained, synth_bundle):
    model, _ = trained
    bundle, _ = synth_bundle
    x = torch.stack([bundle.test[i]["x"] for i in range(3)])
    exp = model.export_module().eval()
    with torch.no_grad():
        score, class_scores, emb = exp(x)
        torch.testing.assert_close(score, model.score(x), atol=1e-3, rtol=1e-4)  # conv STFT vs torch.stft
        torch.testing.assert_close(emb, model.embed(x), atol=1e-3, rtol=1e-3)
    assert class_scores.shape == (3, 4) and exp.output_names == ("score", "class_scores", "embedding")
    assert model.example_input(2).shape == (2, SR)


def test_onnx_export_needs_no_stft_and_matches(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, _ = trained
    exp = model.export_module().eval()
    x = model.example_input(2)
    path = tmp_path / "tastgram.onnx"
    torch.onnx.export(exp, (x,), str(path), opset_version=17, input_names=["waveform"],
                      output_names=list(exp.output_names), dynamic_axes={"waveform": {0: "batch"}}, dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"STFT", "DFT"} and "Conv" in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"waveform": x.numpy()})
    with torch.no_grad():
        want = exp(x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-3, atol=1e-3)


def test_band_max_branch_trains_and_exports(tmp_path):
    """The band-maximum branch (on by default, not in the paper): its gradient flows, pruning keeps its widths fixed,
    and the exported graph matches eager."""
    ort = pytest.importorskip("onnxruntime")
    model = TASTgramMFN(TASTgramConfig(n_classes=3, band_max=True, **TINY))
    x = model.example_input(4)
    out = model.training_step({"x": x, "y": torch.tensor([0, 1, 2, 0])})
    out["loss"].backward()
    assert model.band_proj.weight.grad.abs().sum() > 0
    assert model.band_proj in model.pruning_fixed_layers() and model.band_norm in model.pruning_fixed_layers()
    model.eval()
    exp = model.export_module().eval()
    path = tmp_path / "band.onnx"
    torch.onnx.export(exp, (x,), str(path), opset_version=17, input_names=["waveform"],
                      output_names=list(exp.output_names), dynamo=False)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"waveform": x.numpy()})
    with torch.no_grad():
        want = exp(x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-3, atol=1e-3)
