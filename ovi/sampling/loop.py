"""The engine's joint video+audio sampling loop: two model passes per step, split CFG, SLG, known regions
(i2v's first frame among them), one pass when guidance is 1, an optional step cache.

Each modality has its own solver instance (same schedule, separate history). Latents live in float32
between steps whatever dtype the model computes in; the model wrapper casts its inputs as it needs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..fusion.model import CleanTokens
from ..log import log
from .guidance import guided, needs_negative_pass
from .known import DEFAULT_AUDIO_MODE, DEFAULT_VIDEO_MODE, HeldRegion, KnownRegion, index_mask
from .schedules import make_schedule
from .solvers import make_solver
from .stats import SamplingStats
from .step_cache import StepCache

ModelFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Interrupted(Exception):
    """Sampling was cancelled by ``should_stop`` before step ``step``; nothing is left half-updated."""

    def __init__(self, step: int, total: int):
        self.step, self.total = step, total
        super().__init__(f"sampling interrupted before step {step + 1}/{total}")


def _put(record: Any, key: str, value: Any) -> None:
    if isinstance(record, dict):
        record[key] = value
    else:
        setattr(record, key, value)


def _append(record: Any, key: str, value: torch.Tensor) -> None:
    items = record.get(key) if isinstance(record, dict) else getattr(record, key, None)
    if items is None:
        items = []
        _put(record, key, items)
    items.append(value.detach().to("cpu", copy=True))


def _clean_argument(video: HeldRegion | None, audio: HeldRegion | None) -> bool | CleanTokens:
    """model_fn's clean argument: False, True (video frame 0 alone, I2AV's form that every model_fn takes)
    or a ``CleanTokens`` naming the clean video frames and audio tokens."""
    frames = video.mask if video is not None and video.clean else None
    tokens = audio.mask if audio is not None and audio.clean else None
    if frames is None and tokens is None:
        return False
    if tokens is None and bool(frames[0]) and int(frames.sum()) == 1:
        return True
    return CleanTokens(video_frames=frames, audio_tokens=tokens)


@torch.no_grad()
def sample(model_fn: ModelFn, video_noise: torch.Tensor, audio_noise: torch.Tensor, *,
           pos_ctx: torch.Tensor, video_neg_ctx: torch.Tensor, audio_neg_ctx: torch.Tensor,
           solver: str = "unipc", steps: int = 50, shift: float = 5.0,
           video_guidance: float = 4.0, audio_guidance: float = 3.0, slg_layer: int = 11,
           image_latent: torch.Tensor | None = None,
           video_known: KnownRegion | None = None, audio_known: KnownRegion | None = None, known_seed: int = 0,
           cache_threshold: float = 0.0, stats: SamplingStats | None = None,
           callback: Callable[..., Any] | None = None, should_stop: Callable[[], bool] | None = None,
           record: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise ``video_noise`` [48, F, h, w] and ``audio_noise`` [L, 20] (no batch dim) to final latents.

    ``model_fn(video, audio, t, video_ctx, audio_ctx, clean, slg_layer)`` returns the velocities
    ``(v_video, v_audio)``; ``t`` is a 1-element tensor in the schedule's dtype (int64, float32 for euler);
    ``clean`` is False, True (latent frame 0 is clean) or a ``CleanTokens`` (the clean video frames and audio
    tokens), the forms ``FusionModel.forward(first_frame_is_clean=...)`` takes. The positive pass gives both
    backbones ``pos_ctx`` and skips no layer; the negative pass gives ``video_neg_ctx`` / ``audio_neg_ctx``
    and skips fused layer ``slg_layer`` (<= 0: none). With both guidance scales 1 the negative pass is not
    run (one pass per step). Guidance defaults are the official inference config (4.0 / 3.0, SLG layer 11).

    Known regions: ``video_known`` (latent frames) and ``audio_known`` (latent tokens) are held as their
    mode says (``ovi.sampling.known``; defaults video clean, audio renoise, the renoise eps drawn from
    ``known_seed``) and equal their known values in the result. ``image_latent`` [48, 1, h, w] is I2AV: the
    same as a clean ``video_known`` of frame 0 (give one or the other).

    ``cache_threshold`` > 0 turns on the step cache (``ovi.sampling.step_cache``): steps whose estimated
    output change stays below it reuse the last full step's transformation; 0 runs every step in full.
    ``stats`` (a ``SamplingStats``) receives the passes run and skipped and the cached steps.

    ``callback(i, steps, video, audio, video_x0)`` runs after step i (0-based; ``video_x0`` is the step's
    clean-video estimate x - sigma*v, for previews); ``should_stop()`` runs before each step and raises
    ``Interrupted`` when true. ``record`` (a dict or an object) receives the schedule, per-step model inputs
    (``video_inputs``/``audio_inputs``, after the known regions are written) and states, and the step-0 pass
    outputs. Inputs are not modified.
    """
    schedule = make_schedule(solver, steps, shift)
    video_solver, audio_solver = make_solver(schedule), make_solver(schedule)
    video = video_noise.to(torch.float32, copy=True)
    audio = audio_noise.to(torch.float32, copy=True)
    if image_latent is not None:
        if video_known is not None:
            raise ValueError("give the first frame as image_latent or as video_known, not both")
        image_latent = image_latent.to(video.device, torch.float32)
        if image_latent.dim() == video.dim() - 1:
            image_latent = image_latent.unsqueeze(1)
        if image_latent.shape != video[:, :1].shape:
            raise ValueError(f"image latent {list(image_latent.shape)} does not match the first frame of the "
                             f"video latent {list(video[:, :1].shape)}")
        video_known = KnownRegion(image_latent, index_mask(video.shape[1], [0]), "clean")
    held_video = None if video_known is None else HeldRegion(video_known, video, 1, "video frames",
                                                             DEFAULT_VIDEO_MODE, known_seed)
    held_audio = None if audio_known is None else HeldRegion(audio_known, audio, 0, "audio tokens",
                                                             DEFAULT_AUDIO_MODE, known_seed)
    held = [(r, x) for r, x in ((held_video, "video"), (held_audio, "audio")) if r is not None and r.count]
    clean = _clean_argument(held_video, held_audio)
    two_pass = needs_negative_pass(video_guidance, audio_guidance)
    if not two_pass:
        log.info("video and audio guidance are both 1: one model pass per step, no negative pass")
    cache = StepCache(cache_threshold, schedule.steps)
    run = stats if stats is not None else SamplingStats()
    run.steps, run.passes_per_step = schedule.steps, 2 if two_pass else 1
    run.passes_run, run.passes_skipped, run.cached_steps = 0, 0, []
    if record is not None:
        _put(record, "timesteps", schedule.timesteps.clone())
        _put(record, "sigmas", schedule.sigmas.clone())
    total = schedule.steps
    for k in range(total):
        if should_stop is not None and should_stop():
            raise Interrupted(k, total)
        t = schedule.timesteps[k:k + 1].to(video.device)
        sigma = float(schedule.sigmas[k])
        for region, which in held:
            region.before_step(video if which == "video" else audio, sigma)
        if record is not None:
            _append(record, "video_inputs", video)
            _append(record, "audio_inputs", audio)
        if cache.should_run(k, (video, audio)):
            v_pos, a_pos = model_fn(video, audio, t, pos_ctx, pos_ctx, clean, 0)
            v_pos, a_pos = v_pos.to(torch.float32), a_pos.to(torch.float32)
            v_neg = a_neg = None
            if two_pass:
                v_neg, a_neg = model_fn(video, audio, t, video_neg_ctx, audio_neg_ctx, clean, slg_layer)
                v_neg, a_neg = v_neg.to(torch.float32), a_neg.to(torch.float32)
            run.passes_run += run.passes_per_step
            run.passes_skipped += 2 - run.passes_per_step
            if record is not None:
                _append(record, "model_timesteps", t)
                if k == 0:
                    outputs = (("step0_video_pos", v_pos), ("step0_video_neg", v_neg),
                               ("step0_audio_pos", a_pos), ("step0_audio_neg", a_neg))
                    for key, value in outputs:
                        if value is not None:
                            _put(record, key, value.detach().to("cpu", copy=True))
            v = guided(v_pos, v_neg, video_guidance)
            a = guided(a_pos, a_neg, audio_guidance)
            del v_pos, a_pos, v_neg, a_neg
            cache.store((video, audio), (v, a))
        else:
            v, a = cache.reuse((video, audio))
            run.cached_steps.append(k)
            run.passes_skipped += 2
        # The clean-video estimate of this step, for previews: one elementwise op, only when someone listens.
        video_x0 = video - sigma * v if callback is not None else None
        video = video_solver.step(v, t, video)
        audio = audio_solver.step(a, t, audio)
        if record is not None:
            _append(record, "video_states", video)
            _append(record, "audio_states", audio)
        if callback is not None:
            callback(k, total, video, audio, video_x0)
    for region, which in held:
        region.finish(video if which == "video" else audio)
    if cache.enabled:
        log.info("step cache (threshold %g): %d of %d steps reused %s, %d model passes run, %d skipped",
                 cache.threshold, len(run.cached_steps), total, run.cached_steps, run.passes_run, run.passes_skipped)
    elif run.passes_skipped:
        log.info("%d model passes run, %d skipped", run.passes_run, run.passes_skipped)
    return video, audio
