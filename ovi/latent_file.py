"""An Ovi latent as one .safetensors file: what it must hold, reading it as untrusted input, writing it atomically.

The file holds two tensors, ``samples`` (the video latent [N, 48, F, h, w]) and ``ovi_audio`` (the audio
latent [N, L, 20]), and under the header metadata key ``ovi.latent`` the JSON object of the latent's
metadata: variant (required), seed, height, width, mode, prompt, settings. F and L are the variant's latent
lengths and h, w the frame size over the VAE's spatial stride; a file that disagrees with itself or its
variant would only fail (or decode garbage) at the end of a decode, so every check runs before any model
does, and each error names the file.

N is 1 for one clip of one window: exactly the format before long clips, byte for byte. A long clip
(``ovi.long_clip``) holds one batch entry per window, N > 1, and its metadata adds ``windows``: one object
per window (seed, mode, prompt, settings; each window's ``settings["window"]`` places it on the clip's time
axis, see ``long_clip.generate.window_meta``), checked to be consecutive windows of one clip; the top-level
seed, mode, prompt and settings are the first window's. Two optional parts, for a clip made from the user's
own media: ``clip`` ({"frames", "samples"}: the length as written, when shorter than the windows' span) and
the tensor ``ovi_track`` [1, samples] (a lip-sync clip's original 16 kHz track, its soundtrack).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .atomic_write import AtomicOutput
from .loading import CheckpointError, CheckpointReader
from .variants import AUDIO_SAMPLES_PER_LATENT, VAE_TIME_STRIDE, Variant, get_variant

VIDEO_KEY = "samples"  # the tensor names are the keys of ComfyUI's LATENT dict, so loading is one dict
AUDIO_KEY = "ovi_audio"
TRACK_KEY = "ovi_track"  # optional: a lip-sync clip's own 16 kHz track [1, samples], its soundtrack
FILE_META_KEY = "ovi.latent"  # safetensors header metadata: the JSON of the latent's metadata
VAE_SPATIAL_STRIDE = 16  # Wan2.2 VAE: one latent pixel per 16x16 frame pixels
LATENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MODES = ("t2av", "i2av")
SEED_LIMIT = 2 ** 63  # seeds are stored and drawn as int64
WINDOW_FIELDS = ("index", "frame_start", "token_start", "known_latent_frames", "known_tokens", "overlap_frames",
                 "base_seed")  # a window's place on its clip (long_clip.generate.window_meta)


class LatentError(CheckpointError):
    """A latent that cannot be decoded; the message names its file when it came from one."""


def _dims(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(meta: Mapping, path, where: str) -> None:
    """seed, mode, prompt and settings of the latent (``where`` = "latent") or of one of its windows."""
    if "seed" in meta and not (_whole(meta["seed"]) and 0 <= meta["seed"] < SEED_LIMIT):
        raise LatentError(path, f"the {where} metadata's seed must be a whole number in [0, 2^63), "
                                f"got {meta['seed']!r}.")
    if "mode" in meta and meta["mode"] not in MODES:
        raise LatentError(path, f"the {where} metadata's mode must be one of {', '.join(MODES)}, got {meta['mode']!r}.")
    if "prompt" in meta and not isinstance(meta["prompt"], str):
        raise LatentError(path, f"the {where} metadata's prompt must be text, got {type(meta['prompt']).__name__}.")
    if "settings" in meta and not isinstance(meta["settings"], Mapping):
        raise LatentError(path, f"the {where} metadata's settings must be an object, got "
                                f"{type(meta['settings']).__name__}.")


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
    for key in ("height", "width"):
        if key in meta and not (_whole(meta[key]) and meta[key] > 0):
            raise LatentError(path, f"the latent metadata's {key} must be a positive whole number of pixels, "
                                    f"got {meta[key]!r}.")
    _check_fields(meta, path, "latent")
    if "windows" in meta:
        windows = meta["windows"]
        if not isinstance(windows, list) or not windows:
            raise LatentError(path, f"the latent metadata's windows must be a list of one object per window, got "
                                    f"{type(windows).__name__ if not isinstance(windows, list) else 'an empty list'}.")
        for k, entry in enumerate(windows):
            if not isinstance(entry, Mapping):
                raise LatentError(path, f"window {k}'s metadata must be an object, got {type(entry).__name__}.")
            _check_fields(entry, path, f"window {k}")
        _check_places(windows, variant, path)
    if "clip" in meta:
        clip = meta["clip"]
        if not isinstance(clip, Mapping) or set(clip) != {"frames", "samples"} \
                or not all(_whole(clip[k]) and clip[k] > 0 for k in ("frames", "samples")):
            raise LatentError(path, f"the latent metadata's clip must be {{\"frames\": F, \"samples\": S}} with "
                                    f"whole numbers > 0, got {clip!r}.")
    return variant


def _check_places(windows: list, v: Variant, path) -> None:
    """Each window's place on the clip (``settings["window"]``): consecutive windows, each starting where the
    previous one's overlap starts, its shared frames and tokens those the plan gives (``long_clip.plan``)."""
    from .long_clip.plan import token_at_frame  # here: the long_clip package imports this module

    if len(windows) == 1 and "window" not in (windows[0].get("settings") or {}):
        return  # one window, made by the sampler alone
    places = []
    for k, entry in enumerate(windows):
        place = (entry.get("settings") or {}).get("window")
        if not isinstance(place, Mapping) or not all(_whole(place.get(f)) and place[f] >= 0 for f in WINDOW_FIELDS):
            raise LatentError(path, f"window {k}'s settings must hold its place on the clip, \"window\": "
                                    f"{{{', '.join(WINDOW_FIELDS)}}} as whole numbers >= 0, got {place!r}.")
        places.append(place)
    for k in range(1, len(places)):
        p, q = places[k - 1], places[k]
        o = q["overlap_frames"]
        starts = p["frame_start"] + v.video_frames - o
        token = token_at_frame(v, q["frame_start"])
        problem = None
        if q["index"] != p["index"] + 1:
            problem = f"its index is {q['index']} after {p['index']}"
        elif (o - 1) % VAE_TIME_STRIDE or not 1 <= o <= v.video_frames - VAE_TIME_STRIDE:
            problem = f"it shares {o} frames with the window before (1 + 4 m, below {v.video_frames}, expected)"
        elif q["known_latent_frames"] != 1 + (o - 1) // VAE_TIME_STRIDE:
            problem = f"its {o} shared frames are held as {q['known_latent_frames']} latent frames"
        elif q["frame_start"] != starts:
            problem = f"it starts at frame {q['frame_start']}, not at {starts}"
        elif q["token_start"] != token or q["known_tokens"] != max(0, p["token_start"] + v.audio_latent_length - token):
            problem = f"its audio tokens start at {q['token_start']} sharing {q['known_tokens']}, not at {token}"
        if problem:
            raise LatentError(path, f"window {k} does not continue window {k - 1} of the clip: {problem}.")


def clip_span(meta: Mapping, variant: Variant) -> tuple[int, int]:
    """(pixel frames, audio samples) the windows of latent metadata ``meta`` cover together, as written."""
    v = variant
    windows = meta.get("windows") or [meta]
    places = [(w.get("settings") or {}).get("window") for w in windows]
    if len(places) == 1 or any(p is None for p in places):
        return v.video_frames, v.audio_samples
    frames = v.video_frames + sum(v.video_frames - p["overlap_frames"] for p in places[1:])
    tokens = places[-1]["token_start"] - places[0]["token_start"] + v.audio_latent_length
    return frames, tokens * AUDIO_SAMPLES_PER_LATENT


def check_shapes(video_shape, video_dtype: torch.dtype, audio_shape, audio_dtype: torch.dtype, meta: Mapping,
                 variant: Variant, path: str | os.PathLike | None = None) -> None:
    """Ranks, sizes and dtypes of the two latents against each other, the variant and the metadata's frame size
    and windows (one batch entry per window)."""
    video_shape, audio_shape = tuple(int(d) for d in video_shape), tuple(int(d) for d in audio_shape)
    v = variant
    windows = meta.get("windows")
    n = 1 if windows is None else len(windows)
    what = "one clip" if n == 1 else f"{n} windows"
    want_video = f"[{n}, {v.video_latent_channels}, {v.video_latent_length}, h, w]"
    want_audio = f"[{n}, {v.audio_latent_length}, {v.audio_latent_channels}]"
    if (len(video_shape) != 5 or video_shape[:3] != (n, v.video_latent_channels, v.video_latent_length)
            or min(video_shape) < 1):
        more = ""
        if windows is None and len(video_shape) == 5 and video_shape[0] > 1:
            more = f"; a latent of {video_shape[0]} windows needs their metadata (\"windows\")"
        raise LatentError(path, f"the video latent must be {want_video} for {v.name} ({what}), got "
                                f"{_dims(video_shape)}{more}.")
    if audio_shape != (n, v.audio_latent_length, v.audio_latent_channels):
        raise LatentError(path, f"the audio latent must be {want_audio} for {v.name} ({what}), got "
                                f"{_dims(audio_shape)}.")
    for what, dtype in (("video", video_dtype), ("audio", audio_dtype)):
        if dtype not in LATENT_DTYPES:
            raise LatentError(path, f"the {what} latent must be floating point, got {dtype}.")
    h, w = video_shape[-2:]
    for key, latent_px in (("height", h), ("width", w)):
        if key in meta and meta[key] != latent_px * VAE_SPATIAL_STRIDE:
            raise LatentError(path, f"the latent metadata's {key} is {meta[key]} pixels, but the video latent is "
                                    f"{latent_px} latent pixels ({latent_px * VAE_SPATIAL_STRIDE} pixels) along it.")
    if "clip" in meta:
        frames, samples = clip_span(meta, v)
        clip = meta["clip"]
        if clip["frames"] > frames or clip["samples"] > samples:
            raise LatentError(path, f"the latent metadata's clip is {clip['frames']} frames and {clip['samples']} "
                                    f"samples, longer than its windows ({frames} frames, {samples} samples).")


def check_track(track_shape, track_dtype: torch.dtype, meta: Mapping, path: str | os.PathLike | None = None) -> None:
    """A lip-sync track [1, samples]: float, as long as the clip's samples (``clip`` is required with it)."""
    shape = tuple(int(d) for d in track_shape)
    clip = meta.get("clip")
    if clip is None:
        raise LatentError(path, f"the latent holds a {TRACK_KEY} track but its metadata gives no clip length "
                                "(\"clip\": {\"frames\", \"samples\"}).")
    if shape != (1, clip["samples"]):
        raise LatentError(path, f"the {TRACK_KEY} track must be [1, {clip['samples']}] (the clip's samples), got "
                                f"{_dims(shape)}.")
    if track_dtype not in LATENT_DTYPES:
        raise LatentError(path, f"the {TRACK_KEY} track must be floating point, got {track_dtype}.")


def check_finite(video: torch.Tensor, audio: torch.Tensor, path: str | os.PathLike | None = None,
                 track: torch.Tensor | None = None) -> None:
    for what, t in (("video latent", video), ("audio latent", audio), (f"{TRACK_KEY} track", track)):
        if t is None:
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise LatentError(path, f"the {what} holds {bad} NaN or infinite values of {t.numel()}; "
                                    "it cannot be decoded.")


def check_latent(video: Any, audio: Any, meta: Any, path: str | os.PathLike | None = None,
                 track: Any = None) -> Variant:
    """Every check of this module on an in-memory latent; returns its variant."""
    for what, t in (("video", video), ("audio", audio)):
        if not isinstance(t, torch.Tensor):
            raise LatentError(path, f"the {what} latent must be a tensor, got {type(t).__name__}.")
    if track is not None and not isinstance(track, torch.Tensor):
        raise LatentError(path, f"the {TRACK_KEY} track must be a tensor, got {type(track).__name__}.")
    variant = check_metadata(meta, path)
    check_shapes(video.shape, video.dtype, audio.shape, audio.dtype, meta, variant, path)
    if track is not None:
        check_track(track.shape, track.dtype, meta, path)
    check_finite(video, audio, path, track)
    return variant


@dataclass
class LatentParts:
    """What a latent file holds: the two latents, the metadata and, for a lip-sync clip, its track."""

    video: torch.Tensor
    audio: torch.Tensor
    meta: dict
    track: torch.Tensor | None = None


def read_latent_file(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(video [N, 48, F, h, w], audio [N, L, 20], metadata) of a latent file, fully checked (``read_latent``)."""
    parts = read_latent(path)
    return parts.video, parts.audio, parts.meta


def read_latent(path: str | os.PathLike) -> LatentParts:
    """Every part of a latent file, fully checked.

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
        sv, sa, st = sources[VIDEO_KEY], sources[AUDIO_KEY], sources.get(TRACK_KEY)
        check_shapes(sv.shape, sv.dtype, sa.shape, sa.dtype, meta, variant, path)
        if st is not None:
            check_track(st.shape, st.dtype, meta, path)
        try:
            video, audio = sv.load(), sa.load()
            track = None if st is None else st.load()
        except (CheckpointError, OSError, RuntimeError, ValueError) as e:
            raise LatentError(path, f"unreadable latent tensors ({e}); the file is corrupt.") from e
    check_finite(video, audio, path, track)
    return LatentParts(video, audio, meta, track)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def write_latent_file(path: str | os.PathLike, video: torch.Tensor, audio: torch.Tensor, meta: Mapping,
                      track: torch.Tensor | None = None) -> Path:
    """Save a latent (checked first) to ``path``: complete, or not at all (``atomic_write``). ``track``: a
    lip-sync clip's own track (``TRACK_KEY``); without one the file holds exactly the two latents.

    A failure (a full disk, a read-only folder, an interrupt) leaves no file at ``path`` and no temporary
    file; an OSError names ``path``.
    """
    from safetensors.torch import save

    path = Path(path)
    check_latent(video, audio, meta, track=track)
    tensors = {VIDEO_KEY: video.detach().contiguous().cpu(), AUDIO_KEY: audio.detach().contiguous().cpu()}
    if track is not None:
        tensors[TRACK_KEY] = track.detach().contiguous().cpu()
    data = save(tensors, metadata={FILE_META_KEY: json.dumps(dict(meta)), "format": "pt"})
    with AtomicOutput(path) as out:
        out.write(data)
    return path
