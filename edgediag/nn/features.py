"""Audio front ends computed inside the model, so an exported graph takes raw waveform.

:class:`LogMel` is librosa's ``melspectrogram`` (+ a log) in torch. The STFT has two
numerically equivalent paths:

* ``fft``: ``torch.stft`` - fast, used for training and eager inference on the CPU;
* ``conv``: a ``conv1d`` with a fixed DFT basis (Hann-windowed cos/sin kernels), so the
  ONNX graph needs no STFT/DFT operator (TensorRT and older runtimes lack one).

Export code selects the conv path with ``forward(x, conv=True)`` (a plain Python flag,
fixed at trace time, so the traced graph has no data-dependent branch).
librosa stays the reference: tests compare both paths against
``librosa.feature.melspectrogram`` / ``librosa.power_to_db``.
"""

from __future__ import annotations

import math

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def hann_window(n_fft: int, win_length: int) -> np.ndarray:
    """Periodic Hann of ``win_length`` zero-padded to ``n_fft`` and centred (librosa's and
    torch.stft's convention)."""
    window = np.zeros(n_fft)
    left = (n_fft - win_length) // 2
    window[left:left + win_length] = np.hanning(win_length + 1)[:-1]
    return window


def dft_basis(n_fft: int, win_length: int | None = None) -> torch.Tensor:
    """(2·(n_fft//2+1), 1, n_fft) conv kernels: Hann-windowed cos rows then -sin rows.

    Computed in float64 (the phase k·n/N is large) and cast once, which keeps the conv
    path within float32 rounding of ``torch.stft``.
    """
    window = hann_window(n_fft, win_length or n_fft)
    n = np.arange(n_fft)
    k = np.arange(n_fft // 2 + 1)[:, None]
    phase = 2 * math.pi * ((k * n) % n_fft) / n_fft  # modulo keeps the argument small
    kernels = np.concatenate([np.cos(phase) * window, -np.sin(phase) * window], axis=0)
    return torch.from_numpy(kernels[:, None, :].astype(np.float32))


class LogMel(nn.Module):
    """Waveform (B, L) or (B, 1, L) -> log-mel (B, n_mels, frames).

    frames = 1 + L // hop with ``center=True`` (zero padding of n_fft//2 each side, as
    librosa >= 0.10 and torchaudio's ``pad_mode='constant'``).

    ``log``:
      * ``"db"``: 20/power·log10(mel + eps), eps = float64 machine epsilon as in the published
        STgram-MFN / Noisy-ArcMix code (torchaudio mel, ``20/power·log10``);
      * ``"power_to_db"``: ``librosa.power_to_db(mel, ref=1, amin=1e-10, top_db=...)``,
        with the top-dB floor taken per clip (what librosa does for one clip);
      * ``"none"``: the mel power itself.
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 2048, hop: int = 512, n_mels: int = 128,
                 center: bool = True, win_length: int | None = None, power: float = 2.0,
                 fmin: float = 0.0, fmax: float | None = None, log: str = "db",
                 top_db: float | None = 80.0, eps: float = float(np.finfo(float).eps), amin: float = 1e-10):
        super().__init__()
        if log not in ("db", "power_to_db", "none"):
            raise ValueError(f"log must be db, power_to_db or none, not {log!r}")
        if power not in (1.0, 2.0):
            raise ValueError("power must be 1 (magnitude) or 2 (power)")
        self.sample_rate, self.n_fft, self.hop, self.n_mels = int(sample_rate), int(n_fft), int(hop), int(n_mels)
        self.center, self.power, self.log = bool(center), float(power), log
        self.win_length = int(win_length or n_fft)
        self.top_db, self.eps, self.amin = top_db, float(eps), float(amin)
        mel = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        # Not persistent: rebuilt from the config, so checkpoints stay small (the DFT basis
        # alone is 16 MB for n_fft=2048).
        self.register_buffer("mel_fb", torch.from_numpy(mel.astype(np.float32)), persistent=False)
        self.register_buffer("basis", dft_basis(n_fft, self.win_length), persistent=False)
        self.register_buffer("window", torch.from_numpy(hann_window(n_fft, self.win_length).astype(np.float32)),
                             persistent=False)

    def n_frames(self, n_samples: int) -> int:
        if self.center:
            return 1 + n_samples // self.hop
        return 1 + (n_samples - self.n_fft) // self.hop

    def spectrogram(self, x: torch.Tensor, conv: bool = False) -> torch.Tensor:
        """|STFT|^power, (B, n_fft//2+1, frames)."""
        if x.dim() == 3:
            x = x[:, 0]
        if conv:
            # The conv's own zero padding is the centre padding (no separate Pad node).
            spec = F.conv1d(x.unsqueeze(1), self.basis, stride=self.hop,
                            padding=self.n_fft // 2 if self.center else 0)
            n_bins = self.n_fft // 2 + 1
            power = spec[:, :n_bins] ** 2 + spec[:, n_bins:] ** 2
        else:
            stft = torch.stft(x, self.n_fft, self.hop, self.n_fft, window=self.window, center=self.center,
                              pad_mode="constant", return_complex=True)
            power = stft.real ** 2 + stft.imag ** 2
        return power if self.power == 2.0 else power.sqrt()

    def forward(self, x: torch.Tensor, conv: bool = False) -> torch.Tensor:
        mel = torch.matmul(self.mel_fb, self.spectrogram(x, conv=conv))
        if self.log == "db":
            return (20.0 / self.power) * torch.log10(mel + self.eps)
        if self.log == "power_to_db":
            db = 10.0 * torch.log10(mel.clamp_min(self.amin))
            if self.top_db is not None:
                floor = db.amax(dim=(-2, -1), keepdim=True) - float(self.top_db)
                db = torch.maximum(db, floor)
            return db
        return mel
