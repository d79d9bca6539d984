"""The README's main command, on one model (the full demo runs in `make demo`)."""

import json

from tests.conftest import run_cli


def test_demo_runs_the_whole_pipeline_on_one_model(tmp_path):
    """train -> prune -> export (original and pruned) -> bench, through the user's verbs."""
    proc = run_cli("edgediag.demo", "--models", "ldmamba_small", "--out", tmp_path, "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["runs"]
    assert {(r["variant"], r["backend"]) for r in rows} == {
        (v, b) for v in ("original", "pruned") for b in ("eager", "onnxruntime")}
    by = {(r["variant"], r["backend"]): r for r in rows}
    assert by["pruned", "eager"]["params"] < 0.6 * by["original", "eager"]["params"]
    assert all(r["metric"] == "acc" and r["value"] > 0.5 for r in rows), \
        "the furnace classes are separable: a trained model beats chance (1/3)"
    for name in ("report.md", "report.json", "pareto.png"):
        assert (tmp_path / "bench" / name).stat().st_size > 0
    for run in ("ldmamba_small", "ldmamba_small-pruned"):
        assert json.loads((tmp_path / "onnx" / run / "export.json").read_text())["parity"]["passed"]
    assert "report:" in proc.stdout and "pareto.png" in proc.stdout


def test_demo_rejects_an_unknown_model_and_bad_stages(tmp_path):
    for args in (["--models", "nope"], ["--stages", "bench,train"]):
        proc = run_cli("edgediag.demo", *args, "--out", tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
