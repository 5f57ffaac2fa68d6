"""MMAudio's 16 kHz log-mel front-end (used only to encode audio into the VAE latent).

The Slaney mel filterbank is built here in numpy float64 and rounded to float32 at the same two points librosa
rounds it, so the basis equals the one the official code gets from ``librosa.filters.mel`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..log import log

_F_SP = 200.0 / 3  # Slaney scale: linear below 1 kHz at 3 mels per 200 Hz, logarithmic above
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(hz) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log = hz >= _MIN_LOG_HZ
    return np.where(log, _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP, mel)


def mel_to_hz(mel) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    log = mel >= _MIN_LOG_MEL
    return np.where(log, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)), hz)


def slaney_mel_basis(sr: int = 16000, n_fft: int = 1024, n_mels: int = 80, fmin: float = 0.0,
                     fmax: float | None = None) -> torch.Tensor:
    """Slaney-scale, Slaney-normalised (unit area) triangular filterbank [n_mels, n_fft//2 + 1], float32."""
    fmax = sr / 2 if fmax is None else fmax
    fft_freqs = np.arange(n_fft // 2 + 1) * (1.0 / (n_fft * (1.0 / sr)))
    lo, hi = float(hz_to_mel(fmin)), float(hz_to_mel(fmax))
    mels = np.arange(n_mels + 2) * ((hi - lo) / (n_mels + 1)) + lo
    mels[-1] = hi
    edges = mel_to_hz(mels)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    tri = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    # The triangles are stored in float32 before the area normalisation is applied in float64.
    enorm = 2.0 / (edges[2:] - edges[:-2])
    return torch.from_numpy((tri.astype(np.float64) * enorm[:, None]).astype(np.float32))


@dataclass(frozen=True)
class MelConfig:
    sampling_rate: int = 16000
    n_fft: int = 1024
    num_mels: int = 80
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: float = 8000.0

    @classmethod
    def from_dict(cls, d) -> "MelConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class MelFrontend(nn.Module):
    """Waveform [B, N] in [-1, 1] -> log10 mel [B, num_mels, N/hop], computed in float32.

    The buffers are built on the CPU even inside a ``meta`` device context: they come from no checkpoint.
    """

    def __init__(self, cfg: MelConfig = MelConfig()):
        super().__init__()
        self.config = cfg
        basis = slaney_mel_basis(cfg.sampling_rate, cfg.n_fft, cfg.num_mels, cfg.fmin, cfg.fmax).to("cpu")
        self.register_buffer("mel_basis", basis, persistent=False)
        self.register_buffer("hann_window", torch.hann_window(cfg.win_size, periodic=True, dtype=torch.float32,
                                                              device="cpu"), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        c = self.config
        if wav.abs().max() > 1:
            log.debug("mel front-end: waveform peaks at %.3f, clamping to [-1, 1]", float(wav.abs().max()))
        x = wav.to(device=self.mel_basis.device, dtype=torch.float32).clamp(-1.0, 1.0)
        pad = (c.n_fft - c.hop_size) // 2
        x = torch.nn.functional.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(x, c.n_fft, hop_length=c.hop_size, win_length=c.win_size, window=self.hann_window,
                          center=False, normalized=False, onesided=True, return_complex=True)
        spec = torch.view_as_real(spec)
        mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
        return torch.log10(torch.clamp(torch.matmul(self.mel_basis, mag), min=1e-5))
