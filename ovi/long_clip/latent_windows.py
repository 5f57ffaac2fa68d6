"""A long clip held as its windows' latents, with no mp4 written yet: what the ComfyUI nodes pass along.

``generate_clip`` makes the windows and writes the mp4 in one go. A node graph splits that: the sampler makes
the windows (``generate_windows``: a storyboard of one prompt, a lip-sync track or a video longer than one
window), Ovi Extend appends one (``extend_clip``), and Ovi Save Video writes them, decoding one window at a
time (``write_clip``), or Ovi Decode stitches them in memory (``decode_clip``, for short clips). In between
only latents travel (``ClipWindows``): 21 MB a 5 s window at 960x960, where its decoded frames take 1.3 GB.

The windows are made exactly as ``generate_clip`` makes them (the same pieces of ``generate``): window 0 the
plain T2AV / I2AV call, each later window holding the previous one's re-encoded overlap frames and audio
tokens, or the user's audio / frames in every window. Making window n + 1 needs window n's last overlap
frames decoded, so each window but the last (and all of a soundtrack's, whose frames are the user's) is
decoded once here and only those frames kept.

A clip from the user's media can be shorter than its windows' span (a 7 s track needs two 5 s windows);
``frames`` / ``samples`` then say where the clip ends. A lip-sync clip's soundtrack is the user's own track
(``track``), written as it is, as ``generate_clip`` writes it: exact samples, no VAE round trip. A soundtrack
clip's frames here are the Wan VAE's decode of the user's frames' latents (only latents travel); ``generate_clip``
writes the user's frames themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..engine import DecodedClip, GenerationResult
from ..log import log
from ..variants import AUDIO_SAMPLES_PER_LATENT, get_variant
from ..video_io import DEFAULT_CRF
from .clip_writer import ClipWriter, to_uint8
from .generate import (ClipProgress, _check_request, _check_windows, _fit_frames, _fit_track, _generate_window,
                       _meta_of, decode_windows, decoded_bytes, extend, window_meta)
from .plan import DEFAULT_OVERLAP_S, ClipPlan
from .stitch import frames_to_keep

# (window 1..N, windows, step, steps, the step's clean-video estimate) after every denoising step
ClipPreview = Callable[[int, int, int, int, torch.Tensor], None]


@dataclass
class ClipWindows:
    """Consecutive windows of one clip. ``frames`` / ``samples``: the clip's length as written when shorter
    than the windows' span (None: the span). ``track``: a lip-sync clip's 16 kHz track [samples], written as
    its soundtrack instead of the windows' decoded sound."""

    results: list[GenerationResult]
    frames: int | None = None
    samples: int | None = None
    track: torch.Tensor | None = None

    def __post_init__(self):
        self.results = list(self.results)
        metas = _check_windows(self.results)
        v = get_variant(self.results[0].variant)
        span_frames = v.video_frames + sum(v.video_frames - m["overlap_frames"] for m in metas[1:])
        span_samples = (metas[-1]["token_start"] - metas[0]["token_start"] + v.audio_latent_length) \
            * AUDIO_SAMPLES_PER_LATENT
        self.span = (span_frames, span_samples)
        for name, value, most in (("frames", self.frames, span_frames), ("samples", self.samples, span_samples)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
                raise ValueError(f"{name} must be a whole number in [1, {most}] (the windows' span), got {value!r}")
        if self.track is not None:
            if self.track.ndim != 1 or self.samples is None or self.track.shape[0] != self.samples:
                raise ValueError(f"the track must be [samples] with the clip's samples given, got "
                                 f"{list(self.track.shape)} for samples={self.samples}")
            if metas[0]["index"] != 0:
                raise ValueError("a clip with its own track starts at window 0 of that clip")

    @property
    def count(self) -> int:
        return len(self.results)

    @property
    def length(self) -> tuple[int, int]:
        """(frames, samples) as written."""
        return (self.frames or self.span[0], self.samples or self.span[1])


def generate_windows(engine, prompts: Sequence[str] | str, *, plan: ClipPlan, image=None,
                     audio_track: torch.Tensor | None = None, video_frames: torch.Tensor | None = None,
                     video_mode: str | None = None, audio_mode: str | None = None,
                     progress: ClipProgress | None = None, preview: ClipPreview | None = None,
                     should_stop: Callable[[], bool] | None = None, tile_size: int | None = None,
                     **generate_kw) -> ClipWindows:
    """The windows of ``plan`` as latents, made as ``generate_clip`` makes them (same arguments, same
    windows for the same seed), with nothing written. ``audio_track`` / ``video_frames`` are fitted to the
    plan as there; the result carries the plan's length and, for lip-sync, the track cut to it."""
    prompts = _check_request(engine, prompts, plan, image, audio_track, video_frames, video_mode, audio_mode,
                             generate_kw)
    v = plan.variant
    track = None if audio_track is None else _fit_track(audio_track, plan)
    frames_in = None if video_frames is None else _fit_frames(video_frames, plan)
    base_seed = plan.windows[0].seed
    n = plan.count
    results: list[GenerationResult] = []
    previous = previous_tail = size = None
    for w in plan.windows:
        kw = dict(generate_kw)
        if preview is not None:
            kw["preview"] = lambda step, steps, x0, i=w.index: preview(i + 1, n, step, steps, x0)
        result = _generate_window(engine, w, n, prompts[w.index], image, track, frames_in, previous, previous_tail,
                                  plan, size, video_mode, audio_mode, progress, should_stop, kw)
        result.settings["window"] = window_meta(w, base_seed)
        size = (result.height, result.width)
        if w.index + 1 < n and frames_in is None:
            # the next window starts from this one's last frames, re-encoded
            previous_tail = engine.decode(result, tile_size=tile_size, should_stop=should_stop) \
                .frames[-plan.overlap_frames:].clone()
        previous = result
        results.append(result)
    cut = (plan.frames, plan.samples) != (plan.span_frames, plan.span_tokens * AUDIO_SAMPLES_PER_LATENT)
    return ClipWindows(results, frames=plan.frames if cut or track is not None else None,
                       samples=plan.samples if cut or track is not None else None,
                       track=None if track is None else track[:plan.samples].clone())


def extend_clip(engine, clip: ClipWindows, prompt: str, *, overlap: float = DEFAULT_OVERLAP_S,
                tile_size: int | None = None, should_stop: Callable[[], bool] | None = None,
                **extend_kw) -> ClipWindows:
    """``clip`` with one more window after its last (``generate.extend``; ``extend_kw`` go there: seed,
    steps, guidance, modes, progress, preview...). The last window is decoded here for its overlap frames.
    The longer clip spans all its windows: a cut at the user's media's end and a lip-sync track no longer
    fit it, so they are dropped (logged) and its sound is every window's decoded sound."""
    last = clip.results[-1]
    if clip.frames is not None or clip.track is not None:
        log.info("extending a clip cut to its media's length (%d frames%s): the longer clip spans all its windows "
                 "and its sound is decoded from every window", clip.length[0],
                 ", the user's track as its sound" if clip.track is not None else "")
    tail = engine.decode(last, tile_size=tile_size, should_stop=should_stop).frames
    result = extend(engine, last, prompt, overlap=overlap, previous_frames=tail, should_stop=should_stop,
                    **extend_kw)
    del tail
    # a plain one-window result (the sampler alone) is window 0 of the clip now: say so in its metadata
    first = clip.results[0]
    if "window" not in first.settings:
        first = replace(first, settings={**first.settings, "window": _meta_of(first)})
    return ClipWindows([first, *clip.results[1:], result])


def clip_bytes(clip: ClipWindows) -> int:
    """Memory ``decode_clip`` takes (``generate.decoded_bytes``)."""
    return decoded_bytes(clip.results)


def decode_clip(engine, clip: ClipWindows, *, tile_size: int | None = None, progress: ClipProgress | None = None,
                should_stop: Callable[[], bool] | None = None, **decode_kw) -> DecodedClip:
    """The whole clip in memory (``generate.decode_windows``), cut to its length, its sound the track when it
    has one. ``decode_kw`` (``tile_overlap``, ``vae_dtype``) go to every window's ``engine.decode``."""
    decoded = decode_windows(engine, clip.results, tile_size=tile_size, progress=progress, should_stop=should_stop,
                             **decode_kw)
    frames, samples = clip.length
    decoded.frames = decoded.frames[:frames]
    decoded.waveform = clip.track.clone() if clip.track is not None else decoded.waveform[:samples]
    return decoded


def write_clip(engine, clip: ClipWindows, path: str | os.PathLike, *, progress: ClipProgress | None = None,
               should_stop: Callable[[], bool] | None = None, tile_size: int | None = None,
               crf: int = DEFAULT_CRF) -> Path:
    """The clip as an mp4 at ``path``, decoded and written one window at a time (``ClipWriter``: frames shared
    with the previous window taken once, the shared sound crossfaded, or the track's samples as they are), so
    memory holds one window's frames whatever the clip's length. ``progress(window, windows, frames decoded,
    frames)`` follows each window's decode. An interrupt after >= 1 window writes those as a shorter mp4, then
    propagates."""
    results = clip.results
    metas = _check_windows(results)
    v = get_variant(results[0].variant)
    n = len(results)
    frames_limit, samples_limit = clip.length
    # where each window's sound ends, in samples from the clip's start
    ends = [(m["token_start"] - metas[0]["token_start"] + v.audio_latent_length) * AUDIO_SAMPLES_PER_LATENT
            for m in metas]
    log.info("writing %d window%s of %s at %dx%d (%d frames, %.2f s of %s) to %s", n, "s" if n > 1 else "", v.name,
             results[0].width, results[0].height, frames_limit, samples_limit / v.sample_rate,
             "the given track" if clip.track is not None else "sound", path)
    with ClipWriter(path, v.fps, v.sample_rate, frames_limit=frames_limit, samples_limit=samples_limit,
                    crf=crf) as writer:
        for k, (r, m) in enumerate(zip(results, metas)):
            step = None if progress is None else (lambda done, total, k=k: progress(k + 1, n, done, total))
            decoded = engine.decode(r, tile_size=tile_size, progress=step, should_stop=should_stop)
            kept = to_uint8(decoded.frames[frames_to_keep(m["overlap_frames"])])
            if clip.track is not None:
                # the track's own samples, each written once: from the previous window's end to this one's
                writer.append(kept, clip.track[0 if k == 0 else ends[k - 1]:ends[k]], overlap_samples=0)
            else:
                hold = 0 if k + 1 == n else metas[k + 1]["known_tokens"] * AUDIO_SAMPLES_PER_LATENT
                writer.append(kept, decoded.waveform, overlap_samples=hold)
            del decoded, kept
    return Path(path)


__all__ = ["ClipPreview", "ClipWindows", "clip_bytes", "decode_clip", "extend_clip", "generate_windows",
           "write_clip"]
