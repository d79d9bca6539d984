"""benchmarks/gpu_check.py (`make gpu-check`): its CPU-skip path for real, its tables, its
kernel-parity logic with a stand-in kernel on CPU, and the real parity check where CUDA and
mamba-ssm exist."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

try:
    import mamba_ssm  # noqa: F401
    HAS_MAMBA = True
except Exception:
    HAS_MAMBA = False


def load_script():
    """benchmarks/ is not a package: the script imported from its path."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load_script()


@pytest.fixture
def scan():
    return importlib.import_module("edgediag.ops.selective_scan")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-skip path needs a machine without CUDA")
def test_without_cuda_one_line_nothing_written_exit_0(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device here"), proc.stdout
    for skipped in ("kernel parity", "CUDA training", "TensorRT", "ldmamba"):
        assert skipped in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, not even the default folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-skip path needs a machine without CUDA")
def test_main_in_process_skips_and_rejects_unknown_families(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "o"), "--families", "memorymamba"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("gpu-check: no CUDA device here") and "memorymamba" in line and "ldmamba" not in line
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--families", "no_such_family"])
    assert exc.value.code == 2


def test_tables_render_skipped_and_failed_rows(gpu_check):
    rows = [
        {"family": "ldmamba", "precision": "fp32", "export_exit": 0, "verify_exit": 0, "engine_ms": 0.41234,
         "ort_cpu_ms": 12.5, "status": "ok"},
        {"family": "ldmamba", "precision": "int8", "export_exit": 4,
         "status": "FAILED: parity or fp32 agreement (export exit 4)"},
        {"family": "aegan_ad", "precision": "fp16", "status": "skipped: tensorrt is not installed here"},
        {"family": "x", "precision": "fp32", "status": "FAILED: RuntimeError: a|b\nsecond line"},
    ]
    table = gpu_check.format_table(rows, gpu_check.TRT_COLS).splitlines()
    assert table[0] == "| family | precision | export exit | verify exit | engine ms | ORT-CPU ms | status |"
    assert table[1] == "|---|---|---|---|---|---|---|"
    assert table[2] == "| ldmamba | fp32 | 0 | 0 | 0.4123 | 12.5 | ok |"
    assert table[3] == "| ldmamba | int8 | 4 | - | - | - | FAILED: parity or fp32 agreement (export exit 4) |"
    assert table[4] == "| aegan_ad | fp16 | - | - | - | - | skipped: tensorrt is not installed here |"
    assert table[5].endswith("| FAILED: RuntimeError: a\\|b second line |")  # one row, the pipe escaped
    assert [gpu_check.failed(r) for r in rows] == [False, True, False, True]

    report = {"device": "NVIDIA H100", "torch": "2.x", "mamba_ssm": None, "tensorrt": "10.3", "budget_s": 600,
              "seconds": 42.0, "passed": False,
              "kernel_parity": [{"check": "mamba-ssm kernel", "status": gpu_check.NO_MAMBA}],
              "training": [{"family": "ldmamba", "model": "ldmamba_small", "exit": 0, "seconds": 3.2,
                            "scan_backend": "chunked", "status": f"ok; kernel {gpu_check.NO_MAMBA}"},
                           {"family": "memorymamba", "model": "memorymamba_nano",
                            "status": "skipped: time budget (600 s) spent"}],
              "trt": rows}
    md = gpu_check.render_markdown(report)
    assert md.startswith("# gpu-check: FAILED")
    assert "mamba-ssm -, tensorrt 10.3; 42 s of a 600 s budget" in md
    assert "| mamba-ssm kernel | - | - | skipped: mamba-ssm not importable |" in md
    assert "| ldmamba | ldmamba_small | 0 | 3.2 | chunked | ok; kernel skipped: mamba-ssm not importable |" in md
    assert "| memorymamba | memorymamba_nano | - | - | - | skipped: time budget (600 s) spent |" in md
    assert md.index("## mamba-ssm kernel parity") < md.index("## Training on CUDA") < md.index("## TensorRT engines")


def test_budget_notes_when_spent(gpu_check):
    assert gpu_check.Budget(600).spent() == ""
    assert gpu_check.Budget(0).spent() == "skipped: time budget (0 s) spent"


def test_main_writes_reports_and_exit_code_follows_failures(gpu_check, tmp_path, monkeypatch, capsys):
    """The orchestration with CUDA faked and the three steps stubbed: reports written, exit 1 on a
    failed row, 0 when every row passed or was skipped."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    calls = {}

    def fake_train(out, families, budget, steps):
        calls["train"] = (families, steps)
        return [{"family": f, "model": f, "exit": 0, "status": "ok"} for f in families], {f: out for f in families}

    def fake_trt(out, checkpoints, families, budget):
        calls["trt"] = sorted(checkpoints)
        return [{"family": f, "precision": "fp32", "status": status} for f in families]

    monkeypatch.setattr(gpu_check, "kernel_parity", lambda: [{"check": "c", "status": "ok"}])
    monkeypatch.setattr(gpu_check, "train_steps", fake_train)
    for status, code in (("FAILED: verify exit 1", 1), ("skipped: tensorrt is not installed here", 0)):
        monkeypatch.setattr(gpu_check, "trt_rows", fake_trt)
        out = tmp_path / status[:6]
        assert gpu_check.main(["--out", str(out), "--families", "ldmamba", "--train-steps", "3"]) == code
        report = json.loads((out / "gpu_check.json").read_text())
        assert report["passed"] is (code == 0) and report["device"] == "Fake GPU"
        assert report["trt"][0]["status"] == status
        assert status in (out / "gpu_check.md").read_text()
        assert calls == {"train": (["ldmamba"], 3), "trt": ["ldmamba"]}
        assert capsys.readouterr().out.rstrip().endswith(f"report: {out / 'gpu_check.md'}")

    def broken():
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu_check, "kernel_parity", broken)  # a step that raises past its own guards
    assert gpu_check.main(["--out", str(tmp_path / "broken"), "--families", "ldmamba"]) == 1
    report = json.loads((tmp_path / "broken" / "gpu_check.json").read_text())
    assert report["kernel_parity"] == [{"check": "kernel_parity", "status": "FAILED: RuntimeError: kernel exploded"}]
    assert report["training"][0]["status"] == "ok" and report["trt"][0]["family"] == "ldmamba"  # the rest ran


def _stand_in_kernel(monkeypatch, scan, kernel):
    """CUDA faked on CPU: .cuda() is the identity and ``kernel`` plays mamba-ssm's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(scan, "_mamba_scan_fn", lambda: object())
    monkeypatch.setattr(scan, "selective_scan_cuda", kernel)
    monkeypatch.setattr(scan, "resolve_backend", lambda *a, **k: "cuda")


def test_kernel_parity_logic_with_a_stand_in_kernel(gpu_check, scan, monkeypatch):
    """The parity loop on CPU, the chunked scan standing in for the kernel: every case passes;
    a kernel off by 1 % fails each forward and backward case."""
    _stand_in_kernel(monkeypatch, scan, scan.selective_scan_chunked)
    rows = gpu_check.kernel_parity()
    assert [r["check"] for r in rows[:6]] == ["forward B/C const", "forward B/C var", "forward B/C grouped",
                                              "forward B/C var", "backward B/C var", "backward B/C grouped"]
    assert rows[3]["shape"] == "b1 d256 n16 L1024"
    assert all(r["status"].startswith("ok") for r in rows), rows
    assert all(r["rel_err"] < 1e-5 for r in rows[:6])

    def off_kernel(*args, **kw):
        res = scan.selective_scan_chunked(*args, **kw)
        return tuple(t * 1.01 for t in res) if isinstance(res, tuple) else res * 1.01

    _stand_in_kernel(monkeypatch, scan, off_kernel)
    rows = gpu_check.kernel_parity()
    assert all(gpu_check.failed(r) for r in rows[:6]), rows
    assert "beyond rtol 0.0006 / atol 0.002" in rows[0]["status"]
    assert "beyond rtol 0.002 / atol 0.005" in rows[4]["status"]


def test_kernel_parity_reports_missing_pieces(gpu_check, scan, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.kernel_parity() == [{"check": "mamba-ssm kernel", "status": "skipped: no CUDA device"}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(scan, "_mamba_scan_fn", lambda: None)
    assert gpu_check.kernel_parity() == [{"check": "mamba-ssm kernel", "status": "skipped: mamba-ssm not importable"}]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_MAMBA,
                    reason="needs a CUDA device and the mamba-ssm package")
def test_kernel_parity_on_cuda(gpu_check):
    rows = gpu_check.kernel_parity()
    assert len(rows) == 7
    assert all(r["status"].startswith("ok") for r in rows), gpu_check.format_table(rows, gpu_check.PARITY_COLS)
