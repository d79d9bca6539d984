"""edgediag::SelectiveScan, the scan as an ONNX Runtime custom op (kernels/selective_scan_ort.cpp):
the op against selective_scan_ref, its errors, the headers' fetch, and `export --scan-op custom`
through to the board's verify and predictor."""

import hashlib
import io
import json
import tarfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgediag import cli, export
from edgediag.models import create_model
from edgediag.ops import selective_scan_ref
from edgediag.runtime import custom_ops
from tests.test_export import FAMILIES, FAST, save_with_threshold

_UNAVAILABLE = custom_ops.available()
needs_op = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"custom op not buildable here: {_UNAVAILABLE}")

# (batch, dim, L, N, B/C: "inv" | groups, z?) -> the wide layout (N > 4), the narrow one
# (N <= 4, channel lanes: MemoryMamba's d_state 1 with SS2D's 4 direction groups), an odd
# N, a length that is no multiple of the tile, time-invariant B/C
CASES = [(2, 64, 100, 16, 1, True), (1, 32, 77, 1, 4, False), (1, 24, 33, 3, 1, True),
         (2, 16, 50, 16, "inv", True), (1, 16, 9, 2, 2, True)]
# fp32 kernel against the fp32 sequential reference: max |y - ref| / max |ref|
REL_TOL = 2e-6


def _scan_graph(with_z: bool) -> bytes:
    names = ["u", "delta", "A", "B", "C", "D", "delta_bias"] + (["z"] if with_z else [])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    node = helper.make_node("SelectiveScan", names, ["y"], domain="edgediag", delta_softplus=1)
    graph = helper.make_graph([node], "scan", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgediag", 1)])
    return model.SerializeToString()


def _inputs(batch, dim, L, N, groups, with_z):
    g = torch.Generator().manual_seed(batch * 1000 + dim + L + N)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (lambda: r(dim, N)) if groups == "inv" else (lambda: r(batch, groups, N, L))
    return dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L), A=-torch.rand(dim, N, generator=g) - 0.1,
                B=bc(), C=bc(), D=r(dim), delta_bias=0.1 * r(dim), z=r(batch, dim, L) if with_z else None)


@needs_op
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}L{}N{}G{}z{}".format(*c))
def test_op_matches_the_reference(case):
    x = _inputs(*case)
    ref = selective_scan_ref(**x, delta_softplus=True).numpy()
    session = custom_ops.open_session(_scan_graph(x["z"] is not None))
    y = session.run(None, {k: v.numpy() for k, v in x.items() if v is not None})[0]
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() / np.abs(ref).max() < REL_TOL


@needs_op
def test_op_reports_a_bad_shape_in_one_message():
    x = _inputs(1, 16, 20, 4, 1, True)
    x["A"] = torch.zeros(3, 3)
    session = custom_ops.open_session(_scan_graph(True))
    with pytest.raises(Exception, match=r"edgediag::SelectiveScan: A must be \(dim, N\), got \(3, 3\)"):
        session.run(None, {k: v.numpy() for k, v in x.items()})


def test_missing_headers_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDIAG_CACHE", str(tmp_path))
    monkeypatch.setenv("EDGEDIAG_ORT_INCLUDE", str(tmp_path / "nowhere"))
    monkeypatch.setattr(custom_ops, "include_dir", lambda: None)
    monkeypatch.setattr(custom_ops, "_library", None)
    with pytest.raises(custom_ops.CustomOpsUnavailable, match="fetch-headers"):
        custom_ops.library_path()
    # an ordinary graph never needs the library
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]), opset_imports=[helper.make_opsetid("", 17)])
    assert custom_ops.open_session(plain.SerializeToString()).run(None, {"x": np.array([-1, 2], np.float32)})[0][1] == 2


def _deb(files: dict[str, bytes]) -> bytes:
    """A .deb as dpkg writes it: an ar archive of debian-binary, control.tar.xz, data.tar.xz."""
    def tar_xz(entries):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    out = b"!<arch>\n"
    for name, data in [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"./control": b"Package: x\n"})),
                       ("data.tar.xz", tar_xz(files))]:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def test_fetch_headers_checks_the_digest_and_keeps_the_headers(tmp_path, monkeypatch):
    deb = _deb({"./usr/include/onnxruntime/onnxruntime_c_api.h": b"// c api\n",
                "./usr/include/onnxruntime/core/providers/x.h": b"// nested\n",
                "./usr/share/doc/libonnxruntime-dev/copyright": b"MIT\n"})
    (tmp_path / "pkg.deb").write_bytes(deb)
    monkeypatch.setenv("EDGEDIAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEDIAG_ORT_INCLUDE", "")
    monkeypatch.setattr(custom_ops, "include_dir", lambda: None)  # not the machine's own copy
    monkeypatch.setattr(custom_ops, "HEADERS_DEB", (tmp_path / "pkg.deb").as_uri())
    monkeypatch.setattr(custom_ops, "HEADERS_SHA256", "0" * 64)
    with pytest.raises(custom_ops.CustomOpsUnavailable, match="sha256"):
        custom_ops.fetch_headers()
    assert not (tmp_path / "cache" / "onnxruntime-headers" / custom_ops.HEADERS_VERSION).exists()
    monkeypatch.setattr(custom_ops, "HEADERS_SHA256", hashlib.sha256(deb).hexdigest())
    folder = custom_ops.fetch_headers()
    assert (folder / "onnxruntime_c_api.h").read_bytes() == b"// c api\n"
    assert (folder / "core" / "providers" / "x.h").is_file()
    assert sorted(p.name for p in folder.parent.iterdir()) == [custom_ops.HEADERS_VERSION]  # no staging left


@needs_op
@pytest.mark.parametrize("family", ["ldmamba", "memorymamba"])
def test_export_with_the_custom_scan_op_verifies_and_predicts(family, tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model(family, **FAMILIES[family])
    ckpt = save_with_threshold(model, tmp_path / f"{family}.pt",
                               data={"kind": model.data_kind, "classes": ["ok", "bad"], "normal_classes": ["ok"]})
    assert cli.run(export.main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "graph"), *FAST]) == 0
    out = tmp_path / "custom"
    assert cli.run(export.main, ["--checkpoint", str(ckpt), "--out", str(out), "--scan-op", "custom", *FAST]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["decisions_identical"]
    custom = onnx.load(str(out / "model.onnx"))
    scans = [n for n in custom.graph.node if n.domain == "edgediag"]
    assert scans and all(n.op_type == "SelectiveScan" for n in scans)
    assert {o.domain: o.version for o in custom.opset_import}["edgediag"] == 1
    assert len(custom.graph.node) < report["onnx"]["nodes"] + 1 < len(onnx.load(str(tmp_path / "graph" / "model.onnx")).graph.node)
    assert any("edgediag::SelectiveScan" in w for w in report["warnings"])
    # the bundle verifies itself, and the board's predictor loads it, with the library
    from edgediag import verify
    from edgediag.runtime import load

    assert cli.run(verify.main, [str(out)]) == 0
    x = model.example_input(1).float().numpy()
    with torch.no_grad():
        expected = float(model.export_module().eval()(torch.from_numpy(x))[0])
    assert load(out / "model.onnx").score(x)[0] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # where the library cannot be built, loading the graph is one error line and exit 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(custom_ops, "include_dir", lambda: None)
        mp.setattr(custom_ops, "_library", None)
        capsys.readouterr()
        assert cli.run(verify.main, [str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "uses the edgediag::SelectiveScan op, which cannot be loaded here" in err[0]


@pytest.mark.parametrize("extra", [["--target", "trt"], ["--precision", "fp16"], ["--exporter", "dynamo"]])
def test_custom_scan_op_refuses_what_cannot_read_it(extra, tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("ldmamba", **FAMILIES["ldmamba"])
    ckpt = save_with_threshold(model, tmp_path / "m.pt",
                               data={"kind": model.data_kind, "classes": ["ok", "bad"], "normal_classes": ["ok"]})
    code = cli.run(export.main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--scan-op", "custom",
                                 *extra, *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--scan-op custom needs --target onnx" in err[0]
    assert not (tmp_path / "o").exists()
