"""Tiny Wan2.2 VAE checkpoints in both released layouts, for CPU tests.

Writes ``Wan2.2-TI2V-5B/Wan2.2_VAE.pth`` (float32 state dict, as released) and ``vae/wan2.2_vae.safetensors``
(Comfy-Org layout: the same keys, stored in bf16). The weights are rounded to bf16 first, so both files
hold exactly the same values. The shapes imply the configuration.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...vae.wan22 import Wan22VAE, WanVAEConfig

TINY_CONFIG = WanVAEConfig(dim=4, dec_dim=6)


def tiny_state_dict(seed: int, config: WanVAEConfig = TINY_CONFIG) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Wan22VAE(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("gamma"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("bias"):
            t = 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        sd[k] = t.to(torch.bfloat16).float().contiguous()
    return sd


def write_tiny(out_dir: Path, seed: int) -> list[Path]:
    from safetensors.torch import save_file

    sd = tiny_state_dict(seed)
    pth = Path(out_dir) / "Wan2.2-TI2V-5B" / "Wan2.2_VAE.pth"
    st = Path(out_dir) / "vae" / "wan2.2_vae.safetensors"
    pth.parent.mkdir(parents=True, exist_ok=True)
    st.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, pth)
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(st))
    return [pth, st]
