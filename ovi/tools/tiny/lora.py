"""Tiny random LoRAs for the tiny fusion model, in the key conventions LoRAs for Wan 2.2 5B and Ovi ship in.

    write_tiny_lora("Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16.safetensors")   # a Wan LoRA, video branch

Every low-rank pair covers one linear layer of the fused blocks: attention q/k/v/o and both FFN linears of each
block, plus Ovi's fusion projections (``k_fusion``/``v_fusion``) in the Ovi convention, which has branch
prefixes and so reaches the audio branch too. The factors are seeded, so a file is the same every time.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...fusion.config import FusionConfig
from ...fusion.model import FusionModel
from ...lora.keys import diffusers_name
from .fusion import TINY_CONFIG

# convention -> (key of a module stem, down suffix, up suffix, has alpha)
CONVENTIONS = {
    "comfy": (lambda branch, stem: f"diffusion_model.{stem}", ".lora_down.weight", ".lora_up.weight", True),
    "kohya": (lambda branch, stem: "lora_unet_" + stem.replace(".", "_"), ".lora_down.weight", ".lora_up.weight",
              True),
    "peft": (lambda branch, stem: f"transformer.{diffusers_name(stem)}", ".lora_A.weight", ".lora_B.weight", False),
    "ovi": (lambda branch, stem: f"{branch}_model.{stem}", ".lora_down.weight", ".lora_up.weight", True),
}
WAN_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
              "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
FUSION_LAYERS = ("cross_attn.k_fusion", "cross_attn.v_fusion")  # Ovi's own: no Wan LoRA has them
FACTOR_STD = 0.3  # with rank 4 and alpha = rank, each delta entry is ~0.2: a clear change of the tiny model's output


def tiny_lora(config: FusionConfig = TINY_CONFIG, *, convention: str = "comfy", rank: int = 4,
              alpha: float | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
              layers: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one tiny LoRA. ``convention``: a ``CONVENTIONS`` key; "ovi" covers both branches
    (fusion projections included), the others the video branch only, as Wan 2.2 LoRAs do. ``alpha`` (default:
    the rank) is stored where the convention has one."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    key_of, down_sfx, up_sfx, has_alpha = CONVENTIONS[convention]
    branches = ("video", "audio") if convention == "ovi" else ("video",)
    layers = layers or (WAN_LAYERS + FUSION_LAYERS if convention == "ovi" else WAN_LAYERS)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FusionModel(config).state_dict(keep_vars=True).items()}
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for branch in branches:
        for i in range(config.num_layers):
            for layer in layers:
                stem = f"blocks.{i}.{layer}"
                n_out, n_in = shapes[f"{branch}_model.{stem}.weight"]
                key = key_of(branch, stem)
                out[key + down_sfx] = (FACTOR_STD * torch.randn(rank, n_in, generator=g)).to(dtype)
                out[key + up_sfx] = (FACTOR_STD * torch.randn(n_out, rank, generator=g)).to(dtype)
                if has_alpha:
                    out[key + ".alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    return out


def write_tiny_lora(path: str | os.PathLike, config: FusionConfig = TINY_CONFIG, **kw) -> Path:
    """``tiny_lora(config, **kw)`` saved as a safetensors file at ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tiny_lora(config, **kw).items()}, str(path))
    return path
