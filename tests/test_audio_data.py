"""Audio data: DCASE layouts, labelled folders, bad files, the synthetic generator."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from edgediag.data import DataConfig, build_data
from edgediag.data.audio import decode_clip, fix_length
from edgediag.data.synth_audio import generate_machine_sounds, machine_clip
from edgediag.errors import UserError
from tests.conftest import run_cli, shared_data

SR = 16000
MODEL = SimpleNamespace(sample_rate=SR, clip_seconds=0.0, pad_mode="wrap", train_normal_only=True)


def tone(seconds=1.0, sr=SR, freq=220.0, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = 0.2 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))
    return np.stack([y] * channels, axis=1).astype(np.float32) if channels > 1 else y.astype(np.float32)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_machine_sounds(root, n_train=12, n_test=8, seconds=1.0, seed=3)
    return root


def test_generator_writes_the_dcase2023_layout(synth):
    train = sorted(p.name for p in (synth / "fan" / "train").glob("*.wav"))
    test = sorted(p.name for p in (synth / "fan" / "test").glob("*.wav"))
    assert len(train) == 12 and len(test) == 8
    assert all(n.startswith("section_00_") and "_train_normal_" in n for n in train)
    attrs = Counter(n.split("_", 6)[-1].rsplit(".", 1)[0] for n in train)
    assert len(attrs) == 4  # two operating conditions per domain
    assert sum("anomaly" in n for n in test) == 4 and sum("_target_" in n for n in test) == 4
    info = sf.info(str(synth / "fan" / "train" / train[0]))
    assert info.samplerate == SR and info.frames == SR and info.subtype == "PCM_16"


def test_generator_is_deterministic_and_not_white_noise(tmp_path):
    a = generate_machine_sounds(tmp_path / "a", n_train=4, n_test=4, seconds=0.5, seed=7)
    b = generate_machine_sounds(tmp_path / "b", n_train=4, n_test=4, seconds=0.5, seed=7)
    c = generate_machine_sounds(tmp_path / "c", n_train=4, n_test=4, seconds=0.5, seed=8)
    name = sorted((a / "train").glob("*.wav"))[0].name
    ya, yb, yc = (sf.read(str(d / "train" / name))[0] for d in (a, b, c))
    assert np.array_equal(ya, yb) and not np.array_equal(ya, yc)
    # Harmonic machine sound: the spectrum is far from flat (spectral flatness << 1).
    spec = np.abs(np.fft.rfft(ya)) ** 2 + 1e-12
    flatness = np.exp(np.mean(np.log(spec))) / np.mean(spec)
    assert flatness < 0.2


def test_anomalies_change_the_sound():
    n = SR
    normal = machine_clip(np.random.default_rng(0), SR, n, 25.0, "source")
    for kind in ("bearing", "imbalance", "rub", "chatter"):
        bad = machine_clip(np.random.default_rng(0), SR, n, 25.0, "source", kind)
        assert np.isfinite(bad).all() and np.abs(bad).max() <= 1.0
        assert np.abs(bad - normal).mean() > 0.1 * np.abs(normal).mean(), kind
    with pytest.raises(ValueError):
        machine_clip(np.random.default_rng(0), SR, n, 25.0, "source", "explosion")


def test_dcase_folder_classes_domains_and_items(synth):
    bundle = build_data("audio", DataConfig(root=str(synth)), MODEL)
    # One section with 4 attribute values in training: one class per attribute.
    assert bundle.classes == ["fan_speed_25", "fan_speed_30", "fan_speed_36", "fan_speed_42"]
    assert len(bundle.train) == 12 and len(bundle.test) == 8 and bundle.val is None
    assert bundle.info["clip_seconds"] == 1.0 and bundle.info["domains"] == ["source", "target"]
    assert bundle.info["sections"] == {"fan": ["section_00"]}
    item = bundle.test[0]
    assert set(item) >= {"x", "y", "anomaly", "domain", "key", "machine", "section", "label"}
    assert item["x"].shape == (SR,) and item["x"].dtype.is_floating_point
    assert item["key"].startswith("fan/test/") and item["machine"] == "fan" and item["section"] == "section_00"
    assert all(bundle.train[i]["anomaly"] == 0 for i in range(len(bundle.train)))
    assert Counter(bundle.test[i]["anomaly"] for i in range(len(bundle.test))) == {0: 4, 1: 4}
    assert all(0 <= bundle.test[i]["y"] < 4 for i in range(len(bundle.test)))


def test_root_that_is_a_machine_folder_and_val_split(synth):
    bundle = build_data("audio", DataConfig(root=str(synth / "fan"), val_fraction=0.25), MODEL)
    assert len(bundle.train) + len(bundle.val) == 12 and len(bundle.val) >= 3
    keys = {bundle.train[i]["key"] for i in range(len(bundle.train))}
    assert keys.isdisjoint(bundle.val[i]["key"] for i in range(len(bundle.val)))


def test_val_from_test_is_a_labelled_held_out_split(synth):
    """data.val_from_test: half of every (normal/anomalous, domain) test group becomes
    a validation split with both kinds of clips; the test split keeps the rest, disjoint."""
    full = build_data("audio", DataConfig(root=str(synth / "fan")), MODEL)
    bundle = build_data("audio", DataConfig(root=str(synth / "fan"), val_from_test=0.5), MODEL)
    val = [bundle.val[i] for i in range(len(bundle.val))]
    test = [bundle.test[i] for i in range(len(bundle.test))]
    assert len(val) + len(test) == len(full.test) and len(bundle.train) == len(full.train)
    assert {v["anomaly"] for v in val} == {0, 1} and {v["domain"] for v in val} == {"source", "target"}
    assert {v["key"] for v in val}.isdisjoint(t["key"] for t in test) and {t["anomaly"] for t in test} == {0, 1}
    with pytest.raises(UserError, match="val_from_test"):
        build_data("audio", DataConfig(root=str(synth / "fan"), val_from_test=1.0), MODEL)


def _write(path: Path, y, sr=SR, subtype="PCM_16"):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), y, sr, subtype=subtype)


def test_dcase2020_names_multi_machine_root_resampling_and_mono(tmp_path):
    for machine in ("pump", "slider"):
        for i, mid in enumerate(("id_00", "id_02")):
            for k in range(2):
                # 2 channels at 22.05 kHz: mixed down and resampled to 16 kHz.
                _write(tmp_path / machine / "train" / f"normal_{mid}_{k:08d}.wav",
                       tone(0.5, 22050, 200 + 50 * i, channels=2, seed=k), sr=22050)
            _write(tmp_path / machine / "test" / f"anomaly_{mid}_{0:08d}.wav", tone(0.5, seed=9))
    bundle = build_data("audio", DataConfig(root=str(tmp_path)), MODEL)
    assert bundle.classes == ["pump_id_00", "pump_id_02", "slider_id_00", "slider_id_02"]
    assert bundle.info["machines"] == ["pump", "slider"]
    assert bundle.train[0]["x"].shape == (8000,)
    assert {bundle.test[i]["domain"] for i in range(len(bundle.test))} == {""}


def test_fixed_length_crop_and_pad():
    y = np.arange(5, dtype=np.float32)
    assert fix_length(y, 3).tolist() == [0, 1, 2]
    assert fix_length(y, 7, "wrap").tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert fix_length(y, 7, "zeros").tolist() == [0, 1, 2, 3, 4, 0, 0]
    with pytest.raises(UserError):
        fix_length(y, 7, "mirror")


def _bad_files(folder: Path) -> dict[str, str]:
    """name -> the words the error must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    good = (folder / "good.wav")
    _write(good, tone(1.0))
    (folder / "empty.wav").write_bytes(b"")
    (folder / "junk.wav").write_bytes(b"this is not audio at all" * 20)
    _write(folder / "silent.wav", np.zeros(SR, dtype=np.float32))
    _write(folder / "nan.wav", np.full(SR, np.nan, dtype=np.float32), subtype="FLOAT")
    data = good.read_bytes()
    (folder / "truncated.wav").write_bytes(data[: len(data) // 2])
    header_only = bytearray(data[:44])
    (folder / "header_only.wav").write_bytes(bytes(header_only))
    return {"empty.wav": "readable", "junk.wav": "readable", "silent.wav": "silent", "nan.wav": "NaN",
            "truncated.wav": "truncated", "header_only.wav": "truncated"}


def test_decode_clip_names_each_problem(tmp_path):
    from edgediag.data.audio import BadAudio

    expected = _bad_files(tmp_path)
    assert decode_clip(tmp_path / "good.wav", SR, SR).shape == (SR,)
    for name, words in expected.items():
        with pytest.raises(BadAudio, match=words):
            decode_clip(tmp_path / name, SR, SR)


def test_bad_files_in_a_labelled_folder_error_or_skip(tmp_path, caplog):
    expected = _bad_files(tmp_path / "clips")
    rows = [("clips/good.wav", "ON", "train")] + [(f"clips/{n}", "ON", "train") for n in expected]
    rows += [("clips/good.wav", "ON", "test")]
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "split"), *rows])
    cfg = DataConfig(root=str(tmp_path), normal_labels=["ON"])
    with pytest.raises(UserError, match=r"clips/(empty|junk|silent|nan|truncated|header_only)\.wav"):
        build_data("audio", cfg, MODEL)
    cfg.on_bad_file = "skip"
    with caplog.at_level(logging.WARNING):
        bundle = build_data("audio", cfg, MODEL)
    assert len(bundle.train) == 1 and bundle.info["n_skipped"] == len(expected)
    assert "skipped 6 bad audio file" in caplog.text


def test_labelled_folder_errors_are_one_clear_line(tmp_path):
    (tmp_path / "labels.csv").write_text("file,state\na.wav,ON\n")
    with pytest.raises(UserError, match="path,label"):
        build_data("audio", DataConfig(root=str(tmp_path), normal_labels=["ON"]), MODEL)
    _write(tmp_path / "a.wav", tone(0.5))
    (tmp_path / "labels.csv").write_text("path,label,split\na.wav,ON,train\na.wav,ON,later\n")
    with pytest.raises(UserError, match="split must be"):
        build_data("audio", DataConfig(root=str(tmp_path), normal_labels=["ON"]), MODEL)
    (tmp_path / "labels.csv").write_text("path,label,split\na.wav,ON,train\nmissing.wav,ON,test\n")
    with pytest.raises(UserError, match="missing.wav: not found"):
        build_data("audio", DataConfig(root=str(tmp_path), normal_labels=["ON"]), MODEL)
    with pytest.raises(UserError, match="normal_labels"):
        build_data("audio", DataConfig(root=str(tmp_path)), MODEL)
    with pytest.raises(UserError, match=r"\['RUNNING'\] not among"):
        build_data("audio", DataConfig(root=str(tmp_path), normal_labels=["RUNNING"]), MODEL)


def test_not_an_audio_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="no audio found"):
        build_data("audio", DataConfig(root=str(tmp_path)), MODEL)
    (tmp_path / "fan" / "train").mkdir(parents=True)
    _write(tmp_path / "fan" / "train" / "recording_1.wav", tone(0.5))
    with pytest.raises(UserError, match="not DCASE names"):
        build_data("audio", DataConfig(root=str(tmp_path)), MODEL)


def test_labelled_folder_without_split_is_split_stratified(tmp_path):
    rows = []
    for label, n in (("ON", 12), ("TAPPING", 8)):
        for i in range(n):
            _write(tmp_path / f"{label}_{i}.wav", tone(0.25, freq=300 if label == "ON" else 900, seed=i))
            rows.append((f"{label}_{i}.wav", label))
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    bundle = build_data("audio", DataConfig(root=str(tmp_path), normal_labels=["ON"], test_fraction=0.25), MODEL)
    test_labels = Counter(bundle.test[i]["label"] for i in range(len(bundle.test)))
    assert test_labels == {"ON": 3, "TAPPING": 2}
    assert bundle.classes == ["ON"] and len(bundle.train) == 9  # normal-only training
    # --set data.normal_labels=[ON] arrives as [True] (YAML 1.1); it still means ON.
    again = build_data("audio", DataConfig(root=str(tmp_path), normal_labels=[True], test_fraction=0.25), MODEL)
    assert again.classes == ["ON"] and again.info["normal_labels"] == ["ON"]


def test_cli_entry_writes_the_set(tmp_path):
    res = run_cli("edgediag.data.synth_audio", "--out", tmp_path, "--n-train", 4, "--n-test", 4, "--seconds", 0.5,
                  timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "fan" / "train").glob("*.wav"))) == 4
    res = run_cli("edgediag.data.synth_audio", "--out", tmp_path, "--n-train", 1, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1


def test_real_valve_set():
    root = shared_data("dcase2023_valve")
    bundle = build_data("audio", DataConfig(root=str(root)), MODEL)
    assert bundle.classes == ["valve_pat_00", "valve_pat_01", "valve_pat_02", "valve_pat_03"]
    assert len(bundle.train) == 30 and len(bundle.test) == 70
    assert bundle.info["clip_seconds"] == 10.0 and bundle.train[0]["x"].shape == (160000,)
    test = [bundle.test[i] for i in range(len(bundle.test))]
    assert Counter(t["anomaly"] for t in test) == {0: 20, 1: 50}
    assert {t["domain"] for t in test} == {"source", "target"}


def test_real_fan_set_off_is_neither_normal_nor_fault():
    root = shared_data("fan_sensiml")
    bundle = build_data("audio", DataConfig(root=str(root), normal_labels=["ON"]), MODEL)
    assert bundle.classes == ["ON"] and len(bundle.train) == 45
    assert bundle.info["clip_seconds"] == 5.0 and bundle.info["ignored_labels"] == ["OFF"]
    roles = Counter((bundle.test[i]["label"], bundle.test[i]["anomaly"]) for i in range(len(bundle.test)))
    assert roles == {("ON", 0): 7, ("OFF", -1): 5, ("BLADE FAULT", 1): 3, ("TAPPING", 1): 3, ("FAN_GUARDS", 1): 2}


def test_segments_cut_every_file_into_whole_clips(tmp_path):
    """data.segments: a 2.5 s file at clip_seconds 1 gives two 1 s items (the rest is
    dropped), a 0.6 s file one padded item; keys name the segment, labels and splits are
    the file's; without it each file gives its first second."""
    y = tone(2.5, freq=300.0)
    _write(tmp_path / "long.wav", y)
    _write(tmp_path / "short.wav", tone(0.6))
    (tmp_path / "labels.csv").write_text("path,label,split\nlong.wav,ON,train\nshort.wav,FAULT,test\n")
    model = SimpleNamespace(**{**vars(MODEL), "clip_seconds": 1.0})
    bundle = build_data("audio", DataConfig(root=str(tmp_path), normal_labels=["ON"], segments=True), model)
    train = [bundle.train[i] for i in range(len(bundle.train))]
    assert [t["key"] for t in train] == ["long.wav#0", "long.wav#1"]
    assert np.allclose(train[1]["x"].numpy(), y[SR:2 * SR], atol=1e-4)
    assert len(bundle.test) == 1 and bundle.test[0]["key"] == "short.wav#0" and bundle.test[0]["anomaly"] == 1
    assert bundle.test[0]["x"].shape == (SR,)
    plain = build_data("audio", DataConfig(root=str(tmp_path), normal_labels=["ON"]), model)
    assert len(plain.train) == 1 and np.allclose(plain.train[0]["x"].numpy(), y[:SR], atol=1e-4)
    with pytest.raises(UserError, match="segments"):
        build_data("image", DataConfig(root=str(tmp_path), segments=True), model)


def test_real_fan_set_in_one_second_segments():
    root = shared_data("fan_sensiml")
    model = SimpleNamespace(**{**vars(MODEL), "clip_seconds": 1.0})
    bundle = build_data("audio", DataConfig(root=str(root), normal_labels=["ON"], val_fraction=0.2,
                                            segments=True), model)
    assert len(bundle.train) + len(bundle.val) == 45 * 5 and len(bundle.test) == 20 * 5
    files = {k.split("#")[0] for k in (bundle.train[i]["key"] for i in range(len(bundle.train)))}
    assert files.isdisjoint(bundle.val[i]["key"].split("#")[0] for i in range(len(bundle.val)))
