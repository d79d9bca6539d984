"""A corpus of bad inputs, one case per kind, over every verb (issue 25): each must end with
exactly one ``error: ...`` line on stderr, exit code 2, no traceback, and nothing left behind
(the folder listing before and after the run is the same).

Cases run in-process through ``cli.run`` (the wrapper every verb's ``__main__`` uses) with the
logging the verb would print routed to the captured stderr, plus a few as real processes. The
artifacts are tiny: the band-energy audio model of tests/test_runtime.py (a .pt and its ONNX
export), toy data, and synthetic files written per case."""

from __future__ import annotations

import csv
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from edgediag import cli
from tests.conftest import run_cli
from tests.test_runtime import build_band_artifacts
from tests.toy import write_toy_data

SR = 16000
_SHOWN = (UserWarning, RuntimeWarning, FutureWarning, SyntaxWarning, BytesWarning, UnicodeWarning)


# --- shared artifacts (built once; a case never writes into them) ------------------------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("bad_inputs_shared")
        art = build_band_artifacts(root / "band")
        toy = write_toy_data(root / "toy", n=32)
    finally:
        torch.set_num_threads(old)
    return {"root": root, "pt": art["pt"], "onnx": art["onnx"], "bundle": art["onnx"].parent, "toy": toy}


def listing(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots for p in root.rglob("*"))


def run_verb(verb: str, args, capfd) -> tuple[int, str]:
    """``python -m edgediag.<verb> args`` in-process: its exit code and stderr, with what its
    logging and Python warnings would print in a fresh process counted in."""
    module = importlib.import_module(f"edgediag.{verb}")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []  # cli.run's logging.basicConfig then writes to the captured stderr, as in a process
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = cli.run(module.main, [str(a) for a in args])
    finally:
        root.handlers[:] = handlers  # drops the handler basicConfig added
        root.setLevel(level)
    captured = capfd.readouterr()
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, _SHOWN)]
    return rc, captured.err + "".join(line + "\n" for line in shown)


def assert_one_line_error(rc: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit {rc}: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


# --- bad files -------------------------------------------------------------------------------------
def wav(path: Path, seconds: float = 0.5, seed: int = 0, subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (np.random.default_rng(seed).normal(size=int(seconds * SR)) * 0.1).astype(np.float32)
    sf.write(path, x, SR, subtype=subtype)
    return path


def truncated_wav(path: Path) -> Path:
    data = wav(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def nan_wav(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.zeros(SR // 2, np.float32)
    x[100:120] = np.nan
    sf.write(path, x, SR, subtype="FLOAT")
    return path


def empty_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def corrupt_wav(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage that is not a wave file")
    return path


def labelled_folder(root: Path, bad: str, make_bad, good: int = 4) -> Path:
    """``labels.csv`` (path,label) with ``good`` good clips and one bad one (``make_bad(path)``)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [(wav(root / f"c{i}.wav", seed=i).name, "normal" if i % 2 else "fault") for i in range(good)]
    rows.append((make_bad(root / bad).name, "normal"))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return root


def image_folder(root: Path, make_bad, good: int = 2) -> Path:
    import cv2

    for cls in ("good", "crack"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(good):
            img = np.random.default_rng(i).integers(0, 255, (16, 16), dtype=np.uint8)
            cv2.imwrite(str(root / cls / f"{i}.png"), img)
    make_bad(root / "crack" / "bad.png")
    return root


def video_folder(root: Path, make_bad) -> Path:
    """``labels.csv`` (path,label) of four short .npy clips and a bad clip ``make_bad(path)``."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(4):
        np.save(root / f"v{i}.npy", np.random.default_rng(i).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8))
        rows.append((f"v{i}.npy", "normal" if i % 2 else "fault"))
    rows.append((make_bad(root).name, "normal"))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    return root


def corrupt_mp4(root: Path) -> Path:
    path = root / "x.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 64)
    return path


def nan_clip(root: Path) -> Path:
    clip = np.random.default_rng(9).random((6, 16, 16, 3)).astype(np.float32)
    clip[2, 3, 4] = np.nan
    np.save(root / "x.npy", clip)
    return root / "x.npy"


def image_checkpoint(path: Path) -> Path:
    """A tiny untrained image_cnn checkpoint (the monitor's video sources need an image model)."""
    from edgediag.engine.checkpoint import make_checkpoint, save_checkpoint
    from edgediag.models import create_model

    model = create_model("image_cnn", n_classes=2, in_chans=1, image_size=16, classes=["ok", "bad"],
                         normal_classes=["ok"], widths=[4, 8], depths=[1, 1]).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, make_checkpoint(model, data={"kind": "image", "classes": ["ok", "bad"],
                                                               "normal_classes": ["ok"]}))


def corrupt_png(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    return path


def locked(folder: Path) -> Path:
    """A folder another live run holds (the lock names this test process)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / cli.LOCK_NAME).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    return folder


def a_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder\n")
    return path


def onnx_with_spec(src: Path, dst: Path, change) -> Path:
    """A copy of an exported graph whose input_spec metadata ``change`` edits."""
    import onnx

    graph = onnx.load(str(src))
    for prop in graph.metadata_props:
        if prop.key == "input_spec":
            spec = json.loads(prop.value)
            change(spec)
            prop.value = json.dumps(spec)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(dst))
    return dst


def wrong_input_name(spec):
    spec["inputs"][0]["name"] = "waveform"


def wrong_item_shape(spec):
    spec["shape"] = [4000]


def garbage_log(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("RAM 12/34MB CPU [abc@x,5%@100]\n99-99-2026 00:00:00 RAM 1/2MB VDD_IN 5/5\nhello\n")
    return path


def binary_log(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def truncated_checkpoint(path: Path, s: dict) -> Path:
    data = s["pt"].read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def export_copy(t: Path, s: dict, edit) -> Path:
    dst = t / "bundle"
    shutil.copytree(s["bundle"], dst)
    edit(dst)
    return dst


def binary_file(path: Path) -> Path:
    path.write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    return path


# --- the corpus: (id, verb, args builder (tmp, shared) -> argv, text the error line names) ---------
TOY = ["--model", "toy_mlp", "--epochs", "1"]
SEQ = ["--model", "ldmamba", "--epochs", "1"]
AUDIO = ["--model", "tastgram_mfn_small", "--epochs", "1", "--set", "model.clip_seconds=0.5",
         "--set", "data.normal_labels=[normal]"]
CASES = [
    # train
    ("train-missing-data", "train", lambda t, s: [*TOY, "--data", t / "nowhere", "--out", t / "o"], "nowhere"),
    ("train-out-is-a-file", "train", lambda t, s: [*TOY, "--data", s["toy"], "--out", a_file(t / "o")],
     "exists and is not a folder"),
    ("train-out-locked", "train", lambda t, s: [*TOY, "--data", s["toy"], "--out", locked(t / "o")], "in use by"),
    ("train-set-list-for-int", "train", lambda t, s: [*TOY, "--data", s["toy"], "--out", t / "o",
                                                      "--set", "train.batch_size=[1,2]"], "train.batch_size"),
    ("train-negative-width", "train", lambda t, s: [*TOY, "--data", s["toy"], "--out", t / "o",
                                                    "--set", "model.hidden=-3"], "cannot be built from its config"),
    ("train-unknown-option", "train", lambda t, s: [*TOY, "--data", s["toy"], "--out", t / "o", "--epochz", "3"],
     "--epochz"),
    ("train-bad-int-option", "train", lambda t, s: ["--model", "toy_mlp", "--epochs", "many", "--out", t / "o"],
     "--epochs"),
    ("train-missing-config", "train", lambda t, s: [*TOY, "--config", t / "none.yaml", "--out", t / "o"],
     "none.yaml"),
    ("train-config-not-utf8", "train", lambda t, s: [*TOY, "--config", binary_file(t / "c.yaml"), "--out", t / "o"],
     "not UTF-8"),
    ("train-bad-device", "train", lambda t, s: [*TOY, "--data", s["toy"], "--out", t / "o", "--device", "tpu"],
     "train.device 'tpu'"),
    ("train-fraction-out-of-range", "train", lambda t, s: [*TOY, "--data", s["toy"], "--out", t / "o",
                                                           "--set", "data.val_fraction=2"], "data.val_fraction"),
    ("train-data-is-a-file", "train", lambda t, s: [*TOY, "--data", a_file(t / "data.csv"), "--out", t / "o"],
     "is a file"),
    ("train-seq-truncated-wav", "train", lambda t, s: [*SEQ, "--data", labelled_folder(t / "d", "x.wav", truncated_wav),
                                                       "--out", t / "o"], "x.wav: truncated"),
    ("train-seq-nan-wav", "train", lambda t, s: [*SEQ, "--data", labelled_folder(t / "d", "x.wav", nan_wav),
                                                 "--out", t / "o"], "x.wav: holds NaN"),
    ("train-seq-empty-wav", "train", lambda t, s: [*SEQ, "--data", labelled_folder(t / "d", "x.wav", empty_file),
                                                   "--out", t / "o"], "x.wav: empty file"),
    ("train-seq-corrupt-wav", "train", lambda t, s: [*SEQ, "--data", labelled_folder(t / "d", "x.wav", corrupt_wav),
                                                     "--out", t / "o"], "x.wav: not a readable audio file"),
    ("train-seq-every-file-bad-skipped", "train",
     lambda t, s: [*SEQ, "--data", labelled_folder(t / "d", "x.wav", corrupt_wav, good=0), "--out", t / "o",
                   "--set", "data.on_bad_file=skip"], "no readable audio files"),
    ("train-audio-nan-wav", "train",
     lambda t, s: [*AUDIO, "--data", labelled_folder(t / "d", "x.wav", nan_wav), "--out", t / "o"],
     "x.wav: contains NaN"),
    ("train-audio-truncated-wav", "train",
     lambda t, s: [*AUDIO, "--data", labelled_folder(t / "d", "x.wav", truncated_wav), "--out", t / "o"],
     "x.wav: is truncated"),
    ("train-audio-every-file-bad-skipped", "train",
     lambda t, s: [*AUDIO, "--data", labelled_folder(t / "d", "x.wav", empty_file, good=0), "--out", t / "o",
                   "--set", "data.on_bad_file=skip"], "x.wav"),
    ("train-seq-corrupt-video", "train",
     lambda t, s: [*SEQ, "--data", video_folder(t / "d", corrupt_mp4), "--out", t / "o"], "x.mp4: OpenCV decoded no"),
    ("train-seq-nan-video-clip", "train",
     lambda t, s: [*SEQ, "--data", video_folder(t / "d", nan_clip), "--out", t / "o"], "x.npy: holds NaN"),
    ("train-image-every-file-bad-skipped", "train",
     lambda t, s: ["--model", "image_cnn", "--epochs", "1", "--data", image_folder(t / "d", corrupt_png, good=0),
                   "--out", t / "o", "--set", "data.on_bad_file=skip"], "no readable images"),
    ("train-image-corrupt-png", "train",
     lambda t, s: ["--model", "image_cnn", "--epochs", "1", "--data", image_folder(t / "d", corrupt_png),
                   "--out", t / "o"], "bad.png: not a decodable image"),
    ("train-image-empty-png", "train",
     lambda t, s: ["--model", "image_cnn", "--epochs", "1", "--data", image_folder(t / "d", empty_file),
                   "--out", t / "o"], "bad.png: empty file"),
    # evaluate
    ("evaluate-missing-checkpoint", "evaluate", lambda t, s: ["--checkpoint", t / "none.pt", "--out", t / "o"],
     "not found"),
    ("evaluate-truncated-checkpoint", "evaluate",
     lambda t, s: ["--checkpoint", truncated_checkpoint(t / "cut.pt", s), "--out", t / "o"], "corrupt or truncated"),
    ("evaluate-out-is-a-file", "evaluate", lambda t, s: ["--checkpoint", s["pt"], "--out", a_file(t / "o")],
     "exists and is not a folder"),
    ("evaluate-out-locked", "evaluate", lambda t, s: ["--checkpoint", s["pt"], "--data", t, "--out", locked(t / "o")],
     "in use by"),
    ("evaluate-truncated-wav", "evaluate",
     lambda t, s: ["--checkpoint", s["pt"], "--data", labelled_folder(t / "d", "x.wav", truncated_wav),
                   "--split", "train", "--out", t / "o"], "x.wav: is truncated"),
    ("evaluate-onnx-as-checkpoint", "evaluate", lambda t, s: ["--checkpoint", s["onnx"], "--out", t / "o"],
     "an exported graph, not a checkpoint"),
    ("evaluate-bad-device", "evaluate", lambda t, s: ["--checkpoint", s["pt"], "--device", "tpu",
                                                      "--data", labelled_folder(t / "d", "c9.wav", wav),
                                                      "--out", t / "o"], "--device 'tpu'"),
    ("evaluate-batch-size-0", "evaluate", lambda t, s: ["--checkpoint", s["pt"], "--batch-size", "0",
                                                        "--out", t / "o"], "--batch-size"),
    # predict
    ("predict-onnx-wrong-input-name", "predict",
     lambda t, s: ["--checkpoint", onnx_with_spec(s["onnx"], t / "m" / "model.onnx", wrong_input_name), "--data", t,
                   "--out", t / "o"], "waveform"),
    ("predict-onnx-not-a-graph", "predict",
     lambda t, s: ["--checkpoint", corrupt_wav(t / "model.onnx"), "--out", t / "o"], "not a loadable ONNX graph"),
    ("predict-unknown-artifact", "predict", lambda t, s: ["--checkpoint", a_file(t / "model.bin"), "--out", t / "o"],
     "unknown artifact type"),
    ("predict-out-is-a-file", "predict", lambda t, s: ["--checkpoint", s["onnx"], "--out", a_file(t / "o")],
     "exists and is not a folder"),
    ("predict-out-locked", "predict", lambda t, s: ["--checkpoint", s["onnx"], "--data", t, "--out", locked(t / "o")],
     "in use by"),
    ("predict-nan-wav", "predict",
     lambda t, s: ["--checkpoint", s["onnx"], "--data", labelled_folder(t / "d", "x.wav", nan_wav), "--split", "train",
                   "--out", t / "o"], "x.wav: contains NaN"),
    ("predict-data-is-a-file", "predict", lambda t, s: ["--checkpoint", s["onnx"], "--data", wav(t / "in.wav"),
                                                        "--out", t / "o"], "is a file"),
    ("predict-bad-threads", "predict", lambda t, s: ["--checkpoint", s["onnx"], "--threads", "0", "--out", t / "o"],
     "--threads"),
    # prune
    ("prune-missing-checkpoint", "prune", lambda t, s: ["--checkpoint", t / "none.pt", "--data", t, "--out", t / "o"],
     "checkpoint not found"),
    ("prune-bad-ratio", "prune", lambda t, s: ["--checkpoint", s["pt"], "--data", t, "--out", t / "o",
                                               "--ratio", "2"], "--ratio"),
    ("prune-unknown-method", "prune", lambda t, s: ["--checkpoint", s["pt"], "--data", t, "--out", t / "o",
                                                    "--method", "random"], "--method"),
    ("prune-not-a-checkpoint", "prune", lambda t, s: ["--checkpoint", binary_log(t / "model.pt"), "--data", t,
                                                      "--out", t / "o"], "model.pt is not a checkpoint"),
    ("prune-out-is-a-file", "prune", lambda t, s: ["--checkpoint", s["pt"], "--data", t, "--out", a_file(t / "o")],
     "exists and is not a folder"),
    ("prune-out-locked", "prune", lambda t, s: ["--checkpoint", s["pt"], "--data", t, "--out", locked(t / "o")],
     "in use by"),
    # export
    ("export-missing-checkpoint", "export", lambda t, s: ["--checkpoint", t / "none.pt", "--out", t / "o"],
     "not found"),
    ("export-truncated-checkpoint", "export",
     lambda t, s: ["--checkpoint", truncated_checkpoint(t / "cut.pt", s), "--out", t / "o"], "corrupt or truncated"),
    ("export-out-is-a-file", "export", lambda t, s: ["--checkpoint", s["pt"], "--out", a_file(t / "o")], "o"),
    ("export-bad-opset", "export", lambda t, s: ["--checkpoint", s["pt"], "--out", t / "o", "--opset", "x"],
     "--opset"),
    ("export-batch-zero", "export", lambda t, s: ["--checkpoint", s["pt"], "--out", t / "o", "--batch", "0"],
     "--batch must be >= 1"),
    ("export-missing-calib-data", "export", lambda t, s: ["--checkpoint", s["pt"], "--out", t / "o",
                                                          "--calib-data", t / "nowhere"], "nowhere"),
    # bench
    ("bench-missing-model-arg", "bench", lambda t, s: ["--out", t / "o"], "--checkpoint"),
    ("bench-unknown-backend", "bench", lambda t, s: ["--checkpoint", s["onnx"], "--out", t / "o", "--backends", "tpu"],
     "unknown backend tpu"),
    ("bench-garbage-tegrastats", "bench", lambda t, s: ["--checkpoint", s["onnx"], "--out", t / "o", "--data", t,
                                                        "--tegrastats", garbage_log(t / "run.log")],
     "run.log: no tegrastats lines"),
    ("bench-onnx-wrong-item-shape", "bench",
     lambda t, s: ["--checkpoint", onnx_with_spec(s["onnx"], t / "m" / "model.onnx", wrong_item_shape),
                   "--data", labelled_folder(t / "d", "c9.wav", wav), "--out", t / "o", "--latency-runs", "1",
                   "--warmup", "0", "--threads", "1"], "does not match the graph"),
    ("bench-out-is-a-file", "bench", lambda t, s: ["--checkpoint", s["onnx"], "--out", a_file(t / "o")],
     "exists and is not a folder"),
    ("bench-out-locked", "bench", lambda t, s: ["--checkpoint", s["onnx"], "--threads", "1", "--out", locked(t / "o")],
     "in use by"),
    ("bench-bad-device", "bench", lambda t, s: ["--checkpoint", s["onnx"], "--out", t / "o", "--device", "tpu"],
     "--device 'tpu'"),
    ("bench-batch-0", "bench", lambda t, s: ["--checkpoint", s["onnx"], "--out", t / "o", "--batch", "0"], "--batch"),
    # monitor
    ("monitor-corrupt-wav", "monitor", lambda t, s: ["--checkpoint", s["onnx"], "--source", corrupt_wav(t / "in.wav"),
                                                     "--out", t / "events.jsonl"], "in.wav: not a readable audio file"),
    ("monitor-empty-wav", "monitor", lambda t, s: ["--checkpoint", s["onnx"], "--source", empty_file(t / "in.wav"),
                                                   "--out", t / "events.jsonl"], "in.wav: empty file"),
    ("monitor-onnx-wrong-input-name", "monitor",
     lambda t, s: ["--checkpoint", onnx_with_spec(s["onnx"], t / "m" / "model.onnx", wrong_input_name),
                   "--source", wav(t / "in.wav"), "--out", t / "events.jsonl"], "does not match the graph"),
    ("monitor-corrupt-video", "monitor",
     lambda t, s: ["--checkpoint", image_checkpoint(t / "img" / "model.pt"), "--source", corrupt_mp4(t),
                   "--out", t / "events.jsonl"], "cannot open video source"),
    ("monitor-negative-fps", "monitor", lambda t, s: ["--checkpoint", s["onnx"], "--source", wav(t / "in.wav"),
                                                      "--fps", "-1", "--out", t / "e.jsonl"], "--fps"),
    ("monitor-out-is-a-folder", "monitor", lambda t, s: ["--checkpoint", s["onnx"], "--source", wav(t / "in.wav"),
                                                         "--out", t], "is a folder"),
    ("monitor-out-in-missing-folder", "monitor",
     lambda t, s: ["--checkpoint", s["onnx"], "--source", wav(t / "in.wav"), "--out", t / "no" / "events.jsonl"],
     "does not exist"),
    ("monitor-bad-alarm-rule", "monitor", lambda t, s: ["--checkpoint", s["onnx"], "--source", wav(t / "in.wav"),
                                                        "--alarm-rule", "seven", "--out", t / "e.jsonl"], "seven"),
    # verify
    ("verify-missing-folder", "verify", lambda t, s: [t / "nowhere"], "nowhere"),
    ("verify-no-manifest", "verify", lambda t, s: [export_copy(t, s, lambda d: (d / "manifest.json").unlink())],
     "manifest"),
    ("verify-garbage-manifest", "verify",
     lambda t, s: [export_copy(t, s, lambda d: (d / "manifest.json").write_text("{not json"))], "manifest.json"),
    ("verify-bad-threads", "verify", lambda t, s: [s["bundle"], "--threads", "0"], "--threads"),
    # tegrastats
    ("tegrastats-garbage-text", "tegrastats", lambda t, s: [garbage_log(t / "run.log")], "run.log: no tegrastats"),
    ("tegrastats-binary-garbage", "tegrastats", lambda t, s: [binary_log(t / "run.log")], "run.log: no tegrastats"),
    ("tegrastats-empty-log", "tegrastats", lambda t, s: [empty_file(t / "run.log")], "run.log: no tegrastats"),
    ("tegrastats-missing-log", "tegrastats", lambda t, s: [t / "none.log"], "none.log"),
    ("tegrastats-negative-interval", "tegrastats", lambda t, s: [garbage_log(t / "run.log"), "--interval-ms", "-5"],
     "--interval-ms"),
]


def test_the_corpus_covers_every_verb():
    from edgediag import VERBS

    covered = {verb for _, verb, _, _ in CASES}
    assert covered >= set(VERBS) - {"demo"}, set(VERBS) - covered


# FFmpeg reads its log level once per process, when OpenCV first opens a video: these run as
# real processes, so an earlier test's video cannot decide what they print.
IN_PROCESS_UNFAITHFUL = {"train-seq-corrupt-video", "monitor-corrupt-video"}


@pytest.mark.parametrize("case, verb, build, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, verb, build, needle, shared, tmp_path, capfd,
                                                         one_thread):
    args = build(tmp_path, shared)
    before = listing(tmp_path, shared["root"])
    if case in IN_PROCESS_UNFAITHFUL:
        proc = run_cli(f"edgediag.{verb}", *args, cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
        rc, err = proc.returncode, proc.stderr
    else:
        rc, err = run_verb(verb, args, capfd)
    assert_one_line_error(rc, err, needle)
    assert listing(tmp_path, shared["root"]) == before, "the failed run left files behind"


# --- as a user runs them: real processes -------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["edgediag.bench", "--out", "o"], "the following arguments are required: --checkpoint"),
    (["edgediag.tegrastats", "{log}"], "no tegrastats lines"),
], ids=["bench-argument-error", "tegrastats-garbage"])
def test_as_a_process_one_line(args, needle, tmp_path):
    log = garbage_log(tmp_path / "run.log")
    before = listing(tmp_path)
    proc = run_cli(*[a.format(log=log) for a in args], cwd=tmp_path, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, needle)
    assert listing(tmp_path) == before


# --- the output-folder lock ------------------------------------------------------------------------
def test_lock_is_released_and_a_stale_one_taken_over(tmp_path):
    out = tmp_path / "a" / "b"
    with cli.locked_output(out) as held:
        assert held == out and (out / cli.LOCK_NAME).read_text().split()[0] == str(os.getpid())
        with pytest.raises(cli.UserError, match="in use by another edgediag run"):
            with cli.locked_output(out):
                pass
    assert out.is_dir() and not (out / cli.LOCK_NAME).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / cli.LOCK_NAME).write_text(dead.stdout.strip() + "\n")  # its run died without removing it
    with cli.locked_output(out):
        assert (out / cli.LOCK_NAME).read_text().split()[0] == str(os.getpid())


def test_a_failed_run_removes_the_folders_it_created(tmp_path):
    with pytest.raises(cli.UserError):
        with cli.locked_output(tmp_path / "x" / "y") as out:
            (out / "partial.png").write_bytes(b"x")
            raise cli.UserError("bad")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "keep").mkdir()
    with pytest.raises(cli.UserError):
        with cli.locked_output(tmp_path / "keep" / "run", keep_on_failure=True) as out:
            (out / "last.pt").write_bytes(b"x")
            raise cli.UserError("bad")
    assert sorted(p.name for p in (tmp_path / "keep" / "run").iterdir()) == ["last.pt"]  # resumable
