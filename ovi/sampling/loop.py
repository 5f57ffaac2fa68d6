"""The engine's joint video+audio sampling loop: two model passes per step, split CFG, SLG, i2v first frame.

Each modality has its own solver instance (same schedule, separate history). Latents live in float32
between steps whatever dtype the model computes in; the model wrapper casts its inputs as it needs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .schedules import make_schedule
from .solvers import make_solver

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


@torch.no_grad()
def sample(model_fn: ModelFn, video_noise: torch.Tensor, audio_noise: torch.Tensor, *,
           pos_ctx: torch.Tensor, video_neg_ctx: torch.Tensor, audio_neg_ctx: torch.Tensor,
           solver: str = "unipc", steps: int = 50, shift: float = 5.0,
           video_guidance: float = 4.0, audio_guidance: float = 3.0, slg_layer: int = 11,
           image_latent: torch.Tensor | None = None,
           callback: Callable[..., Any] | None = None, should_stop: Callable[[], bool] | None = None,
           record: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise ``video_noise`` [48, F, h, w] and ``audio_noise`` [L, 20] (no batch dim) to final latents.

    ``model_fn(video, audio, t, video_ctx, audio_ctx, first_frame_is_clean, slg_layer)`` returns the
    velocities ``(v_video, v_audio)``; ``t`` is a 1-element tensor in the schedule's dtype (int64, float32
    for euler). The positive pass gives both backbones ``pos_ctx`` and skips no layer; the negative pass
    gives ``video_neg_ctx`` / ``audio_neg_ctx`` and skips fused layer ``slg_layer`` (<= 0: none).
    ``image_latent`` [48, 1, h, w] switches to i2v: it replaces frame 0 before every step and at the end,
    and that frame is marked clean. ``callback(i, steps, video, audio, video_x0)`` runs after step i (0-based; ``video_x0`` is the step's
    clean-video estimate x - sigma*v, for previews);
    ``should_stop()`` runs before each step and raises ``Interrupted`` when true. ``record`` (a dict or an
    object) receives the schedule, per-step states and the step-0 pass outputs. Guidance defaults are the
    official inference config (4.0 / 3.0, SLG layer 11). Inputs are not modified.
    """
    schedule = make_schedule(solver, steps, shift)
    video_solver, audio_solver = make_solver(schedule), make_solver(schedule)
    video = video_noise.to(torch.float32, copy=True)
    audio = audio_noise.to(torch.float32, copy=True)
    i2v = image_latent is not None
    if i2v:
        image_latent = image_latent.to(video.device, torch.float32)
        if image_latent.dim() == video.dim() - 1:
            image_latent = image_latent.unsqueeze(1)
        if image_latent.shape != video[:, :1].shape:
            raise ValueError(f"image latent {list(image_latent.shape)} does not match the first frame of the "
                             f"video latent {list(video[:, :1].shape)}")
    if record is not None:
        _put(record, "timesteps", schedule.timesteps.clone())
        _put(record, "sigmas", schedule.sigmas.clone())
    total = schedule.steps
    for k in range(total):
        if should_stop is not None and should_stop():
            raise Interrupted(k, total)
        t = schedule.timesteps[k:k + 1].to(video.device)
        if i2v:
            video[:, :1] = image_latent
        v_pos, a_pos = model_fn(video, audio, t, pos_ctx, pos_ctx, i2v, 0)
        v_neg, a_neg = model_fn(video, audio, t, video_neg_ctx, audio_neg_ctx, i2v, slg_layer)
        v_pos, a_pos, v_neg, a_neg = (p.to(torch.float32) for p in (v_pos, a_pos, v_neg, a_neg))
        if record is not None:
            _append(record, "model_timesteps", t)
            if k == 0:
                for key, value in (("step0_video_pos", v_pos), ("step0_video_neg", v_neg),
                                   ("step0_audio_pos", a_pos), ("step0_audio_neg", a_neg)):
                    _put(record, key, value.detach().to("cpu", copy=True))
        v = v_neg + video_guidance * (v_pos - v_neg)
        a = a_neg + audio_guidance * (a_pos - a_neg)
        del v_pos, a_pos, v_neg, a_neg
        # The clean-video estimate of this step, for previews: one elementwise op, only when someone listens.
        video_x0 = video - float(schedule.sigmas[k]) * v if callback is not None else None
        video = video_solver.step(v, t, video)
        audio = audio_solver.step(a, t, audio)
        if record is not None:
            _append(record, "video_states", video)
            _append(record, "audio_states", audio)
        if callback is not None:
            callback(k, total, video, audio, video_x0)
    if i2v:
        video[:, :1] = image_latent
    return video, audio
