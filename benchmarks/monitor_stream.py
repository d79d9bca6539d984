"""Measured figures of issue 11 (python -m edgediag.monitor on exported ONNX graphs).

1. fan: real fan recordings (../shared/data/fan_sensiml, test split) ON x N then BLADE FAULT x M,
   concatenated into one wav, through the monitor verb: time of the first alarm after the
   change, alarms during ON.
2. cwru: the CWRU normal recording then a fault recording (test part of each: the last
   ``data.test_fraction`` = 25 % that the model never trained on), as sensor CSV on stdin,
   through a window graph and (``--cwru-stream-model``) a streaming graph with carried states.
3. rtf: real-time factor on one core (ONNX Runtime intra-op threads = 1) of the fan model:
   the monitor verb on a long wav with hop = window (every sample scored once).
4. rss: a simulated one-hour stream of synthetic machine sound, generated chunk by chunk,
   through the monitor core; RSS every simulated minute after a warm-up.

    PYTHONPATH=. python benchmarks/monitor_stream.py --fan-model export/fan/model.onnx \\
        --cwru-model export/cwru/model.onnx [--only fan,cwru,rtf,rss] [--json out.json]

Prints one block per figure and a JSON summary.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgediag import cli, runtime  # noqa: E402
from edgediag import monitor as monitor_verb  # noqa: E402
from edgediag.data.sequences import read_mat_signal  # noqa: E402
from edgediag.data.synth_audio import machine_clip  # noqa: E402
from edgediag.runtime import monitor  # noqa: E402

DATA = Path(os.environ.get("EDGEDIAG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def run_verb(args: list[str], stdin_text: str | None = None) -> list[dict]:
    """The monitor verb in this process; its JSON-lines events."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "events.jsonl"
        old = sys.stdin
        try:
            if stdin_text is not None:
                sys.stdin = io.StringIO(stdin_text)
            rc = cli.run(monitor_verb.main, [*map(str, args), "--out", str(out)])
        finally:
            sys.stdin = old
        if rc != 0:
            raise SystemExit(f"monitor exited {rc}")
        return [json.loads(line) for line in out.read_text().splitlines()]


def alarm_report(evs: list[dict], change_t: float) -> dict:
    win = [e for e in evs if e["type"] == "window"]
    ons = [e["t"] for e in win if e.get("change") == "on"]
    after = [t for t in ons if t > change_t]
    before = [e for e in win if e["t"] <= change_t]
    fault = [e for e in win if e["t"] > change_t]
    return {"change_s": round(change_t, 3), "windows": len(win),
            "alarm_windows_before_change": sum(e["alarm"] for e in before),
            "alarms_before_change": sum(t <= change_t for t in ons),
            "first_alarm_after_change_s": after[0] if after else None,
            "alarm_delay_s": round(after[0] - change_t, 3) if after else None,
            "alarm_at_end": win[-1]["alarm"] if win else None,
            "normal_score_max": max(e["smoothed"] for e in before) if before else None,
            "fault_score_median": float(np.median([e["smoothed"] for e in fault])) if fault else None,
            "flags": dict(next(e for e in evs if e["type"] == "summary")["flags"])}


# --- 1. fan ----------------------------------------------------------------------------------------
def fan_stream(model: Path, n_on: int, n_fault: int, extra: list[str]) -> dict:
    root = DATA / "fan_sensiml"
    rows = list(csv.DictReader(open(root / "labels.csv")))
    on = [r["path"] for r in rows if r["label"] == "ON" and r.get("split") == "test"][:n_on]
    bad = [r["path"] for r in rows if r["label"] == "BLADE FAULT" and r.get("split") == "test"][:n_fault]
    parts = [sf.read(str(root / p), dtype="float32")[0] for p in on + bad]
    sr = sf.info(str(root / on[0])).samplerate
    change = sum(len(p) for p in parts[:len(on)]) / sr
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "fan_on_then_blade_fault.wav"
        sf.write(str(wav), np.concatenate(parts), sr, subtype="PCM_16")
        evs = run_verb(["--checkpoint", model, "--source", wav, "--threads", "1", *extra])
    rep = alarm_report(evs, change)
    rep.update(files_on=on, files_fault=bad, args=extra)
    return rep


# --- 2. cwru ---------------------------------------------------------------------------------------
def cwru_stream(model: Path, fault_file: str, extra: list[str], test_fraction: float = 0.25) -> dict:
    root = DATA / "cwru_bearing"
    normal, _ = read_mat_signal(root / "normal_0_97.mat")
    fault, _ = read_mat_signal(root / fault_file)
    normal = normal[int(round(len(normal) * (1 - test_fraction))):]  # the test part: never trained on
    fault = fault[int(round(len(fault) * (1 - test_fraction))):]
    x = np.concatenate([normal, fault])
    rate = 48000
    text = "\n".join(f"{v:.6g}" for v in x) + "\n"
    evs = run_verb(["--checkpoint", model, "--source", "-", "--rate", str(rate), "--threads", "1", *extra], text)
    rep = alarm_report(evs, len(normal) / rate)
    summary = next(e for e in evs if e["type"] == "summary")
    rep.update(fault_file=fault_file, args=extra, rtf=summary["rtf"], latency_p50_ms=summary["latency_p50"])
    return rep


# --- 3. real-time factor ---------------------------------------------------------------------------
def real_time_factor(model: Path, seconds: float) -> dict:
    pred = runtime.load(model, threads=1)
    window_s = pred.preprocess.window / pred.preprocess.rate
    root = DATA / "fan_sensiml"
    rows = [r for r in csv.DictReader(open(root / "labels.csv")) if r["label"] == "ON"]
    waves, total = [], 0.0
    while total < seconds:
        for r in rows:
            w, sr = sf.read(str(root / r["path"]), dtype="float32")
            waves.append(w)
            total += len(w) / sr
            if total >= seconds:
                break
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "long.wav"
        sf.write(str(wav), np.concatenate(waves), sr, subtype="PCM_16")
        t0 = time.perf_counter()
        evs = run_verb(["--checkpoint", model, "--source", wav, "--threads", "1", "--hop", str(window_s),
                        "--events", "changes", "--health-every", "1e9"])
        wall = time.perf_counter() - t0
    summary = next(e for e in evs if e["type"] == "summary")
    return {"stream_s": round(total, 1), "window_s": window_s, "hop_s": window_s, "windows": summary["windows"],
            "rtf_monitor": summary["rtf"], "rtf_wall_incl_startup": round(total / wall, 1),
            "alarms_on_normal_recordings": summary["alarms"], "load_avg_1m": round(os.getloadavg()[0], 2),
            "latency_p50_ms": summary["latency_p50"], "latency_p95_ms": summary["latency_p95"],
            "rtf_per_window_p50": round(window_s / (summary["latency_p50"] / 1e3), 1),
            "threads": 1, "backend": pred.backend}


# --- 4. RSS over a simulated hour ------------------------------------------------------------------
def rss_hour(model: Path, minutes: int, warmup_min: int, hop: float | None) -> dict:
    pred = runtime.load(model, threads=1)
    sr = pred.preprocess.rate
    mon = monitor.Monitor(pred, monitor.Settings(hop=hop, smooth=3, health_every=60.0))
    rng = np.random.default_rng(0)
    samples, chunk_s = [], 1.0
    n_windows = 0
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "events.jsonl", "a", buffering=1) as out:
        t0 = time.perf_counter()
        for minute in range(minutes):
            for _ in range(int(60 / chunk_s)):
                # a machine at a slowly varying speed; one generated chunk at a time, never the whole hour
                chunk = machine_clip(rng, sr, int(chunk_s * sr), 30.0 + 2 * np.sin(minute / 9), "source") * 0.3
                for ev in mon.push(chunk.astype(np.float32)):
                    out.write(json.dumps(ev) + "\n")
                    n_windows += ev["type"] == "window"
            if minute + 1 >= warmup_min:
                samples.append(monitor.rss_mb())
        wall = time.perf_counter() - t0
    s = np.asarray(samples)
    return {"simulated_minutes": minutes, "warmup_minutes": warmup_min, "windows": n_windows,
            "rss_mb_first": round(float(s[0]), 2), "rss_mb_last": round(float(s[-1]), 2),
            "rss_mb_min": round(float(s.min()), 2), "rss_mb_max": round(float(s.max()), 2),
            "rss_spread_pct": round(float((s.max() - s.min()) / s[0] * 100), 2),
            "rss_drift_pct": round(float((s[-1] - s[0]) / s[0] * 100), 2), "wall_s": round(wall, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fan-model", type=Path, help="ONNX graph of a model trained on fan_sensiml ON")
    p.add_argument("--cwru-model", type=Path, help="ONNX graph of a sequence model trained on cwru_bearing")
    p.add_argument("--cwru-stream-model", type=Path,
                   help="streaming ONNX graph (export --streaming) of a causal model trained on cwru_bearing")
    p.add_argument("--only", default="fan,cwru,rtf,rss")
    p.add_argument("--fan-on", type=int, default=4, help="ON test recordings (5 s each) before the change")
    p.add_argument("--fan-fault", type=int, default=3, help="BLADE FAULT test recordings after it")
    p.add_argument("--fan-args", default="--hop 0.25 --smooth 3 --min-duration 0.5",
                   help="monitor options for the fan stream")
    p.add_argument("--cwru-args", default="--smooth 3", help="monitor options for the CWRU stream")
    p.add_argument("--cwru-faults", default="48k_Drive_End_IR007_0_109.mat,48k_Drive_End_B007_0_122.mat,"
                                            "48k_Drive_End_OR007@6_0_135.mat")
    p.add_argument("--rtf-seconds", type=float, default=120.0)
    p.add_argument("--rss-minutes", type=int, default=60)
    p.add_argument("--rss-warmup", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    only = set(args.only.split(","))
    if not DATA.is_dir():
        raise SystemExit(f"real data not found at {DATA}")
    results: dict = {}
    if "fan" in only and args.fan_model:
        results["fan"] = fan_stream(args.fan_model, args.fan_on, args.fan_fault, args.fan_args.split())
        print("fan ON -> BLADE FAULT:", json.dumps(results["fan"], indent=1))
    if "cwru" in only and args.cwru_model:
        results["cwru"] = [cwru_stream(args.cwru_model, f, args.cwru_args.split()) for f in args.cwru_faults.split(",")]
        for r in results["cwru"]:
            print("cwru normal -> fault:", json.dumps(r, indent=1))
    if "cwru" in only and args.cwru_stream_model:
        results["cwru_streaming"] = [cwru_stream(args.cwru_stream_model, f, args.cwru_args.split())
                                     for f in args.cwru_faults.split(",")]
        for r in results["cwru_streaming"]:
            print("cwru normal -> fault, streaming graph:", json.dumps(r, indent=1))
    if "rtf" in only and args.fan_model:
        results["rtf"] = real_time_factor(args.fan_model, args.rtf_seconds)
        print("real-time factor (1 thread):", json.dumps(results["rtf"], indent=1))
    if "rss" in only and args.fan_model:
        results["rss"] = rss_hour(args.fan_model, args.rss_minutes, args.rss_warmup, None)
        print("RSS over a simulated hour:", json.dumps(results["rss"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
