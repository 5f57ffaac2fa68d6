"""Parity runners for the fusion DiT: one forward per fixture, and the full-size key manifest."""

from __future__ import annotations

import torch

from ...loading import meta_device
from ...fusion.checkpoint import load_fusion_model
from ...fusion.config import FusionConfig
from ...fusion.model import FusionModel


def build_fusion_from_fixture(fx) -> FusionModel:
    """The fixture's tiny model in float32, built from its ``config`` and loaded through the real loader."""
    return load_fusion_model(fx.weights_path, prefix=fx.weights_prefix, dtype=torch.float32,
                             config=FusionConfig.from_dict(fx.config))


def _forward(fx) -> dict[str, torch.Tensor]:
    model = build_fusion_from_fixture(fx)
    i, a = fx.inputs, fx.args
    video, audio = model(i["video_latent"], i["audio_latent"], i["timestep"], i["video_context"],
                         i["audio_context"], first_frame_is_clean=bool(a.get("first_frame_is_clean", False)),
                         slg_layer=int(a.get("slg_layer", 0)))
    return {"video_pred": video, "audio_pred": audio}


def _manifest(shapes: dict) -> dict:
    with meta_device():
        model = FusionModel(FusionConfig.from_shapes(shapes))
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


TENSOR_RUNNERS = {k: _forward for k in ("fusion_forward_t2v", "fusion_forward_i2v", "fusion_forward_slg")}
MANIFEST_ANCHORS = {"fusion": "video_model.patch_embedding.weight"}
MANIFEST_RUNNERS = {"fusion": _manifest}
