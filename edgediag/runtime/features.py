"""The sequence models' feature front end in numpy, for the board (no torch, Python 3.8).

LDMamba and ``seq_cnn`` graphs take features (T, F) that the training data reader computes
from raw windows with torch (:class:`edgediag.data.sequences.Frontend`: log-mel, log
spectrogram or plain frames). This is the same computation in numpy, so a board turns a
raw window into the graph's input with numpy alone; tests/test_runtime.py checks it against
the training reader on real recordings. Conventions (as ``edgediag.nn.features.LogMel``):
periodic Hann window, ``center=True`` with zero padding of n_fft/2 on each side, power
spectrum, Slaney mel filters (librosa's default), ``10·log10(max(x, 1e-10))``.
"""

from __future__ import annotations

import numpy as np

AMIN = 1e-10  # the dB floor's power (librosa.power_to_db's amin)


def hz_to_mel(hz):
    """Slaney's mel scale (librosa ``htk=False``): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mel = hz / f_sp
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-12) / min_log_hz) / logstep, mel)


def mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax=None) -> np.ndarray:
    """(n_mels, n_fft//2+1) triangular filters with Slaney area normalisation, as
    ``librosa.filters.mel(sr, n_fft, n_mels)``."""
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights


def power_spectrogram(wave: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|STFT|^2 of a 1-D window, (n_fft//2+1, frames): periodic Hann, centred frames."""
    x = np.pad(np.asarray(wave, dtype=np.float64).reshape(-1), (n_fft // 2, n_fft // 2))
    n_frames = 1 + (len(x) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    window = np.hanning(n_fft + 1)[:-1]
    spec = np.fft.rfft(x[idx] * window, axis=-1)
    return (spec.real ** 2 + spec.imag ** 2).T


class SequenceFrontend:
    """Raw window -> (seq_len, F) float32 features for the ``kind`` the model was trained on
    (logmel | logspec | frames), with the parameters its input_spec records."""

    def __init__(self, kind: str, params: dict):
        if kind not in ("logmel", "logspec", "frames"):
            raise ValueError(f"no numpy front end for {kind!r}")
        self.kind, self.params = kind, dict(params)
        self.mel = None
        if kind == "logmel":
            p = self.params
            self.mel = mel_filters(int(p["sample_rate"]), int(p["n_fft"]), int(p.get("n_mels") or 64))

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        p = self.params
        seq_len, hop = int(p["seq_len"]), int(p["hop_length"])
        if self.kind == "frames":
            n = seq_len * hop
            return np.ascontiguousarray(np.asarray(raw)[:n].reshape(seq_len, hop), dtype=np.float32)
        power = power_spectrogram(raw, int(p["n_fft"]), hop)
        if self.mel is not None:
            power = self.mel @ power
        db = 10.0 * np.log10(np.maximum(power, AMIN))
        return np.ascontiguousarray(db.T[:seq_len], dtype=np.float32)
