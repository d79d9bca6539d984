"""The self-verifying export bundle: golden inputs, tolerances and a sha256 manifest written by
export, checked torch-free by `python -m edgediag.verify` (export/README.md, "Self-verifying
bundle"). Uses the small fitted band-energy audio model of test_runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgediag import cli
from edgediag import verify as verify_verb
from tests.test_runtime import build_band_artifacts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_band_artifacts(tmp_path_factory.mktemp("verify"))["onnx"].parent


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def run_verify(*args) -> int:
    return cli.run(verify_verb.main, [str(a) for a in args])


def test_export_writes_a_bundle_that_verifies(bundle, capsys):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"model.onnx", "export.json", "golden.npz", "verify.json"} <= set(manifest["files"])
    info = json.loads((bundle / "verify.json").read_text())
    assert info["tolerance"]["onnx"] == 1e-4 and info["score_scale"] > 0 and 1 <= info["items"] <= 4
    with np.load(bundle / "golden.npz") as z:
        assert {"input/input", "output/score", "decisions"} <= set(z.files)
    assert run_verify(bundle, "--threads", "1") == 0
    out = capsys.readouterr().out
    assert "decisions agree" in out and "model.onnx:score" in out and "ok" in out


def test_a_changed_graph_byte_is_tampering(copy, capsys):
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    assert run_verify(copy, "--threads", "1") == 1
    captured = capsys.readouterr()
    assert "model.onnx: FAIL: sha256 differs" in captured.err


def test_an_unlisted_graph_is_tampering(copy, capsys):
    shutil.copy(copy / "model.onnx", copy / "extra.onnx")
    assert run_verify(copy, "--threads", "1") == 1
    assert "extra.onnx: FAIL: not in the manifest" in capsys.readouterr().err


def test_a_golden_reference_beyond_tolerance_fails(copy, capsys):
    with np.load(copy / "golden.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output/score"] = arrays["output/score"] + 10 * json.loads((copy / "verify.json").read_text())["score_scale"]
    np.savez(copy / "golden.npz", **arrays)
    # re-sign the manifest: the digests pass, the comparison must catch it
    from edgediag.deploy.bundle import write_manifest

    write_manifest(copy)
    assert run_verify(copy, "--threads", "1") == 1
    assert "FAIL: beyond tolerance" in capsys.readouterr().err


def test_a_missing_manifest_is_a_clear_error(copy, capsys):
    (copy / "manifest.json").unlink()
    assert run_verify(copy) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no manifest.json" in err and len(err.strip().splitlines()) == 1


def test_engine_without_tensorrt_exits_3(copy, capsys):
    pytest.importorskip("onnxruntime")
    if __import__("importlib").util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    (copy / "model.engine").write_bytes(b"not an engine")
    assert run_verify(copy, "--engine", copy / "model.engine") == 3
    err = capsys.readouterr().err.strip()
    assert "tensorrt is not installed" in err and len(err.splitlines()) == 1


def test_verify_runs_without_torch(bundle):
    out = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['torch'] = None\n"
                          "from edgediag import cli, verify\n"
                          f"sys.exit(cli.run(verify.main, [{str(bundle)!r}, '--threads', '1']))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "verify:" in out.stdout


def test_verify_without_torch_fails_on_altered_weights_even_when_re_signed(copy):
    """The weights of model.onnx changed and the manifest rewritten to match (a digest check
    alone would pass): the golden comparison, run with torch unimportable, must fail."""
    import onnx
    from onnx import numpy_helper

    from edgediag.deploy.bundle import write_manifest

    graph = onnx.load(str(copy / "model.onnx"))
    big = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) * 1.5, big.name))
    onnx.save(graph, str(copy / "model.onnx"))
    write_manifest(copy)
    out = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['torch'] = None\n"
                          "from edgediag import cli, verify\n"
                          f"sys.exit(cli.run(verify.main, [{str(copy)!r}, '--threads', '1']))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "model.onnx:score" in out.stdout + out.stderr and "FAIL" in out.stdout + out.stderr


@pytest.mark.parametrize("family,extra", [("tastgram_mfn", []), ("aegan_ad", []), ("image_cnn", []),
                                          ("seq_cnn", []), ("ldmamba", ["--dynamic-batch"])])
def test_every_family_bundle_verifies(family, extra, tmp_path, capsys):
    """Small configs of test_export: several outputs (tastgram_mfn: class_scores, embedding),
    images, sequences, a dynamic batch."""
    import torch

    from edgediag.models import create_model
    from tests.test_export import FAMILIES, FAST, TOLERANCE, run_export, save_with_threshold

    torch.manual_seed(0)
    model = create_model(family, **FAMILIES[family])
    ckpt = save_with_threshold(model, tmp_path / f"{family}.pt",
                               data={"kind": model.data_kind, "classes": ["ok", "bad"], "normal_classes": ["ok"]})
    out = tmp_path / "out"
    assert run_export("--checkpoint", ckpt, "--out", out, "--tolerance", TOLERANCE.get(family, "1e-4"),
                      *extra, *FAST) == 0
    capsys.readouterr()
    assert run_verify(out, "--threads", "1") == 0, capsys.readouterr()
    assert (out / "golden.npz").stat().st_size < 4 << 20


def test_streaming_bundle_checks_digests_only(tmp_path, capsys):
    from tests.test_runtime import build_ema_artifacts

    out = build_ema_artifacts(tmp_path)["onnx"].parent
    capsys.readouterr()
    assert (out / "manifest.json").is_file() and not (out / "golden.npz").exists()
    assert run_verify(out, "--threads", "1") == 0
    assert "streaming export: no golden inputs" in capsys.readouterr().out
