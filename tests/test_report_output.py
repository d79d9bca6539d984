"""How the verbs report (issue 25, items 3 and 5): one timing protocol and its settings in
every report that shows a latency; one parameter/FLOP count for a checkpoint and its graph;
aligned tables and ``--json`` with the same keys; other libraries' warnings in the run's log
file, not on the terminal; outputs with the user's umask. No timed assertions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from edgediag import bench, cli, evaluate, export, predict, train
from edgediag import prune as prune_verb
from edgediag.cli import Column, cell, format_table
from edgediag.measure.cost import count_parameters, scoring_costs
from edgediag.measure.timing import RUNS, THREADS, WARMUP
from edgediag.models import create_model
from tests.conftest import ROOT
from tests.toy import trained_image_checkpoint, write_toy_data

QUICK = ["--latency-runs", "3", "--warmup", "1"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy checkpoint (one epoch of the train verb) and its ONNX export."""
    root = tmp_path_factory.mktemp("report")
    data = write_toy_data(root / "data")
    assert cli.run(train.main, ["--model", "toy_mlp", "--data", str(data), "--out", str(root / "run"),
                                "--set", "train.epochs=1"]) == 0
    ckpt = root / "run" / "model.pt"
    assert cli.run(export.main, ["--checkpoint", str(ckpt), "--out", str(root / "onnx"), "--parity-items", "4",
                                 *QUICK]) == 0
    return root, data, ckpt, root / "onnx" / "model.onnx"


# --- tables ------------------------------------------------------------------------------------------
def test_cells_have_sensible_precision():
    assert [cell(v) for v in (1234567, 0.80469, 12.3456, 397.3777, 123456.7, 0.0000123, 0.0)] == \
        ["1,234,567", "0.8047", "12.35", "397.4", "123,457", "1.23e-05", "0"]
    assert [cell(v) for v in (None, float("nan"), float("inf"), True, "acc")] == ["n/a", "n/a", "n/a", "yes", "acc"]
    assert cell(0.123456, ".3f") == "0.123" and cell(5, ",d") == "5"


def test_tables_align_numbers_right_and_text_left():
    rows = [{"name": "a", "ms": 1.5, "n": 10}, {"name": "longer", "ms": 12.25, "n": None}]
    text = format_table(rows, [Column("name"), Column("ms", "p50 ms", ".2f"), Column("n")])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "p50", "ms", "n"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule as wide as each other
    assert lines[2].startswith("a      ") and lines[2].endswith(" 1.50   10")
    assert lines[3].endswith("12.25  n/a")
    md = format_table(rows, [Column("name"), Column("n")], markdown=True).splitlines()
    assert md[:2] == ["| name | n |", "|---|---:|"]


# --- --json: one object on stdout, the table's keys ------------------------------------------------------
def _json_and_table(capsys, main, args: list[str], json_args: list[str]) -> tuple[dict, str]:
    assert cli.run(main, [*json_args, "--json"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    report = json.loads(out)  # the whole of stdout is one JSON object
    assert out.count("\n") == 1
    assert cli.run(main, args) == 0
    return report, capsys.readouterr().out


def _same_keys(report: dict, table: str) -> None:
    columns = report["columns"]
    assert report["rows"] and all(list(r) == list(columns) for r in report["rows"])
    header = next(line for line in table.splitlines() if all(title in line for title in columns.values()))
    assert header  # the printed table has every column the JSON has


def test_bench_json_is_the_table(toy, tmp_path, capsys):
    root, data, ckpt, graph = toy
    common = ["--checkpoint", str(ckpt), str(graph), "--data", str(data), "--backends", "eager,onnxruntime", *QUICK]
    report, table = _json_and_table(capsys, bench.main, [*common, "--out", str(tmp_path / "b")],
                                    [*common, "--out", str(tmp_path / "bj")])
    _same_keys(report, table)
    assert report["verb"] == "bench" and {r["backend"] for r in report["rows"]} == {"eager", "onnxruntime"}
    assert report["protocol"] == {"threads": 1, "warmup": 1, "runs": 3, "statistic": "median", "clock": "wall",
                                  "rounds": 1}
    assert "1 thread, 1 warm-up + 3 timed runs, median of wall time" in table
    # the checkpoint and its graph: the same parameter and FLOP counts
    assert len({(r["params"], r["mflops_per_item"]) for r in report["rows"]}) == 1
    assert report["rows"][0]["params"] == 8 * 32 + 32 + 32 * 2 + 2


def test_export_evaluate_predict_json_is_the_table(toy, tmp_path, capsys):
    root, data, ckpt, graph = toy
    common = ["--checkpoint", str(ckpt), "--parity-items", "4", *QUICK]
    report, table = _json_and_table(capsys, export.main, [*common, "--out", str(tmp_path / "e")],
                                    [*common, "--out", str(tmp_path / "ej")])
    _same_keys(report, table)
    assert [(r["runtime"], r["params"]) for r in report["rows"]] == [("pytorch eager", 354), ("onnxruntime", 354)]
    assert {k: report["latency"][k] for k in ("threads", "warmup", "runs")} == {"threads": 1, "warmup": 1, "runs": 3}
    assert "1 thread, 1 warm-up + 3 timed runs" in table

    common = ["--checkpoint", str(ckpt), "--data", str(data)]
    report, table = _json_and_table(capsys, evaluate.main, [*common, "--out", str(tmp_path / "v")],
                                    [*common, "--out", str(tmp_path / "vj")])
    _same_keys(report, table)
    assert report["rows"][0]["metric"] == "acc" and 0 <= report["rows"][0]["value"] <= 1

    common = ["--checkpoint", str(graph), "--data", str(data)]
    report, table = _json_and_table(capsys, predict.main, [*common, "--out", str(tmp_path / "p")],
                                    [*common, "--out", str(tmp_path / "pj")])
    _same_keys(report, table)
    assert report["rows"][0]["items"] == 64 and 0.5 <= report["rows"][0]["auc"] <= 1


def test_prune_json_is_the_table_with_the_protocol(tmp_path, capsys):
    ckpt, data = trained_image_checkpoint(tmp_path, "image_cnn", n_classes=3, in_chans=1, image_size=32,
                                          widths=[8, 16], depths=[1, 1])
    common = ["--checkpoint", str(ckpt), "--data", str(data), "--finetune-epochs", "1", "--ratio", "0.4", *QUICK]
    report, table = _json_and_table(capsys, prune_verb.main, [*common, "--out", str(tmp_path / "p")],
                                    [*common, "--out", str(tmp_path / "pj")])
    _same_keys(report, table)
    assert [r["stage"] for r in report["rows"]] == ["before", "after pruning", "after finetune"]
    assert report["protocol"] == {"threads": THREADS, "warmup": 1, "runs": 3, "statistic": "median",
                                  "clock": "wall"}
    assert "1 thread, 1 warm-up + 3 timed runs" in table
    # prune counts parameters as bench and export do (an image CNN scores with all of them)
    from edgediag.engine.checkpoint import load_model

    model, _ = load_model(tmp_path / "pj" / "model.pt")
    assert report["rows"][-1]["params"] == report["after_finetune"]["params"] == count_parameters(model)["total"]
    assert report["after_finetune"]["params_checkpoint"] == count_parameters(model)["total"]


# --- one timing protocol -----------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["bench", "export", "prune"])
def test_every_timing_verb_has_the_protocols_flags_and_defaults(verb):
    import importlib

    args = importlib.import_module(f"edgediag.{verb}").parser().parse_args(
        ["--checkpoint", "m.pt", "--out", "o", *(["--data", "d"] if verb == "prune" else [])])
    assert (args.warmup, args.latency_runs) == (WARMUP, RUNS)
    assert args.threads == (None if verb == "prune" else THREADS)  # prune: its fine-tuning keeps torch's
    if verb == "prune":
        from edgediag.compress.pipeline import timing_threads

        assert timing_threads(args) == THREADS


# --- one parameter count for a checkpoint and its graph -------------------------------------------------
def test_training_only_parts_are_not_counted():
    """AEGAN-AD scoring with its generator alone: the discriminator, and the generator's
    decoder where the score does not use it, are not in the deployed graph."""
    model = create_model("aegan_ad", clip_seconds=0.6, n_fft=256, hop=64, channels=4, d_channels=4, latent_dim=8,
                         window_hop=64, input_min=-80.0, input_max=0.0, score="G-x-L2-mean")
    counted = scoring_costs(model)
    everything = count_parameters(model)["total"]
    assert 0 < counted["params"]["total"] < everything - count_parameters(model.discriminator)["total"] + 1
    assert counted["flops"]["flops"] > 0


def test_a_graph_without_recorded_counts_is_counted_as_its_architecture(toy, tmp_path):
    """An older graph (no counts in its metadata) gets its architecture's parameter total;
    its non-zero count is unknown, not guessed."""
    import onnx

    from edgediag.measure.bench import attach_costs, load_artifact

    root, data, ckpt, graph = toy
    proto = onnx.load(str(graph))
    for prop in proto.metadata_props:
        if prop.key == "export":
            info = json.loads(prop.value)
            del info["params"], info["flops_per_item"]
            prop.value = json.dumps(info)
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    arts = [load_artifact(old)]
    attach_costs(arts)
    assert arts[0].params["total"] == 354 and arts[0].params["nonzero"] is None and arts[0].flops["flops"] == 640
    assert arts[0].graph_numbers >= 354  # what the graph stores: weights (folded) and constants


# --- other libraries' warnings: the run's log, not the terminal ---------------------------------------
WARNS = """
import sys, warnings
from pathlib import Path
import edgediag
from edgediag import cli, evaluate
from tests import toy

original = toy.ToyMLP.evaluate

def noisy(self, loader, out_dir=None):
    exec(compile("import warnings; warnings.warn('torch_pruning: a third-party warning')",
                 "/site-packages/torch_pruning/fake.py", "exec"))
    exec(compile("import warnings; warnings.warn('an edgediag warning')",
                 str(Path(edgediag.__file__).parent / "fake.py"), "exec"))
    return original(self, loader, out_dir)

toy.ToyMLP.evaluate = noisy
sys.exit(cli.run(evaluate.main, sys.argv[1:]))
"""


def test_third_party_warnings_go_to_the_log_not_the_terminal(toy, tmp_path):
    root, data, ckpt, graph = toy
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-c", WARNS, "--checkpoint", str(ckpt), "--data", str(data),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "third-party warning" not in proc.stderr + proc.stdout
    assert "an edgediag warning" in proc.stderr  # edgediag's own warnings stay on the terminal
    log = (out / cli.LOG_NAME).read_text()
    assert "torch_pruning: a third-party warning" in log and "an edgediag warning" not in log
    assert f"1 warning(s)/log record(s) of other libraries: {out / cli.LOG_NAME}" in proc.stderr
    assert "metric" in proc.stdout  # the report itself is unchanged


def test_nothing_third_party_means_no_log_file(toy):
    root, data, ckpt, graph = toy
    assert not (root / "run" / cli.LOG_NAME).exists() and not (root / "onnx" / cli.LOG_NAME).exists()


# --- the user's umask ---------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_follow_the_umask(toy, tmp_path, umask, file_mode, dir_mode):
    root, data, ckpt, graph = toy
    old = os.umask(umask)
    try:
        assert cli.run(export.main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "e"), "--parity-items", "4",
                                     *QUICK]) == 0
        assert cli.run(bench.main, ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "b"),
                                    "--backends", "eager", *QUICK]) == 0
    finally:
        os.umask(old)
    for folder in (tmp_path / "e", tmp_path / "b"):
        paths = [folder, *folder.rglob("*")]
        modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in paths}
        assert {k: m for k, m in modes.items() if m != (dir_mode if (tmp_path / k).is_dir() else file_mode)} == {}
    assert math.isfinite(json.loads((tmp_path / "b" / "report.json").read_text())["memory"]["rss_peak_mb"])


def test_an_exports_log_is_in_its_bundle(toy, tmp_path, monkeypatch, capsys):
    """export stages its folder: the log written there moves with it, listed in the manifest
    (verify still passes), and the last line names where it is."""
    from edgediag import verify
    from edgediag.deploy import pipeline

    root, data, ckpt, graph = toy
    counted = pipeline.traced_costs

    def noisy(*args):
        exec(compile("import warnings; warnings.warn('onnx: a third-party warning')",
                     "/site-packages/onnx/fake.py", "exec"))
        return counted(*args)

    monkeypatch.setattr(pipeline, "traced_costs", noisy)
    out = tmp_path / "e"
    assert cli.run(export.main, ["--checkpoint", str(ckpt), "--out", str(out), "--parity-items", "4", *QUICK]) == 0
    assert "onnx: a third-party warning" in (out / cli.LOG_NAME).read_text()
    assert cli.LOG_NAME in json.loads((out / "manifest.json").read_text())["files"]
    assert capsys.readouterr().err.strip().endswith(f"of other libraries: {out / cli.LOG_NAME}")
    assert cli.run(verify.main, [str(out), "--threads", "1"]) == 0
