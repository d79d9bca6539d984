"""Parse NVIDIA ``tegrastats`` logs (Jetson power, load, clocks) into a power summary.

    sudo tegrastats --interval 100 --logfile run.tegrastats &   # on the board, during a run
    python -m edgediag.tegrastats run.tegrastats --inferences 5000 --interval-ms 100

One tegrastats line per interval (``--interval`` ms, 1000 by default), e.g. JetPack 5.1/6.x
on an Orin Nano / NX:

    07-29-2026 18:00:27 RAM 2272/7620MB (lfb 4x4MB) SWAP 221/3810MB (cached 0MB)
    CPU [0%@729,0%@1036,off,...] EMC_FREQ 0% GR3D_FREQ 0% cpu@54.937C ... tj@56.656C
    VDD_IN 4673mW/4673mW VDD_CPU_GPU_CV 527mW/527mW VDD_SOC 1339mW/1339mW

(one line; the timestamp appears with ``--logfile`` on JetPack 5+, optional here). Rails are
``NAME current/average`` in mW (JetPack 5+) or bare numbers (JetPack 4). The board's input
power is ``VDD_IN`` (Orin Nano/NX, Xavier NX); the AGX Orin has no VDD_IN rail and its
module rails (``VDD_GPU_SOC``, ``VDD_CPU_CV``, ``VIN_SYS_5V0``, ``VDDQ_VDD2_1V8AO``) are
summed instead (``power_source`` says which). Energy = sum of instantaneous power x interval
(or the timestamps' spacing); energy per inference = that / the inferences run meanwhile.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable
from pathlib import Path

from edgediag.errors import UserError

_TIME = re.compile(r"^(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_FREQ = re.compile(r"\b(GR3D_FREQ|EMC_FREQ) (\d+)%(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b((?:VDD|VIN|VDDQ)_[A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?")
AGX_ORIN_RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO")


@dataclasses.dataclass
class Sample:
    """One tegrastats line. Loads in %, clocks in MHz, memory in MB, power in mW."""

    time: dt.datetime | None = None
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    cpu_load: list = dataclasses.field(default_factory=list)  # per core, None = off
    cpu_freq_mhz: list = dataclasses.field(default_factory=list)
    gpu_load: float | None = None  # GR3D_FREQ %
    gpu_freq_mhz: int | None = None
    emc_load: float | None = None
    temps_c: dict = dataclasses.field(default_factory=dict)
    rails_mw: dict = dataclasses.field(default_factory=dict)  # name -> (current, average)

    @property
    def cpu_load_mean(self) -> float | None:
        on = [v for v in self.cpu_load if v is not None]
        return sum(on) / len(on) if on else None

    def input_power_mw(self) -> tuple[float | None, str]:
        """(board input power, where it came from)."""
        if "VDD_IN" in self.rails_mw:
            return float(self.rails_mw["VDD_IN"][0]), "VDD_IN"
        agx = [r for r in AGX_ORIN_RAILS if r in self.rails_mw]
        if agx:
            return float(sum(self.rails_mw[r][0] for r in agx)), "+".join(agx)
        if self.rails_mw:
            return float(sum(v[0] for v in self.rails_mw.values())), "sum of rails"
        return None, ""


def parse_line(line: str) -> Sample | None:
    """A tegrastats line -> Sample; None for a line that is not tegrastats output (garbage
    that merely contains ``RAM`` or a rail-like word, with fields that do not parse, too)."""
    line = line.strip()
    if not line or "RAM " not in line and not _RAIL.search(line):
        return None
    try:
        return _parse(line)
    except (ValueError, IndexError, OverflowError):
        return None


def _parse(line: str) -> Sample:
    s = Sample()
    m = _TIME.match(line)
    if m:
        s.time = dt.datetime.strptime(m.group(1), "%m-%d-%Y %H:%M:%S")
    if m := _RAM.search(line):
        s.ram_used_mb, s.ram_total_mb = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(line):
        s.swap_used_mb, s.swap_total_mb = int(m.group(1)), int(m.group(2))
    if m := _CPU.search(line):
        for core in m.group(1).split(","):
            core = core.strip()
            if core == "off" or not core:
                s.cpu_load.append(None)
                s.cpu_freq_mhz.append(None)
                continue
            load, _, freq = core.partition("@")
            s.cpu_load.append(float(load.rstrip("%")))
            s.cpu_freq_mhz.append(int(freq) if freq.isdigit() else None)
    for m in _FREQ.finditer(line):
        load = float(m.group(2))
        freq = int(m.group(3).split(",")[0]) if m.group(3) else None
        if m.group(1) == "GR3D_FREQ":
            s.gpu_load, s.gpu_freq_mhz = load, freq
        else:
            s.emc_load = load
    for m in _TEMP.finditer(line):
        s.temps_c[m.group(1)] = float(m.group(2))
    for m in _RAIL.finditer(line):
        s.rails_mw[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return s


def parse_lines(lines: Iterable[str]) -> list[Sample]:
    return [s for s in (parse_line(line) for line in lines) if s is not None]


def read_log(path: str | Path) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tegrastats log not found: {path}")
    try:
        with open(path, errors="replace") as f:
            samples = parse_lines(f)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not samples:
        raise UserError(f"{path}: no tegrastats lines (expected lines like 'RAM 2272/7620MB ... VDD_IN 4673mW/4673mW')")
    return samples


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(samples: list[Sample], interval_ms: float | None = None, inferences: int | None = None,
              idle_mw: float | None = None) -> dict:
    """Power and load summary; energy from the instantaneous input power. ``interval_ms``
    defaults to the timestamps' mean spacing, else tegrastats' default 1000 ms. With
    ``idle_mw`` (the board's idle input power) the energy above idle is reported too."""
    if not samples:
        raise UserError("no tegrastats samples to summarise")
    power = [s.input_power_mw() for s in samples]
    mw = [p for p, _ in power if p is not None]
    source = next((src for p, src in power if p is not None), "")
    times = [s.time for s in samples if s.time is not None]
    if interval_ms is None:
        interval_ms = ((times[-1] - times[0]).total_seconds() * 1e3 / (len(times) - 1)
                       if len(times) >= 2 and times[-1] > times[0] else 1000.0)
    seconds = len(samples) * interval_ms / 1e3
    out: dict = {"samples": len(samples), "interval_ms": round(interval_ms, 3), "duration_s": round(seconds, 3),
                 "power_source": source,
                 "power_mean_w": round(sum(mw) / len(mw) / 1e3, 4) if mw else None,
                 "power_max_w": round(max(mw) / 1e3, 4) if mw else None,
                 "gpu_load_mean": _mean(s.gpu_load for s in samples),
                 "cpu_load_mean": _mean(s.cpu_load_mean for s in samples),
                 "emc_load_mean": _mean(s.emc_load for s in samples),
                 "ram_used_max_mb": max((s.ram_used_mb for s in samples if s.ram_used_mb is not None), default=None),
                 "temp_max_c": max((max(s.temps_c.values()) for s in samples if s.temps_c), default=None),
                 "rails_mean_w": {name: round(_mean(s.rails_mw.get(name, (None,))[0] for s in samples) / 1e3, 4)
                                  for name in dict.fromkeys(n for s in samples for n in s.rails_mw)}}
    if mw:
        energy = sum(mw) / 1e3 * interval_ms / 1e3 * (len(samples) / len(mw))  # J, gaps filled by the mean
        out["energy_j"] = round(energy, 4)
        if idle_mw is not None:
            out["energy_above_idle_j"] = round(max(0.0, energy - idle_mw / 1e3 * seconds), 4)
        if inferences:
            out["inferences"] = int(inferences)
            out["energy_per_inference_mj"] = round(energy / inferences * 1e3, 4)
            if idle_mw is not None:
                out["energy_above_idle_per_inference_mj"] = round(out["energy_above_idle_j"] / inferences * 1e3, 4)
    return out
