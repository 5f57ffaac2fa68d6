"""Known regions: parts of the video or audio latent that are given and held through sampling.

A region is a set of latent frames (video) or latent tokens (audio) with their known values. It is held
one of two ways:

* ``clean``: the known values are written into the latent before every step and at the end, and the
  model sees those tokens at t = 0 (I2AV's first frame is the case of video frame 0);
* ``renoise``: before every step the region is replaced by the known values noised to that step's level,
  ``(1 - sigma_k) * x_known + sigma_k * eps`` with one fixed ``eps`` drawn from the seed, and the clean
  values are written at the end; the model sees the step's own timestep there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..choices import KNOWN_MODES
# Video was trained with a clean first frame at t = 0, so clean frames are in-distribution for it.
DEFAULT_VIDEO_MODE = "clean"
# Audio never saw per-token timesteps in training; renoising keeps every token on the step's own level.
DEFAULT_AUDIO_MODE = "renoise"
# Added to the seed for the renoise generator, so its eps is not the initial noise the seed itself gives.
RENOISE_SEED_OFFSET = 0x6B6E6F776E  # "known"
_SEED_MODULUS = 2 ** 64  # torch.Generator.manual_seed takes any 64-bit value


@dataclass
class KnownRegion:
    """Known values of one modality and which of them are known.

    ``latent``: the full latent ([48, F, h, w] video, [L, 20] audio; values outside the mask are ignored)
    or only the known part (the marked frames / tokens in order). ``mask``: bool [F] over latent frames
    (video) or [L] over latent tokens (audio). ``mode``: "clean" or "renoise"; None takes the modality's
    default (video clean, audio renoise).
    """

    latent: torch.Tensor
    mask: torch.Tensor
    mode: str | None = None


def index_mask(length: int, indices: Sequence[int]) -> torch.Tensor:
    """A bool [length] mask marking ``indices`` (frames, tokens; negative indices count from the end)."""
    mask = torch.zeros(length, dtype=torch.bool)
    if len(indices):
        mask[torch.as_tensor(list(indices), dtype=torch.long)] = True
    return mask


def range_mask(length: int, start: int, stop: int) -> torch.Tensor:
    """A bool [length] mask marking ``start <= i < stop`` (a time range of audio tokens, a run of frames)."""
    if not 0 <= start <= stop <= length:
        raise ValueError(f"range [{start}, {stop}) is not inside [0, {length}]")
    mask = torch.zeros(length, dtype=torch.bool)
    mask[start:stop] = True
    return mask


def renoise_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The fixed float32 ``eps`` of renoised regions for a latent of ``shape``: drawn once, on the CPU (the
    same values on every device), from a generator of its own so the initial noise stream is untouched."""
    g = torch.Generator(device="cpu").manual_seed((int(seed) + RENOISE_SEED_OFFSET) % _SEED_MODULUS)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


class HeldRegion:
    """A checked ``KnownRegion`` bound to one latent: writes its values before each step and at the end.

    ``dim`` is the latent dimension the mask runs along (1 for video frames, 0 for audio tokens).
    """

    def __init__(self, region: KnownRegion, latent: torch.Tensor, dim: int, what: str, default_mode: str,
                 seed: int):
        mode = default_mode if region.mode is None else region.mode
        if mode not in KNOWN_MODES:
            raise ValueError(f"known {what} mode must be one of {', '.join(KNOWN_MODES)}, got {mode!r}")
        length = latent.shape[dim]
        mask = torch.as_tensor(region.mask)
        if mask.dtype != torch.bool or mask.ndim != 1 or mask.shape[0] != length:
            raise ValueError(f"known {what} mask must be a bool vector of length {length}, got {mask.dtype} "
                             f"{list(mask.shape)}")
        mask = mask.to(latent.device)
        count = int(mask.sum())
        known = torch.as_tensor(region.latent).to(latent.device, torch.float32)
        part_shape = list(latent.shape)
        part_shape[dim] = count
        if tuple(known.shape) == tuple(latent.shape):
            values = _take(known, mask, dim)
        elif list(known.shape) == part_shape:
            values = known
        else:
            raise ValueError(f"known {what} latent {list(known.shape)} matches neither the latent "
                             f"{list(latent.shape)} nor its {count} marked entries {part_shape}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"known {what} latent has NaN or infinite values")
        self.what, self.mode, self.dim, self.mask, self.count = what, mode, dim, mask, count
        self.values = values.clone()
        self.eps = None
        if mode == "renoise" and count:
            self.eps = _take(renoise_noise(latent.shape, seed).to(latent.device), mask, dim)

    @property
    def clean(self) -> bool:
        """Whether the model should see this region at t = 0."""
        return self.mode == "clean" and self.count > 0

    def before_step(self, x: torch.Tensor, sigma: float) -> None:
        """Write the region into ``x`` (in place) for a step at noise level ``sigma``."""
        if not self.count:
            return
        if self.mode == "clean":
            _put(x, self.mask, self.dim, self.values)
        else:
            _put(x, self.mask, self.dim, (1.0 - sigma) * self.values + sigma * self.eps)

    def finish(self, x: torch.Tensor) -> None:
        """Write the clean known values into the final latent ``x`` (in place)."""
        if self.count:
            _put(x, self.mask, self.dim, self.values)


def _take(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    return x[:, mask] if dim == 1 else x[mask]


def _put(x: torch.Tensor, mask: torch.Tensor, dim: int, values: torch.Tensor) -> None:
    if dim == 1:
        x[:, mask] = values
    else:
        x[mask] = values
