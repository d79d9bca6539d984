"""Package, CLI, configs, checkpoints and the training engine (issue 2)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgediag import VERBS
from edgediag.config import apply_overrides, from_dict, load_tree
from edgediag.engine.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from edgediag.engine.trainer import TrainConfig, lr_factor
from edgediag.errors import UserError
from tests.conftest import ROOT, run_cli
from tests.toy import ToyMLP, write_toy_data


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0]


def test_cli_lists_every_verb_and_each_has_help():
    proc = run_cli("edgediag", "--help")
    assert proc.returncode == 0
    for verb in VERBS:
        assert verb in proc.stdout
        help_proc = run_cli(f"edgediag.{verb}", "--help")
        assert help_proc.returncode == 0, (verb, help_proc.stderr)
        assert "usage:" in help_proc.stdout


def test_bad_data_path_unknown_model_and_bad_key_are_one_line_errors(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run_cli("tests.toy", "train", "--model", "toy_mlp", "--data", "no/such/dir", "--out", out),
                          "no/such/dir")
    assert_one_line_error(run_cli("edgediag.train", "--model", "no_such_model", "--data", tmp_path, "--out", out),
                          "no_such_model")
    data = write_toy_data(tmp_path / "data")
    assert_one_line_error(run_cli("tests.toy", "train", "--model", "toy_mlp", "--data", data, "--out", out,
                                  "--set", "train.no_such_key=1"), "train.no_such_key")
    assert_one_line_error(run_cli("tests.toy", "train", "--model", "toy_mlp", "--data", data, "--out", out,
                                  "--set", "model.hiden=3"), "hiden")
    assert not out.exists(), "a failed run must not leave output behind"


def test_truncated_and_foreign_checkpoints_are_one_line_errors(tmp_path):
    model = ToyMLP(ToyMLP.Config())
    good = save_checkpoint(tmp_path / "good.pt", make_checkpoint(model))
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("edgediag.evaluate", "--checkpoint", tmp_path / "cut.pt"), "corrupt or truncated")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert_one_line_error(run_cli("edgediag.evaluate", "--checkpoint", tmp_path / "foreign.pt"), "not an edgediag")
    assert_one_line_error(run_cli("edgediag.evaluate", "--checkpoint", tmp_path / "none.pt"), "not found")


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = ToyMLP(ToyMLP.Config(hidden=16))
    model.threshold.fill_(0.25)
    save_checkpoint(tmp_path / "m.pt", make_checkpoint(model, data={"classes": ["a", "b"]}))
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"
    payload = load_checkpoint(tmp_path / "m.pt")  # torch.load(weights_only=True) inside
    assert payload["model_name"] == "toy_mlp" and payload["model_config"]["hidden"] == 16
    assert payload["threshold"] == 0.25 and payload["data"]["classes"] == ["a", "b"]
    rebuilt = ToyMLP(from_dict(ToyMLP.Config, payload["model_config"]))
    rebuilt.load_state_dict(payload["state_dict"])
    for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)


def test_config_yaml_overrides_and_type_coercion(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("model: {name: toy_mlp, hidden: 8}\ntrain: {epochs: 3, lr: 1e-3}\n")
    tree = load_tree(str(cfg_file), ["train.lr=3e-4", "train.betas=[0.5, 0.999]", "model.hidden=12"],
                     {"model", "train", "data"})
    cfg = from_dict(TrainConfig, tree["train"])
    assert cfg.epochs == 3 and cfg.lr == pytest.approx(3e-4) and cfg.betas == (0.5, 0.999)
    assert tree["model"]["hidden"] == 12
    with pytest.raises(UserError, match="unknown config section"):
        load_tree(str(cfg_file), ["trian.lr=1"], {"model", "train", "data"})
    with pytest.raises(UserError, match="cannot read"):
        from_dict(TrainConfig, apply_overrides({}, ["epochs=many"]))


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(warmup=0.1, schedule="cosine", min_lr_ratio=0.0)
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] < 0.01
    lin = TrainConfig(warmup=0.0, schedule="linear")
    assert lr_factor(50, 100, lin) == pytest.approx(0.5)


def _train_args(data, out, epochs):
    return ["tests.toy", "train", "--model", "toy_mlp", "--data", data, "--out", out, "--epochs", epochs,
            "--batch-size", "8", "--lr", "0.01", "--set", "train.threads=1", "--set", "train.warmup=0.1"]


def test_train_writes_checkpoints_and_evaluate_reads_them(tmp_path):
    data = write_toy_data(tmp_path / "data")
    out = tmp_path / "run"
    proc = run_cli(*_train_args(data, out, 3))
    assert proc.returncode == 0, proc.stderr
    assert {"last.pt", "best.pt", "model.pt", "train.json"} <= {p.name for p in out.iterdir()}
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["data"]["classes"] == ["normal", "fault"]
    assert ckpt["threshold"] == ckpt["threshold"], "threshold must be calibrated (not NaN)"
    assert ckpt["meta"]["test_metrics"]["acc"] > 0.75
    ev = run_cli("tests.toy", "evaluate", "--checkpoint", out / "model.pt", "--out", tmp_path / "ev")
    assert ev.returncode == 0, ev.stderr
    assert "acc" in ev.stdout and (tmp_path / "ev" / "metrics.json").exists()
    again = run_cli(*_train_args(data, out, 3))
    assert_one_line_error(again, "--resume")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    data = write_toy_data(tmp_path / "data", n=6000)
    epochs = 4
    ref = run_cli(*_train_args(data, tmp_path / "ref", epochs))
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", *map(str, _train_args(data, out, epochs))], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, saves, seen = out / "last.pt", 0, None
    deadline = time.time() + 300
    while saves < 2 and time.time() < deadline and proc.poll() is None:
        stamp = last.stat().st_mtime_ns if last.exists() else None
        if stamp is not None and stamp != seen:
            saves, seen = saves + 1, stamp
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"
    state = load_checkpoint(last)["train_state"]
    assert 1 <= state["epoch"] < epochs, state["epoch"]

    resumed = run_cli(*_train_args(data, out, epochs), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "ref" / "last.pt")["state_dict"]
    b = load_checkpoint(last)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:  # bitwise: zero tolerance (NaN == NaN for the not-yet-calibrated threshold)
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=f"{key} differs after resume")


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_two_gloo_processes(tmp_path):
    data = write_toy_data(tmp_path / "data", n=512)
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun if torchrun.exists() else "torchrun"), "--standalone", "--nproc_per_node=2",
           "-m", *map(str, _train_args(data, out, 2))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["meta"]["test_metrics"]["acc"] > 0.75
    history = load_checkpoint(out / "last.pt")["train_state"]["history"]
    # Two ranks each see half of the 384 training items per epoch.
    assert len(history) == 2 and history[-1]["loss"] < history[0]["loss"]


def test_every_registered_model_implements_the_interface():
    """The base classes' abstract methods are the interface, not unfinished work: every
    registered family overrides each of them (and its family base's hook), and a class
    that leaves one out cannot be built."""
    from edgediag.models import DiagnosisModel, get_model_class, list_models
    from edgediag.models.image_cnn.model import ImageClassifier
    from edgediag.models.ldmamba.model import SequenceClassifier

    required = ["training_step", "score", "evaluate", "example_input"]
    for name in list_models():
        cls = get_model_class(name)[0]
        if not cls.__module__.startswith("edgediag."):
            continue  # a test's own model
        hooks = [(DiagnosisModel, m) for m in required]
        if issubclass(cls, SequenceClassifier):
            hooks.append((SequenceClassifier, "embed"))
        if issubclass(cls, ImageClassifier):
            hooks.append((ImageClassifier, "forward"))
        missing = [m for base, m in hooks if getattr(cls, m) is getattr(base, m)]
        assert not missing, f"{name} ({cls.__name__}) does not implement {missing}"


def test_a_model_missing_an_interface_method_cannot_be_built():
    from edgediag.models import DiagnosisModel

    class ScoreOnly(DiagnosisModel):
        def score(self, x):
            return x.mean(dim=-1)

    with pytest.raises(TypeError, match="abstract"):
        ScoreOnly()


def test_an_inference_only_model_refuses_training_with_one_line():
    from edgediag.errors import UserError
    from edgediag.models import DiagnosisModel

    class Detector(DiagnosisModel):  # fixed signal processing: scores, nothing to train
        def score(self, x):
            return x.abs().mean(dim=-1)

        def example_input(self, batch_size=1):
            return torch.zeros(batch_size, 8)

    model = Detector(None)
    assert model.score(model.example_input(2)).shape == (2,)
    with pytest.raises(UserError, match="inference-only"):
        model.training_step({"x": model.example_input(2)})
    with pytest.raises(UserError, match="inference-only"):
        model.evaluate([])


def test_outputs_get_the_users_umask_not_mkstemps_0600(tmp_path):
    """A file written through atomic_path is readable by others (0644 under umask 022), as
    any file the user creates; mkstemp's 0600 would hide it from a board's service account."""
    import os

    from edgediag.utils import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "report.json") as tmp:
            tmp.write_text("{}")
        assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        with atomic_path(tmp_path / "private.json") as tmp:
            tmp.write_text("{}")
        assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_edgediag_command_runs_every_verb_and_knows_its_version():
    """`edgediag <verb> ...` (the console script, = python -m edgediag) is `python -m
    edgediag.<verb> ...`: same errors, same exit codes; `--version` at the top level."""
    import subprocess
    import sys

    from edgediag import __version__

    def run(*args):
        return subprocess.run([sys.executable, "-m", "edgediag", *args], capture_output=True, text=True, timeout=300)

    assert run("--version").stdout.strip() == f"edgediag {__version__}"
    bad = run("predict", "--checkpoint", "/nonexistent/model.pt", "--data", "/nonexistent", "--out", "/tmp/none")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    unknown = run("trian")
    assert unknown.returncode == 2 and "unknown verb 'trian'" in unknown.stderr


@pytest.mark.parametrize("verb, extra", [
    ("train", ["--model", "tastgram_mfn", "--data", "."]),
    ("evaluate", ["--checkpoint", "/nonexistent/model.pt"]),
    ("predict", ["--checkpoint", "/nonexistent/model.pt", "--data", "."]),
    ("prune", ["--checkpoint", "{file}", "--data", "."]),
    ("bench", ["--checkpoint", "/nonexistent/model.pt"]),
])
def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, verb, extra):
    import importlib

    from edgediag import cli

    taken = tmp_path / "taken"
    taken.write_text("keep me")
    args = [a.replace("{file}", str(taken)) for a in extra]
    for out in (taken, taken / "sub"):
        assert cli.run(importlib.import_module(f"edgediag.{verb}").main, [*args, "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: --out {out}")
    assert taken.read_text() == "keep me"
