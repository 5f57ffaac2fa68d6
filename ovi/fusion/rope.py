"""Rotary position embeddings of the two backbones: 3-D (frame, row, column) for video, 1-D for audio.

Pairs are interleaved (dims 2j, 2j+1 form complex pair j). The official code builds the tables and
rotates in float64 whatever the model dtype, so do we; tables depend only on the grid and are cached.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

THETA = 10000.0
# Rotation dtype: float64 as in the official code (a float32 rotation costs ~1e-6 relative).
ROPE_DTYPE = torch.float64


class Rope(NamedTuple):
    """cos/sin of the rotation angles, [L, 1, P] for L tokens and P rotated pairs (broadcast over heads)."""

    cos: torch.Tensor
    sin: torch.Tensor


def split_head_dim(head_dim: int) -> tuple[int, int, int]:
    """Real dims of a head given to (frame, row, column): 44/42/42 for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _angles(n: int, positions: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """[P, n/2] angles pos·scale·θ^(−2j/n) of an n-dim rotary table, float64."""
    inv = 1.0 / torch.pow(THETA, torch.arange(0, n, 2, dtype=torch.float64, device=positions.device) / n)
    return torch.outer(positions.to(torch.float64) * scale, inv)


def _rope(angles: torch.Tensor) -> Rope:
    return Rope(torch.cos(angles).unsqueeze(1).to(ROPE_DTYPE), torch.sin(angles).unsqueeze(1).to(ROPE_DTYPE))


@lru_cache(maxsize=16)
def video_rope(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> Rope:
    """3-D table for tokens in (f, y, x) raster order over a token grid (F, h, w)."""
    f, h, w = grid
    nf, nh, nw = split_head_dim(head_dim)
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    af, ah, aw = _angles(nf, ar(f)), _angles(nh, ar(h)), _angles(nw, ar(w))
    angles = torch.cat([af[:, None, None].expand(f, h, w, -1), ah[None, :, None].expand(f, h, w, -1),
                        aw[None, None, :].expand(f, h, w, -1)], dim=-1)
    return _rope(angles.reshape(f * h * w, -1))


@lru_cache(maxsize=16)
def audio_rope(length: int, head_dim: int, scale: float, device: torch.device) -> Rope:
    """1-D table over the temporal dims only (44 of 128): the remaining dims of each head are not rotated."""
    nf = split_head_dim(head_dim)[0]
    return _rope(_angles(nf, torch.arange(length, device=device), scale))


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate the first 2·P dims of each head of x [B, L, H, D]; the rest pass through. Returns x's dtype."""
    n = 2 * rope.cos.shape[-1]
    xr = x[..., :n].to(rope.cos.dtype).unflatten(-1, (-1, 2))
    a, b = xr[..., 0], xr[..., 1]
    out = torch.stack((a * rope.cos - b * rope.sin, a * rope.sin + b * rope.cos), dim=-1).flatten(-2).to(x.dtype)
    return out if n == x.shape[-1] else torch.cat((out, x[..., n:]), dim=-1)
