"""umT5 encoder (the text encoder of Wan2.2 / Ovi), with the official ``models_t5_umt5-xxl-enc-bf16.pth`` key names.

T5 v1.1 style blocks with umT5's twist: every block owns its relative-position bias table
(``blocks.i.pos_embedding.embedding``). Attention logits are not scaled by 1/sqrt(head_dim), padded keys are
masked with the dtype's most negative finite value, the norms are T5 RMSNorms whose mean square is taken in
float32, and the FFN is gated by a tanh-GELU branch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UMT5Config:
    vocab: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int = 32
    max_dist: int = 128
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], **overrides) -> "UMT5Config":
        """Infer the configuration from ``{official key: shape}``; max_dist and eps are not in the shapes."""
        def shape(key):
            if key not in shapes:
                raise KeyError(f"cannot infer the umT5 configuration: no {key!r} among the tensors")
            return tuple(shapes[key])

        vocab, dim = shape("token_embedding.weight")
        dim_attn = shape("blocks.0.attn.q.weight")[0]
        dim_ffn = shape("blocks.0.ffn.fc1.weight")[0]
        num_buckets, num_heads = shape("blocks.0.pos_embedding.embedding.weight")
        layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
        cfg = dict(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                   num_layers=max(layers) + 1, num_buckets=num_buckets)
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def from_dict(cls, d: Mapping) -> "UMT5Config":
        """From the official constructor arguments (the parity fixture's ``config``); unknown keys are ignored."""
        names = {"vocab", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "num_buckets", "max_dist", "eps"}
        return cls(**{k: v for k, v in d.items() if k in names})


UMT5_XXL = UMT5Config(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24)


def relative_position_bucket(rel_pos: torch.Tensor, num_buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of ``rel_pos`` = key position - query position (int64 in, int64 out).

    Half of the buckets are for keys after the query. Within a half, distances below half of it are exact,
    the rest are log-spaced up to ``max_dist``. The log is taken in float32 and truncated toward zero,
    as the official code does, because a float64 log moves some boundary distances by one bucket.
    """
    half = num_buckets // 2
    buckets = (rel_pos > 0).long() * half
    a = rel_pos.abs()
    exact = half // 2
    large = exact + (torch.log(a.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(a < exact, a, large)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class GELUTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``bias`` [B or 1, heads, L, L] holds the relative bias with the key mask already folded in."""
        b, n = x.shape[0], self.num_heads
        q, k, v = (t.view(b, -1, n, t.shape[-1] // n).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # umT5 logits are unscaled
        return self.o(out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[-1]))


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GELUTanh())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class RelativeBias(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """[Lq, Lk] bucket table -> [1, heads, Lq, Lk] bias."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # fp16 residual streams of T5 overflow on some prompts; the official code pulls infinities back in range
    if x.dtype == torch.float16 and torch.isinf(x).any():
        m = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-m, m)
    return x


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = RelativeBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        bias = self.pos_embedding(buckets).to(x.dtype)
        if key_mask is not None:
            bias = bias.masked_fill(key_mask, torch.finfo(x.dtype).min)
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """``forward(ids [B, L], mask [B, L]) -> context [B, L, dim]``; ``encode`` gives the per-prompt trimmed rows."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self._buckets: dict[tuple[int, str], torch.Tensor] = {}

    def buckets(self, length: int, device: torch.device) -> torch.Tensor:
        """[L, L] bucket of (key j - query i), cached per length and device (it is the same for every block)."""
        key = (length, str(device))
        table = self._buckets.get(key)
        if table is None:
            pos = torch.arange(length, device=device)
            table = relative_position_bucket(pos[None, :] - pos[:, None], self.config.num_buckets, self.config.max_dist)
            self._buckets[key] = table
        return table

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, *,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Context for every position (padded ones too). With ``return_hidden`` also the residual stream
        after each block (before the final norm)."""
        x = self.token_embedding(ids)
        buckets = self.buckets(ids.shape[1], ids.device)
        key_mask = None if mask is None else (mask == 0).view(ids.shape[0], 1, 1, ids.shape[1])
        hidden = []
        for block in self.blocks:
            x = block(x, buckets, key_mask)
            if return_hidden:
                hidden.append(x)
        out = self.norm(x)
        return (out, hidden) if return_hidden else out

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """One [len_i, dim] tensor per prompt, len_i = mask[i].sum() (the EOS row kept), as the engine gets it.

        Runs only up to the longest prompt: valid rows never see padded keys (their softmax weight is exactly
        zero) and the relative bias depends only on j - i, so cutting trailing padding changes nothing.
        """
        device = self.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        lens = mask.gt(0).sum(dim=1).tolist()
        longest = max(max(lens, default=0), 1)
        context = self(ids[:, :longest], mask[:, :longest])
        return [c[:n] for c, n in zip(context, lens)]
