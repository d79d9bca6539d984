"""edgediag.tegrastats: lines in NVIDIA's documented tegrastats format (JetPack 4, 5 and 6;
Orin Nano/NX with VDD_IN, AGX Orin with module rails), power summary, energy per inference."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from edgediag import cli
from edgediag import tegrastats as tegrastats_verb
from edgediag.runtime import tegrastats

# JetPack 5.1 / 6.x, Orin Nano (tegrastats --logfile adds the timestamp)
ORIN_NANO = ("07-29-2026 18:00:27 RAM 2272/7620MB (lfb 4x4MB) SWAP 221/3810MB (cached 0MB) "
             "CPU [0%@729,12%@1036,off,0%@1036,40%@729,0%@729] EMC_FREQ 3%@2133 GR3D_FREQ 45%@[305,305] "
             "cpu@54.937C soc2@55.562C soc0@56.156C gpu@55.468C tj@56.656C soc1@56.656C "
             "VDD_IN 4673mW/4600mW VDD_CPU_GPU_CV 527mW/527mW VDD_SOC 1339mW/1339mW")
# without a timestamp, GR3D without clocks (the format of the brief / tegrastats on stdout)
PLAIN = ("RAM 2448/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [12%@1510,8%@1510,3%@1510,1%@1510] "
         "EMC_FREQ 0% GR3D_FREQ 0% cpu@45.5C gpu@44.5C VDD_IN 4803mW/4803mW VDD_CPU_GPU_CV 561mW/561mW "
         "VDD_SOC 1442mW/1442mW")
# AGX Orin: no VDD_IN rail, module rails instead
AGX_ORIN = ("RAM 13123/62841MB (lfb 63x4MB) SWAP 9/31420MB (cached 0MB) CPU [3%@729,4%@729,off,off] "
            "GR3D_FREQ 0% cpu@48.156C soc2@43.562C tj@48.156C VDD_GPU_SOC 3193mW/3193mW "
            "VDD_CPU_CV 399mW/399mW VIN_SYS_5V0 4306mW/4306mW VDDQ_VDD2_1V8AO 400mW/400mW")
# JetPack 4.x (Xavier NX): rails as bare numbers in mW
JETPACK4 = ("RAM 1906/7772MB (lfb 1x4MB) SWAP 0/3886MB (cached 0MB) CPU [4%@1190,2%@1190] EMC_FREQ 0% "
            "GR3D_FREQ 0% AO@37C GPU@37.5C thermal@37.2C VDD_IN 4753/4753 VDD_CPU_GPU_CV 1055/1055 "
            "VDD_SOC 1473/1473")


def test_orin_line_fields():
    s = tegrastats.parse_line(ORIN_NANO)
    assert s.time == dt.datetime(2026, 7, 29, 18, 0, 27)
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb, s.swap_total_mb) == (2272, 7620, 221, 3810)
    assert s.cpu_load == [0.0, 12.0, None, 0.0, 40.0, 0.0] and s.cpu_freq_mhz[1] == 1036
    assert s.cpu_load_mean == pytest.approx(52 / 5)
    assert (s.gpu_load, s.gpu_freq_mhz, s.emc_load) == (45.0, 305, 3.0)
    assert s.temps_c["tj"] == pytest.approx(56.656) and len(s.temps_c) == 6
    assert s.rails_mw["VDD_IN"] == (4673, 4600)
    assert s.input_power_mw() == (4673.0, "VDD_IN")  # the instantaneous value, not the average


def test_other_boards_and_jetpack_versions():
    plain = tegrastats.parse_line(PLAIN)
    assert plain.time is None and plain.gpu_load == 0.0 and plain.gpu_freq_mhz is None
    assert plain.input_power_mw()[0] == 4803.0
    agx = tegrastats.parse_line(AGX_ORIN)
    power, source = agx.input_power_mw()
    assert power == 3193 + 399 + 4306 + 400 and "VDD_GPU_SOC" in source
    jp4 = tegrastats.parse_line(JETPACK4)
    assert jp4.rails_mw["VDD_IN"] == (4753, 4753) and jp4.temps_c["GPU"] == 37.5
    assert tegrastats.parse_line("") is None and tegrastats.parse_line("some other log line") is None


def test_summary_energy_per_inference():
    lines = [ORIN_NANO.replace("18:00:27", f"18:00:{27 + i}").replace("VDD_IN 4673mW", f"VDD_IN {4000 + 1000 * i}mW")
             for i in range(3)]  # 4, 5, 6 W at 1 s spacing
    summary = tegrastats.summarize(tegrastats.parse_lines(["junk", *lines]), inferences=300, idle_mw=3000)
    assert summary["samples"] == 3 and summary["interval_ms"] == 1000.0
    assert summary["power_mean_w"] == pytest.approx(5.0) and summary["power_max_w"] == pytest.approx(6.0)
    assert summary["energy_j"] == pytest.approx(15.0)
    assert summary["energy_per_inference_mj"] == pytest.approx(50.0)
    assert summary["energy_above_idle_j"] == pytest.approx(6.0)
    assert summary["gpu_load_mean"] == 45.0 and summary["rails_mean_w"]["VDD_SOC"] == pytest.approx(1.339)
    fast = tegrastats.summarize(tegrastats.parse_lines([PLAIN] * 10), interval_ms=100)
    assert fast["duration_s"] == pytest.approx(1.0) and fast["energy_j"] == pytest.approx(4.803)


def test_cli(tmp_path, capsys):
    log = tmp_path / "run.tegrastats"
    log.write_text("\n".join([PLAIN] * 4) + "\n")
    assert cli.run(tegrastats_verb.main, [str(log), "--inferences", "40", "--interval-ms", "500"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["energy_per_inference_mj"] == pytest.approx(4.803 * 2 / 40 * 1e3)
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    assert cli.run(tegrastats_verb.main, [str(empty)]) == cli.EXIT_USAGE
    assert cli.run(tegrastats_verb.main, [str(tmp_path / "missing.log")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err)
