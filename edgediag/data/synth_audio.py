"""Synthetic machine sounds in the DCASE 2023 layout, for the demo and the tests.

A rotating machine: shaft harmonics with a blade-pass emphasis and a slow speed drift,
gear-mesh whine and mains hum, broadband flow noise modulated by the blades, in a room
(short exponentially decaying impulse response). Each domain has two operating
conditions (attribute ``speed_<Hz>``); the target domain also has another room and
background. Anomalies: bearing impulse trains (ringing bursts at the outer-race
frequency), imbalance (once-per-revolution modulation, strong 1× harmonic), blade rub
(friction bursts once per revolution) and valve chatter (irregular clicks).

Written as ``<out>/<machine>/{train,test}/section_00_<domain>_<split>_<state>_NNNN_speed_<Hz>.wav``
(16-bit PCM), so :mod:`edgediag.data.audio` reads it like a DCASE set. Deterministic per
seed; 80 clips of 4 s take about a second.

    python -m edgediag.data.synth_audio --out /tmp/machines
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from edgediag import cli

log = logging.getLogger("edgediag.data.synth_audio")

# domain -> (attribute, shaft rotation in Hz)
CONDITIONS = {"source": (("speed_25", 25.0), ("speed_30", 30.0)),
              "target": (("speed_36", 36.0), ("speed_42", 42.0))}
ROOMS = {"source": {"rt60": 0.25, "noise_db": -20.0}, "target": {"rt60": 0.5, "noise_db": -12.0}}
ANOMALIES = ("bearing", "imbalance", "rub", "chatter")
N_BLADES = 6
BPFO = 3.57  # outer-race defect frequency / shaft frequency for a typical ball bearing


def _pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """1/f noise by shaping white noise's spectrum."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    noise = np.fft.irfft(spec / np.sqrt(f), n)
    return noise / (noise.std() + 1e-12)


def _room(rng: np.random.Generator, sr: int, rt60: float) -> np.ndarray:
    """Direct path plus exponentially decaying diffuse tail (energy -60 dB at rt60)."""
    n = int(sr * min(0.6, rt60))
    t = np.arange(n) / sr
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60) * 0.12
    ir[0] = 1.0
    return ir


def _ring(sr: int, freq: float, decay_s: float) -> np.ndarray:
    t = np.arange(int(sr * decay_s * 5)) / sr
    return np.sin(2 * np.pi * freq * t) * np.exp(-t / decay_s)


def machine_clip(rng: np.random.Generator, sr: int, n: int, f_rot: float, domain: str,
                 anomaly: str | None = None) -> np.ndarray:
    """One clip of the machine at shaft frequency ``f_rot`` (Hz), float32 in [-1, 1]."""
    t = np.arange(n) / sr
    # Slow speed drift: a sinusoidal hunt plus a smoothed random walk, about ±1.5 %.
    walk = np.cumsum(rng.standard_normal(n)) / np.sqrt(sr)
    walk = signal.sosfiltfilt(signal.butter(2, 0.5, fs=sr, output="sos"), walk)
    f_inst = f_rot * (1 + 0.012 * np.sin(2 * np.pi * rng.uniform(0.08, 0.2) * t + rng.uniform(0, 6.3))
                      + 0.02 * walk / (np.abs(walk).max() + 1e-9))
    phase = 2 * np.pi * np.cumsum(f_inst) / sr + rng.uniform(0, 2 * np.pi)

    # Shaft harmonics sin(k·phase + φk), by powers of exp(i·phase) (no sin per harmonic).
    x = np.zeros(n)
    z, zk = np.exp(1j * phase), np.ones(n, dtype=np.complex128)
    for k in range(1, 25):
        zk *= z
        amp = (1.0 / k ** 1.1) * (3.0 if k % N_BLADES == 0 else 1.0) * (1 + 0.15 * rng.standard_normal())
        x += amp * (zk * np.exp(1j * rng.uniform(0, 2 * np.pi))).imag
    mesh = 37 * phase  # gear-mesh whine, amplitude-modulated by the shaft
    x += 0.15 * (1 + 0.3 * np.sin(phase)) * np.sin(mesh)
    x += 0.1 * np.sin(2 * np.pi * 100 * t) + 0.04 * np.sin(2 * np.pi * 200 * t)  # mains hum
    flow = _pink_noise(rng, n) * (1 + 0.35 * np.sin(N_BLADES * phase))
    x = x / (x.std() + 1e-12) + 0.6 * flow

    if anomaly == "bearing":
        period = sr / (BPFO * f_rot)
        hits = np.zeros(n)
        pos = np.arange(rng.uniform(0, period), n, period).astype(int)
        hits[pos] = rng.uniform(0.6, 1.0, len(pos))
        x += 2.5 * signal.fftconvolve(hits, _ring(sr, rng.uniform(2800, 3600), 0.0015))[:n]
    elif anomaly == "imbalance":
        x = x * (1 + 0.6 * np.sin(phase)) + 1.5 * np.sin(phase)
    elif anomaly == "rub":
        band = signal.sosfilt(signal.butter(4, [2000, 5000], btype="band", fs=sr, output="sos"),
                              rng.standard_normal(n))
        contact = (np.mod(phase, 2 * np.pi) < 2 * np.pi * 0.1).astype(float)  # 10 % of each turn
        x += 4.0 * band / (band.std() + 1e-12) * contact
    elif anomaly == "chatter":
        clicks = np.zeros(n)
        pos = np.cumsum(rng.uniform(0.02, 0.07, int(n / sr / 0.02) + 1) * sr).astype(int)
        pos = pos[pos < n]
        clicks[pos] = rng.uniform(0.5, 1.0, len(pos))
        click = rng.standard_normal(int(0.004 * sr)) * np.exp(-np.arange(int(0.004 * sr)) / (0.001 * sr))
        x += 3.0 * signal.fftconvolve(clicks, click)[:n]
    elif anomaly is not None:
        raise ValueError(f"unknown anomaly {anomaly!r} (one of {', '.join(ANOMALIES)})")

    room = ROOMS[domain]
    x = signal.fftconvolve(x, _room(rng, sr, room["rt60"]))[:n]
    x = x / (x.std() + 1e-12)
    x += 10 ** (room["noise_db"] / 20) * _pink_noise(rng, n)  # background, relative to the machine
    gain = 0.05 * 10 ** (rng.uniform(-2, 2) / 20)  # about -26 dBFS RMS, ±2 dB
    return np.clip(x / (x.std() + 1e-12) * gain, -1, 1).astype(np.float32)


def generate_machine_sounds(out_dir: str | Path, n_train: int = 40, n_test: int = 40, seconds: float = 4.0,
                            sr: int = 16000, seed: int = 0, machine: str = "fan",
                            target_fraction: float = 0.25) -> Path:
    """Write a DCASE 2023-style machine folder ``out_dir/machine``; returns its path.

    ``n_train`` normal training clips (``target_fraction`` of them in the target domain,
    at least one per target condition); ``n_test`` test clips, half per domain, half of
    each normal and half anomalous (anomaly kinds in turn).
    """
    if n_train < 4 or n_test < 4:
        raise cli.UserError("synthetic machine sounds need n_train >= 4 and n_test >= 4")
    if seconds <= 0 or sr < 8000:
        raise cli.UserError("seconds must be positive and sr at least 8000")
    out = Path(out_dir) / machine
    n = int(round(seconds * sr))
    n_target = min(n_train - 2, max(2, int(round(n_train * target_fraction))))
    plan = []  # (split, domain, state, anomaly kind)
    plan += [("train", "source", "normal", None)] * (n_train - n_target)
    plan += [("train", "target", "normal", None)] * n_target
    for domain in ("source", "target"):
        n_dom = n_test // 2 if domain == "source" else n_test - n_test // 2
        plan += [("test", domain, "normal", None)] * (n_dom // 2)
        plan += [("test", domain, "anomaly", ANOMALIES[i % len(ANOMALIES)]) for i in range(n_dom - n_dom // 2)]
    counters: dict[tuple, int] = {}
    for i, (split, domain, state, kind) in enumerate(plan):
        idx = counters.get((split, domain, state), 0)
        counters[(split, domain, state)] = idx + 1
        attr, f_rot = CONDITIONS[domain][idx % 2]
        rng = np.random.default_rng([seed, i])
        wave = machine_clip(rng, sr, n, f_rot, domain, kind)
        path = out / split / f"section_00_{domain}_{split}_{state}_{idx:04d}_{attr}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), wave, sr, subtype="PCM_16")
    return out


def main(argv=None) -> int:
    p = cli.make_parser("data.synth_audio", "Write synthetic machine sounds in the DCASE 2023 layout.")
    p.add_argument("--out", required=True, help="output folder (a <machine>/ folder is written in it)")
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--sr", type=int, default=16000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine", default="fan")
    args = p.parse_args(argv)
    path = generate_machine_sounds(args.out, args.n_train, args.n_test, args.seconds, args.sr, args.seed, args.machine)
    print(f"wrote {args.n_train + args.n_test} clips to {path}")
    return 0


if __name__ == "__main__":
    cli.entry(main)
