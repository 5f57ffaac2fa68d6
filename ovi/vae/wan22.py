"""Wan2.2 video VAE (48-channel latent, 16x spatial and 4x temporal compression) with latent normalisation.

``Wan22VAE`` holds exactly the tensors of ``Wan2.2_VAE.pth`` (encoder.*, conv1, conv2, decoder.*).
Decoding streams one latent frame at a time through per-layer caches, optionally over spatial tiles
blended linearly in pixel space; encoding streams frame 0, then 4 frames at a time. The whole-sequence
form (``causal=False``) is the reference contract and gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .wan22_blocks import CausalConv3d, Decoder3d, Encoder3d, patchify, unpatchify

# Per-channel latent statistics of the released model (float32 of these decimals, as the official wrapper builds them).
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

Progress = Callable[[int, int], None]  # (steps done, steps in total)


@dataclass(frozen=True)
class WanVAEConfig:
    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = LATENT_MEAN
    latent_std: tuple[float, ...] = LATENT_STD
    # 1/std as float32 values; None computes it in float32 from latent_std, as the official wrapper does.
    latent_inv_std: tuple[float, ...] | None = field(default=None)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 * 2 ** (len(self.dim_mult) - 1)  # pixel patchify 2, then one 2x per down stage but the last

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> "WanVAEConfig":
        """Infer the architecture from state-dict shapes (the released file carries no config)."""
        dim = shapes["encoder.conv1.weight"][0]
        stages = 0
        while f"encoder.downsamples.{stages}.downsamples.0.residual.6.weight" in shapes:
            stages += 1
        nrb = 0
        while f"encoder.downsamples.0.downsamples.{nrb}.residual.0.gamma" in shapes:
            nrb += 1
        if not stages or not nrb:
            raise KeyError("encoder.downsamples.0.downsamples.0.residual.6.weight")
        stage = "encoder.downsamples.{}.downsamples.{}"
        mult = tuple(shapes[stage.format(i, 0) + ".residual.6.weight"][0] // dim for i in range(stages))
        tdown = tuple(stage.format(i, nrb) + ".time_conv.weight" in shapes for i in range(stages - 1))
        return cls(dim=dim, dec_dim=shapes["decoder.head.2.weight"][1], z_dim=shapes["conv2.weight"][0],
                   dim_mult=mult, num_res_blocks=nrb, temperal_downsample=tdown)

    @classmethod
    def from_fixture(cls, config: Mapping) -> "WanVAEConfig":
        """From a parity fixture's ``config``: constructor ``kwargs`` plus the latent statistics."""
        kw = dict(config.get("kwargs", config))
        if kw.get("attn_scales"):
            raise ValueError("Wan2.2 VAE: attention at intermediate scales is not part of this architecture")
        extra = {}
        if "latent_mean" in config:
            extra["latent_mean"] = tuple(float(v) for v in config["latent_mean"])
        if "latent_std" in config:
            extra["latent_std"] = tuple(float(v) for v in config["latent_std"])
        if "latent_inv_std_float32" in config:
            extra["latent_inv_std"] = tuple(float(v) for v in config["latent_inv_std_float32"])
        return cls(dim=int(kw["dim"]), dec_dim=int(kw.get("dec_dim", kw["dim"])), z_dim=int(kw.get("z_dim", 48)),
                   dim_mult=tuple(int(m) for m in kw.get("dim_mult", (1, 2, 4, 4))),
                   num_res_blocks=int(kw.get("num_res_blocks", 2)),
                   temperal_downsample=tuple(bool(t) for t in kw.get("temperal_downsample", (False, True, True))),
                   **extra)


def _spans(n: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Evenly spaced tile ranges covering [0, n), neighbours overlapping by at least ``overlap``."""
    if n <= tile:
        return [(0, n)]
    k = -(-(n - overlap) // (tile - overlap))
    return [(s, s + tile) for s in (round(i * (n - tile) / (k - 1)) for i in range(k))]


def _ramp(n: int) -> torch.Tensor:
    # Rising weight across an overlap of n pixels: 0 on the outer quarter, whose pixels see the zero padding
    # at the tile's cut edge most, linear across the middle half, 1 on the inner quarter. ramp + flipped = 1.
    m = n // 4
    r = n - 2 * m
    return torch.cat([torch.zeros(m, dtype=torch.float64), (torch.arange(r, dtype=torch.float64) + 0.5) / r,
                      torch.ones(m, dtype=torch.float64)])


def _blend_weights(spans: list[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """Per-tile pixel weights along one axis, summing to 1 at every pixel."""
    raw = []
    for i, (a, b) in enumerate(spans):
        w = torch.ones((b - a) * scale, dtype=torch.float64)
        if i > 0 and spans[i - 1][1] > a:
            n = (spans[i - 1][1] - a) * scale
            w[:n] = torch.minimum(w[:n], _ramp(n))
        if i + 1 < len(spans) and b > spans[i + 1][0]:
            n = (b - spans[i + 1][0]) * scale
            w[-n:] = torch.minimum(w[-n:], _ramp(n).flip(0))
        raw.append(w)
    total = torch.zeros(spans[-1][1] * scale, dtype=torch.float64)
    for (a, _), w in zip(spans, raw):
        total[a * scale:a * scale + len(w)] += w
    return [w / total[a * scale:a * scale + len(w)] for (a, _), w in zip(spans, raw)]


class Wan22VAE(nn.Module):
    def __init__(self, config: WanVAEConfig = WanVAEConfig()):
        super().__init__()
        c = config
        self.config = c
        self.encoder = Encoder3d(c.dim, c.z_dim * 2, c.dim_mult, c.num_res_blocks, c.temperal_downsample)
        self.conv1 = CausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)
        self.conv2 = CausalConv3d(c.z_dim, c.z_dim, 1)
        self.decoder = Decoder3d(c.dec_dim, c.z_dim, c.dim_mult, c.num_res_blocks, c.temperal_downsample[::-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    # -- latent normalisation (float32, the official constants' precision) -----------------------------
    def _stats(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        mean = torch.tensor(c.latent_mean, dtype=torch.float32, device=device)
        inv = (torch.tensor(c.latent_inv_std, dtype=torch.float32, device=device) if c.latent_inv_std is not None
               else 1.0 / torch.tensor(c.latent_std, dtype=torch.float32, device=device))
        return mean.view(1, -1, 1, 1, 1), inv.view(1, -1, 1, 1, 1)

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        mean, inv = self._stats(mu.device)
        return (mu.float() - mean) * inv

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        mean, inv = self._stats(latent.device)
        return latent.float() / inv + mean

    def num_frames(self, latent_frames: int) -> int:
        return 1 + self.config.temporal_factor * (latent_frames - 1)

    # -- decode ------------------------------------------------------------------------------------------
    def _trunk(self, z: torch.Tensor, causal: bool) -> torch.Tensor:
        """conv2, decoder.conv1 and the middle for the whole latent (small: latent resolution)."""
        if not causal:
            return self.decoder.trunk(self.conv2(z))
        cache: dict = {}
        return torch.cat([self.decoder.trunk(self.conv2(z[:, :, i:i + 1]), cache) for i in range(z.shape[2])], 2)

    @staticmethod
    def _stream(x: torch.Tensor, fn, causal: bool) -> Iterator[tuple[int, torch.Tensor]]:
        """(first video frame, frames before the clamp) of ``fn`` over x, one latent frame at a time."""
        if not causal:
            yield 0, unpatchify(fn(x, None))
            return
        cache: dict = {}
        t = 0
        for i in range(x.shape[2]):
            frames = unpatchify(fn(x[:, :, i:i + 1], cache))
            yield t, frames
            t += frames.shape[2]

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, *, tile_size: int | None = None, tile_overlap: int = 8,
               clamp: bool = True, causal: bool = True, progress: Progress | None = None,
               output_device: torch.device | str | None = None) -> torch.Tensor:
        """Normalised latent [B,z_dim,F,h,w] -> video [B,3,1+4(F-1),16h,16w] in the module's dtype.

        ``tile_size``/``tile_overlap`` are in latent pixels (None or 0 = no tiling). Tiling runs the decoder's
        trunk (conv1 and the middle, whose attention spans the whole frame) on the whole latent, and only
        the up stages, which are local, per tile; tile outputs are blended with linear ramps, so pixels farther
        than the up stages' receptive field (13 latent pixels) from a tile's cut edge are exact.
        ``progress(done, total)`` is called after every latent frame of every tile. ``output_device`` lets
        the video collect in host memory while the model runs on the GPU.
        """
        c = self.config
        if latent.ndim != 5 or latent.shape[1] != c.z_dim:
            raise ValueError(f"Wan2.2 VAE decode expects a latent [B,{c.z_dim},F,h,w], got {list(latent.shape)}")
        if tile_size and tile_overlap >= tile_size:
            raise ValueError(f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size})")
        z = self.denormalize(latent.to(self.device)).to(self.dtype)
        b, _, f, h, w = z.shape
        s = c.spatial_factor
        out_dev = torch.device(output_device) if output_device is not None else z.device
        ys = _spans(h, tile_size, tile_overlap) if tile_size else [(0, h)]
        xs = _spans(w, tile_size, tile_overlap) if tile_size else [(0, w)]
        single = len(ys) == len(xs) == 1
        out = (torch.empty if single else torch.zeros)(b, 3, self.num_frames(f), h * s, w * s, dtype=z.dtype,
                                                        device=out_dev)
        total, done = len(ys) * len(xs) * (f if causal else 1), 0

        def step() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        if single:
            for t0, frames in self._stream(z, lambda x, cache: self.decoder(self.conv2(x), cache), causal):
                out[:, :, t0:t0 + frames.shape[2]] = frames.to(out_dev)
                del frames
                step()
            return out.clamp_(-1.0, 1.0) if clamp else out
        feats = self._trunk(z, causal)
        del z
        for (y0, y1), my in zip(ys, _blend_weights(ys, s)):
            for (x0, x1), mx in zip(xs, _blend_weights(xs, s)):
                mask = (my[:, None] * mx[None, :]).to(out_dev, out.dtype)
                for t0, frames in self._stream(feats[:, :, :, y0:y1, x0:x1], self.decoder.upsample, causal):
                    out[:, :, t0:t0 + frames.shape[2], y0 * s:y1 * s, x0 * s:x1 * s] += frames.to(out_dev) * mask
                    del frames
                    step()
        return out.clamp_(-1.0, 1.0) if clamp else out

    # -- encode ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, causal: bool = True, progress: Progress | None = None) -> torch.Tensor:
        """Video [B,3,T,H,W] in [-1,1] -> normalised latent mean [B,z_dim,1+(T-1)//4,H/16,W/16] (float32).

        Frames beyond the last whole group of 4 after frame 0 are dropped, as the official encoder does.
        """
        c = self.config
        tf, s = c.temporal_factor, c.spatial_factor
        if video.ndim != 5 or video.shape[1] != 3 or video.shape[3] % s or video.shape[4] % s:
            raise ValueError(f"Wan2.2 VAE encode expects a video [B,3,T,H,W] with H and W multiples of {s}, "
                             f"got {list(video.shape)}")
        t = 1 + tf * ((video.shape[2] - 1) // tf)
        x = video[:, :, :t]
        chunks = [(0, 1)] + [(i, i + tf) for i in range(1, t, tf)] if causal else [(0, t)]
        cache = {} if causal else None
        parts = []
        for n, (a, e) in enumerate(chunks, 1):
            parts.append(self.encoder(patchify(x[:, :, a:e].to(self.device, self.dtype)), cache))
            if progress is not None:
                progress(n, len(chunks))
        h = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
        del parts, cache
        # conv1 is 1x1x1, so only the mean half of its output is computed; the log-variance is unused.
        mu = F.conv3d(h, self.conv1.weight[:c.z_dim], self.conv1.bias[:c.z_dim])
        return self.normalize(mu)
