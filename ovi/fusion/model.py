"""The Ovi fusion DiT: a video and an audio backbone run in lock-step, exchanging states in every layer.

A forward is ``prepare`` (embeddings, timestep modulation, RoPE tables), ``forward_layer`` once per
fused layer, then ``finish`` (heads, unpatchify), so a caller can move one layer pair at a time
(block swap) or skip layers (SLG) without touching the block code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..attention import attention
from .backbone import Backbone, Block, CrossAttention, SelfAttention
from .config import FusionConfig
from .rope import Rope, audio_rope, video_rope


@dataclass(frozen=True)
class CleanTokens:
    """Which tokens are already clean and see t = 0 instead of the step's timestep.

    ``video_frames``: bool [F] over latent frames (every token of a marked frame); ``audio_tokens``: bool [L_a]
    over audio latent tokens. None marks nothing. Video modulation then runs with one group per latent
    frame, audio modulation with one group per token.
    """

    video_frames: torch.Tensor | None = None
    audio_tokens: torch.Tensor | None = None


@dataclass
class FusionState:
    """Everything one forward carries from layer to layer. Modulation is per token group ([B, G, ...])."""

    video: torch.Tensor           # [B, L_v, dim] video token stream
    audio: torch.Tensor           # [B, L_a, dim] audio token stream
    video_e: torch.Tensor         # [B, G_v, dim] time embedding (for the head)
    audio_e: torch.Tensor
    video_e0: torch.Tensor        # [B, G_v, 6, dim] block modulation before each block's table is added
    audio_e0: torch.Tensor
    video_context: torch.Tensor   # [B, text_len, dim] embedded text
    audio_context: torch.Tensor
    video_rope: Rope
    audio_rope: Rope
    video_grid: tuple[int, int, int]
    audio_grid: tuple[int]
    unbatched: bool = False
    video_t: torch.Tensor | None = None  # [B, G_v] the timestep each video token group sees
    audio_t: torch.Tensor | None = None  # [B, G_a]


class FusionModel(nn.Module):
    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = config
        self.video_model = Backbone(config.video)
        self.audio_model = Backbone(config.audio)
        # Set by the loader to the dtype activations run in; defaults to the parameters' dtype.
        self.compute_dtype: torch.dtype | None = None
        self.attn_fn = attention
        # What ``forward_layer`` runs on a layer's two blocks: ``fused_layer``, or a compiled form of it
        # (``ovi.compile``), so every caller (the plain loop, block swap, SLG) gets the same one.
        self.layer_fn = fused_layer

    def set_attention(self, fn) -> None:
        """Route every attention of both backbones through ``fn(q, k, v)`` on [B, L, H, D] tensors, e.g. an
        ``ovi.attention.Attention`` from ``make_attention``; the default is plain sdpa."""
        self.attn_fn = fn
        for m in self.modules():
            if isinstance(m, (SelfAttention, CrossAttention)):
                m.attn_fn = fn

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def blocks(self) -> list[tuple[Block, Block]]:
        """The fused layers as (video block, audio block) pairs."""
        return list(zip(self.video_model.blocks, self.audio_model.blocks))

    def layer_modules(self, i: int) -> tuple[Block, Block]:
        return self.video_model.blocks[i], self.audio_model.blocks[i]

    def _dtype(self) -> torch.dtype:
        return self.compute_dtype or self.video_model.head.modulation.dtype

    # -- forward ------------------------------------------------------------------------------
    def forward(self, video_latent: torch.Tensor | Sequence[torch.Tensor],
                audio_latent: torch.Tensor | Sequence[torch.Tensor], t: torch.Tensor | float,
                video_context: torch.Tensor | Sequence[torch.Tensor],
                audio_context: torch.Tensor | Sequence[torch.Tensor], *,
                first_frame_is_clean: bool | CleanTokens = False, slg_layer: int = 0):
        """Velocity predictions (video_pred, audio_pred).

        Latents: video [B, C, F, H, W] and audio [B, L_a, C] (or one sample without the batch dim, or
        a list of equally shaped samples; the output has the same form). ``t``: [B], [1] or a scalar,
        int64 or float. Contexts: a list of [L_i, text_dim] tensors or a [B, L, text_dim] tensor, each
        zero-padded to text_len and attended in full, without a mask. ``first_frame_is_clean``: True gives
        the tokens of latent frame 0 t = 0 (I2AV); a ``CleanTokens`` names the clean video frames and audio
        tokens (the sampling loop's model_fn passes either form in the same argument). ``slg_layer`` = s > 0
        skips fused layer s (both modalities); s <= 0 or s >= num_layers skips nothing.
        """
        state = self.prepare(video_latent, audio_latent, t, video_context, audio_context,
                             first_frame_is_clean=first_frame_is_clean)
        for i in range(self.num_layers):
            if i == slg_layer and slg_layer > 0:
                continue
            self.forward_layer(i, state)
        return self.finish(state, as_list=not torch.is_tensor(video_latent))

    def prepare(self, video_latent, audio_latent, t, video_context, audio_context, *,
                first_frame_is_clean: bool | CleanTokens = False) -> FusionState:
        vm, am = self.video_model, self.audio_model
        dtype = self._dtype()
        video, unbatched = _batch(video_latent, 4)
        audio, _ = _batch(audio_latent, 2)
        if video.shape[0] != audio.shape[0]:
            raise ValueError(f"video batch {video.shape[0]} != audio batch {audio.shape[0]}")
        b, device = video.shape[0], video.device
        xv, grid_v = vm.embed(video.to(dtype))
        xa, grid_a = am.embed(audio.to(dtype))

        # A Python number keeps float64 so fractional (Euler) timesteps are not rounded to float32.
        t = (t if torch.is_tensor(t) else torch.tensor(t, dtype=torch.float64)).to(device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        elif t.numel() != b:
            raise ValueError(f"timestep has {t.numel()} values for a batch of {b}")
        clean = first_frame_is_clean
        first_frame = False
        if isinstance(clean, CleanTokens):
            clean_frames = _clean_mask(clean.video_frames, grid_v[0], "latent frames", device)
            clean_audio = _clean_mask(clean.audio_tokens, grid_a[0], "audio tokens", device)
        else:
            clean_frames = clean_audio = None
            first_frame = bool(clean)
        t_a = t[:, None]
        if clean_audio is not None:
            # Clean audio tokens see t = 0: one modulation group per audio token.
            t_a = t[:, None].expand(b, grid_a[0]).clone()
            t_a[:, clean_audio] = 0
        if clean_frames is not None:
            # Tokens of clean latent frames see t = 0: one modulation group per latent frame.
            t_v = t[:, None].expand(b, grid_v[0]).clone()
            t_v[:, clean_frames] = 0
        elif first_frame:
            # Tokens of latent frame 0 see t = 0 (I2AV): one modulation group per latent frame.
            t_v = t[:, None].expand(b, grid_v[0]).clone()
            t_v[:, 0] = 0
        else:
            t_v = t[:, None]
        ev, ev0 = vm.embed_time(t_v, dtype)
        ea, ea0 = am.embed_time(t_a, dtype)

        head_dim = self.config.video.head_dim
        rope_v = video_rope(grid_v, head_dim, device)
        rope_a = audio_rope(grid_a[0], self.config.audio.head_dim, self.config.audio.temporal_rope_scaling_factor,
                            device)
        return FusionState(
            video=xv, audio=xa, video_e=ev, audio_e=ea, video_e0=ev0, audio_e0=ea0,
            video_context=vm.embed_text(_pad_context(video_context, b, self.config.video.text_len, dtype, device)),
            audio_context=am.embed_text(_pad_context(audio_context, b, self.config.audio.text_len, dtype, device)),
            video_rope=rope_v, audio_rope=rope_a, video_grid=grid_v, audio_grid=grid_a, unbatched=unbatched,
            video_t=t_v, audio_t=t_a)

    def forward_layer(self, i: int, s: FusionState) -> None:
        """Fused layer i, updating ``s.video`` and ``s.audio`` (``fused_layer`` on the layer's blocks)."""
        vb, ab = self.layer_modules(i)
        s.video, s.audio = self.layer_fn(vb, ab, s.video, s.audio, s.video_e0, s.audio_e0, s.video_context,
                                         s.audio_context, s.video_rope, s.audio_rope)

    def finish(self, s: FusionState, as_list: bool = False):
        vm, am = self.video_model, self.audio_model
        video = vm.unpatchify(vm.head(s.video, s.video_e), s.video_grid)
        audio = am.unpatchify(am.head(s.audio, s.audio_e), s.audio_grid)
        if s.unbatched:
            return video[0], audio[0]
        if as_list:
            return list(video.unbind(0)), list(audio.unbind(0))
        return video, audio


def fused_layer(vb: Block, ab: Block, video: torch.Tensor, audio: torch.Tensor, video_e0: torch.Tensor,
                audio_e0: torch.Tensor, video_context: torch.Tensor, audio_context: torch.Tensor, video_rope: Rope,
                audio_rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused layer: (video, audio) token streams after the video block ``vb`` and the audio block ``ab``.

    Order: audio self-attn, video self-attn; then audio cross-attn + FFN against the video stream
    after its self-attn; then video cross-attn + FFN against the audio stream after its self-attn
    (not after this layer's audio cross-attn/FFN). Tensors in, tensors out (no state object), so a
    compiled form of it takes the same arguments for every layer.
    """
    vmod, amod = vb.modulation_for(video_e0), ab.modulation_for(audio_e0)
    a_sa = ab.self_attn_phase(audio, amod, audio_rope)
    v_sa = vb.self_attn_phase(video, vmod, video_rope)
    audio = ab.cross_ffn_phase(a_sa, amod, audio_context, audio_rope, v_sa, video_rope)
    video = vb.cross_ffn_phase(v_sa, vmod, video_context, video_rope, a_sa, audio_rope)
    return video, audio


def _batch(x, sample_ndim: int) -> tuple[torch.Tensor, bool]:
    """A batched tensor from a tensor or a list of samples; also whether the input had no batch dim."""
    if not torch.is_tensor(x):
        xs = list(x)
        if any(tuple(u.shape) != tuple(xs[0].shape) for u in xs):
            raise ValueError("all samples of a batch must have the same shape: "
                             f"{[list(u.shape) for u in xs]}")
        return torch.stack(xs), False
    if x.ndim == sample_ndim:
        return x.unsqueeze(0), True
    if x.ndim != sample_ndim + 1:
        raise ValueError(f"expected a {sample_ndim}-D sample or a {sample_ndim + 1}-D batch, got {list(x.shape)}")
    return x, False


def _clean_mask(mask: torch.Tensor | None, length: int, what: str, device) -> torch.Tensor | None:
    """A CleanTokens mask checked against the token grid; None when it marks nothing."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or mask.ndim != 1 or mask.shape[0] != length:
        raise ValueError(f"the clean mask over {what} must be a bool vector of length {length}, got "
                         f"{mask.dtype} {list(mask.shape)}")
    return mask.to(device) if bool(mask.any()) else None


def _pad_context(ctx, b: int, text_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Zero-pad each context to text_len rows -> [B, text_len, text_dim] (padding rows are attended too)."""
    items = list(ctx) if not torch.is_tensor(ctx) else ([ctx] if ctx.ndim == 2 else list(ctx.unbind(0)))
    if len(items) == 1 and b > 1:
        items = items * b
    if len(items) != b:
        raise ValueError(f"{len(items)} text contexts for a batch of {b}")
    out = torch.zeros(b, text_len, items[0].shape[-1], dtype=dtype, device=device)
    for i, u in enumerate(items):
        if u.shape[0] > text_len:
            raise ValueError(f"text context has {u.shape[0]} tokens, more than text_len {text_len}")
        out[i, :u.shape[0]] = u.to(device=device, dtype=dtype)
    return out
