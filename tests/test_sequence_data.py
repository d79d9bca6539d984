"""The "sequence" data reader (format detection, splits, front ends, errors), the synthetic
conveyor/furnace generators and the disturbances, on generated and real data."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edgediag.data import DataConfig, build_data
from edgediag.data.sequence_files import detect_format
from edgediag.data.synth_sequences import (
    CONVEYOR_CLASSES,
    FURNACE_CLASSES,
    conveyor_clip,
    disturb,
    furnace_sequence,
    generate,
)
from edgediag.errors import UserError
from edgediag.models import build_config
from tests.conftest import run_cli, shared_data


def _cfg(**kw):
    return build_config("ldmamba", **kw)


def _write_labels(root: Path, header, rows) -> None:
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _starts(ds, file):
    return [int(k.rsplit("@", 1)[1]) for k in ds.keys if k.startswith(file + "@")]


# --- synthetic generators ---
def test_generators_are_deterministic_and_classes_differ():
    a = furnace_sequence(np.random.default_rng(3), "semi_molten")
    b = furnace_sequence(np.random.default_rng(3), "semi_molten")
    np.testing.assert_array_equal(a, b)
    assert a.shape == (256, 3) and a.dtype == np.float32
    # Semi-molten: the sagging phase ends lower than it started, relative to the others.
    clip = conveyor_clip(np.random.default_rng(0), "stoppage", frames=8, size=32, disturbance=0.0)
    moving = conveyor_clip(np.random.default_rng(0), "normal", frames=8, size=32, disturbance=0.0)
    assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8
    # A stopped belt changes far less between frames than a moving one (no disturbance).
    still = np.abs(np.diff(clip.astype(float), axis=0)).mean()
    assert still < 0.3 * np.abs(np.diff(moving.astype(float), axis=0)).mean()
    with pytest.raises(ValueError, match="unknown conveyor class"):
        conveyor_clip(np.random.default_rng(0), "exploded")


def test_furnace_folder_reads_as_sensor_sequences(tmp_path):
    generate("furnace", tmp_path, n_train=3, n_test=2, seed=1)
    again = generate("furnace", tmp_path / "again", n_train=3, n_test=2, seed=1)
    assert (tmp_path / "items" / "train_normal_000.npy").read_bytes() == (again / "items" / "train_normal_000.npy").read_bytes()
    assert detect_format(tmp_path) == "sensor"
    b = build_data("sequence", DataConfig(root=str(tmp_path)), _cfg())
    assert b.classes == ["normal", "arc_instability", "semi_molten"] and b.normal_classes == ["normal"]
    assert (len(b.train), len(b.test)) == (9, 6)
    item = b.train[0]
    assert item["x"].shape == (256, 3) and item["y"] == 0 and item["anomaly"] == 0
    assert b.info["input_kind"] == "sequence" and b.info["seq_len"] == 256 and len(b.info["feature_mean"]) == 3
    # Windows of a long record: model.window rows; the split column keeps files apart.
    w = build_data("sequence", DataConfig(root=str(tmp_path), val_fraction=0.2), _cfg(window=64))
    assert w.train[0]["x"].shape == (64, 3) and len(w.train) + len(w.val) == 9 * 4
    assert not {k.split("@")[0] for k in w.test.keys} & {k.split("@")[0] for k in w.train.keys}


def test_conveyor_folder_reads_as_video(tmp_path):
    generate("conveyor", tmp_path, n_train=2, n_test=1, frames=8, size=32)
    assert detect_format(tmp_path) == "video"
    b = build_data("sequence", DataConfig(root=str(tmp_path)), _cfg(seq_len=16, frame_size=24))
    x = b.train[0]["x"]
    # seq_len is capped at the clip's 8 frames; frames resized to 24x24, channels first, 0..1.
    assert x.shape == (8, 3, 24, 24) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert b.classes[0] == "normal" and set(b.classes) == set(CONVEYOR_CLASSES)
    assert b.info["input_kind"] == "video" and len(b.info["feature_mean"]) == 3


def test_video_files_and_frame_folders(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    clips = [conveyor_clip(rng, lab, frames=6, size=32, disturbance=0.0) for lab in ("normal", "stoppage")] * 2
    rows = []
    for i, clip in enumerate(clips):
        if i % 2 == 0:  # an .avi file
            path = tmp_path / f"clip{i}.avi"
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
            for f in clip:
                writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
            writer.release()
        else:  # a folder of PNG frames
            path = tmp_path / f"clip{i}"
            path.mkdir()
            for j, f in enumerate(clip):
                cv2.imwrite(str(path / f"{j:03d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        rows.append((path.name, "normal" if i % 2 == 0 else "stoppage", "train" if i < 2 else "test"))
    _write_labels(tmp_path, ["path", "label", "split"], rows)
    b = build_data("sequence", DataConfig(root=str(tmp_path)), _cfg(seq_len=4, frame_size=16, in_channels=1))
    assert b.train[0]["x"].shape == (4, 1, 16, 16) and b.train[1]["x"].shape == (4, 1, 16, 16)
    # The decoded frames keep the picture (MJPG is lossy, PNG is not).
    png = b.train[1]["x"][0, 0].numpy()
    ref = cv2.resize(cv2.cvtColor(clips[1][0], cv2.COLOR_RGB2GRAY), (16, 16), interpolation=cv2.INTER_AREA) / 255
    assert np.abs(png - ref).max() < 1.5 / 255  # grey-then-resize vs resize-then-grey rounding


def _write_mat_set(root: Path, n: int = 40000):
    import scipy.io

    rng = np.random.default_rng(0)
    t = np.arange(n) / 12000
    rows = []
    for i, (fault, f0) in enumerate([("normal", 30.0), ("ball", 140.0), ("inner_race", 160.0)]):
        sig = np.sin(2 * np.pi * f0 * t) + 0.1 * rng.normal(size=n)
        scipy.io.savemat(root / f"rec{i}.mat", {f"X{i:03d}_DE_time": sig[:, None], f"X{i:03d}_FE_time": sig[:, None]})
        rows.append((f"rec{i}.mat", 12000, fault))
    _write_labels(root, ["file", "fs_hz", "fault"], rows)


def test_mat_recordings_are_windowed_and_split_by_time(tmp_path):
    _write_mat_set(tmp_path)
    assert detect_format(tmp_path) == "cwru"
    b = build_data("sequence", DataConfig(root=str(tmp_path), val_fraction=0.2, test_fraction=0.25),
                   _cfg(window=2048, seq_len=16))
    assert b.classes == ["normal", "ball", "inner_race"] and b.info["frontend"] == "logspec"
    assert b.train[0]["x"].shape == (16, b.info["n_features"])
    for f in ("rec0.mat", "rec1.mat", "rec2.mat"):
        tr, va, te = _starts(b.train, f), _starts(b.val, f), _starts(b.test, f)
        # first part train, then val, last part test: no window overlaps another split's
        assert max(tr) + 2048 <= min(va) and max(va) + 2048 <= min(te)
    frames = build_data("sequence", DataConfig(root=str(tmp_path)), _cfg(window=2048, seq_len=32, frontend="frames"))
    x = frames.train[0]["x"].numpy()
    assert x.shape == (32, 64)  # the raw window cut into 32 frames of 64 samples
    np.testing.assert_allclose(x.reshape(-1), frames.train.raws[0][:2048], rtol=0, atol=0)


def test_sensor_csv_with_header_and_time_split(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, label in enumerate(["ok", "ok", "leak"]):
        arr = rng.normal(size=(200, 2)) + (i == 2)
        np.savetxt(tmp_path / f"s{i}.csv", arr, delimiter=",", header="p,q", comments="")
        rows.append((f"s{i}.csv", label))
    _write_labels(tmp_path, ["path", "label"], rows)
    b = build_data("sequence", DataConfig(root=str(tmp_path), test_fraction=0.3), _cfg(window=20))
    assert b.classes == ["ok", "leak"] and b.train[0]["x"].shape == (20, 2)
    assert max(_starts(b.train, "s2.csv")) + 20 <= min(_starts(b.test, "s2.csv"))
    np.testing.assert_allclose(b.info["feature_mean"], np.mean(np.concatenate(
        [b.train.raws[i] for i in range(len(b.train))]), axis=0), atol=1e-5)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no labels.csv"):
        build_data("sequence", DataConfig(root=str(tmp_path)), _cfg())
    _write_labels(tmp_path, ["path", "label"], [("a.xyz", "ok")])
    with pytest.raises(UserError, match="a.xyz: unsupported file type"):
        build_data("sequence", DataConfig(root=str(tmp_path)), _cfg())
    (tmp_path / "good.wav").write_bytes(b"")
    np.save(tmp_path / "seq.npy", np.zeros((10, 2), np.float32))
    _write_labels(tmp_path, ["path", "label"], [("good.wav", "ok"), ("seq.npy", "bad")])
    with pytest.raises(UserError, match="mixes audio and sensor"):
        build_data("sequence", DataConfig(root=str(tmp_path)), _cfg())
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav")
    import soundfile as sf

    sf.write(tmp_path / "good.wav", np.zeros(16000, np.float32), 16000)
    _write_labels(tmp_path, ["path", "label"], [("good.wav", "ok"), ("broken.wav", "bad"), ("good.wav", "bad")])
    with pytest.raises(UserError, match="broken.wav: not a readable audio file"):
        build_data("sequence", DataConfig(root=str(tmp_path)), _cfg())
    ok = build_data("sequence", DataConfig(root=str(tmp_path), on_bad_file="skip", test_fraction=0.0), _cfg())
    assert len(ok.train) == 2
    np.save(tmp_path / "short.npy", np.zeros((5, 2), np.float32))
    _write_labels(tmp_path, ["path", "label"], [("seq.npy", "ok"), ("short.npy", "bad")])
    with pytest.raises(UserError, match="short.npy: 5 rows but seq.npy has 10"):
        build_data("sequence", DataConfig(root=str(tmp_path)), _cfg())
    import scipy.io

    scipy.io.savemat(tmp_path / "x.mat", {"other": np.zeros((10, 1))})
    _write_labels(tmp_path, ["file", "fault"], [("x.mat", "normal")])
    with pytest.raises(UserError, match=r"x.mat: no X<nnn>_DE_time variable \(has other\)"):
        build_data("sequence", DataConfig(root=str(tmp_path)), _cfg())


def test_cli_generator_and_bad_kind(tmp_path):
    res = run_cli("edgediag.data.synth_sequences", "--kind", "furnace", "--out", tmp_path / "f", "--n-train", "1",
                  "--n-test", "1", "--length", "64", timeout=120)
    assert res.returncode == 0, res.stderr
    assert len((tmp_path / "f" / "labels.csv").read_text().splitlines()) == 1 + 2 * len(FURNACE_CLASSES)
    assert np.load(tmp_path / "f" / "items" / "test_semi_molten_000.npy").shape == (64, 3)
    res = run_cli("edgediag.data.synth_sequences", "--kind", "furnace", "--out", tmp_path / "g", "--n-train", "0",
                  timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == "error: --n-train must be >= 1 and --n-test >= 0"


# --- disturbances ---
def test_disturbances_hit_their_targets():
    rng = np.random.default_rng(0)
    wave = np.sin(np.linspace(0, 200, 16000)).astype(np.float32)
    for snr in (20.0, 0.0):
        noisy = disturb(wave, "noise", snr, np.random.default_rng(1))
        measured = 10 * np.log10(np.mean(wave ** 2) / np.mean((noisy - wave) ** 2))
        assert abs(measured - snr) < 0.3
    record = furnace_sequence(rng, "normal", disturbance=0.0)
    noisy = disturb(record, "noise", 10.0, np.random.default_rng(1))
    # SNR against each channel's variance, not its (large) DC level.
    assert abs(10 * np.log10(record.var(0) / (noisy - record).var(0)) - 10).max() < 0.8
    spiky = disturb(wave, "impulses", 0.01, np.random.default_rng(1))
    assert 0.005 < np.mean(spiky != wave) < 0.015 and np.abs(spiky).max() > 3
    gaps = disturb(record, "dropout", 0.2, np.random.default_rng(1))
    assert 0.05 < np.mean(gaps == 0) < 0.2 and gaps.dtype == record.dtype
    clip = conveyor_clip(rng, "normal", frames=10, size=16)
    dark = disturb(clip, "dropout", 0.2, np.random.default_rng(1))
    assert dark.dtype == np.uint8 and 1 <= int((dark.reshape(10, -1).max(1) == 0).sum()) <= 4
    with pytest.raises(ValueError, match="unknown disturbance"):
        disturb(wave, "fire", 1.0, rng)


# --- real data ---
def test_real_cwru_windows_split_by_time():
    root = shared_data("cwru_bearing")
    b = build_data("sequence", DataConfig(root=str(root), val_fraction=0.1), _cfg(seq_len=32))
    assert b.classes == ["normal", "ball", "inner_race", "outer_race"]
    assert b.train[0]["x"].shape == (32, b.info["n_features"]) and b.info["window"] == 4096
    counts = np.bincount(b.test.labels, minlength=4)
    assert counts[0] > 10 and all(counts[1:] > 2 * counts[0] - 5)  # one normal file, two per fault
    for f in {k.rsplit("@", 1)[0] for k in b.test.keys}:
        assert max(_starts(b.train, f)) + 4096 <= min(_starts(b.val, f))
        assert max(_starts(b.val, f)) + 4096 <= min(_starts(b.test, f))


def test_real_fan_clips_become_log_mel_sequences():
    root = shared_data("fan_sensiml")
    b = build_data("sequence", DataConfig(root=str(root)), _cfg())
    assert b.classes == ["ON", "BLADE FAULT", "FAN_GUARDS", "OFF", "TAPPING"] and b.normal_classes == ["ON"]
    assert (len(b.train), len(b.test)) == (116, 20)
    # A stopped fan is a class of its own but neither normal nor a fault for anomaly scores.
    assert {(b.classes[y], a) for y, a in zip(b.test.labels, b.test.anomaly)} == {
        ("ON", 0), ("OFF", -1), ("BLADE FAULT", 1), ("FAN_GUARDS", 1), ("TAPPING", 1)}
    assert b.info["ignored_classes"] == ["OFF"]
    x = b.test[0]["x"]
    assert x.shape == (64, 64) and b.info["frontend"] == "logmel" and b.info["frontend_params"]["hop_length"] == 1250
    assert float(x.std()) > 1.0  # real spectra, not a constant floor
    cfg = dataclasses.replace(_cfg(), clip_seconds=1.0)
    seg = build_data("sequence", DataConfig(root=str(root), max_items=50), cfg)
    assert seg.train[0]["x"].shape == (64, 64) and "#" in seg.train[0]["key"] and len(seg.train) == 50
