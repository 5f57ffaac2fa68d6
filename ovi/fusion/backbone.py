"""One Wan-2.2-style backbone of the Ovi fusion model (video or audio), with the fusion projections built in.

Module and parameter names reproduce the official state-dict keys exactly. Norms and modulation
compute in the dtype of their input (float32 for parity, bf16 in production); the timestep sinusoid
and RoPE run in float64. Timestep-dependent modulation is held per token *group* ([B, G, ...], the
tokens split into G equal consecutive runs: G = 1 for a shared timestep, G = frames when some latent
frames are clean, G = tokens for audio with clean tokens), so video modulation is never materialised
per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attention
from .config import BackboneConfig
from .rope import Rope, apply_rope


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] timesteps -> [N, dim] float64 embedding, cos half first, ω_k = 10000^(−k/half)."""
    half = dim // 2
    t = t.to(torch.float64)
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, omega)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x·(1+scale)+shift for x [B, L, D] and per-group shift/scale [B, G, D]."""
    g = shift.shape[1]
    return (x.unflatten(1, (g, -1)) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2)


def add_gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y·gate with a per-group gate [B, G, D]."""
    g = gate.shape[1]
    return x + (y.unflatten(1, (g, -1)) * gate.unsqueeze(2)).flatten(1, 2)


class RMSNorm(nn.Module):
    """RMS norm over the whole last dim (for q/k: across all heads together, before the head split)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computing in the input's dtype (the parameters follow it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unflatten(-1, (n, -1))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_fn = attention  # replaced by FusionModel.set_attention
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        n = self.num_heads
        q = apply_rope(_heads(self.norm_q(self.q(x)), n), rope)
        k = apply_rope(_heads(self.norm_k(self.k(x)), n), rope)
        v = _heads(self.v(x), n)
        return self.o(self.attn_fn(q, k, v).flatten(2))


class CrossAttention(nn.Module):
    """Text cross-attention plus the injected fusion attention to the other modality.

    One query serves both: unrotated for the text, rotated with this stream's RoPE for the other
    stream's keys (which carry that stream's RoPE). The two results are summed before the shared ``o``.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_fn = attention  # replaced by FusionModel.set_attention
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.k_fusion = nn.Linear(dim, dim)
        self.v_fusion = nn.Linear(dim, dim)
        self.pre_attn_norm_fusion = LayerNorm(dim, eps=1e-6, elementwise_affine=True)
        self.norm_k_fusion = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope: Rope, other: torch.Tensor,
                other_rope: Rope) -> torch.Tensor:
        n = self.num_heads
        q = _heads(self.norm_q(self.q(x)), n)
        out = self.attn_fn(q, _heads(self.norm_k(self.k(context)), n), _heads(self.v(context), n))
        t = self.pre_attn_norm_fusion(other)
        k_t = apply_rope(_heads(self.norm_k_fusion(self.k_fusion(t)), n), other_rope)
        out = out + self.attn_fn(apply_rope(q, rope), k_t, _heads(self.v_fusion(t), n))
        return self.o(out.flatten(2))


class ModulationTable(nn.Module):
    """A learned [1, n, dim] table added to the timestep projection (a module only for its key name)."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, n, dim))


class Block(nn.Module):
    """One layer of a backbone; the fused forward calls its two phases with the other stream in between."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, eps)
        self.norm3 = LayerNorm(dim, eps=eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = ModulationTable(6, dim)
        self.norm1 = LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm2 = LayerNorm(dim, eps=eps, elementwise_affine=False)

    def modulation_for(self, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff), each [B, G, D], from e0 [B, G, 6, D]."""
        return (self.modulation.modulation.to(e0.dtype).unsqueeze(0) + e0).unbind(2)

    def self_attn_phase(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], rope: Rope) -> torch.Tensor:
        y = self.self_attn(modulate(self.norm1(x), mod[0], mod[1]), rope)
        return add_gated(x, y, mod[2])

    def cross_ffn_phase(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], context: torch.Tensor, rope: Rope,
                        other: torch.Tensor, other_rope: Rope) -> torch.Tensor:
        x = x + self.cross_attn(self.norm3(x), context, rope, other, other_rope)
        y = self.ffn(modulate(self.norm2(x), mod[3], mod[4]))
        return add_gated(x, y, mod[5])


class Head(nn.Module):
    def __init__(self, dim: int, out: int, eps: float):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))
        self.norm = LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Shift/scale come from the time embedding e [B, G, D] itself, not from the 6-way projection."""
        shift, scale = (self.modulation.to(e.dtype).unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(modulate(self.norm(x), shift, scale))


class ConvMLP(nn.Module):
    """SwiGLU made of kernel-7 convolutions, channel-first: w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden: int, kernel: int = 7):
        super().__init__()
        self.w1 = nn.Conv1d(dim, hidden, kernel, padding=kernel // 2, bias=False)
        self.w2 = nn.Conv1d(hidden, dim, kernel, padding=kernel // 2, bias=False)
        self.w3 = nn.Conv1d(dim, hidden, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class AudioPatchEmbed(nn.Sequential):
    """[B, L, C] audio latent -> [B, L, dim]: conv k7, SiLU, ConvMLP, all over the sequence (no patchify)."""

    def __init__(self, in_dim: int, dim: int, hidden: int):
        super().__init__(nn.Conv1d(in_dim, dim, 7, padding=3), nn.SiLU(), ConvMLP(dim, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Backbone(nn.Module):
    """Embeddings, blocks and head of one modality; ``FusionModel`` drives the blocks layer by layer."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        if cfg.is_audio:
            self.patch_embedding = AudioPatchEmbed(cfg.in_dim, dim, cfg.audio_mlp_dim)
        else:
            self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        out = cfg.out_dim if cfg.is_audio else cfg.out_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.head = Head(dim, out, cfg.eps)

    def embed(self, latent: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Latent [B, C, F, H, W] (video) or [B, L, C] (audio) -> (tokens [B, L, dim], token grid)."""
        cfg = self.config
        if cfg.is_audio:
            if latent.ndim != 3 or latent.shape[-1] != cfg.in_dim:
                raise ValueError(f"audio latent must be [B, L, {cfg.in_dim}], got {list(latent.shape)}")
            return self.patch_embedding(latent).contiguous(), (latent.shape[1],)
        if latent.ndim != 5 or latent.shape[1] != cfg.in_dim:
            raise ValueError(f"video latent must be [B, {cfg.in_dim}, F, H, W], got {list(latent.shape)}")
        if any(s % p for s, p in zip(latent.shape[2:], cfg.patch_size)):
            raise ValueError(f"video latent size {list(latent.shape[2:])} is not a multiple of the patch size "
                             f"{list(cfg.patch_size)}")
        x = self.patch_embedding(latent)
        return x.flatten(2).transpose(1, 2).contiguous(), tuple(x.shape[2:])

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """[B, text_len, text_dim] zero-padded context -> [B, text_len, dim]."""
        return self.text_embedding(context)

    def embed_time(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group timesteps [B, G] -> (e [B, G, dim], e0 [B, G, 6, dim])."""
        b, g = t.shape
        e = self.time_embedding(sinusoid(t.flatten(), self.config.freq_dim).to(dtype))
        e0 = self.time_projection(e)
        return e.unflatten(0, (b, g)), e0.unflatten(0, (b, g)).unflatten(-1, (6, -1))

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Head output [B, L, out] -> latent layout ([B, C, F, H, W] video, [B, L, C] audio)."""
        cfg = self.config
        if cfg.is_audio:
            return x
        b, c, (pt, ph, pw) = x.shape[0], cfg.out_dim, cfg.patch_size
        f, h, w = grid
        x = x.reshape(b, f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, f * pt, h * ph, w * pw)
