"""benchmarks/scan_report.py, issue 24's measuring instrument, on tiny sizes: every part runs,
its timing protocol is what the header says, and its error columns hold the kernel to the
reference. The figures themselves are measured by running the script, not here."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from edgediag.ops import _cpu_ext

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scan_report.py"


@pytest.fixture(scope="module")
def scan_report():
    if _cpu_ext.load_extension() is None:
        pytest.skip(f"native CPU selective scan could not be built: {_cpu_ext.build_error()}")
    spec = importlib.util.spec_from_file_location("scan_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_burst_times_each_call_after_an_untimed_one(scan_report):
    calls = []
    ticks = iter(range(100))
    times = scan_report.timed_burst(lambda: calls.append(1), lambda: next(ticks), 3)
    assert len(calls) == 4 and times == [1, 1, 1]  # one untimed call, then three timed
    calls.clear()
    assert scan_report.timed_burst(lambda: calls.append(1), lambda: next(ticks), 0) == [1] and len(calls) == 1


def test_every_part_runs_and_the_errors_are_small(scan_report, capsys):
    assert scan_report.main(["--seqlens", "64", "--dstates", "1,16", "--threads", "1,2", "--rounds", "1",
                             "--burst", "1", "--onnx-seqlens", "64", "--onnx-dstates", "16",
                             "--split-seqlens", "64", "--default-malloc"]) == 0
    out = capsys.readouterr().out
    assert "one untimed call, then 1 timed" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+64\s+(1|16)\s+[12] \|", line)]
    assert len(rows) == 4  # (N 1, N 16) x (1, 2 threads)
    for row in rows:
        assert float(row.split()[-1]) <= 1e-4  # grad err, native against ref
    assert re.search(r"1 -> 2 threads.*L=64 N=16: [\d.]+x \(matmul [\d.]+x\)", out)
    assert "Part 2" in out and "Part 3" in out and out.rstrip().splitlines()[-1].startswith("goals (issue 24)")
