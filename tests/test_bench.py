"""FLOP counting (selective scan by its formula) and the bench verb (issue 10)."""

import json
import math

import pytest
import torch

from edgediag import bench, cli, export
from edgediag.measure.cost import _storage, count_flops, count_parameters
from edgediag.models import create_model
from edgediag.nn.mamba import MambaMixer
from edgediag.ops.flops import scan_flops
from tests.conftest import run_cli
from tests.toy import write_toy_data

B, L, D_MODEL, N, K = 2, 10, 16, 8, 4


def _mixer():
    torch.manual_seed(0)
    return MambaMixer(D_MODEL, d_state=N, d_conv=K, expand=2).eval()


def test_scan_flops_equal_the_formula():
    m = _mixer()
    d = m.d_inner
    res = count_flops(m, torch.randn(B, L, D_MODEL))
    # 9·B·L·D·N for the recurrence, plus B·D·L for the D skip and B·D·L for the z gate
    assert res["scan_calls"] == 1
    assert res["scan_flops"] == 9 * B * L * d * N + 2 * B * d * L
    assert res["by_op"]["selective_scan"] == res["scan_flops"]
    assert count_flops(m, torch.randn(2 * B, L, D_MODEL))["scan_flops"] == 2 * res["scan_flops"]
    u, A = torch.zeros(3, 5, 7), torch.zeros(5, 4)
    assert scan_flops(u, A) == 9 * 3 * 7 * 5 * 4
    assert scan_flops(u, A, D=torch.ones(5), z=u) == 9 * 3 * 7 * 5 * 4 + 2 * 3 * 5 * 7


def test_mamba_block_total_equals_hand_count():
    m = _mixer()
    d, r = m.d_inner, m.dt_rank
    tokens = B * L
    hand = {
        "in_proj": 2 * tokens * D_MODEL * 2 * d,
        # depthwise causal conv: padded output of L + K - 1 steps, K taps per channel
        "conv1d": 2 * B * d * (L + K - 1) * K,
        "x_proj": 2 * tokens * d * (r + 2 * N),
        "dt_proj": 2 * tokens * r * d,  # F.linear inside the mixer (the bias goes to the scan)
        "out_proj": 2 * tokens * d * D_MODEL,
        "scan": 9 * B * L * d * N + 2 * B * d * L,
    }
    res = count_flops(m, torch.randn(B, L, D_MODEL))
    assert res["flops"] == sum(hand.values())
    assert res["macs"] == res["flops"] // 2
    own = res["by_module"]
    assert own["MambaMixer.in_proj"] == hand["in_proj"]
    assert own["MambaMixer.conv1d"] == hand["conv1d"]
    assert own["MambaMixer.x_proj"] == hand["x_proj"]
    assert own["MambaMixer.out_proj"] == hand["out_proj"]
    assert own["MambaMixer"] == hand["dt_proj"] + hand["scan"]


@pytest.mark.parametrize("name", ["ldmamba_small", "memorymamba_nano"])
def test_mamba_model_totals_equal_their_per_layer_breakdown(name):
    model = create_model(name).eval()
    module = model.export_module().eval()
    res = count_flops(module, model.example_input(1))
    assert res["scan_calls"] > 0 and res["scan_flops"] > 0
    assert sum(res["by_module"].values()) == res["flops"]
    assert sum(res["by_op"].values()) == res["flops"]
    assert res["by_op"]["selective_scan"] == res["scan_flops"]
    assert res["flops"] > res["scan_flops"]


def test_parameter_counts_see_zeros_and_frozen_weights():
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight[0].zero_()
    lin.bias.requires_grad_(False)
    assert count_parameters(lin) == {"total": 15, "trainable": 12, "nonzero": 15 - 4 - int((lin.bias == 0).sum())}


@pytest.fixture(scope="module")
def toy_artifacts(tmp_path_factory):
    """A toy checkpoint trained by the train verb, and its ONNX export."""
    root = tmp_path_factory.mktemp("bench")
    data = write_toy_data(root / "data")
    res = run_cli("tests.toy", "train", "--model", "toy_mlp", "--data", data, "--out", root / "run",
                  "--set", "train.epochs=1")
    assert res.returncode == 0, res.stderr
    ckpt = root / "run" / "model.pt"
    rc = export.main(["--checkpoint", str(ckpt), "--target", "onnx", "--out", str(root / "onnx"),
                      "--dynamic-batch", "--parity-items", "8", "--no-simplify"])
    assert rc == 0
    return root, data, ckpt, root / "onnx" / "model.onnx"


def test_bench_reports_eager_and_onnxruntime_rows(toy_artifacts, tmp_path, capsys):
    root, data, ckpt, graph = toy_artifacts
    out = tmp_path / "bench"
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not built here")
    rc = cli.run(bench.main, ["--checkpoint", str(ckpt), str(graph), str(engine), "--data", str(data), "--out", str(out),
                              "--batch", "1,4", "--warmup", "2", "--latency-runs", "10", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["backend"], r["batch"]) for r in ok} == {("eager", 1), ("eager", 4), ("onnxruntime", 1),
                                                        ("onnxruntime", 4)}
    # the checkpoint and its graph are one model: same group, same FLOPs and scores
    assert len({r["group"] for r in ok}) == 1
    assert {r["flops_per_item"] for r in ok} == {2 * (8 * 32 + 32 * 2)}
    for r in ok:
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["items_per_s"] > 0 and "rss_peak_mb" not in r  # not per row: one process ran every row
        assert (r["threads"], r["warmup"], r["runs"]) == (1, 2, 10)
        assert r["env"]["threads"] == 1 and r["env"]["torch"] == torch.__version__ and r["env"]["onnxruntime"]
        assert r["params_total"] >= 354 and r["variant"] == "original"
        assert 0.0 <= r["auc"] <= 1.0
    eager = next(r for r in ok if r["backend"] == "eager")
    ort = next(r for r in ok if r["backend"] == "onnxruntime")
    assert eager["metric_name"] == "acc" and eager["metric_source"] == "model.evaluate"
    assert math.isclose(eager["auc"], ort["auc"], abs_tol=1e-6)  # same scores through both runtimes
    skipped = [r for r in rows if r["backend"] == "tensorrt"]
    assert skipped and all(r["status"] == "skipped" and r["reason"] for r in skipped)
    assert report["memory"]["rss_peak_mb"] > 0 and report["protocol"]["warmup"] == 2
    md = (out / "report.md").read_text()
    assert "| model | variant | backend | batch | params | MFLOPs/item | p50 ms |" in md
    assert "RSS" not in md and "1 thread, 2 warm-up + 10 timed runs, median of wall time" in md
    assert md.count("| toy_mlp | original |") == 4 and "skipped" in md
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / ok[0]["plots"] / "roc.png").is_file()


def test_interleaved_rounds_time_every_row_with_all_its_runs(toy_artifacts, tmp_path, capsys):
    """--rounds R: the timed runs of all rows alternate in R rounds (drift hits every row
    alike); each row still gets exactly --latency-runs timed runs, over one shared span."""
    _, data, ckpt, graph = toy_artifacts
    out = tmp_path / "bench"
    rc = cli.run(bench.main, ["--checkpoint", str(ckpt), str(graph), "--data", str(data), "--out", str(out),
                              "--backends", "eager,onnxruntime", "--warmup", "1", "--latency-runs", "7", "--rounds", "3",
                              "--threads", "1", "--clock", "cpu"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    assert len(ok) == 2 and report["settings"]["rounds"] == 3
    assert report["settings"]["clock"] == "cpu" and {r["clock"] for r in ok} == {"cpu"}
    ref = report["reference"]["p50"]  # the reference kernel, timed in the same rounds
    assert ref > 0 and all(math.isclose(r["relative_p50"], r["latency_ms"]["p50"] / ref) for r in ok)
    assert "CPU time of the timing thread" in (out / "report.md").read_text()
    for r in ok:
        assert r["rounds"] == 3 and r["span"]["interleaved"] and 0 < r["latency_ms"]["min"] <= r["latency_ms"]["p50"]
        assert math.isclose(r["items_per_s"] * r["latency_ms"]["mean"] / 1e3, 1.0, rel_tol=1e-6)  # 7 runs of 1 item
        # both clocks at one thread; the thread's CPU time never exceeds the wall time by much
        assert r["cpu_p50_ms"] == r["latency_ms"]["p50"] and r["wall_p50_ms"] > 0
        assert 0 < r["cpu_share"] <= 1.05
    assert ok[0]["span"] == ok[1]["span"]
    md = (out / "report.md").read_text()
    assert "the timing thread ran" in md.lower()
    rc = cli.run(bench.main, ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o2"),
                              "--latency-runs", "4", "--rounds", "5"])
    assert rc == 2 and "--rounds" in capsys.readouterr().err


def test_bench_bad_input_is_one_line(toy_artifacts, tmp_path, capsys):
    _, data, ckpt, _ = toy_artifacts
    # as a user runs it: one error line, exit 2, no traceback, nothing written
    res = run_cli("tests.toy", "bench", "--checkpoint", tmp_path / "none.pt", "--data", data, "--out", tmp_path / "out")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: artifact not found"), res.stderr
    # the same wrapper in-process (saves a second interpreter start)
    for args, needle in [(["--checkpoint", str(ckpt), "--backends", "eager,tpu"], "unknown backend tpu"),
                         (["--checkpoint", str(ckpt), "--batch", "0"], "--batch"),
                         (["--checkpoint", str(ckpt), "--clock", "cpu", "--threads", "2"], "--threads 1"),
                         (["--checkpoint", str(tmp_path / "m.txt")], "not found")]:
        rc = cli.run(bench.main, [*args, "--data", str(data), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_bench_attaches_tegrastats_power(toy_artifacts, tmp_path, capsys):
    """--tegrastats LOG: each timed row gets the power of the log lines within its span."""
    import datetime

    _, data, _, graph = toy_artifacts
    now = datetime.datetime.now().replace(microsecond=0)
    log = tmp_path / "run.tegrastats"
    log.write_text("".join(
        f"{(now + datetime.timedelta(seconds=k)).strftime('%m-%d-%Y %H:%M:%S')} RAM 2272/7620MB (lfb 4x4MB) "
        f"CPU [10%@1510,20%@1510] GR3D_FREQ 30% cpu@50C VDD_IN 5000mW/5000mW VDD_SOC 1400mW/1400mW\n"
        for k in range(-5, 120)))
    out = tmp_path / "bench"
    rc = cli.run(bench.main, ["--checkpoint", str(graph), "--data", str(data), "--out", str(out), "--latency-runs", "20",
                              "--warmup", "1", "--threads", "1", "--backends", "onnxruntime", "--tegrastats", str(log)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["power"]["power_mean_w"] == 5.0 and report["power"]["power_source"] == "VDD_IN"
    row = next(r for r in report["rows"] if r["status"] == "ok")
    assert row["power"]["samples"] >= 1 and row["power"]["inferences"] == 20
    assert row["power"]["energy_per_inference_mj"] == pytest.approx(5000 * row["power"]["samples"] / 20)


def test_one_threads_cpu_time_is_not_reported_for_several_threads(toy_artifacts, tmp_path):
    _, data, ckpt, _ = toy_artifacts
    out = tmp_path / "bench"
    assert cli.run(bench.main, ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--latency-runs", "3",
                                "--warmup", "1", "--threads", "2"]) == 0
    ok = [r for r in json.loads((out / "report.json").read_text())["rows"] if r["status"] == "ok"]
    assert ok and all("cpu_share" not in r and "cpu_p50_ms" not in r and r["wall_p50_ms"] > 0 for r in ok)


def test_unknown_labels_are_left_out_and_every_row_sees_the_same_items(toy_artifacts, tmp_path, capsys):
    """Items with no normal/anomalous label (an OFF fan: anomaly -1) are left out of the
    accuracy figures with a note instead of crashing; --max-items applies to every row; the
    data settings take --set data.KEY=VALUE like the other verbs."""
    root, _, ckpt, graph = toy_artifacts
    data = write_toy_data(tmp_path / "data", unknown=5)
    out = tmp_path / "bench"
    rc = cli.run(bench.main, ["--checkpoint", str(ckpt), str(graph), "--data", str(data), "--out", str(out),
                              "--max-items", "20", "--warmup", "1", "--latency-runs", "2", "--threads", "1",
                              "--set", "data.split_seed=3"])
    assert rc == 0, capsys.readouterr().err
    ok = [r for r in json.loads((out / "report.json").read_text())["rows"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"eager", "onnxruntime"}
    assert all(r["items"] == 15 and "5 items with no normal/anomalous label" in r["note"] for r in ok)
    eager = next(r for r in ok if r["backend"] == "eager")
    ort = next(r for r in ok if r["backend"] == "onnxruntime")
    assert math.isclose(eager["auc"], ort["auc"], abs_tol=1e-6)  # the same 15 items through both runtimes
    rc = cli.run(bench.main, ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "b2"),
                              "--set", "train.lr=1"])
    assert rc == cli.EXIT_USAGE and "data.KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "b2" / "report.json").exists()


def test_storage_key_of_a_tensor_without_storage_is_minus_one_and_does_not_raise():
    # torch raises NotImplementedError for the storage of a sparse tensor; the parameter
    # counter's storage keys map such tensors to -1 instead of failing the count
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(NotImplementedError):
        sparse.untyped_storage()
    assert _storage(sparse) == -1
    assert _storage(torch.eye(3).to_sparse_csr()) == _storage(torch.eye(3).to_mkldnn()) == -1
    dense = torch.ones(4)
    assert _storage(dense) == _storage(dense[1:].view(3)) == dense.untyped_storage().data_ptr() > 0
