"""An Ovi latent as one .safetensors file: what it must hold, reading it as untrusted input, writing it atomically.

The file holds two tensors, ``samples`` (the video latent [1, 48, F, h, w]) and ``ovi_audio`` (the audio
latent [1, L, 20]), and under the header metadata key ``ovi.latent`` the JSON object of the latent's
metadata: variant (required), seed, height, width, mode, prompt, settings. F and L are the variant's latent
lengths and h, w the frame size over the VAE's spatial stride; a file that disagrees with itself or its
variant would only fail (or decode garbage) at the end of a decode, so every check runs before any model
does, and each error names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .atomic_write import AtomicOutput
from .loading import CheckpointError, CheckpointReader
from .variants import Variant, get_variant

VIDEO_KEY = "samples"  # the tensor names are the keys of ComfyUI's LATENT dict, so loading is one dict
AUDIO_KEY = "ovi_audio"
FILE_META_KEY = "ovi.latent"  # safetensors header metadata: the JSON of the latent's metadata
VAE_SPATIAL_STRIDE = 16  # Wan2.2 VAE: one latent pixel per 16x16 frame pixels
LATENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MODES = ("t2av", "i2av")
SEED_LIMIT = 2 ** 63  # seeds are stored and drawn as int64


class LatentError(CheckpointError):
    """A latent that cannot be decoded; the message names its file when it came from one."""


def _dims(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_metadata(meta: Any, path: str | os.PathLike | None = None) -> Variant:
    """The variant of latent metadata ``meta``; LatentError for anything a decode could trip over."""
    if not isinstance(meta, Mapping):
        raise LatentError(path, f"the latent metadata must be a JSON object, got {type(meta).__name__}.")
    if "variant" not in meta:
        raise LatentError(path, "the latent metadata names no variant; it was not saved by OviSaveLatent.")
    try:
        variant = get_variant(meta["variant"]) if isinstance(meta["variant"], str) else None
    except ValueError as e:
        raise LatentError(path, f"the latent metadata names an {e}.") from None
    if variant is None:
        raise LatentError(path, f"the latent metadata's variant must be a name, got {meta['variant']!r}.")
    if "seed" in meta and not (_whole(meta["seed"]) and 0 <= meta["seed"] < SEED_LIMIT):
        raise LatentError(path, f"the latent metadata's seed must be a whole number in [0, 2^63), "
                                f"got {meta['seed']!r}.")
    for key in ("height", "width"):
        if key in meta and not (_whole(meta[key]) and meta[key] > 0):
            raise LatentError(path, f"the latent metadata's {key} must be a positive whole number of pixels, "
                                    f"got {meta[key]!r}.")
    if "mode" in meta and meta["mode"] not in MODES:
        raise LatentError(path, f"the latent metadata's mode must be one of {', '.join(MODES)}, got {meta['mode']!r}.")
    if "prompt" in meta and not isinstance(meta["prompt"], str):
        raise LatentError(path, f"the latent metadata's prompt must be text, got {type(meta['prompt']).__name__}.")
    if "settings" in meta and not isinstance(meta["settings"], Mapping):
        raise LatentError(path, f"the latent metadata's settings must be an object, got "
                                f"{type(meta['settings']).__name__}.")
    return variant


def check_shapes(video_shape, video_dtype: torch.dtype, audio_shape, audio_dtype: torch.dtype, meta: Mapping,
                 variant: Variant, path: str | os.PathLike | None = None) -> None:
    """Ranks, sizes and dtypes of the two latents against each other, the variant and the metadata's frame size."""
    video_shape, audio_shape = tuple(int(d) for d in video_shape), tuple(int(d) for d in audio_shape)
    v = variant
    want_video = f"[1, {v.video_latent_channels}, {v.video_latent_length}, h, w]"
    want_audio = f"[1, {v.audio_latent_length}, {v.audio_latent_channels}]"
    if (len(video_shape) != 5 or video_shape[:3] != (1, v.video_latent_channels, v.video_latent_length)
            or min(video_shape) < 1):
        raise LatentError(path, f"the video latent must be {want_video} for {v.name} (one clip), got "
                                f"{_dims(video_shape)}.")
    if audio_shape != (1, v.audio_latent_length, v.audio_latent_channels):
        raise LatentError(path, f"the audio latent must be {want_audio} for {v.name} (one clip), got "
                                f"{_dims(audio_shape)}.")
    for what, dtype in (("video", video_dtype), ("audio", audio_dtype)):
        if dtype not in LATENT_DTYPES:
            raise LatentError(path, f"the {what} latent must be floating point, got {dtype}.")
    h, w = video_shape[-2:]
    for key, latent_px in (("height", h), ("width", w)):
        if key in meta and meta[key] != latent_px * VAE_SPATIAL_STRIDE:
            raise LatentError(path, f"the latent metadata's {key} is {meta[key]} pixels, but the video latent is "
                                    f"{latent_px} latent pixels ({latent_px * VAE_SPATIAL_STRIDE} pixels) along it.")


def check_finite(video: torch.Tensor, audio: torch.Tensor, path: str | os.PathLike | None = None) -> None:
    for what, t in (("video", video), ("audio", audio)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise LatentError(path, f"the {what} latent holds {bad} NaN or infinite values of {t.numel()}; "
                                    "it cannot be decoded.")


def check_latent(video: Any, audio: Any, meta: Any, path: str | os.PathLike | None = None) -> Variant:
    """Every check of this module on an in-memory latent; returns its variant."""
    for what, t in (("video", video), ("audio", audio)):
        if not isinstance(t, torch.Tensor):
            raise LatentError(path, f"the {what} latent must be a tensor, got {type(t).__name__}.")
    variant = check_metadata(meta, path)
    check_shapes(video.shape, video.dtype, audio.shape, audio.dtype, meta, variant, path)
    check_finite(video, audio, path)
    return variant


def read_latent_file(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(video [1, 48, F, h, w], audio [1, L, 20], metadata) of a latent file, fully checked.

    The file is read as untrusted: anything unreadable, missing, mistyped or inconsistent raises LatentError
    (a CheckpointError, so a ValueError) naming the file; shapes and metadata are checked from the header,
    before a tensor is read.
    """
    path = Path(path)
    try:
        reader = CheckpointReader(path)
    except CheckpointError as e:
        raise LatentError(None, f"{e} (expected an Ovi latent file saved by OviSaveLatent)") from e
    with reader:
        if FILE_META_KEY not in reader.metadata:
            raise LatentError(path, f"not an Ovi latent file (saved by OviSaveLatent): it has no {FILE_META_KEY} "
                                    "metadata.")
        try:
            meta = json.loads(reader.metadata[FILE_META_KEY], parse_constant=_no_constant)
        except ValueError as e:
            raise LatentError(path, f"the {FILE_META_KEY} metadata is not valid JSON ({e}).") from None
        variant = check_metadata(meta, path)
        sources = reader.sources()
        missing = [k for k in (VIDEO_KEY, AUDIO_KEY) if k not in sources]
        if missing:
            raise LatentError(path, f"not a complete Ovi latent file: the {' and '.join(missing)} tensor"
                                    f"{'s are' if len(missing) > 1 else ' is'} missing (it has "
                                    f"{', '.join(sorted(sources)) or 'no tensors'}).")
        sv, sa = sources[VIDEO_KEY], sources[AUDIO_KEY]
        check_shapes(sv.shape, sv.dtype, sa.shape, sa.dtype, meta, variant, path)
        try:
            video, audio = sv.load(), sa.load()
        except (CheckpointError, OSError, RuntimeError, ValueError) as e:
            raise LatentError(path, f"unreadable latent tensors ({e}); the file is corrupt.") from e
    check_finite(video, audio, path)
    return video, audio, meta


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def write_latent_file(path: str | os.PathLike, video: torch.Tensor, audio: torch.Tensor, meta: Mapping) -> Path:
    """Save a latent (checked first) to ``path``: complete, or not at all (``atomic_write``).

    A failure (a full disk, a read-only folder, an interrupt) leaves no file at ``path`` and no temporary
    file; an OSError names ``path``.
    """
    from safetensors.torch import save

    path = Path(path)
    check_latent(video, audio, meta)
    tensors = {VIDEO_KEY: video.detach().contiguous().cpu(), AUDIO_KEY: audio.detach().contiguous().cpu()}
    data = save(tensors, metadata={FILE_META_KEY: json.dumps(dict(meta)), "format": "pt"})
    with AtomicOutput(path) as out:
        out.write(data)
    return path
