"""Parity runners for the Wan2.2 video VAE: decode, encode, the full-size manifest and the ComfyUI key map."""

from __future__ import annotations

import torch

from ...loading import meta_device
from ...vae.checkpoint import ANCHOR, comfy_to_official, load_wan_vae
from ...vae.wan22 import Wan22VAE, WanVAEConfig


def _model(fx) -> Wan22VAE:
    cfg = WanVAEConfig.from_fixture(fx.config)
    return load_wan_vae(fx.weights_path, prefix=fx.weights_prefix, config=cfg, dtype=torch.float32)


def _decode(fx) -> dict:
    vae = _model(fx)
    raw = vae.decode(fx.inputs["latent"].float(), clamp=False)
    return {"video_before_clamp": raw, "video": raw.clamp(-1.0, 1.0)}


def _encode(fx) -> dict:
    vae = _model(fx)
    out = {}
    for inp, name in (("image", "latent"), ("video", "latent_video")):
        if inp in fx.inputs:
            out[name] = vae.encode(fx.inputs[inp].float())
    return out


def _meta_shapes(expected: dict) -> dict:
    with meta_device():
        m = Wan22VAE(WanVAEConfig.from_shapes(expected))
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _keymap(mapping: dict) -> list[str]:
    problems = [f"{comfy!r} maps to {comfy_to_official(comfy)!r}, the map says {off!r}"
                for off, comfy in mapping.items() if comfy_to_official(comfy) != off]
    ours = set(_full_shapes())
    missing, extra = sorted(ours - set(mapping)), sorted(set(mapping) - ours)
    if missing:
        problems.append(f"{len(missing)} module keys not in the map: {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} mapped keys not in the module: {extra[:3]}")
    return problems


def _full_shapes() -> dict:
    with meta_device():
        m = Wan22VAE(WanVAEConfig())
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


TENSOR_RUNNERS = {"wan22_vae_decode": _decode, "wan22_vae_encode": _encode}
MANIFEST_ANCHORS = {"wan22_vae": ANCHOR}
MANIFEST_RUNNERS = {"wan22_vae": _meta_shapes}
KEYMAP_RUNNERS = {"wan22_vae": _keymap}
