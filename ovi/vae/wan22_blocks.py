"""Layers of the Wan2.2 video VAE, named exactly as in ``Wan2.2_VAE.pth``.

Every temporal layer takes ``cache``. ``None`` runs a whole sequence at once (the reference form). A
dict streams a sequence chunk by chunk: each layer keeps under its own module key what the next chunk
needs (the last two input frames of a k3 causal conv, the last frame of a stride-2 time conv, a mark
that the first chunk has passed), so peak memory is set by one chunk, not by the clip length. All
layers except the causal convs and the time resamplers act on each frame separately, which is why the
two forms agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _first_chunk(module: nn.Module, cache: dict | None) -> bool:
    """True on the first chunk of a stream (always in whole-sequence form); marks the module as started."""
    if cache is None:
        return True
    first = module not in cache
    if first:
        cache[module] = True
    return first


class CausalConv3d(nn.Conv3d):
    """Conv3d zero-padded in time only in front (k_t-1 frames), so frame t never sees frames after t."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int]):
        k = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        super().__init__(cin, cout, k, padding=(0, k[1] // 2, k[2] // 2))
        self.time_pad = k[0] - 1

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        p = self.time_pad
        if not p:
            return super().forward(x)
        prev = cache.get(self) if cache is not None else None
        n = 0 if prev is None else prev.shape[2]
        parts = [prev, x] if n else [x]
        if n < p:
            parts.insert(0, x.new_zeros(x.shape[0], x.shape[1], p - n, *x.shape[3:]))
        x = torch.cat(parts, 2)
        if cache is not None:
            cache[self] = x[:, :, -p:].clone()  # a copy, so the padded chunk can be freed
        return super().forward(x)


class RMSNorm(nn.Module):
    """L2 normalisation over channels times sqrt(C) and a per-channel gain (no bias)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1).mul_(self.scale).mul_(self.gamma)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        # Indices follow the official Sequential (1, 4 are SiLU, 5 is a zero dropout).
        self.residual = nn.ModuleDict({"0": RMSNorm(cin), "2": CausalConv3d(cin, cout, 3),
                                       "3": RMSNorm(cout), "6": CausalConv3d(cout, cout, 3)})
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        r = self.residual
        h = r["2"](F.silu(r["0"](x), inplace=True), cache)
        h = r["6"](F.silu(r["3"](h), inplace=True), cache)
        return h.add_(x if self.shortcut is None else self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        q, k, v = self.to_qkv(y).reshape(b * t, 1, 3 * c, h * w).transpose(-1, -2).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return self.proj(y).reshape(b, t, c, h, w).transpose(1, 2).add(x)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    b, c, t = x.shape[:3]
    y = fn(x.transpose(1, 2).reshape(b * t, c, *x.shape[3:]))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial up/down sampling, optionally with 2x temporal up/down sampling ("up3d", "down3d")."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        conv = nn.Conv2d(dim, dim, 3, padding=1) if mode.startswith("up") else nn.Conv2d(dim, dim, 3, stride=2)
        self.resample = nn.ModuleDict({"1": conv})
        if mode == "up3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "down3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        conv = self.resample["1"]
        if self.mode.startswith("up"):
            if self.mode == "up3d":
                x = self._time_up(x, cache)
            return _per_frame(lambda y: conv(F.interpolate(y, scale_factor=2.0, mode="nearest-exact")), x)
        x = _per_frame(lambda y: conv(F.pad(y, (0, 1, 0, 1))), x)
        return self._time_down(x, cache) if self.mode == "down3d" else x

    def _time_up(self, x: torch.Tensor, cache: dict | None) -> torch.Tensor:
        # Frame 0 of the clip stays single; every later frame t becomes frames (2t-1, 2t) of the output,
        # the two halves of the time conv's channels, computed over frames 1.. as their own sequence.
        head = x[:, :, :1] if _first_chunk(self, cache) else None
        rest = x[:, :, 1:] if head is not None else x
        if rest.shape[2]:
            b, c, t, h, w = rest.shape
            rest = self.time_conv(rest, cache).view(b, 2, c, t, h, w)
            rest = rest.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return rest if head is None else (torch.cat([head, rest], 2) if rest.shape[2] else head)

    def _time_down(self, x: torch.Tensor, cache: dict | None) -> torch.Tensor:
        # Output is [x0, tc(x0,x1,x2), tc(x2,x3,x4), ...]. Streaming needs the first chunk odd and the
        # others even in length (the encoder feeds 1, then 4 frames at a time), carrying one frame over.
        if _first_chunk(self, cache):
            out = x[:, :, :1]
            if x.shape[2] >= 3:
                out = torch.cat([out, self.time_conv(x)], 2)
        else:
            out = self.time_conv(torch.cat([cache[(self, "last")], x], 2))
        if cache is not None:
            cache[(self, "last")] = x[:, :, -1:].clone()
        return out


def avg_down(x: torch.Tensor, cout: int, ft: int, fs: int) -> torch.Tensor:
    """Parameter-free shortcut: fold (ft, fs, fs) neighbourhoods into channels, then average groups."""
    pad = (-x.shape[2]) % ft
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, cout, -1, t // ft, h // fs, w // fs).mean(2)


def dup_up(x: torch.Tensor, cout: int, ft: int, fs: int, first: bool) -> torch.Tensor:
    """Parameter-free shortcut: repeat channels, unfold them into (ft, fs, fs) neighbourhoods."""
    b, c, t, h, w = x.shape
    r = cout * ft * fs * fs // c
    x = x[:, :, None].expand(b, c, r, t, h, w).reshape(b, cout, ft, fs, fs, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, cout, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1:] if first and ft > 1 else x


class DownBlock(nn.Module):
    """Official ``Down_ResidualBlock``: residual blocks, an optional Resample, plus the avg_down shortcut."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        blocks: list[nn.Module] = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks)]
        if down:
            blocks.append(Resample(cout, "down3d" if temporal else "down2d"))
        self.downsamples = nn.ModuleList(blocks)
        self.cout, self.ft, self.fs = cout, 2 if temporal and down else 1, 2 if down else 1
        self.identity = self.ft == self.fs == 1 and cin == cout

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        y = x
        for m in self.downsamples:
            y = m(y, cache)
        return y.add_(x if self.identity else avg_down(x, self.cout, self.ft, self.fs))


class UpBlock(nn.Module):
    """Official ``Up_ResidualBlock``: residual blocks, an optional Resample, plus the dup_up shortcut."""

    def __init__(self, cin: int, cout: int, num_blocks: int, temporal: bool, up: bool):
        super().__init__()
        blocks: list[nn.Module] = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_blocks)]
        if up:
            blocks.append(Resample(cout, "up3d" if temporal else "up2d"))
        self.upsamples = nn.ModuleList(blocks)
        self.cout, self.ft, self.up = cout, 2 if temporal and up else 1, up

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        y = x
        for m in self.upsamples:
            y = m(y, cache)
        if not self.up:
            return y
        return y.add_(dup_up(x, self.cout, self.ft, 2, _first_chunk(self, cache)))


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim: int, cout: int) -> nn.ModuleDict:
    return nn.ModuleDict({"0": RMSNorm(dim), "2": CausalConv3d(dim, cout, 3)})


def _run_head(head: nn.ModuleDict, x: torch.Tensor, cache: dict | None) -> torch.Tensor:
    return head["2"](F.silu(head["0"](x), inplace=True), cache)


class Encoder3d(nn.Module):
    """Patchified video [B,12,T,H,W] -> [B,2*z_dim,1+(T-1)/4,H/8,W/8] (mean and log-variance)."""

    def __init__(self, dim: int, z2: int, dim_mult, num_res_blocks: int, temperal_downsample):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        n = len(dim_mult)
        self.conv1 = CausalConv3d(12, dims[0], 3)
        self.downsamples = nn.ModuleList(
            DownBlock(dims[i], dims[i + 1], num_res_blocks,
                      bool(temperal_downsample[i]) if i < len(temperal_downsample) else False, i != n - 1)
            for i in range(n))
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], z2)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for m in self.downsamples:
            x = m(x, cache)
        for m in self.middle:
            x = m(x, cache)
        return _run_head(self.head, x, cache)


class Decoder3d(nn.Module):
    """Latent [B,z_dim,F,h,w] -> patchified video [B,12,1+4(F-1),8h,8w]."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temperal_upsample):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        n = len(dim_mult)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3)
        self.middle = _middle(dims[0])
        self.upsamples = nn.ModuleList(
            UpBlock(dims[i], dims[i + 1], num_res_blocks + 1,
                    bool(temperal_upsample[i]) if i < len(temperal_upsample) else False, i != n - 1)
            for i in range(n))
        self.head = _head(dims[-1], 12)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        return self.upsample(self.trunk(x, cache), cache)

    def trunk(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """conv1 and the middle (with its frame-wide attention), at latent resolution."""
        x = self.conv1(x, cache)
        for m in self.middle:
            x = m(x, cache)
        return x

    def upsample(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """The up stages and the head: only 3x3 convs and nearest 2x steps, so spatially local."""
        for m in self.upsamples:
            x = m(x, cache)
        return _run_head(self.head, x, cache)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B,3,T,H,W] -> [B,12,T,H/2,W/2]; channel c*4 + r*2 + q holds pixel (2i+q, 2j+r)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * 4, t, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``patchify``."""
    b, c4, t, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, c4 // 4, t, h * 2, w * 2)
