"""Shared by the sampling-loop tests on the tiny fusion model: loading it, seeded inputs, a model_fn that
counts its calls, and a plain reference loop (two passes per step, split CFG, i2v frame 0) written from
the pipeline description, against which the loop's new options are compared."""

from __future__ import annotations

from pathlib import Path

import torch

from ovi.fusion.checkpoint import load_fusion_model
from ovi.sampling.loop import sample
from ovi.sampling.schedules import make_schedule
from ovi.sampling.solvers import make_solver

FRAMES, H, W, TOKENS = 4, 4, 4, 12  # latent frames, latent height/width (patch 2), audio latent tokens
SLG = 1  # the tiny model has 2 fused layers
STEPS = 3  # enough for UniPC's corrector and its second order
GUIDE = dict(video_guidance=4.0, audio_guidance=3.0)


def load_tiny(tiny_dir: Path):
    return load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32)


def inputs(seed: int = 3) -> dict:
    """Seeded noise (one generator per modality, both from ``seed``, as the engine draws it) and contexts."""
    text_dim = 32
    gv = torch.Generator().manual_seed(seed)
    ga = torch.Generator().manual_seed(seed)
    gc = torch.Generator().manual_seed(seed + 1)
    return dict(video_noise=torch.randn(48, FRAMES, H, W, generator=gv),
                audio_noise=torch.randn(TOKENS, 20, generator=ga),
                pos_ctx=torch.randn(6, text_dim, generator=gc), video_neg_ctx=torch.randn(3, text_dim, generator=gc),
                audio_neg_ctx=torch.randn(4, text_dim, generator=gc))


def known_latents(seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for encoded video and audio: full-size latents whose values the known regions take."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(48, FRAMES, H, W, generator=g) * 0.7, torch.randn(TOKENS, 20, generator=g) * 0.7


def model_fn(model, calls: list | None = None):
    """The loop's model_fn over the tiny model; ``calls`` receives (t, clean, slg) of every call."""

    def fn(video, audio, t, video_ctx, audio_ctx, clean, slg_layer):
        if calls is not None:
            calls.append((int(t.item()), clean, slg_layer))
        return model(video, audio, t, video_ctx, audio_ctx, first_frame_is_clean=clean, slg_layer=slg_layer)

    return fn


def reference_sample(model, inp: dict, *, steps: int, solver: str = "unipc", shift: float = 5.0,
                     video_guidance: float, audio_guidance: float, slg_layer: int = SLG,
                     image_latent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The official loop: (i2v: frame 0 := image latent) positive pass, negative pass with SLG, split CFG,
    one solver per modality; frame 0 written once more at the end."""
    schedule = make_schedule(solver, steps, shift)
    vs, as_ = make_solver(schedule), make_solver(schedule)
    video, audio = inp["video_noise"].clone(), inp["audio_noise"].clone()
    i2v = image_latent is not None
    for k in range(schedule.steps):
        t = schedule.timesteps[k:k + 1]
        if i2v:
            video[:, :1] = image_latent
        vp, ap = model(video, audio, t, inp["pos_ctx"], inp["pos_ctx"], first_frame_is_clean=i2v)
        vn, an = model(video, audio, t, inp["video_neg_ctx"], inp["audio_neg_ctx"], first_frame_is_clean=i2v,
                       slg_layer=slg_layer)
        video = vs.step(vn + video_guidance * (vp - vn), t, video)
        audio = as_.step(an + audio_guidance * (ap - an), t, audio)
    if i2v:
        video[:, :1] = image_latent
    return video, audio


def run_sample(model, inp: dict, calls: list | None = None, **kw):
    """The loop under test on ``inp`` (from ``inputs``): UniPC, STEPS steps, GUIDE, SLG unless ``kw`` says otherwise."""
    inp = dict(inp)
    video, audio = inp.pop("video_noise"), inp.pop("audio_noise")
    opts = dict(solver="unipc", steps=STEPS, shift=5.0, slg_layer=SLG, **GUIDE)
    opts.update(kw)
    return sample(model_fn(model, calls), video, audio, **inp, **opts)
