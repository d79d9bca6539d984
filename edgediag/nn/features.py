"""Audio front ends computed inside the model, so an exported graph takes raw waveform.

:class:`LogMel` is librosa's ``melspectrogram`` (+ a log) in torch. The STFT has three
numerically equivalent paths (``method``):

* ``fft``: ``torch.stft`` - fast, used for training and eager inference on the CPU;
* ``factored``: the DFT as two small matrix products (a two-factor Cooley-Tukey split,
  n_fft = N1·N2, :func:`factored_dft_matrices`): frames by reshape/slice, no STFT/DFT
  operator, so TensorRT and any ONNX runtime take it, at ~1/10 of the dense DFT's MACs
  (n_fft 2048: 0.40 M vs 4.2 M per frame). The export path;
* ``conv``: a ``conv1d`` with the dense Hann-windowed DFT basis: the readable reference
  for ``factored`` and the fallback where it does not apply (hop not dividing n_fft, or
  n_fft prime).

``method="auto"`` (the default) takes ``fft`` in eager runs and ``factored`` while tracing for
export (as the selective scan's ``auto`` backend does), or what ``with stft_method(name):``
forces (the FLOP counter counts the exported form). The choice is a Python branch, fixed at
trace time, so the graph has no data-dependent branch. librosa stays the reference: tests
compare every path against ``librosa.feature.melspectrogram`` / ``librosa.power_to_db``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgediag.ops import is_tracing
from edgediag.utils import context_value

METHODS = ("fft", "factored", "conv")
_forced_method: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgediag_stft_method", default=None)


def stft_method(name: str) -> contextlib.AbstractContextManager[None]:
    """Force what ``method="auto"`` resolves to inside the block."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {name!r}")
    return context_value(_forced_method, name)


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


def _split(n: int) -> tuple[int, int] | None:
    """n = N1·N2 with N1 >= N2 > 1 as close to sqrt(n) as possible; None for primes."""
    for n2 in range(int(math.isqrt(n)), 1, -1):
        if n % n2 == 0:
            return n // n2, n2
    return None


def factored_dft_matrices(n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices of the two-step DFT of real frames, bins 0..n_fft//2 (Cooley-Tukey, n = N2·n1 + n2,
    k = k1 + N1·k2, W_M = exp(-2πi/M)):

        A[k1, n2]  = sum_n1 x[n1, n2] W_N1^(n1·k1)                  step 1: ``first`` (2·N1, N1) @ x
        X[k1, k2]  = sum_n2 A[k1, n2] W_N^(n2·k1) W_N2^(n2·k2)       step 2: per k1, ``second`` (N1, 2·N2, 2·K2)

    ``first`` stacks the real and imaginary rows of W_N1; ``second[k1]`` is the twiddle and the
    N2-point DFT as one real (re, im) x (re, im) block matrix. Only k2 <= N2/2 is kept (K2 columns),
    which covers the one-sided bins. Built in float64, cast once.
    """
    n1_size, n2_size = _split(n_fft)
    k2_size = n2_size // 2 + 1
    n1 = np.arange(n1_size)
    first = np.exp(-2j * np.pi * np.outer(n1, n1) / n1_size)                      # [k1, n1]
    k1, n2, k2 = np.arange(n1_size)[:, None, None], np.arange(n2_size)[None, :, None], np.arange(k2_size)
    m = np.exp(-2j * np.pi * (n2 * k1 / n_fft + n2 * k2 / n2_size))                # [k1, n2, k2]
    second = np.block([[m.real, m.imag], [-m.imag, m.real]])                        # (N1, 2·N2, 2·K2)
    first = np.concatenate([first.real, first.imag], axis=0)
    return torch.from_numpy(first.astype(np.float32)), torch.from_numpy(second.astype(np.float32))


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

    # Kept in float32 in an exported fp16/int8 graph (edgediag.deploy.quantize): its power
    # spectrum overflows fp16 and its DFT and dB do not survive 8 bits.
    signal_front_end = True

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
        # Not persistent: rebuilt from the config, so checkpoints stay small.
        self.register_buffer("mel_fb", torch.from_numpy(mel.astype(np.float32)), persistent=False)
        self.register_buffer("window", torch.from_numpy(hann_window(n_fft, self.win_length).astype(np.float32)),
                             persistent=False)
        if self.factored:
            first, second = factored_dft_matrices(self.n_fft)
            self.register_buffer("dft_first", first, persistent=False)
            self.register_buffer("dft_second", second, persistent=False)
        else:  # the dense basis (16 MB at n_fft 2048) only where the factored form does not apply
            self.register_buffer("basis", dft_basis(n_fft, self.win_length), persistent=False)

    def n_frames(self, n_samples: int) -> int:
        padded = n_samples + 2 * (self.n_fft // 2) if self.center else n_samples
        return 1 + (padded - self.n_fft) // self.hop

    @property
    def factored(self) -> bool:
        """Whether the ``factored`` path applies (else export graphs use ``conv``)."""
        return self.n_fft % self.hop == 0 and _split(self.n_fft) is not None

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) -> windowed frames (B, frames, n_fft) by reshape and slices (no Unfold):
        hop-sized blocks, each frame is r = n_fft/hop consecutive blocks."""
        r, n_frames = self.n_fft // self.hop, self.n_frames(x.shape[-1])
        if self.center:
            x = F.pad(x, (self.n_fft // 2, self.n_fft // 2))
        n_blocks = n_frames + r - 1
        blocks = x[:, :n_blocks * self.hop].reshape(-1, n_blocks, self.hop)
        frames = torch.cat([blocks[:, j:j + n_frames] for j in range(r)], dim=-1)
        return frames * self.window

    def spectrogram(self, x: torch.Tensor, method: str = "auto") -> torch.Tensor:
        """|STFT|^power, (B, n_fft//2+1, frames). ``method``: auto | fft | factored | conv (module
        doc); ``factored`` falls back to ``conv`` where it does not apply."""
        if x.dim() == 3:
            x = x[:, 0]
        n_bins = self.n_fft // 2 + 1
        if method == "auto":
            method = _forced_method.get() or ("factored" if is_tracing() else "fft")
        if method == "factored" and not self.factored:
            method = "conv"
        if method == "factored":
            first, second = self.dft_first, self.dft_second
            n1, n2 = first.shape[1], second.shape[1] // 2
            frames = self.frames(x)                                           # (B, T, N)
            t, k2 = frames.shape[1], second.shape[2] // 2
            # Both steps as few large GEMMs: step 1 over all frames at once, step 2 batched over k1.
            x1 = frames.reshape(-1, n1, n2).transpose(0, 1).reshape(n1, -1)  # (N1, B·T·N2)
            a = torch.matmul(first, x1)                                       # (2·N1, B·T·N2): re rows, im rows
            a = a.reshape(2, n1, -1, n2).permute(1, 2, 0, 3).reshape(n1, -1, 2 * n2)  # (N1, B·T, 2·N2)
            spec = torch.matmul(a, second)                                    # (N1, B·T, 2·K2): re, im
            power = spec[..., :k2] ** 2 + spec[..., k2:] ** 2                 # [k1, ., k2] is bin k1 + N1·k2
            power = power.permute(1, 2, 0).reshape(-1, t, k2 * n1)[..., :n_bins].transpose(1, 2)
        elif method == "conv":
            # The conv's own zero padding is the centre padding (no separate Pad node).
            basis = self.basis if hasattr(self, "basis") else dft_basis(self.n_fft, self.win_length).to(x)
            spec = F.conv1d(x.unsqueeze(1), basis, stride=self.hop,
                            padding=self.n_fft // 2 if self.center else 0)
            power = spec[:, :n_bins] ** 2 + spec[:, n_bins:] ** 2
        elif method == "fft":
            stft = torch.stft(x, self.n_fft, self.hop, self.n_fft, window=self.window, center=self.center,
                              pad_mode="constant", return_complex=True)
            power = stft.real ** 2 + stft.imag ** 2
        else:
            raise ValueError(f"method must be auto, fft, factored or conv, not {method!r}")
        return power if self.power == 2.0 else power.sqrt()

    def forward(self, x: torch.Tensor, method: str = "auto") -> torch.Tensor:
        mel = torch.matmul(self.mel_fb, self.spectrogram(x, method))
        if self.log == "db":
            return (20.0 / self.power) * torch.log10(mel + self.eps)
        if self.log == "power_to_db":
            db = 10.0 * torch.log10(mel.clamp_min(self.amin))
            if self.top_db is not None:
                floor = db.amax(dim=(-2, -1), keepdim=True) - float(self.top_db)
                db = torch.maximum(db, floor)
            return db
        return mel
