"""Parity runners for the solvers on their own (kind ``scheduler``) and the full sampling loop (``sampling``)."""

from __future__ import annotations

import torch

from ...sampling.loop import sample
from ...sampling.schedules import make_schedule
from ...sampling.solvers import make_solver


def run_scheduler(fx) -> dict:
    out = {}
    for run in fx.args["runs"]:
        tag = run["tag"]
        schedule = make_schedule(fx.config["solver_name"], run["sample_steps"], run["shift"])
        solver = make_solver(schedule)
        x, velocities, states = fx.inputs[f"{tag}_sample"], fx.inputs[f"{tag}_model_outputs"], []
        for k, t in enumerate(schedule.timesteps):
            x = solver.step(velocities[k], t, x)
            states.append(x)
        out[f"{tag}_timesteps"] = schedule.timesteps
        out[f"{tag}_sigmas"] = schedule.sigmas
        out[f"{tag}_states"] = torch.stack(states)
    return out


def fusion_model_fn(model):
    """Adapt a loaded FusionModel to the loop's ``model_fn`` (unbatched latents and contexts)."""

    def model_fn(video, audio, t, video_ctx, audio_ctx, first_frame_is_clean, slg_layer):
        return model(video, audio, t, video_ctx, audio_ctx,
                     first_frame_is_clean=first_frame_is_clean, slg_layer=slg_layer)

    return model_fn


def run_sampling(fx) -> dict:
    from .fusion import build_fusion_from_fixture

    a = fx.args
    model = build_fusion_from_fixture(fx)
    record: dict = {}
    video, audio = sample(
        fusion_model_fn(model), fx.inputs["video_noise"], fx.inputs["audio_noise"],
        pos_ctx=fx.inputs["text_embedding_pos"], video_neg_ctx=fx.inputs["text_embedding_video_neg"],
        audio_neg_ctx=fx.inputs["text_embedding_audio_neg"],
        solver=a["solver_name"], steps=a["sample_steps"], shift=a["shift"],
        video_guidance=a["video_guidance_scale"], audio_guidance=a["audio_guidance_scale"],
        slg_layer=a["slg_layer"], image_latent=fx.inputs.get("image_latent"),
        record=record)
    out = {"video_latent": video, "audio_latent": audio}
    for key in ("timesteps", "sigmas"):
        out[key] = record[key]
    out["model_timesteps"] = torch.cat(record["model_timesteps"])
    for key in ("video_states", "audio_states"):
        out[key] = torch.stack(record[key])
    for key in ("step0_video_pos", "step0_video_neg", "step0_audio_pos", "step0_audio_neg"):
        out[key] = record[key]
    return out


TENSOR_RUNNERS = {"scheduler": run_scheduler, "sampling": run_sampling}
