"""Configuration of the twin video/audio backbones, from the official JSON or inferred from a state dict.

Every config is checked when it is made, whatever it came from (a file's header metadata, the official JSON,
tensor shapes, code): field types, ranges and the relations the model needs, so a corrupt config fails at once
with the field named instead of building a model of absurd size.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any, Mapping

# Released checkpoints carry no config; these are fixed across all three Ovi variants.
HEAD_DIM = 128
TEXT_LEN = 512
AUDIO_ROPE_SCALE = 0.19676

# Keys of the official JSON that do not change inference with the released model types.
_IGNORED_KEYS = {"gradient_checkpointing", "additional_emb_dim", "additional_emb_length"}

# Inclusive ranges of the integer fields: generous around the released model (and far above the tiny test models),
# yet small enough that a corrupt value cannot make the loader build a model for minutes.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "in_dim": (1, 1024),       # latent channels: 48 video, 20 audio in the released model
    "out_dim": (1, 1024),      # the same latent channels on the way out
    "dim": (1, 16384),         # backbone width: 3072 released
    "ffn_dim": (1, 65536),     # FFN hidden width: 14336 released
    "freq_dim": (2, 4096),     # timestep sinusoid width: 256 released
    "num_heads": (1, 256),     # attention heads: 24 released
    "num_layers": (1, 128),    # blocks per backbone: 30 released
    "text_len": (1, 4096),     # text context tokens: 512 released
    "text_dim": (1, 16384),    # text encoder width: 4096 (umT5-XXL) released
}
MAX_PATCH = 16  # per-axis patch size: the released video patch is 1x2x2, audio 1
# head_dim = dim / num_heads: the RoPE splits it into three even parts (frame, row, column) of 2*(head_dim//6)
# or more each, so it must be even and at least 6; the released model uses 128, attention kernels stop at 256+.
MIN_HEAD_DIM, MAX_HEAD_DIM = 6, 512
MAX_EPS = 0.1  # norm epsilon: 1e-6 released; anything near 1 would flatten every activation
MAX_ROPE_SCALE = 100.0  # temporal RoPE position scale: 1.0 video, 0.19676 audio released
_INT_FIELDS = tuple(INT_BOUNDS)
_BOOL_FIELDS = ("qk_norm", "cross_attn_norm")
_NO_VALUE = object()


class ConfigError(ValueError):
    """A config field of the wrong type, out of range, missing or unknown. ``field`` is its dotted name
    (``video.num_layers``), None for the config as a whole; the message starts with it."""

    def __init__(self, field: str | None, problem: str, value: Any = _NO_VALUE):
        self.field, self.problem, self.value = field, problem, value
        head = "the config" if field is None else field if value is _NO_VALUE else f"{field}={value!r}"
        super().__init__(f"{head} {problem}")

    def under(self, prefix: str) -> "ConfigError":
        """The same error for the field inside ``prefix`` (``num_layers`` -> ``video.num_layers``)."""
        return ConfigError(prefix if self.field is None else f"{prefix}.{self.field}", self.problem, self.value)


def _type_name(v: Any) -> str:
    name = "bool" if isinstance(v, bool) else type(v).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name: str, v: Any, lo: int, hi: int) -> None:
    if not _is_int(v):
        raise ConfigError(name, f"is {_type_name(v)}, not an integer", v)
    if not lo <= v <= hi:
        raise ConfigError(name, f"is out of range ({lo}..{hi})", v)


def _check_float(name: str, v: Any, hi: float) -> None:
    """A finite number in (0, hi]."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ConfigError(name, f"is {_type_name(v)}, not a number", v)
    if not (math.isfinite(v) and 0 < v <= hi):
        raise ConfigError(name, f"is out of range (a finite number in (0, {hi:g}])", v)


def _check_ints(name: str, v: Any, length: int | None, lo: int, hi: int) -> None:
    """A tuple of integers in lo..hi (``length`` entries when given)."""
    if not isinstance(v, tuple):
        raise ConfigError(name, f"is {_type_name(v)}, not a list of integers", v)
    if length is not None and len(v) != length:
        raise ConfigError(name, f"has {len(v)} entries, not {length}", list(v))
    for i, x in enumerate(v):
        if not _is_int(x):
            raise ConfigError(f"{name}[{i}]", f"is {_type_name(x)}, not an integer", x)
        if not lo <= x <= hi:
            raise ConfigError(f"{name}[{i}]", f"is out of range ({lo}..{hi})", x)


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
        """Raises ``ConfigError`` naming the first field that is of the wrong type or out of range."""
        if not isinstance(self.model_type, str):
            raise ConfigError("model_type", f"is {_type_name(self.model_type)}, not a string", self.model_type)
        if ("a" in self.model_type) == ("v" in self.model_type):
            raise ConfigError("model_type", "must name exactly one of audio ('a') or video ('v')", self.model_type)
        if self.model_type not in ("t2v", "ti2v", "t2a"):
            raise ConfigError("model_type", "is not supported (the released Ovi backbones are 'ti2v' and 't2a'; "
                                            "image-embedding variants are not)", self.model_type)
        for name in _INT_FIELDS:
            _check_int(name, getattr(self, name), *INT_BOUNDS[name])
        for name in _BOOL_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ConfigError(name, f"is {_type_name(v)}, not true/false", v)
        _check_float("eps", self.eps, MAX_EPS)
        _check_float("temporal_rope_scaling_factor", self.temporal_rope_scaling_factor, MAX_ROPE_SCALE)
        _check_ints("patch_size", self.patch_size, 1 if self.is_audio else 3, 1, MAX_PATCH)
        if self.is_audio and self.patch_size != (1,):
            raise ConfigError("patch_size", "must be [1] for the audio backbone", list(self.patch_size))
        _check_ints("window_size", self.window_size, 2, -1, -1)  # only global attention (-1, -1)
        if self.freq_dim % 2:
            raise ConfigError("freq_dim", "is odd; the timestep sinusoid has a cos half and a sin half",
                              self.freq_dim)
        if self.dim % self.num_heads:
            raise ConfigError("dim", f"is not divisible by num_heads={self.num_heads}", self.dim)
        hd = self.dim // self.num_heads
        if hd % 2 or not MIN_HEAD_DIM <= hd <= MAX_HEAD_DIM:
            raise ConfigError("num_heads", f"gives head_dim {hd} (dim {self.dim} / {self.num_heads} heads); the "
                                           f"rotary embedding needs an even head_dim in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}",
                              self.num_heads)

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
        """From one backbone's JSON object. Raises ``ConfigError`` for a non-object, an unknown or missing key, or
        a field of the wrong type or out of range (field names relative to the backbone)."""
        if not isinstance(d, Mapping):
            raise ConfigError(None, f"is {_type_name(d)}, not a JSON object")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known and k not in _IGNORED_KEYS)
        if unknown:
            raise ConfigError(unknown[0], f"is not a backbone config field (known: {', '.join(known)})")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(missing[0], "is missing")
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("patch_size", "window_size"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
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
        """Raises ``ConfigError`` when the two backbones do not pair up (fields named ``video.``/``audio.``)."""
        if self.video.is_audio:
            raise ConfigError("video.model_type", "is an audio type; the video backbone needs 'ti2v' or 't2v'",
                              self.video.model_type)
        if not self.audio.is_audio:
            raise ConfigError("audio.model_type", "is a video type; the audio backbone needs 't2a'",
                              self.audio.model_type)
        # The fused cross-attention layers pair block i of one backbone with block i of the other, and attend
        # across them head by head: depth, width and head count must agree.
        for name in ("num_layers", "dim", "num_heads"):
            v, a = getattr(self.video, name), getattr(self.audio, name)
            if v != a:
                raise ConfigError(f"audio.{name}", f"differs from video.{name}={v}; the backbones are fused layer "
                                                   "by layer and must match", a)

    @property
    def num_layers(self) -> int:
        return self.video.num_layers

    @classmethod
    def from_dict(cls, cfg: Mapping) -> "FusionConfig":
        """From ``{"video": {...}, "audio": {...}}`` (fixture metadata, our header metadata) or the official
        ``video_config``/``audio_config`` names. Raises ``ConfigError`` (a ValueError) naming the bad field."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(None, f"is {_type_name(cfg)}, not a JSON object {{\"video\": {{...}}, \"audio\": {{...}}}}")
        names = {"video": ("video", "video_config"), "audio": ("audio", "audio_config")}
        unknown = sorted(str(k) for k in cfg if k not in names["video"] + names["audio"])
        if unknown:
            raise ConfigError(unknown[0], "is not a fusion config entry (known: video, audio)")
        branches = {}
        for branch, keys in names.items():
            present = [k for k in keys if k in cfg]
            if not present:
                raise ConfigError(branch, "is missing; a fusion config has 'video' and 'audio' entries")
            if len(present) > 1:
                raise ConfigError(branch, f"is given twice ({' and '.join(present)})")
            try:
                branches[branch] = BackboneConfig.from_dict(cfg[present[0]])
            except ConfigError as e:
                raise e.under(branch) from None
        return cls(branches["video"], branches["audio"])

    def to_dict(self) -> dict:
        return {"video": self.video.to_dict(), "audio": self.audio.to_dict()}

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], *, text_len: int = TEXT_LEN,
                    head_dim: int = HEAD_DIM) -> "FusionConfig":
        """Infer the config from ``{state-dict key: shape}`` with the ``video_model.``/``audio_model.`` prefixes.

        Head count and text length are not visible in shapes: the released models use head_dim 128 and
        text_len 512 (files we write carry the exact config in their header instead). Raises ``KeyError`` for a
        missing tensor and ``ConfigError`` for shapes that make no valid config (e.g. 100000 blocks).
        """
        branches = []
        for branch in ("video", "audio"):
            try:
                branches.append(_branch_from_shapes(shapes, branch + "_model.", text_len, head_dim))
            except ConfigError as e:
                raise e.under(branch) from None
        return cls(*branches)

    def shape_mismatches(self, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        """The fields this config gives differently from what the tensor ``shapes`` show, as
        ``video.ffn_dim=320 (the tensors have 288)``; [] when they agree or the shapes give no config at all
        (missing tensors, which the key check reports)."""
        try:
            seen = FusionConfig.from_shapes(shapes, text_len=self.video.text_len, head_dim=self.video.head_dim)
        except (KeyError, ValueError):
            return []
        out = []
        for branch in ("video", "audio"):
            mine, theirs = getattr(self, branch), getattr(seen, branch)
            for name in _SHAPE_FIELDS:
                a, b = getattr(mine, name), getattr(theirs, name)
                if a != b:
                    show = (lambda x: list(x)) if isinstance(a, tuple) else (lambda x: x)
                    out.append(f"{branch}.{name}={show(a)!r} (the tensors have {show(b)!r})")
        return out


# Fields that the tensor shapes (and the presence of the q/k norm and norm3 tensors) determine.
_SHAPE_FIELDS = ("patch_size", "in_dim", "out_dim", "dim", "ffn_dim", "freq_dim", "num_layers", "text_dim",
                 "qk_norm", "cross_attn_norm")


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
    if any(d < 1 for d in patch):
        raise ConfigError("patch_size", "has an empty axis (from the patch embedding's shape)", list(patch))
    head_out = shape("head.head.weight")[0]
    out_dim = head_out // math.prod(patch)
    layer_re = re.compile(re.escape(p) + r"blocks\.(\d+)\.")
    layers = {int(m.group(1)) for k in shapes if (m := layer_re.match(k))}
    if dim % head_dim:
        raise ConfigError("dim", f"is not a multiple of head_dim {head_dim}; the head count cannot be inferred "
                                 "from shapes (give the config explicitly)", dim)
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
