"""edgediag.runtime: one predictor over checkpoints (.pt) and ONNX graphs (.onnx), with the
threshold and pre-processing from the artifact's metadata; streaming graphs stepped with
carried states. The models here are small test models fitted on synthetic machine sounds
(edgediag.data.synth_audio), exported with the real export verb."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgediag import cli, export, runtime
from edgediag.data.synth_audio import machine_clip
from edgediag.engine.checkpoint import make_checkpoint, save_checkpoint
from edgediag.models import DiagnosisModel, register_model
from edgediag.nn.features import LogMel

SR = 16000
FAST = ["--latency-runs", "2", "--parity-items", "4", "--threads", "1"]


# --- a fitted audio model: log-mel band energies, z-scored against normal clips ----------------
@dataclasses.dataclass
class BandConfig:
    sample_rate: int = SR
    clip_seconds: float = 0.5
    n_fft: int = 512
    hop: int = 256
    n_mels: int = 32


@register_model("test_runtime_bands")
class BandEnergyModel(DiagnosisModel):
    """Score = mean squared z-score of the clip's mean log-mel bands against normal clips."""

    Config = BandConfig
    data_kind = "audio"

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.n_samples = int(round(c.clip_seconds * c.sample_rate))
        self.logmel = LogMel(c.sample_rate, c.n_fft, c.hop, c.n_mels, log="db")
        self.register_buffer("band_mean", torch.zeros(c.n_mels))
        self.register_buffer("band_std", torch.ones(c.n_mels))

    def bands(self, x):
        return self.logmel(x).mean(-1)  # traced: the factored DFT, no STFT op

    def fit(self, waves: torch.Tensor) -> None:
        b = self.bands(waves)
        self.band_mean.copy_(b.mean(0))
        self.band_std.copy_(b.std(0) + 1e-3)

    def score(self, x):
        return ((self.bands(x) - self.band_mean) / self.band_std).pow(2).mean(1)

    def example_input(self, batch_size=1):
        return torch.randn(batch_size, self.n_samples, generator=torch.Generator().manual_seed(batch_size)) * 0.1

    def input_spec(self):
        spec = super().input_spec()
        spec.update(sample_rate=self.config.sample_rate)
        return spec


def clips(n: int, seconds: float, anomaly: str | None = None, seed: int = 0) -> np.ndarray:
    """``n`` synthetic machine clips (source domain, 30 Hz shaft), float32 at SR."""
    return np.stack([machine_clip(np.random.default_rng([seed, i]), SR, int(seconds * SR), 30.0, "source", anomaly)
                     for i in range(n)]).astype(np.float32)


def fitted_band_model() -> BandEnergyModel:
    torch.manual_seed(0)
    model = BandEnergyModel(BandConfig()).eval()
    with torch.no_grad():
        model.fit(torch.from_numpy(clips(24, 0.5, seed=1)))
        # threshold well above every held-out normal window (a monitor must not chatter on normal sound)
        normal = model.score(torch.from_numpy(clips(16, 0.5, seed=2)))
        model.threshold.fill_(float(normal.max()) * 1.5)
    return model


def run_export(*args) -> int:
    return cli.run(export.main, [str(a) for a in args])


def build_band_artifacts(root: Path) -> dict[str, Path]:
    """model.pt and its ONNX export (the real export verb, parity-checked)."""
    model = fitted_band_model()
    ckpt = root / "model.pt"
    save_checkpoint(ckpt, make_checkpoint(model, data={"kind": "audio", "classes": ["normal"],
                                                        "normal_classes": ["normal"]}))
    assert run_export("--checkpoint", ckpt, "--out", root / "onnx", *FAST) == 0
    return {"pt": ckpt, "onnx": root / "onnx" / "model.onnx", "root": root}


@pytest.fixture(scope="module")
def band_artifacts(tmp_path_factory) -> dict[str, Path]:
    return build_band_artifacts(tmp_path_factory.mktemp("bands"))


# --- a streaming model: an exponential moving average of sensor rows, state carried ------------
@dataclasses.dataclass
class EmaConfig:
    n_features: int = 3
    seq_len: int = 8
    decay: float = 0.8


class EmaStep(nn.Module):
    input_names = ("x_t", "ema")
    output_names = ("score", "ema_out")

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_t, ema):
        new = self.model.config.decay * ema + (1 - self.model.config.decay) * x_t
        return new.pow(2).mean(1), new

    def example_inputs(self, batch_size=1):
        return torch.zeros(batch_size, self.model.config.n_features), torch.zeros(batch_size, self.model.config.n_features)


@register_model("test_runtime_ema")
class EmaModel(DiagnosisModel):
    """Sensor rows (T, F) -> squared EMA of the rows; a causal model with a streaming form."""

    Config = EmaConfig
    data_kind = "sequence"

    def score(self, x):
        ema = torch.zeros(x.shape[0], x.shape[2])
        for t in range(x.shape[1]):  # fixed T: unrolled at export
            ema = self.config.decay * ema + (1 - self.config.decay) * x[:, t]
        return ema.pow(2).mean(1)

    def example_input(self, batch_size=1):
        return torch.randn(batch_size, self.config.seq_len, self.config.n_features,
                           generator=torch.Generator().manual_seed(batch_size))

    def streaming_module(self):
        return EmaStep(self)


def build_ema_artifacts(root: Path) -> dict[str, Path]:
    """model.pt of the EMA model and its streaming ONNX export."""
    model = EmaModel(EmaConfig()).eval()
    model.threshold.fill_(1.0)
    ckpt = root / "model.pt"
    save_checkpoint(ckpt, make_checkpoint(model, data={"kind": "sequence", "classes": ["normal"],
                                                        "normal_classes": ["normal"]}))
    assert run_export("--checkpoint", ckpt, "--streaming", "--stream-steps", "12", "--out", root / "stream", *FAST) == 0
    return {"pt": ckpt, "onnx": root / "stream" / "model.onnx"}


@pytest.fixture(scope="module")
def ema_artifacts(tmp_path_factory) -> dict[str, Path]:
    return build_ema_artifacts(tmp_path_factory.mktemp("ema"))


# --- tests -------------------------------------------------------------------------------------
def test_pt_and_onnx_agree_and_decide_alike(band_artifacts):
    pt, ox = runtime.load(band_artifacts["pt"], threads=1), runtime.load(band_artifacts["onnx"], threads=1)
    assert (pt.backend, ox.backend) == ("pytorch", "onnxruntime")
    assert pt.threshold == pytest.approx(ox.threshold) and np.isfinite(ox.threshold)
    assert ox.input_spec["sample_rate"] == SR and ox.input_spec["shape"] == [SR // 2]
    assert ox.batch == 1  # a static-batch graph: batches are chunked to it
    x = np.concatenate([clips(3, 0.5, seed=5), clips(3, 0.5, "rub", seed=6)])
    items = np.stack([ox.prepare(w) for w in x])
    s_pt, s_ox = pt.score(items), ox.score(torch.from_numpy(items))
    assert s_ox.shape == (6,)
    np.testing.assert_allclose(s_ox, s_pt, rtol=1e-4, atol=1e-4 * float(np.abs(s_pt).max()))
    assert (pt.is_anomalous(s_pt) == ox.is_anomalous(s_ox)).all()
    assert not ox.is_anomalous(s_ox[:3]).any() and ox.is_anomalous(s_ox[3:]).all()
    assert list(ox.outputs(items)) == ["score"]


def test_prepare_pads_and_crops_like_the_reader(band_artifacts):
    pred = runtime.load(band_artifacts["onnx"])
    short = np.arange(100, dtype=np.float32)
    padded = pred.prepare(short)
    assert padded.shape == (SR // 2,) and padded[100] == 0.0 and padded[250] == 50.0  # wrap = repeat
    assert pred.prepare(np.ones(SR, np.float32)).shape == (SR // 2,)


def test_streaming_graph_steps_with_carried_state(ema_artifacts):
    ox = runtime.load(ema_artifacts["onnx"])
    pt = runtime.load(ema_artifacts["pt"], streaming=True)
    assert ox.streaming and pt.streaming
    assert ox.stream_info["state_inputs"] == ["ema"]
    xs = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    s_ox, s_pt = ox.initial_states(1), pt.initial_states(1)
    assert [s.shape for s in s_ox] == [(1, 3)]
    ema = np.zeros(3)
    for x in xs:
        out_ox, s_ox = ox.step(x[None], s_ox)
        out_pt, s_pt = pt.step(x[None], s_pt)
        ema = 0.8 * ema + 0.2 * x
        assert out_ox["score"][0] == pytest.approx(np.mean(ema ** 2), rel=1e-5)
        assert out_pt["score"][0] == pytest.approx(out_ox["score"][0], rel=1e-5)
    with pytest.raises(cli.UserError, match="streaming graph"):
        ox.score(xs[None])


@pytest.mark.parametrize("name, content, message", [
    ("missing.onnx", None, "artifact not found"),
    ("model.bin", b"x", "unknown artifact type"),
    ("broken.onnx", b"not a graph", "not a loadable ONNX graph"),
    ("model.engine", b"x", "no model.onnx beside the engine"),
])
def test_bad_artifacts_are_one_line_user_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(cli.UserError, match=message):
        runtime.load(path)


def test_graph_without_edgediag_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.onnx"
    torch.onnx.export(nn.Linear(4, 1), (torch.zeros(1, 4),), str(path), dynamo=False)
    with pytest.raises(cli.UserError, match="no edgediag metadata"):
        runtime.load(path)


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where any ``import torch`` fails (a board with only
    the runtime extra); it must exit 0."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['torch'] = None\n" + code],
                         capture_output=True, text=True, cwd=root,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_runtime_imports_without_torch_for_onnx(band_artifacts):
    """A board with only the runtime extra: loading and scoring an ONNX graph never imports torch."""
    out = run_without_torch("import numpy as np\n"
                            "from edgediag import runtime\n"
                            f"p = runtime.load({str(band_artifacts['onnx'])!r}, threads=1)\n"
                            "x = p.prepare(np.zeros(100, np.float32))\n"
                            "print(p.score(x[None]).shape, p.threshold > 0)\n")
    assert out.stdout.strip() == "(1,) True"


def test_engine_runner_needs_tensorrt_not_torch(band_artifacts, tmp_path):
    """.engine artifacts go through edgediag.deploy.trt_engine (torch-free): where tensorrt is missing
    the one-line error names it, even with torch unimportable."""
    pytest.importorskip("onnx")
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    shutil.copy(band_artifacts["onnx"], tmp_path / "model.onnx")
    (tmp_path / "model.engine").write_bytes(b"serialized engine")
    out = run_without_torch("from edgediag import cli, runtime\n"
                            "try:\n"
                            f"    runtime.load({str(tmp_path / 'model.engine')!r})\n"
                            "except cli.UserError as exc:\n"
                            "    print(exc)\n")
    assert "tensorrt is not installed" in out.stdout and "torch" not in out.stdout, out.stdout


def test_metadata_contract_parsed(band_artifacts):
    pred = runtime.load(band_artifacts["onnx"])
    meta = pred.metadata
    assert meta["model_name"] == "test_runtime_bands" and isinstance(meta["model_config"], dict)
    assert meta["input_spec"]["score_output"] == "score" and meta["normal_classes"] == ["normal"]
    assert json.loads(json.dumps(meta["export"]))["opset"] == 17


def test_predict_on_a_test_only_dcase_folder_writes_the_submission_files(band_artifacts, tmp_path):
    """A DCASE folder with only test clips (the shared valve test half) is scored with the
    threshold the artifact carries: predictions.csv with a row per clip, both DCASE files in
    the official format, and the same decisions from the checkpoint and its ONNX graph."""
    from edgediag import predict
    from tests.conftest import shared_data

    valve = shared_data("dcase2023_valve") / "valve" / "test"
    (tmp_path / "data" / "valve").mkdir(parents=True)
    (tmp_path / "data" / "valve" / "test").symlink_to(valve.resolve())
    rows = {}
    for name in ("pt", "onnx"):
        out = tmp_path / name
        assert cli.run(predict.main, ["--checkpoint", str(band_artifacts[name]), "--data", str(tmp_path / "data"),
                                      "--out", str(out), "--threads", "1"]) == 0
        with open(out / "predictions.csv") as fh:
            rows[name] = list(csv.DictReader(fh))
        assert len(rows[name]) == 70
        assert {r["section"] for r in rows[name]} == {"section_00"} and {r["machine"] for r in rows[name]} == {"valve"}
        for kind in ("anomaly_score", "decision_result"):
            lines = (out / f"{kind}_valve_section_00_test.csv").read_text().splitlines()
            assert len(lines) == 70 and all(line.startswith("section_00_") and line.count(",") == 1 for line in lines)
        decisions = dict(line.split(",") for line in (out / "decision_result_valve_section_00_test.csv").read_text().split())
        assert set(decisions.values()) <= {"0", "1"}
    assert [r["decision"] for r in rows["pt"]] == [r["decision"] for r in rows["onnx"]]
    assert sum(r["true_anomaly"] == "1" for r in rows["pt"]) == 50


def test_predict_applies_the_thresholds_per_domain_the_artifact_carries(tmp_path):
    """A checkpoint calibrated per section × domain: predict on the .pt and on its ONNX export
    decides each clip at its own domain's threshold (here: source flags all, target none)."""
    from edgediag import predict
    from tests.conftest import shared_data

    valve = shared_data("dcase2023_valve") / "valve" / "test"
    (tmp_path / "data" / "valve").mkdir(parents=True)
    (tmp_path / "data" / "valve" / "test").symlink_to(valve.resolve())
    model = fitted_band_model()
    calibration = {"target_far": 0.1, "method": "percentile", "source": "test", "n_normals": 20,
                   "groups": {"section_00/source": {"threshold": -1.0, "n_normals": 10},
                              "section_00/target": {"threshold": 1e9, "n_normals": 10}}}
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, make_checkpoint(model, data={"kind": "audio", "classes": ["normal"], "normal_classes": ["normal"]},
                                          meta={"threshold_calibration": calibration}))
    assert run_export("--checkpoint", ckpt, "--out", tmp_path / "onnx", *FAST) == 0
    for artifact in (ckpt, tmp_path / "onnx" / "model.onnx"):
        out = tmp_path / f"pred_{artifact.suffix[1:]}"
        assert cli.run(predict.main, ["--checkpoint", str(artifact), "--data", str(tmp_path / "data"),
                                      "--out", str(out), "--threads", "1"]) == 0
        with open(out / "predictions.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert {(r["domain"], r["decision"], float(r["threshold"])) for r in rows} == {("source", "1", -1.0),
                                                                                      ("target", "0", 1e9)}
        decided = dict(line.split(",") for line in (out / "decision_result_valve_section_00_test.csv").read_text().split())
        assert all(v == ("1" if "_source_" in f else "0") for f, v in decided.items())


# --- the sequence models' front end in numpy (the board's), against the training reader ------------------
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_numpy_mel_filters_are_librosas():
    import librosa

    from edgediag.runtime.features import mel_filters

    for sr, n_fft, n_mels in ((16000, 2048, 128), (48000, 512, 64), (8000, 256, 40)):
        want = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)
        np.testing.assert_allclose(mel_filters(sr, n_fft, n_mels), want, rtol=1e-5, atol=1e-8)


def _real_windows() -> list[tuple[str, np.ndarray, int]]:
    """(name, 1-D signal, sample rate): a fan recording and a CWRU bearing fault, or
    synthetic machine sound where the shared data is absent."""
    out = []
    fan = sorted((SHARED / "fan_sensiml").rglob("*.wav"))
    if fan:
        import soundfile as sf

        wave, sr = sf.read(str(fan[0]), dtype="float32", always_2d=True)
        out.append(("fan", wave[:, 0][:sr], sr))
    cwru = SHARED / "cwru_bearing" / "48k_Drive_End_IR007_0_109.mat"
    if cwru.is_file():
        import scipy.io

        mat = scipy.io.loadmat(str(cwru))
        key = next(k for k in mat if k.endswith("_DE_time"))
        out.append(("cwru", mat[key].reshape(-1)[:8192].astype(np.float32), 48000))
    out.append(("synthetic", clips(1, 1.0)[0], 16000))
    return out


@pytest.mark.parametrize("kind", ["logmel", "logspec", "frames"])
def test_numpy_sequence_front_end_matches_the_training_reader(kind):
    """What the board computes (numpy) equals what training computed (torch) on real signals:
    within 0.05 dB where the power is above the floor's neighbourhood."""
    from edgediag.data.sequences import Frontend
    from edgediag.runtime.features import SequenceFrontend

    for name, wave, sr in _real_windows():
        seq_len = 64
        hop = len(wave) // seq_len
        n_fft = 1 << int(np.ceil(np.log2(2 * hop)))
        params = {"seq_len": seq_len, "hop_length": hop}
        if kind != "frames":
            params.update(n_fft=min(n_fft, 2048), n_mels=64, sample_rate=sr)
        want = Frontend(kind, params)(wave)
        got = SequenceFrontend(kind, params)(wave)
        assert got.shape == want.shape and got.dtype == np.float32, name
        if kind == "frames":
            np.testing.assert_array_equal(got, want)
            continue
        loud = want > want.min() + 20  # float32 vs float64 rounding dominates only near the -100 dB floor
        assert loud.mean() > 0.3, name
        np.testing.assert_allclose(got[loud], want[loud], atol=0.05, err_msg=name)
        assert np.abs(got - want).max() < 1.0, name


def test_sequence_front_end_imports_no_torch():
    out = run_without_torch("import numpy as np\n"
                            "from edgediag.runtime.features import SequenceFrontend\n"
                            "f = SequenceFrontend('logmel', {'seq_len': 16, 'hop_length': 64, 'n_fft': 128,"
                            " 'n_mels': 16, 'sample_rate': 8000})\n"
                            "print(f(np.random.default_rng(0).normal(size=1024)).shape)\n")
    assert out.stdout.strip() == "(16, 16)"
