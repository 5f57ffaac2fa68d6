"""Load the Wan2.2 video VAE from the official ``Wan2.2_VAE.pth`` or Comfy-Org ``wan2.2_vae.safetensors``.

Both files hold the same 196 keys (ComfyUI loads its file into a module with the official names), so
the ComfyUI key map is the identity. The format is told from the file's content by the checkpoint
reader; a wrapper prefix (a VAE stored inside a larger file) is found from the anchor key and stripped.
"""

from __future__ import annotations

import os

import torch

from ..loading import CheckpointError, CheckpointReader, TensorSource, check_keys, load_into_module, meta_device
from ..log import log
from .wan22 import Wan22VAE, WanVAEConfig

ANCHOR = "decoder.middle.0.residual.0.gamma"


def comfy_to_official(key: str) -> str:
    """Official key for a key of Comfy-Org ``wan2.2_vae.safetensors`` (the same name)."""
    return key


def official_to_comfy(key: str) -> str:
    return key


def _strip_wrapper(sources: dict[str, TensorSource]) -> dict[str, TensorSource]:
    if ANCHOR in sources:
        return sources
    for k in sources:
        if k.endswith("." + ANCHOR):
            p = k[: -len(ANCHOR)]
            log.info("Wan2.2 VAE: stripping key prefix %r", p)
            return {k[len(p):]: v for k, v in sources.items() if k.startswith(p)}
    return sources


def _expected_shapes(cfg: WanVAEConfig) -> dict[str, tuple[int, ...]]:
    with meta_device():
        m = Wan22VAE(cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def load_wan_vae(path: str | os.PathLike, *, prefix: str = "", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, config: WanVAEConfig | None = None) -> Wan22VAE:
    """Build the VAE on ``meta`` from the file's shapes (or ``config``) and fill it tensor by tensor."""
    with CheckpointReader(path, prefix=prefix) as reader:
        sources = _strip_wrapper(reader.sources())
        shapes = {k: s.shape for k, s in sources.items()}
        z = shapes.get("conv2.weight", (0,))[0]
        if z and z != 48 and config is None:
            hint = " (a Wan2.1 VAE has a 16-channel latent)" if z == 16 else ""
            raise CheckpointError(path, f"this VAE has a {z}-channel latent{hint}; Ovi needs the Wan2.2 VAE "
                                        "(48 channels, Wan2.2_VAE.pth or wan2.2_vae.safetensors).")
        if config is None:
            try:
                config = WanVAEConfig.from_shapes(shapes)
            except (KeyError, IndexError):
                check_keys("wan22_vae", path, _expected_shapes(WanVAEConfig()), sources)
                raise CheckpointError(path, "not a Wan2.2 VAE state dict.")
        with meta_device():
            model = Wan22VAE(config)
        load_into_module(model, sources, path=path, component="wan22_vae", device=device, dtype=dtype)
    log.debug("Wan2.2 VAE loaded from %s (dim %d, dec_dim %d, %s)", path, config.dim, config.dec_dim, dtype)
    return model.eval()
