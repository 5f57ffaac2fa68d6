"""Long clips: windows generated one after another, each continuing the last, written as they finish.

``generate_clip`` makes the windows of a ``ClipPlan`` (``plan.py`` places them on the clip's time axis):

* window 0 is the plain T2AV / I2AV call, bit-identical to ``engine.generate`` with the same seed;
* window n > 0 holds what it shares with window n - 1: the last ``overlap_frames`` decoded frames of window
  n - 1, re-encoded by the Wan VAE (``engine.encode_frames``), as its first latent frames (video mode, default
  clean), and window n - 1's audio latent tokens over the same seconds as its first tokens (audio mode,
  default renoise);
* each window is decoded, appended to the mp4 (``ClipWriter``: shared frames taken once from the earlier
  window, the shared sound crossfaded) and dropped; only what the next window needs is kept (the overlap
  frames and the audio latent), so memory does not grow with the number of windows. ``results`` keeps each
  window's latents (21 MB a 5 s window at 960x960, against 1.3 GB for its decoded frames).

The user's own media (section 3 of the long-clip design):

* ``audio_track`` (lip-sync): every window's whole audio latent is known, the MMAudio encoding of that
  window's slice of the track (each window encodes its own 5 / 10 s, so memory stays flat however long the
  track). The clip's soundtrack is the track's original samples, not a decode of their latent: they are
  exact, with no VAE round trip's smearing of consonants, and they need no crossfade.
* ``video_frames`` (soundtrack): every latent frame of every window is known, the Wan encoding of that
  window's frames; the clip's frames are the user's frames (only the sound is decoded), and the audio
  overlap still carries from window to window.

``window_latents``: each finished window is saved there (``window_files``), and a rerun with the same
settings loads the windows present instead of generating them. An interrupt (``should_stop``, Ctrl-C, a
host's interrupt) after at least one finished window writes those windows as a valid, shorter mp4.

``extend`` makes one next window from a previous result (the Ovi Extend node); ``write_windows`` and
``decode_windows`` turn a list of windows into an mp4 or one in-memory clip.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..engine import DecodedClip, GenerationResult, Interrupted
from ..log import log
from ..sampling.known import KNOWN_MODES, KnownRegion, range_mask
from ..variants import AUDIO_SAMPLES_PER_LATENT, VAE_TIME_STRIDE, get_variant
from ..video_io import DEFAULT_CRF
from . import window_files
from .clip_writer import ClipWriter, to_uint8
from .plan import ClipPlan, Window, overlap_frames_for, token_at_frame, window_seed
from .stitch import AudioSeams, frames_to_keep

ClipProgress = Callable[[int, int, int, int], None]  # (window 1..N, windows, step, steps)

# engine.generate settings a window's file records and ``extend`` carries from the previous window
SAMPLING_KEYS = ("steps", "solver", "shift", "video_guidance", "audio_guidance", "slg_layer", "cache_threshold",
                 "video_negative_prompt", "audio_negative_prompt")
SIZE_KEYS = ("size", "height", "width", "aspect")
# engine.generate keywords the long clip sets itself, and why a caller may not
RESERVED_KEYS = {
    "seed": "each window's seed comes from the plan (plan_clip(seed=...))",
    "noise": "each window draws its own noise from its seed",
    "video_known": "the known video comes from the previous window or video_frames",
    "audio_known": "the known audio comes from the previous window or audio_track",
    "known_seed": "each window's renoise eps is drawn from its own seed",
}
FRAME_RANGE_SLACK = 1e-3  # frames a little outside [0, 1] (resampling overshoot) are fine; far outside is a mistake


@dataclass
class ClipResult:
    path: Path | None                 # the mp4 (the finished windows' when interrupted)
    plan: ClipPlan
    windows_done: int
    interrupted: bool
    results: list[GenerationResult] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)  # per window: generate, decode, write seconds; resumed


# -- window metadata and known regions ------------------------------------------------------------------
def window_meta(w: Window, base_seed: int) -> dict:
    """What ``result.settings["window"]`` holds: the window's place on the clip's axis and what it shares
    with the window before (``overlap_frames``: pixel frames, 0 for the first window)."""
    return dict(index=w.index, frame_start=w.frame_start, token_start=w.token_start,
                known_latent_frames=w.known_latent_frames, known_tokens=w.known_tokens,
                overlap_frames=w.known_frames, base_seed=int(base_seed))


def _meta_of(result: GenerationResult) -> dict:
    """The window metadata of ``result``; a result without any is a first window seeded with its own seed."""
    meta = result.settings.get("window") if isinstance(result.settings, dict) else None
    if meta is None:
        return dict(index=0, frame_start=0, token_start=0, known_latent_frames=0, known_tokens=0,
                    overlap_frames=0, base_seed=int(result.seed))
    return dict(meta)


def _overlap_video(engine, w: Window, tail_frames: torch.Tensor, mode: str | None) -> KnownRegion:
    """Window ``w``'s first latent frames: the re-encode of the previous window's last decoded frames."""
    latent = engine.encode_frames(tail_frames)
    if latent.shape[1] != w.known_latent_frames:
        raise RuntimeError(f"{tail_frames.shape[0]} overlap frames encoded to {latent.shape[1]} latent frames, "
                           f"expected {w.known_latent_frames}")
    frames = get_variant(engine.variant).video_latent_length
    return KnownRegion(latent, range_mask(frames, 0, w.known_latent_frames), mode)


def _overlap_audio(previous: GenerationResult, previous_token_start: int, w: Window,
                   mode: str | None) -> KnownRegion | None:
    """Window ``w``'s first audio tokens: the previous window's tokens over the same seconds."""
    if w.known_tokens == 0:
        return None
    offset = w.token_start - previous_token_start
    tokens = previous.audio_latent[offset:offset + w.known_tokens]
    if tokens.shape[0] != w.known_tokens:
        raise ValueError(f"the previous window has {previous.audio_latent.shape[0]} audio tokens; window "
                         f"{w.index} needs {w.known_tokens} from token {offset}")
    length = previous.audio_latent.shape[0]
    return KnownRegion(tokens.clone(), range_mask(length, 0, w.known_tokens), mode)


def _whole(latent: torch.Tensor, dim: int, mode: str | None) -> KnownRegion:
    return KnownRegion(latent, torch.ones(latent.shape[dim], dtype=torch.bool), mode)


def _check_mode(name: str, mode: str | None) -> None:
    if mode is not None and mode not in KNOWN_MODES:
        raise ValueError(f"{name} must be one of {', '.join(KNOWN_MODES)} or None, got {mode!r}")


def _sampling_settings(engine, generate_kw: dict) -> dict:
    """The sampling settings a window is made with: generate_kw over engine.generate's defaults."""
    params = inspect.signature(engine.generate).parameters
    out = {}
    for key in SAMPLING_KEYS + SIZE_KEYS:
        if key in generate_kw:
            out[key] = generate_kw[key]
        elif key in params and params[key].default is not inspect.Parameter.empty:
            out[key] = params[key].default
    if isinstance(out.get("size"), tuple):
        out["size"] = list(out["size"])
    return out


# -- the user's media -----------------------------------------------------------------------------------
def _fit_track(track: Any, plan: ClipPlan) -> torch.Tensor:
    """The lip-sync track as float32 [span samples]: zero-padded from at least the clip's length."""
    t = torch.as_tensor(track)
    if t.ndim != 1 or not t.is_floating_point():
        raise ValueError(f"audio_track must be a float waveform [N] (16 kHz mono, ovi.media.load_audio), got "
                         f"{t.dtype} {list(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("audio_track has NaN or infinite samples")
    span = plan.span_tokens * AUDIO_SAMPLES_PER_LATENT
    sr = plan.variant.sample_rate
    if t.shape[0] < plan.samples:
        raise ValueError(f"audio_track lasts {t.shape[0] / sr:.3f} s but the clip {plan.samples / sr:.3f} s; "
                         f"cut or pad it to the plan first (ovi.media.fit_audio_to_plan)")
    if t.shape[0] > span:
        raise ValueError(f"audio_track lasts {t.shape[0] / sr:.3f} s, longer than the {plan.count} window"
                         f"{'s' if plan.count > 1 else ''} planned ({span / sr:.3f} s); plan a longer clip or cut "
                         f"the track (ovi.media.fit_audio_to_plan)")
    t = t.to(torch.float32)
    if t.shape[0] < span:
        t = torch.cat([t, t.new_zeros(span - t.shape[0])])
    return t


def _fit_frames(frames: Any, plan: ClipPlan) -> torch.Tensor:
    """The soundtrack's frames [span frames, H, W, 3], uint8 or float in [0, 1] as given (uint8 stays uint8:
    a minute at 960x960 is 4 GB so, 16 GB as float32; each window converts its own slice, ``_as_float``):
    the last frame repeated from at least the clip's length (repeats past the clip's end are generated over
    but never written)."""
    f = torch.as_tensor(frames)
    if f.ndim != 4 or f.shape[-1] != 3 or not (f.is_floating_point() or f.dtype == torch.uint8):
        raise ValueError(f"video_frames must be frames [T, H, W, 3], uint8 or float in [0, 1] "
                         f"(ovi.media.load_video), got {f.dtype} {list(f.shape)}")
    h, w = f.shape[1:3]
    if h % 32 or w % 32 or h == 0 or w == 0:
        raise ValueError(f"video_frames are {w}x{h}; both sides must be multiples of 32 (ovi.media.fit_frames)")
    if f.shape[0] < plan.frames or f.shape[0] > plan.span_frames:
        raise ValueError(f"video_frames has {f.shape[0]} frames; the clip needs {plan.frames} to "
                         f"{plan.span_frames} (its length to its windows' span; ovi.media.fit_frames_to_plan)")
    if f.is_floating_point():
        lo, hi = float(f.min()), float(f.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -FRAME_RANGE_SLACK or hi > 1 + FRAME_RANGE_SLACK:
            raise ValueError(f"video_frames must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    if f.shape[0] < plan.span_frames:
        f = torch.cat([f, f[-1:].expand(plan.span_frames - f.shape[0], -1, -1, -1)])
    return f


def _as_float(frames: torch.Tensor) -> torch.Tensor:
    """One window's frames as float32 in [0, 1] (uint8 / 255)."""
    if frames.dtype == torch.uint8:
        return frames.to(torch.float32).div_(255.0)
    return frames.to(torch.float32)


# -- generate_clip --------------------------------------------------------------------------------------
def _check_request(engine, prompts, plan: ClipPlan, image, audio_track, video_frames, video_mode, audio_mode,
                   generate_kw: dict) -> list[str]:
    if not isinstance(plan, ClipPlan):
        raise TypeError(f"plan must be a ClipPlan (ovi.long_clip.plan_clip), got {type(plan).__name__}")
    if get_variant(engine.variant).name != plan.variant.name:
        raise ValueError(f"the plan is for {plan.variant.name} windows but the engine runs {engine.variant.name}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("prompts must be one non-empty prompt, or one per window")
    if len(prompts) == 1:
        prompts = prompts * plan.count
    elif len(prompts) != plan.count:
        raise ValueError(f"{len(prompts)} prompts for {plan.count} windows: give one per window, or one for all")
    for key, why in RESERVED_KEYS.items():
        if key in generate_kw:
            raise ValueError(f"{key}= cannot be given to a long clip: {why}")
    _check_mode("video_mode", video_mode)
    _check_mode("audio_mode", audio_mode)
    if audio_track is not None and video_frames is not None:
        raise ValueError("give audio_track (lip-sync) or video_frames (soundtrack), not both: with both known "
                         "there is nothing to generate")
    if video_frames is not None and image is not None:
        raise ValueError("video_frames already gives every frame; an image (I2AV) has no place in a soundtrack")
    if video_frames is not None and any(k in generate_kw for k in SIZE_KEYS):
        raise ValueError("the frame size of a soundtrack is the size of video_frames; drop size/height/width/aspect")
    return prompts


def generate_clip(engine, prompts: Sequence[str] | str, path: str | os.PathLike, *, plan: ClipPlan, image=None,
                  audio_track: torch.Tensor | None = None, video_frames: torch.Tensor | None = None,
                  video_mode: str | None = None, audio_mode: str | None = None,
                  window_latents: str | os.PathLike | None = None, progress: ClipProgress | None = None,
                  should_stop: Callable[[], bool] | None = None, tile_size: int | None = None,
                  crf: int = DEFAULT_CRF, **generate_kw) -> ClipResult:
    """Generate the windows of ``plan`` and write them to ``path`` as one mp4 (see the module doc).

    ``prompts``: one per window (a storyboard) or one for all. ``image``: window 0's first frame (I2AV).
    ``audio_track`` [N] (16 kHz mono, from the clip's length up to its windows' span; the rest of the span is
    padded with silence): lip-sync. ``video_frames`` [T, H, W, 3] in [0, 1] at 24 fps, H and W multiples of
    32: soundtrack. ``video_mode`` / ``audio_mode``: how known regions are held (``ovi.sampling.known``; None:
    video clean, audio renoise). ``progress(window, windows, step, steps)``: window counts from 1.
    ``should_stop()`` is checked before every step and decoded frame. ``generate_kw`` go to every window's
    ``engine.generate`` (steps, solver, guidance, size, ...). On an interrupt after >= 1 finished window the
    mp4 of those windows is written and the result says ``interrupted``; a stop before that raises
    ``Interrupted`` and leaves no file; any other error also writes the finished windows, then propagates.
    """
    prompts = _check_request(engine, prompts, plan, image, audio_track, video_frames, video_mode, audio_mode,
                             generate_kw)
    v = plan.variant
    track = None if audio_track is None else _fit_track(audio_track, plan)
    frames_in = None if video_frames is None else _fit_frames(video_frames, plan)
    folder = None if window_latents is None else window_files.prepare_folder(window_latents)
    base_seed = plan.windows[0].seed
    settings = _sampling_settings(engine, generate_kw)
    fusion = [Path(p).name for p in getattr(engine, "paths", {}).get("fusion", [])]
    n_windows = plan.count
    conditioning = "lip-sync" if track is not None else "soundtrack" if frames_in is not None else None
    log.info("long clip: %d window%s of %s, %d frames (%.2f s) and %.2f s of sound, overlap %d frames%s -> %s",
             n_windows, "s" if n_windows > 1 else "", v.name, plan.frames, plan.frames / v.fps,
             plan.samples / v.sample_rate, plan.overlap_frames, f", {conditioning}" if conditioning else "", path)

    writer = ClipWriter(path, v.fps, v.sample_rate, frames_limit=plan.frames, samples_limit=plan.samples, crf=crf)
    results: list[GenerationResult] = []
    timings: list[dict] = []
    previous: GenerationResult | None = None
    previous_tail: torch.Tensor | None = None  # the last overlap_frames decoded frames of the previous window
    size = None  # window 0's frame size, used by every later window
    try:
        for w in plan.windows:
            i = w.index
            lo, hi = w.frame_start, w.frame_start + v.video_frames
            s_lo = w.token_start * AUDIO_SAMPLES_PER_LATENT
            s_hi = s_lo + v.audio_samples
            t0 = time.perf_counter()
            request = result = None
            if folder is not None:  # what made this window, to find it saved (the digests cost a read of it)
                request = dict(variant=v.name, fusion=fusion, prompt=prompts[i], seed=w.seed,
                               window=window_meta(w, base_seed), video_mode=video_mode, audio_mode=audio_mode,
                               image=window_files.digest(image) if i == 0 else None,
                               audio_track=None if track is None else window_files.digest(track[s_lo:s_hi]),
                               video_frames=None if frames_in is None else window_files.digest(frames_in[lo:hi]),
                               **settings)
                result = window_files.load_window(folder, i, request)
            resumed = result is not None
            if resumed:
                log.info("window %d/%d: seed %d, loaded from %s", i + 1, n_windows, w.seed,
                         window_files.window_path(folder, i))
                if progress is not None:
                    steps = int(result.settings.get("steps", 1))
                    progress(i + 1, n_windows, steps, steps)
            else:
                result = _generate_window(engine, w, n_windows, prompts[i], image, track, frames_in, previous,
                                          previous_tail, plan, size, video_mode, audio_mode, progress,
                                          should_stop, generate_kw)
                result.settings["window"] = window_meta(w, base_seed)
                if folder is not None:
                    window_files.save_window(folder, result, request)
            size = (result.height, result.width)
            results.append(result)  # before it is written: an interrupt from here on may still finish it
            t1 = time.perf_counter()

            # decode what the clip takes from this window, append it, keep what the next window needs
            nxt = plan.windows[i + 1] if i + 1 < n_windows else None
            hold = 0 if nxt is None else nxt.known_tokens * AUDIO_SAMPLES_PER_LATENT
            if frames_in is not None:
                waveform = engine.decode_audio(result)
                frames = _as_float(frames_in[lo:hi])
                t2 = time.perf_counter()
                writer.append(frames[frames_to_keep(w.known_frames)], waveform, overlap_samples=hold)
            else:
                clip = engine.decode(result, tile_size=tile_size, should_stop=should_stop)
                t2 = time.perf_counter()
                previous_tail = None if nxt is None else clip.frames[-plan.overlap_frames:].clone()
                kept = to_uint8(clip.frames[frames_to_keep(w.known_frames)])
                waveform = clip.waveform
                del clip
                if track is not None:
                    # the track's own samples, each written once: the part after the previous window's end
                    start = 0 if i == 0 else (plan.windows[i - 1].token_start + v.audio_latent_length) \
                        * AUDIO_SAMPLES_PER_LATENT
                    writer.append(kept, track[start:s_hi], overlap_samples=0)
                else:
                    writer.append(kept, waveform, overlap_samples=hold)
                del kept
            del waveform
            previous = result
            t3 = time.perf_counter()
            timings.append(dict(window=i, generate=t1 - t0, decode=t2 - t1, write=t3 - t2, resumed=resumed))
    except BaseException as e:
        written = _write_finished(writer, path)
        if written is None:
            raise
        done = writer.windows
        log.warning("stopped in window %d/%d (%s): wrote the %d finished window%s to %s", done + 1, n_windows,
                    type(e).__name__, done, "s" if done > 1 else "", written)
        if isinstance(e, Interrupted):
            return ClipResult(written, plan, done, True, results[:done], timings)
        raise
    written = writer.close()
    return ClipResult(written, plan, n_windows, False, results, timings)


def _write_finished(writer: ClipWriter, path) -> Path | None:
    """After a stop: the mp4 of the windows finished (a window being written when it came is finished first),
    or None, with nothing left behind, when there are none or the writing failed (a second interrupt too)."""
    try:
        if writer.wait() == 0:
            writer.abort()
            return None
        return writer.close()
    except BaseException as err:
        writer.abort()
        log.warning("could not write the finished windows of %s: %s", path, str(err) or type(err).__name__)
        return None


def _generate_window(engine, w: Window, n_windows: int, prompt: str, image, track, frames_in, previous,
                     previous_tail, plan: ClipPlan, size, video_mode, audio_mode, progress, should_stop,
                     generate_kw: dict) -> GenerationResult:
    v = plan.variant
    video_known = audio_known = None
    if frames_in is not None:
        window_frames = _as_float(frames_in[w.frame_start:w.frame_start + v.video_frames])
        video_known = _whole(engine.encode_frames(window_frames), 1, video_mode)
    elif w.index > 0:
        video_known = _overlap_video(engine, w, previous_tail, video_mode)
    if track is not None:
        s_lo = w.token_start * AUDIO_SAMPLES_PER_LATENT
        audio_known = _whole(engine.encode_waveform(track[s_lo:s_lo + v.audio_samples]), 0, audio_mode)
    elif w.index > 0:
        previous_token_start = plan.windows[w.index - 1].token_start
        audio_known = _overlap_audio(previous, previous_token_start, w, audio_mode)
    what = [f"{int(video_known.mask.sum())} known latent frames ({video_known.mode or 'clean'})"
            if video_known is not None else None,
            f"{int(audio_known.mask.sum())} known audio tokens ({audio_known.mode or 'renoise'})"
            if audio_known is not None else None]
    log.info("window %d/%d: seed %d, frames %d-%d, %s", w.index + 1, n_windows, w.seed, w.frame_start,
             w.frame_start + v.video_frames - 1, ", ".join(x for x in what if x) or "nothing known")
    kw = dict(generate_kw)
    if w.index > 0:
        for key in SIZE_KEYS:
            kw.pop(key, None)
        kw["size"] = size  # window 0's size (chosen from an image, a request or the user's frames)
    step_progress = None
    if progress is not None:
        step_progress = lambda step, steps: progress(w.index + 1, n_windows, step, steps)  # noqa: E731
    return engine.generate(prompt, image=image if w.index == 0 else None, seed=w.seed, video_known=video_known,
                           audio_known=audio_known, progress=step_progress, should_stop=should_stop, **kw)


# -- one window at a time: extend, and writing a list of windows -----------------------------------------
def extend(engine, previous: GenerationResult, prompt: str, *, overlap: float = 1.0,
           previous_frames: torch.Tensor | None = None, video_mode: str | None = None,
           audio_mode: str | None = None, **generate_kw) -> GenerationResult:
    """The window after ``previous``: its first latent frames the re-encode of ``previous``'s last
    ``overlap`` seconds of frames (``1 + 4 m`` frames, ``plan.overlap_frames_for``), its first audio tokens
    ``previous``'s tokens over those seconds, its seed the next of the clip's base seed (``seed=`` overrides
    it for this window). ``previous_frames``: ``previous`` decoded (all its frames or at least the last
    overlap ones), else it is decoded here. The frame size is ``previous``'s; the sampling settings default
    to ``previous``'s. The result's
    ``settings["window"]`` places it on the clip (see ``window_meta``); ``previous`` without one is window 0.
    """
    v = get_variant(engine.variant)
    if previous.variant != v.name:
        raise ValueError(f"the previous window is {previous.variant} but the engine runs {v.name}")
    for key in ("noise", "video_known", "audio_known", "known_seed", "image"):
        if key in generate_kw:
            why = RESERVED_KEYS.get(key, "the first frame of a later window is the previous window's")
            raise ValueError(f"{key}= cannot be given to extend: {why}")
    _check_mode("video_mode", video_mode)
    _check_mode("audio_mode", audio_mode)
    meta = _meta_of(previous)
    overlap_frames = overlap_frames_for(v, overlap)
    index = meta["index"] + 1
    frame_start = meta["frame_start"] + v.video_frames - overlap_frames
    token_start = token_at_frame(v, frame_start)
    known_tokens = max(0, meta["token_start"] + v.audio_latent_length - token_start)
    seed = generate_kw.pop("seed", None)
    w = Window(index, window_seed(meta["base_seed"], index) if seed is None else seed, frame_start, token_start,
               overlap_frames, 1 + (overlap_frames - 1) // VAE_TIME_STRIDE, known_tokens)
    if previous_frames is None:
        previous_frames = engine.decode(previous).frames
    if previous_frames.ndim != 4 or previous_frames.shape[0] < overlap_frames:
        raise ValueError(f"previous_frames must be [T, H, W, 3] with at least the {overlap_frames} overlap frames, "
                         f"got {list(previous_frames.shape)}")
    if tuple(previous_frames.shape[1:3]) != (previous.height, previous.width):
        raise ValueError(f"previous_frames are {previous_frames.shape[2]}x{previous_frames.shape[1]} but the "
                         f"previous window is {previous.width}x{previous.height}")
    video_known = _overlap_video(engine, w, previous_frames[-overlap_frames:], video_mode)
    audio_known = _overlap_audio(previous, meta["token_start"], w, audio_mode)
    kw = {k: previous.settings[k] for k in SAMPLING_KEYS if k in previous.settings}
    kw.update(generate_kw)
    for key in SIZE_KEYS:
        kw.pop(key, None)
    log.info("window %d: seed %d, frames %d-%d, %d known latent frames, %d known audio tokens", index + 1, w.seed,
             frame_start, frame_start + v.video_frames - 1, w.known_latent_frames, known_tokens)
    result = engine.generate(prompt, seed=w.seed, size=(previous.height, previous.width), video_known=video_known,
                             audio_known=audio_known, **kw)
    result.settings["window"] = window_meta(w, meta["base_seed"])
    return result


def _check_windows(results: Sequence[GenerationResult]) -> list[dict]:
    """The window metadata of ``results``, checked to be consecutive windows of one clip."""
    results = list(results)
    if not results:
        raise ValueError("no windows to write")
    metas = [_meta_of(r) for r in results]
    first = results[0]
    for n, (r, m) in enumerate(zip(results, metas)):
        if (r.variant, r.height, r.width) != (first.variant, first.height, first.width):
            raise ValueError(f"window {n} is {r.variant} at {r.width}x{r.height}, window 0 {first.variant} at "
                             f"{first.width}x{first.height}: they are not one clip")
        if m["index"] != metas[0]["index"] + n:
            raise ValueError(f"the windows are not consecutive: window {n} of the list is window {m['index']} "
                             f"of its clip (the first is {metas[0]['index']})")
    if metas[0]["index"] != 0:
        log.info("writing windows %d-%d of a clip", metas[0]["index"], metas[-1]["index"])
        metas[0] = {**metas[0], "overlap_frames": 0, "known_tokens": 0}  # nothing before the first is written
    return metas


def write_windows(engine, results: Sequence[GenerationResult], path: str | os.PathLike, *,
                  progress: ClipProgress | None = None, should_stop: Callable[[], bool] | None = None,
                  tile_size: int | None = None, crf: int = DEFAULT_CRF) -> Path:
    """Decode ``results`` (consecutive windows, e.g. from ``extend``) one at a time while writing them to
    ``path``: memory holds one window's frames, whatever the clip's length. ``progress(window, windows,
    frames decoded, frames)`` follows each window's decode. An interrupt (``should_stop``, or a host's) after
    >= 1 window writes those windows as a shorter mp4, then propagates."""
    metas = _check_windows(results)
    v = get_variant(results[0].variant)
    n = len(metas)
    log.info("writing %d window%s of %s at %dx%d to %s", n, "s" if n > 1 else "", v.name, results[0].width,
             results[0].height, path)
    with ClipWriter(path, v.fps, v.sample_rate, crf=crf) as writer:
        for k, (r, m) in enumerate(zip(results, metas)):
            step = None if progress is None else (lambda done, total, k=k: progress(k + 1, n, done, total))
            clip = engine.decode(r, tile_size=tile_size, progress=step, should_stop=should_stop)
            hold = 0 if k + 1 == n else metas[k + 1]["known_tokens"] * AUDIO_SAMPLES_PER_LATENT
            writer.append(to_uint8(clip.frames[frames_to_keep(m["overlap_frames"])]), clip.waveform, hold)
            del clip
    return Path(path)


def decoded_bytes(results: Sequence[GenerationResult]) -> int:
    """Memory ``decode_windows`` takes: the whole clip's float32 frames and waveform, and one window's decode
    beside them while it is copied in."""
    metas = _check_windows(results)
    v = get_variant(results[0].variant)
    frame = results[0].height * results[0].width * 3 * 4
    frames = v.video_frames + sum(v.video_frames - m["overlap_frames"] for m in metas[1:])
    samples = (metas[-1]["token_start"] - metas[0]["token_start"] + v.audio_latent_length) * AUDIO_SAMPLES_PER_LATENT
    return frames * frame + samples * 4 + v.video_frames * frame + v.audio_samples * 4


def decode_windows(engine, results: Sequence[GenerationResult], *, tile_size: int | None = None,
                   progress: ClipProgress | None = None,
                   should_stop: Callable[[], bool] | None = None, **decode_kw) -> DecodedClip:
    """The whole clip of ``results`` in memory, stitched as ``write_windows`` writes it (for short clips; the
    memory it takes, ``decoded_bytes``, is logged before it starts)."""
    metas = _check_windows(results)
    v = get_variant(results[0].variant)
    n = len(metas)
    log.info("decoding %d window%s of %s at %dx%d into memory: %.2f GB", n, "s" if n > 1 else "", v.name,
             results[0].width, results[0].height, decoded_bytes(results) / 1e9)
    seams = AudioSeams()
    h, w = results[0].height, results[0].width
    total = v.video_frames + sum(v.video_frames - m["overlap_frames"] for m in metas[1:])
    frames = torch.empty(total, h, w, 3, dtype=torch.float32)  # filled in place: no second copy of the clip
    sound: list[torch.Tensor] = []
    at = 0
    for k, (r, m) in enumerate(zip(results, metas)):
        step = None if progress is None else (lambda done, total, k=k: progress(k + 1, n, done, total))
        clip = engine.decode(r, tile_size=tile_size, progress=step, should_stop=should_stop, **decode_kw)
        hold = 0 if k + 1 == n else metas[k + 1]["known_tokens"] * AUDIO_SAMPLES_PER_LATENT
        kept = clip.frames[frames_to_keep(m["overlap_frames"])]
        frames[at:at + kept.shape[0]] = kept
        at += kept.shape[0]
        sound.append(seams.push(clip.waveform, hold))
        del clip, kept
    sound.append(seams.flush())
    return DecodedClip(frames=frames, waveform=torch.cat(sound), fps=v.fps, sample_rate=v.sample_rate,
                       variant=v.name, seed=results[0].seed)
