"""python -m edgediag.export: ONNX graphs with parity checks, metadata, TensorRT build scripts,
the TensorRT parser compatibility tables, presets, streaming graphs."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from edgediag import cli, export
from edgediag.deploy import pipeline
from edgediag.deploy import presets as trt_compat
from edgediag.deploy.board import trt_here
from edgediag.deploy.metadata import read_metadata
from edgediag.engine.checkpoint import make_checkpoint, save_checkpoint
from edgediag.engine.model import ScoreModule
from edgediag.models import DiagnosisModel, create_model, register_model
from tests.conftest import run_cli
from tests.toy import ToyConfig, ToyMLP, write_toy_data

METADATA_KEYS = {"edgediag_version", "model_name", "model_config", "input_spec", "threshold", "classes",
                 "normal_classes", "data_kind", "export"}
FAST = ["--latency-runs", "2", "--parity-items", "4", "--threads", "1"]


def trt_and_gpu() -> bool:
    return trt_here()[0]


def save_with_threshold(model, path: Path, data: dict | None = None) -> Path:
    """Checkpoint with the threshold in the widest gap between example scores, so that no
    parity item sits within rounding of it."""
    model.eval()
    with torch.no_grad():
        s = model.score(model.example_input(16).float()).sort().values
    gap = int((s[1:] - s[:-1]).argmax())
    model.threshold.fill_(float((s[gap] + s[gap + 1]) / 2))
    save_checkpoint(path, make_checkpoint(model, data=data))
    return path


def run_export(*args) -> int:
    return cli.run(export.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    data = write_toy_data(root / "data")
    torch.manual_seed(0)
    model = ToyMLP(ToyConfig())
    with torch.no_grad():  # a model that separates the classes a little, without training
        model.net[-1].weight.mul_(3)
    return save_with_threshold(model, root / "model.pt", data={
        "kind": "toy", "config": {"root": str(data)}, "classes": ["normal", "fault"], "normal_classes": ["normal"]})


# --- ONNX export of the toy model: artifacts, metadata, parity --------------------------------------------------
def test_onnx_export_metadata_and_parity(toy_ckpt, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert run_export("--checkpoint", toy_ckpt, "--out", out, *FAST) == pipeline.EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "golden.npz", "manifest.json", "model.onnx", "verify.json"]
    meta = read_metadata(out / "model.onnx")
    assert METADATA_KEYS <= set(meta)
    ckpt = torch.load(toy_ckpt, weights_only=True)
    assert meta["model_name"] == "toy_mlp" and meta["data_kind"] == "toy"
    assert float(meta["threshold"]) == pytest.approx(ckpt["threshold"])
    assert json.loads(meta["classes"]) == ["normal", "fault"] and json.loads(meta["normal_classes"]) == ["normal"]
    assert json.loads(meta["model_config"]) == ckpt["model_config"]
    spec = json.loads(meta["input_spec"])
    assert spec["inputs"] == [{"name": "input", "shape": [1, 8], "dtype": "float32"}]
    assert spec["outputs"][0]["name"] == spec["score_output"] == "score"
    info = json.loads(meta["export"])
    assert info["opset"] == 17 and info["precision"] == "fp32" and info["batch"] == 1 and info["created"]

    report = json.loads((out / "export.json").read_text())
    parity = report["parity"]
    assert parity["passed"] and parity["max_abs_error_std"] <= 1e-4 and parity["decisions_identical"]
    assert "test items of" in parity["data"]  # real items of the recorded data folder
    lat = report["latency"]
    assert lat["onnxruntime_ms"] > 0 and lat["pytorch_eager_ms"] > 0
    # one thread (FAST): its CPU clock too, which leaves out other jobs' time
    assert lat["threads"] == 1 and 0 < lat["onnxruntime_cpu_ms"] and 0 < lat["pytorch_eager_cpu_ms"]
    assert lat["ratio_cpu"] == pytest.approx(lat["onnxruntime_cpu_ms"] / lat["pytorch_eager_cpu_ms"])
    assert set(report["trt_compat"]) == {"8.5", "10.3"} and all(r["ok"] for r in report["trt_compat"].values())
    printed = capsys.readouterr().out
    assert "parity vs PyTorch" in printed and "TensorRT parser check" in printed

    # the graph computes the model's own score, on items it was not checked on
    import onnxruntime as ort

    model = ScoreModule(create_model("toy_mlp", ckpt["model_config"]))
    model.model.load_state_dict(ckpt["state_dict"])
    x = torch.randn(5, 8) * 2
    sess = ort.InferenceSession(str(out / "model.onnx"))
    got = np.concatenate([sess.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(5)])
    np.testing.assert_allclose(got, model.eval()(x).detach().numpy(), atol=1e-6)


def test_dynamic_batch(toy_ckpt, tmp_path):
    out = tmp_path / "dyn"
    assert run_export("--checkpoint", toy_ckpt, "--out", out, "--dynamic-batch", *FAST) == 0
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"))
    assert sess.get_inputs()[0].shape[0] == "batch"
    for n in (1, 3, 7):
        assert sess.run(None, {"input": np.zeros((n, 8), np.float32)})[0].shape == (n,)


# --- parity failure: exit 4, nothing written -------------------------------------------------------------
@dataclasses.dataclass
class DriftConfig:
    width: int = 4


@register_model("test_export_drift")
class DriftModel(DiagnosisModel):
    """Its exported graph differs from eager PyTorch by 1 % (a stand-in for an op that
    exports wrongly)."""

    Config = DriftConfig
    data_kind = "toy"

    def score(self, x):
        s = x.pow(2).mean(dim=1)
        return s * 1.01 if torch.onnx.is_in_onnx_export() else s

    def example_input(self, batch_size=1):
        return torch.randn(batch_size, self.config.width, generator=torch.Generator().manual_seed(batch_size))


def test_parity_failure_leaves_no_artifact(tmp_path, capsys):
    ckpt = save_with_threshold(DriftModel(DriftConfig()), tmp_path / "drift.pt")
    out = tmp_path / "out"
    assert run_export("--checkpoint", ckpt, "--out", out, *FAST) == pipeline.EXIT_PARITY
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drift.pt"]  # no staging folder left behind
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("parity failed for test_export_drift")
    # an earlier export in --out survives a failed one untouched
    out.mkdir()
    (out / "export.json").write_text("{}")
    assert run_export("--checkpoint", ckpt, "--out", out, *FAST) == pipeline.EXIT_PARITY
    assert [p.name for p in out.iterdir()] == ["export.json"]


def test_bad_input_is_one_line_exit_2(toy_ckpt, tmp_path, capsys):
    cases = [["--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "a"],
             ["--checkpoint", toy_ckpt, "--out", tmp_path / "b", "--precision", "int8", "--streaming"],
             ["--checkpoint", toy_ckpt, "--out", tmp_path / "c", "--target", "trt", "--preset", "orin-nano", "--dla"],
             ["--checkpoint", toy_ckpt, "--out", tmp_path / "d", "--preset", "no-such-board"]]
    for args in cases:
        assert run_export(*args) == cli.EXIT_USAGE
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("user data")
    assert run_export("--checkpoint", toy_ckpt, "--out", tmp_path / "busy") == cli.EXIT_USAGE
    assert (tmp_path / "busy" / "notes.txt").read_text() == "user data"


# --- TensorRT without tensorrt: ONNX + build script, exit 3 ---------------------------------------------------
@pytest.mark.skipif(trt_and_gpu(), reason="tensorrt and a GPU are here: the engine is built instead")
def test_target_trt_without_tensorrt_writes_build_script(toy_ckpt, tmp_path):
    out = tmp_path / "nano"
    res = run_cli("tests.toy", "export", "--checkpoint", toy_ckpt, "--target", "trt", "--preset",
                  "export/presets/orin-nano.yaml", "--out", out, *FAST)
    assert res.returncode == pipeline.EXIT_BUILD_ON_BOARD, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "build_engine.sh", "export.json", "golden.npz",
                                                      "manifest.json", "model.fp16.onnx", "model.onnx", "verify.json"]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("tensorrt:")]
    assert len(lines) == 1 and "build_engine.sh" in lines[0] and "exit code 3" in lines[0]
    script = (out / "build_engine.sh").read_text()
    for flag in ("--onnx=model.fp16.onnx", "--saveEngine=model.engine", "--fp16", "--memPoolSize=workspace:1024"):
        assert flag in script
    assert "--useDLACore" not in script and "--int8" not in script
    report = json.loads((out / "export.json").read_text())
    assert report["tensorrt"]["status"] == "build_on_board" and report["exit_code"] == 3
    assert list(report["trt_compat"]) == ["10.3"]


@pytest.mark.skipif(trt_and_gpu(), reason="tensorrt and a GPU are here: the engine is built instead")
def test_int8_without_tensorrt_ships_the_checked_qdq_graph(toy_ckpt, tmp_path):
    out = tmp_path / "nx"
    assert run_export("--checkpoint", toy_ckpt, "--target", "trt", "--preset", "orin-nx", "--precision", "int8",
                      "--dla", "--calib-items", "12", "--out", out, *FAST) == pipeline.EXIT_BUILD_ON_BOARD
    script = (out / "build_engine.sh").read_text()
    tail = script[script.rindex("fi\n"):]
    for flag in ("--onnx=model.int8.onnx", "--int8", "--useDLACore=0", "--allowGPUFallback", "workspace:2048"):
        assert flag in tail
    assert "--calib" not in tail and "--fp16" not in tail
    # the implicit calibrator stays only as a labelled fallback
    assert 'if [ "${EDGEDIAG_IMPLICIT_INT8:-0}" = 1 ]' in script
    assert "python3 calibrate_int8.py --onnx model.onnx --calib calib_data.npy --cache calib.cache" in script
    calib = np.load(out / "calib_data.npy")  # 12 normal training items
    assert calib.shape == (12, 8) and calib.dtype == np.float32
    tree = ast.parse((out / "calibrate_int8.py").read_text())  # valid Python with the calibrator inside
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"EntropyCalibrator", "EngineRunner", "Device"} <= set(classes)
    methods = {f.name for f in classes["EntropyCalibrator"].body if isinstance(f, ast.FunctionDef)}
    assert {"get_batch_size", "get_batch", "read_calibration_cache", "write_calibration_cache"} <= methods
    assert "model.int8.onnx" in (out / "README.md").read_text()


# --- INT8 (explicit Q/DQ) and FP16 graphs checked on ONNX Runtime -----------------------------------------------
def test_int8_graph_is_qdq_checked_against_fp32_and_verifies(toy_ckpt, tmp_path, capsys):
    import onnx

    from edgediag import verify as verify_verb

    out = tmp_path / "int8"
    assert run_export("--checkpoint", toy_ckpt, "--precision", "int8", "--calib-items", "64", "--check-items", "64",
                      "--out", out, *FAST) == pipeline.EXIT_OK
    printed = capsys.readouterr().out
    assert "int8: " in printed and "decision agreement" in printed
    graph = onnx.load(str(out / "model.int8.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    zero_points = [onnx.numpy_helper.to_array(i) for i in graph.graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all((z == 0).all() for z in zero_points)  # symmetric: TensorRT's int8
    assert {z.dtype for z in zero_points} <= {np.dtype(np.int8), np.dtype(np.int32)}  # int32: biases
    report = json.loads((out / "export.json").read_text())
    reduced = report["reduced_precision"]
    check = reduced["check"]
    assert reduced["file"] == "model.int8.onnx" and reduced["quantized_nodes"] == 2 and reduced["calibration"] == "minmax"
    assert check["items"] == 64 and check["passed"] and check["decision_agreement"] >= 0.95
    assert {"auc_fp32", "auc", "auc_delta", "accuracy_fp32", "accuracy"} <= set(check)
    assert reduced["calibration_data"].startswith("64 normal items") or "normal items" in reduced["calibration_data"]
    assert any("INT8 ranges rest on" in w for w in report["warnings"])  # fewer than 100 calibration items
    meta = read_metadata(out / "model.int8.onnx")
    assert json.loads(meta["export"])["precision"] == "int8"
    assert json.loads(read_metadata(out / "model.onnx")["export"])["precision"] == "fp32"
    # the bundle checks the int8 graph too (against fp32 references, with its own decisions)
    info = json.loads((out / "verify.json").read_text())
    entry = info["graphs"][1]
    assert entry["file"] == "model.int8.onnx" and entry["tolerance"] > 0 and info["engine_decisions"]["int8"]
    assert cli.run(verify_verb.main, [str(out), "--threads", "1"]) == 0
    assert "model.int8.onnx:score" in capsys.readouterr().out


def _outlier_toy(path: Path) -> Path:
    """A toy model that int8 per-tensor activations cannot hold: one hidden unit 1e4 times
    larger than the others (which alone decide the score) rounds them all to zero."""
    torch.manual_seed(0)
    model = ToyMLP(ToyConfig())
    with torch.no_grad():
        model.net[-1].weight.mul_(3)
        model.net[0].weight[0].fill_(0).__setitem__(0, 1e4)
        model.net[0].bias[0] = 1e4
        model.net[-1].weight[:, 0] = 0
    data = write_toy_data(path.parent / "data")
    return save_with_threshold(model, path, data={"kind": "toy", "config": {"root": str(data)},
                                                  "classes": ["normal", "fault"], "normal_classes": ["normal"]})


def test_int8_drift_is_refused_unless_allowed(tmp_path, capsys):
    ckpt = _outlier_toy(tmp_path / "outlier" / "model.pt")
    out = tmp_path / "int8"
    assert run_export("--checkpoint", ckpt, "--precision", "int8", "--out", out, *FAST) == pipeline.EXIT_PARITY
    assert not out.exists() and not list(tmp_path.glob(".int8*"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decision agreement" in err[0] and "nothing written" in err[0]
    assert run_export("--checkpoint", ckpt, "--precision", "int8", "--allow-drift", "--out", out, *FAST) == 0
    report = json.loads((out / "export.json").read_text())
    assert not report["reduced_precision"]["check"]["passed"]
    assert any("--allow-drift" in w for w in report["warnings"])


@pytest.mark.skipif(trt_and_gpu(), reason="tensorrt and a GPU are here: the engine is built instead")
def test_fp16_graph_is_checked_and_is_what_the_board_builds(toy_ckpt, tmp_path):
    out = tmp_path / "fp16"
    assert run_export("--checkpoint", toy_ckpt, "--target", "trt", "--precision", "fp16", "--preset", "thor",
                      "--out", out, *FAST) == pipeline.EXIT_BUILD_ON_BOARD
    import onnx

    graph = onnx.load(str(out / "model.fp16.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 in and out
    check = json.loads((out / "export.json").read_text())["reduced_precision"]["check"]
    assert check["passed"] and check["decision_agreement"] >= 0.95 and check["max_abs_error_std"] < 0.05
    script = (out / "build_engine.sh").read_text()
    assert "--onnx=model.fp16.onnx" in script and "--fp16" in script and "--useDLACore" not in script


@pytest.mark.gpu
@pytest.mark.skipif(not trt_and_gpu(), reason="needs tensorrt and a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_built_and_checked(toy_ckpt, tmp_path, precision):
    out = tmp_path / precision
    assert run_export("--checkpoint", toy_ckpt, "--target", "trt", "--precision", precision, "--out", out) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["tensorrt"]["status"] == "built" and report["tensorrt"]["parity"]["passed"]
    assert (out / "model.engine").stat().st_size > 0 and (out / "timing.cache").exists()


# --- presets ------------------------------------------------------------------------------------------------------
def test_presets_load():
    boards = {}
    for path in sorted(trt_compat.PRESET_DIR.glob("*.yaml")):
        preset, _ = trt_compat.load_preset(str(path))
        boards[preset.board] = preset
        assert preset.default_precision in trt_compat.PRECISIONS and preset.workspace_mb > 0 and preset.batch >= 1
        assert preset.cuda_arch.startswith("sm_") and preset.memory_gb > 0 and preset.jetpack
    assert {"orin-nano", "orin-nx", "agx-orin", "xavier-nx"} <= set(boards)
    assert trt_compat.table_version(boards["xavier-nx"].tensorrt) == (8, 5)  # JetPack 5.1
    assert trt_compat.table_version(boards["orin-nano"].tensorrt) == (10, 3)  # JetPack 6.1
    assert boards["orin-nano"].dla_cores == 0 and boards["agx-orin"].dla_cores == 2
    assert trt_compat.load_preset("orin-nx")[0] == boards["orin-nx"]  # bare board names work too


@pytest.mark.parametrize("extra,message", [({"workspace": 512}, "unknown config key preset.workspace"),
                                           ({"default_precision": "bf16"}, "default_precision"),
                                           ({"tensorrt": "7.1"}, "no operator table")])
def test_bad_preset_is_a_user_error(tmp_path, extra, message):
    values = {"board": "x", "tensorrt": "10.3", **extra}
    path = tmp_path / "p.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    with pytest.raises(cli.UserError, match=message):
        trt_compat.load_preset(str(path))


# --- TensorRT parser compatibility tables ---------------------------------------------------------------------
def _graph(nodes, inputs, initializers=()):
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [out], list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)])
    return model


def test_trt_compat_flags_unsupported_ops_and_restrictions():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])
    axis = helper.make_tensor_value_info("axis", TensorProto.INT64, [])  # computed at run time: not allowed
    model = _graph([helper.make_node("NonZero", ["x"], ["nz"]),
                    helper.make_node("CumSum", ["x", "axis"], ["cs"]),
                    helper.make_node("Unique", ["x"], ["u"]),
                    helper.make_node("LayerNormalization", ["x", "scale"], ["y"])],
                   [x, axis], [helper.make_tensor("scale", TensorProto.FLOAT, [3], [1, 1, 1])])

    def kinds(version):
        return {(i.kind, i.op) for i in trt_compat.problems(trt_compat.check_model(model, version))}

    assert {("unsupported_op", "NonZero"), ("restriction", "CumSum"), ("unsupported_op", "Unique"),
            ("unsupported_op", "LayerNormalization")} <= kinds("8.4")
    assert ("unsupported_op", "NonZero") not in kinds("8.5.2")  # NonZero arrived in 8.5
    assert {("restriction", "CumSum"), ("unsupported_op", "Unique"), ("unsupported_op", "LayerNormalization")} \
        <= kinds("8.5.2")
    assert kinds("10.3") == {("restriction", "CumSum"), ("unsupported_op", "Unique")}
    line = trt_compat.summary_line(trt_compat.check_model(model, "8.5"), "8.5", "xavier-nx")
    assert line.startswith("TensorRT 8.5 (xavier-nx): 3 problem(s)") and "Unique" in line and "\n" not in line
    report = trt_compat.report(model, "10.3")
    assert not report["ok"] and report["verified_on_device"] is False and "onnx-tensorrt" in report["source"]
    with pytest.raises(cli.UserError):
        trt_compat.check_model(model, "7.2")


def test_trt_compat_known_bad_cumsum_pattern_and_opset():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])
    axes = [helper.make_tensor("a0", TensorProto.INT64, [], [0]), helper.make_tensor("a1", TensorProto.INT64, [], [1])]
    model = _graph([helper.make_node("CumSum", ["x", "a0"], ["c0"]), helper.make_node("CumSum", ["c0", "a1"], ["y"])],
                   [x], axes)
    assert not trt_compat.problems(trt_compat.check_model(model, "10.3"))  # constant axes: fine before 10.8
    bad = trt_compat.problems(trt_compat.check_model(model, "10.8"))
    assert [(i.kind, i.op) for i in bad] == [("known_bad_pattern", "CumSum")]
    model.opset_import[0].version = 18
    assert [i.kind for i in trt_compat.problems(trt_compat.check_model(model, "8.5"))] == ["opset"]


# --- every model family at a small config (untrained weights: parity needs none) ------------------------------
_IMG = dict(n_classes=2, in_chans=1, image_size=32, classes=["ok", "bad"], normal_classes=["ok"])
FAMILIES = {
    "tastgram_mfn": dict(n_classes=2, clip_seconds=0.5, n_fft=256, hop=128, n_mels=32, tgram_win=256,
                         stem_channels=8, bottlenecks=[[2, 8, 1, 2]], head_channels=16, embedding_dim=8),
    "aegan_ad": dict(clip_seconds=0.6, n_fft=256, hop=64, channels=4, d_channels=4, latent_dim=8, window_hop=64,
                     input_min=-80.0, input_max=0.0, score="G-x-L2-mean"),
    "memorymamba": dict(_IMG, dims=[8, 16], depths=[1, 1], d_state=1, mem_mlp_ratio=1.0, coarse_slots=2,
                        fine_slots=2, mlp_ratio=1.0),
    "image_cnn": dict(_IMG, widths=[8, 16], depths=[1, 1]),
    "ldmamba": dict(n_classes=2, n_features=8, seq_len=16, d_model=16, stem_channels=[16], d_inner=[16],
                    se_hidden=[8], head_hidden=8, d_state=4),
    "seq_cnn": dict(n_classes=2, n_features=8, seq_len=16, channels=[8, 8], kernels=[3, 3], head_hidden=8),
}
# Example inputs of the audio models are one tone with little noise: their scores barely
# vary, so the std-standardised error of an untrained model is loose there.
TOLERANCE = {"aegan_ad": "1e-3"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_exports_with_parity(family, tmp_path):
    torch.manual_seed(0)
    model = create_model(family, **FAMILIES[family])
    ckpt = save_with_threshold(model, tmp_path / f"{family}.pt",
                               data={"kind": model.data_kind, "classes": ["ok", "bad"], "normal_classes": ["ok"]})
    out = tmp_path / "out"
    assert run_export("--checkpoint", ckpt, "--out", out, "--tolerance", TOLERANCE.get(family, "1e-4"), *FAST) == 0
    meta = read_metadata(out / "model.onnx")
    assert METADATA_KEYS <= set(meta) and meta["model_name"] == family
    if model.data_kind in ("image", "sequence"):  # input statistics the graph applies
        assert json.loads(meta["normalisation"])
    report = json.loads((out / "export.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["decisions_identical"]
    assert report["onnx"]["outputs"][0]["name"] == "score" and report["onnx"]["outputs"][0]["shape"] == [1]
    assert "STFT" not in report["onnx"]["ops"] and "DFT" not in report["onnx"]["ops"]  # pre-processing inside
    # the checkpoint and its graph report the same parameters and FLOPs (issue 25): what export traced
    from edgediag.measure.bench import attach_costs, load_artifact

    arts = [load_artifact(Path(ckpt)), load_artifact(out / "model.onnx")]
    attach_costs(arts)
    assert arts[0].params == arts[1].params == report["counts"]["params"]
    assert arts[0].flops["flops"] == arts[1].flops["flops"] == report["counts"]["flops_per_item"] > 0


@pytest.mark.parametrize("family", ["ldmamba", "memorymamba"])
def test_mamba_models_export_with_dynamic_batch(family, tmp_path):
    """The chunked scan and SS2D reshape with -1 on the batch axis, so a graph traced at
    batch 2 runs (with parity) on the parity items at any batch."""
    torch.manual_seed(0)
    model = create_model(family, **FAMILIES[family])
    ckpt = save_with_threshold(model, tmp_path / f"{family}.pt",
                               data={"kind": model.data_kind, "classes": ["ok", "bad"], "normal_classes": ["ok"]})
    out = tmp_path / "out"
    assert run_export("--checkpoint", ckpt, "--out", out, "--dynamic-batch", *FAST) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["onnx"]["inputs"][0]["shape"][0] == "batch" and report["parity"]["passed"]
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out / "model.onnx"))
    x = model.example_input(3).numpy()
    assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape == (3,)


# --- LayerNorm for TensorRT 8.5 ---------------------------------------------------------------------------------
@dataclasses.dataclass
class NormConfig:
    width: int = 6


@register_model("test_export_norm")
class NormModel(DiagnosisModel):
    Config = NormConfig
    data_kind = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.norm = nn.LayerNorm(config.width)
        self.proj = nn.Linear(config.width, 1)
        nn.init.normal_(self.norm.weight, 1.0, 0.3)

    def score(self, x):
        return self.proj(torch.tanh(self.norm(x))).squeeze(1)

    def example_input(self, batch_size=1):
        return torch.randn(batch_size, self.config.width, generator=torch.Generator().manual_seed(batch_size)) * 3


def test_layernorm_decomposed_for_tensorrt_8_5(tmp_path):
    torch.manual_seed(0)
    ckpt = save_with_threshold(NormModel(NormConfig()), tmp_path / "norm.pt")
    for board, decomposed in (("xavier-nx", True), ("orin-nano", False)):
        out = tmp_path / board
        assert run_export("--checkpoint", ckpt, "--preset", board, "--out", out, *FAST) == 0
        report = json.loads((out / "export.json").read_text())
        assert ("LayerNormalization" not in report["onnx"]["ops"]) == decomposed
        assert report["onnx"]["layernorm"] == ("decomposed" if decomposed else "op")
        assert report["parity"]["passed"] and all(r["ok"] for r in report["trt_compat"].values())


# --- streaming: a Mamba mixer's step() as a graph with its states as inputs and outputs ------------------------
class MixerStep(nn.Module):
    """MambaMixer.step as a streaming module (no model implements streaming_module() yet)."""

    input_names = ("x_t", "conv_state", "ssm_state")
    output_names = ("y_t", "conv_state_out", "ssm_state_out")

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, x_t, conv_state, ssm_state):
        return self.mixer.step(x_t, conv_state, ssm_state)

    def example_inputs(self, batch_size=1):
        return (torch.zeros(batch_size, self.mixer.d_model), *self.mixer.allocate_states(batch_size))

    def full_sequence(self, xs):
        return self.mixer(xs)


@dataclasses.dataclass
class StreamConfig:
    d_model: int = 8
    d_state: int = 4


@register_model("test_export_stream")
class StreamModel(DiagnosisModel):
    Config = StreamConfig
    data_kind = "sequence"

    def __init__(self, config):
        super().__init__(config)
        from edgediag.nn.mamba import MambaMixer

        self.mixer = MambaMixer(config.d_model, d_state=config.d_state)

    def score(self, x):
        return self.mixer(x).pow(2).mean(dim=(1, 2))

    def example_input(self, batch_size=1):
        return torch.randn(batch_size, 16, self.config.d_model)

    def streaming_module(self):
        return MixerStep(self.mixer)


def test_streaming_export_matches_the_full_sequence(tmp_path):
    torch.manual_seed(0)
    model = StreamModel(StreamConfig()).eval()
    ckpt = tmp_path / "stream.pt"
    save_checkpoint(ckpt, make_checkpoint(model))
    out = tmp_path / "stream"
    assert run_export("--checkpoint", ckpt, "--streaming", "--stream-steps", "40", "--out", out, *FAST) == 0
    report = json.loads((out / "export.json").read_text())
    parity = report["parity"]
    assert parity["passed"] and parity["steps"] == 40
    assert parity["reference"].startswith("PyTorch full-sequence forward")
    meta = read_metadata(out / "model.onnx")
    stream = json.loads(meta["streaming"])
    assert stream["state_inputs"] == ["conv_state", "ssm_state"]
    assert stream["state_outputs"] == ["conv_state_out", "ssm_state_out"]

    # stepping the graph by hand reproduces the mixer's full-sequence output
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"))
    xs = torch.randn(1, 25, 8)
    states = [s.numpy() for s in model.mixer.allocate_states(1)]
    ys = []
    for t in range(xs.shape[1]):
        y, *states = sess.run(None, {"x_t": xs[:, t].numpy(), "conv_state": states[0], "ssm_state": states[1]})
        ys.append(y)
    with torch.no_grad():
        np.testing.assert_allclose(np.stack(ys, 1), model.mixer(xs).numpy(), atol=1e-5)


def test_streaming_needs_a_streaming_form(toy_ckpt, tmp_path, capsys):
    assert run_export("--checkpoint", toy_ckpt, "--streaming", "--out", tmp_path / "s") == cli.EXIT_USAGE
    assert "no streaming form" in capsys.readouterr().err


def test_board_build_script_builds_the_checked_int8_graph(toy_ckpt, tmp_path):
    """jetson/build_engine.sh on an ONNX export (no build script of its own) with a preset and
    PRECISION=int8 builds model.int8.onnx with --int8 alone, then verifies the engine (which a
    fake trtexec cannot pass: the script must fail rather than hand out an unverified engine)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "int8"
    assert run_export("--checkpoint", toy_ckpt, "--precision", "int8", "--calib-items", "32", "--out", out,
                      *FAST) == pipeline.EXIT_OK
    fake = tmp_path / "trtexec"
    fake.write_text('#!/usr/bin/env bash\necho "$@" >> "$(dirname "$0")/calls.txt"\n'
                    'for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done\n')
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(["bash", str(root / "jetson" / "build_engine.sh"), str(out), "orin-nano"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRTEXEC": str(fake), "PRECISION": "int8", "PYTHON": sys.executable,
                              "PYTHONPATH": str(root)})
    build = (tmp_path / "calls.txt").read_text().splitlines()[0]
    assert "--onnx=model.int8.onnx" in build and "--int8" in build and "--calib" not in build, build
    assert res.returncode == 1 and "failed verification" in res.stderr  # no tensorrt here to run the engine


def test_board_build_script_dry_run_shows_build_and_verify(toy_ckpt, tmp_path):
    import os
    import subprocess

    out = tmp_path / "fp16"
    assert run_export("--checkpoint", toy_ckpt, "--precision", "fp16", "--out", out, *FAST) == pipeline.EXIT_OK
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRTEXEC"}
    res = subprocess.run(["bash", str(root / "jetson" / "build_engine.sh"), "--dry-run", str(out), "orin-nano"],
                         capture_output=True, text=True, timeout=120, env={**env, "PRECISION": "fp16"})
    assert res.returncode == 0, res.stderr
    steps = [ln for ln in res.stdout.splitlines() if ln.startswith("+ ")]
    assert "--onnx=model.fp16.onnx" in steps[0] and "--fp16" in steps[0]
    assert "-m edgediag.verify" in steps[1] and "--engine" in steps[1]
    assert "--loadEngine=" in steps[2]
    assert not (out / "model.engine").exists()
