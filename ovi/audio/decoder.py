"""Audio latent <-> 16 kHz waveform: MMAudio VAE decode + de-normalisation + BigVGAN, and the mel + VAE
encoder path back. One latent token is 2 mel frames is 512 samples."""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from .bigvgan import BigVGAN
from .checkpoint import load_bigvgan, load_mmaudio_vae
from .mel import MelConfig, MelFrontend
from .mmaudio_vae import MMAudioVAE

Progress = Callable[[int, int], None]


class AudioDecoder(nn.Module):
    def __init__(self, vae: MMAudioVAE, vocoder: BigVGAN, mel: MelFrontend | None = None):
        super().__init__()
        self.vae = vae
        self.vocoder = vocoder
        self.mel = mel if mel is not None else MelFrontend(MelConfig(num_mels=vae.config.data_dim))

    @classmethod
    def from_files(cls, vae_path: str | os.PathLike, vocoder_path: str | os.PathLike, *, device=None,
                   dtype: torch.dtype | None = None, encoder: bool = False) -> "AudioDecoder":
        """Load ``v1-16.pth`` and ``best_netG.pt``; the VAE encoder is only loaded when ``encoder`` is set."""
        vae = load_mmaudio_vae(vae_path, device=device, dtype=dtype, encoder=encoder)
        vocoder = load_bigvgan(vocoder_path, device=device, dtype=dtype)
        return cls(vae, vocoder).to(device=device)

    @property
    def samples_per_token(self) -> int:
        return self.vae.config.downsample * self.vocoder.config.hop

    def channels_first(self, latent: torch.Tensor) -> torch.Tensor:
        """[L, C], [B, L, C] or [B, C, L] -> [B, C, L]. A square [B, C, C] is read as channels-first."""
        c = self.vae.config.embed_dim
        if latent.ndim == 2:
            latent = latent.unsqueeze(0)
        if latent.ndim != 3 or c not in latent.shape[1:]:
            raise ValueError(f"audio latent must be [B, L, {c}] or [B, {c}, L], got {list(latent.shape)}")
        return latent if latent.shape[1] == c else latent.transpose(1, 2)

    def decode_mel(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent -> de-normalised log10 mel [B, 80, 2L] (what the vocoder consumes)."""
        z = self.channels_first(latent).to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(z)

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """Log10 mel [B, 80, T] -> waveform [B, 256T] float32."""
        return self.vocoder(mel.to(device=self.vocoder.device, dtype=self.vocoder.dtype))[:, 0].float()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        """Latent [B, L, 20] or [B, 20, L] -> 16 kHz waveform [B, 512L] float32 in (-1, 1)."""
        mel = self.decode_mel(latent)
        if progress is not None:
            progress(1, 2)
        wav = self.vocode(mel)
        if progress is not None:
            progress(2, 2)
        return wav

    @torch.no_grad()
    def encode(self, waveform: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """16 kHz waveform [B, N] or [N] -> posterior mean [B, 20, N/512] ([B, N/512, 20] if channels_last)."""
        if waveform.ndim == 1:
            waveform = waveform.unsqueeze(0)
        mel = self.mel(waveform)
        z = self.vae.encode(mel.to(device=self.vae.device, dtype=self.vae.dtype))
        return z.transpose(1, 2) if channels_last else z
