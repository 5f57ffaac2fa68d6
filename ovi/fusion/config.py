"""Configuration of the twin video/audio backbones, from the official JSON or inferred from a state dict."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Mapping

from ..log import log

# Released checkpoints carry no config; these are fixed across all three Ovi variants.
HEAD_DIM = 128
TEXT_LEN = 512
AUDIO_ROPE_SCALE = 0.19676

# Keys of the official JSON that do not change inference with the released model types.
_IGNORED_KEYS = {"gradient_checkpointing", "additional_emb_dim", "additional_emb_length"}


@dataclass(frozen=True)
class BackboneConfig:
    """Constructor arguments of one Wan-style backbone (names as in the official JSON)."""

    patch_size: tuple[int, ...]
    model_type: str
    in_dim: int
    out_dim: int
    dim: int
    ffn_dim: int
    freq_dim: int
    num_heads: int
    num_layers: int
    text_len: int = TEXT_LEN
    text_dim: int = 4096
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    temporal_rope_scaling_factor: float = 1.0

    def __post_init__(self):
        if ("a" in self.model_type) == ("v" in self.model_type):
            raise ValueError(f"model_type {self.model_type!r} must name exactly one of audio ('a') or video ('v')")
        if self.model_type not in ("t2v", "ti2v", "t2a"):
            raise ValueError(f"model_type {self.model_type!r} is not supported (the released Ovi backbones are "
                             "'ti2v' and 't2a'; image-embedding variants are not)")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if tuple(self.window_size) != (-1, -1):
            raise ValueError(f"window_size {self.window_size}: only global attention (-1, -1) is supported")
        if self.is_audio and tuple(self.patch_size) != (1,):
            raise ValueError(f"audio backbone patch_size must be [1], got {list(self.patch_size)}")
        if not self.is_audio and len(self.patch_size) != 3:
            raise ValueError(f"video backbone patch_size must have 3 entries, got {list(self.patch_size)}")

    @property
    def is_audio(self) -> bool:
        return "a" in self.model_type

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def audio_mlp_dim(self) -> int:
        """Hidden width of the audio patch-embedding ConvMLP: a SwiGLU width derived from dim, not ffn_dim."""
        return 256 * math.ceil(int(2 * 4 * self.dim / 3) / 256)

    @classmethod
    def from_dict(cls, d: Mapping) -> "BackboneConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - _IGNORED_KEYS
        if unknown:
            log.debug("backbone config: ignoring keys %s", sorted(unknown))
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("patch_size", "window_size"):
            if k in kw:
                kw[k] = tuple(int(x) for x in kw[k])
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"], d["window_size"] = list(self.patch_size), list(self.window_size)
        return d


@dataclass(frozen=True)
class FusionConfig:
    video: BackboneConfig
    audio: BackboneConfig

    def __post_init__(self):
        if self.video.is_audio or not self.audio.is_audio:
            raise ValueError("FusionConfig needs a video backbone (model_type with 'v') and an audio one ('a')")
        if self.video.num_layers != self.audio.num_layers:
            raise ValueError(f"the backbones must have equal depth (video {self.video.num_layers}, "
                             f"audio {self.audio.num_layers})")
        if self.video.dim != self.audio.dim:
            raise ValueError(f"the backbones must have equal width (video {self.video.dim}, audio {self.audio.dim})")

    @property
    def num_layers(self) -> int:
        return self.video.num_layers

    @classmethod
    def from_dict(cls, cfg: Mapping) -> "FusionConfig":
        """From ``{"video": {...}, "audio": {...}}`` (fixture metadata, our header metadata) or the official
        ``video_config``/``audio_config`` names."""
        video = cfg.get("video", cfg.get("video_config"))
        audio = cfg.get("audio", cfg.get("audio_config"))
        if video is None or audio is None:
            raise ValueError(f"fusion config needs 'video' and 'audio' entries, got keys {sorted(cfg)}")
        return cls(BackboneConfig.from_dict(video), BackboneConfig.from_dict(audio))

    def to_dict(self) -> dict:
        return {"video": self.video.to_dict(), "audio": self.audio.to_dict()}

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], *, text_len: int = TEXT_LEN,
                    head_dim: int = HEAD_DIM) -> "FusionConfig":
        """Infer the config from ``{state-dict key: shape}`` with the ``video_model.``/``audio_model.`` prefixes.

        Head count and text length are not visible in shapes: the released models use head_dim 128 and
        text_len 512 (files we write carry the exact config in their header instead).
        """
        return cls(_branch_from_shapes(shapes, "video_model.", text_len, head_dim),
                   _branch_from_shapes(shapes, "audio_model.", text_len, head_dim))


def _branch_from_shapes(shapes: Mapping[str, tuple[int, ...]], p: str, text_len: int,
                        head_dim: int) -> BackboneConfig:
    def shape(key: str) -> tuple[int, ...]:
        if p + key not in shapes:
            raise KeyError(f"cannot infer the {p[:-1]} config: key {p + key!r} is missing")
        return tuple(shapes[p + key])

    audio = p + "patch_embedding.0.weight" in shapes
    if audio:
        dim, in_dim = shape("patch_embedding.0.weight")[:2]
        patch: tuple[int, ...] = (1,)
    else:
        dim, in_dim, *patch = shape("patch_embedding.weight")
        patch = tuple(patch)
    head_out = shape("head.head.weight")[0]
    out_dim = head_out // math.prod(patch)
    layer_re = re.compile(re.escape(p) + r"blocks\.(\d+)\.")
    layers = {int(m.group(1)) for k in shapes if (m := layer_re.match(k))}
    if dim % head_dim:
        raise ValueError(f"{p[:-1]}: dim {dim} is not a multiple of head_dim {head_dim}; the head count cannot "
                         "be inferred from shapes (give the config explicitly)")
    return BackboneConfig(
        patch_size=patch, model_type="t2a" if audio else "ti2v", in_dim=in_dim, out_dim=out_dim, dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0], freq_dim=shape("time_embedding.0.weight")[1],
        num_heads=dim // head_dim, num_layers=max(layers) + 1 if layers else 0, text_len=text_len,
        text_dim=shape("text_embedding.0.weight")[1],
        qk_norm=p + "blocks.0.self_attn.norm_q.weight" in shapes,
        cross_attn_norm=p + "blocks.0.norm3.weight" in shapes,
        temporal_rope_scaling_factor=AUDIO_ROPE_SCALE if audio else 1.0)


OVI_VIDEO_CONFIG = BackboneConfig(
    patch_size=(1, 2, 2), model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, freq_dim=256,
    num_heads=24, num_layers=30, text_len=512, text_dim=4096)
OVI_AUDIO_CONFIG = replace(OVI_VIDEO_CONFIG, patch_size=(1,), model_type="t2a", in_dim=20, out_dim=20,
                           temporal_rope_scaling_factor=AUDIO_ROPE_SCALE)
OVI_FUSION_CONFIG = FusionConfig(OVI_VIDEO_CONFIG, OVI_AUDIO_CONFIG)
