"""Tiny random fusion models in the released layout: ``Ovi/model*.safetensors``, bf16, official keys.

The head count and text length cannot be read from shapes, so each file carries its config as JSON
in the header metadata (``ovi.config``), with the variant name under ``ovi.variant``.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from ...fusion.checkpoint import CONFIG_METADATA_KEY, VARIANT_METADATA_KEY
from ...fusion.config import OVI_AUDIO_CONFIG, OVI_VIDEO_CONFIG, FusionConfig
from ...fusion.model import FusionModel

_SMALL = dict(dim=256, num_heads=2, num_layers=2, ffn_dim=288, text_dim=32, text_len=512, freq_dim=256)
TINY_CONFIG = FusionConfig(replace(OVI_VIDEO_CONFIG, **_SMALL), replace(OVI_AUDIO_CONFIG, **_SMALL))

# variant name -> file name under Ovi/, as the official engine expects them.
VARIANT_FILES = {"720x720_5s": "model.safetensors", "960x960_5s": "model_960x960.safetensors",
                 "960x960_10s": "model_960x960_10s.safetensors"}


def random_state_dict(config: FusionConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights scaled so every layer keeps activations O(1) (unit-variance fan-in init, norm gains
    near 1, small biases and modulation tables), in float32."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FusionModel(config).state_dict(keep_vars=True).items()}
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if "modulation" in key:
            t = 0.1 * noise
        elif key.endswith(".bias"):
            t = 0.02 * noise
        elif len(shape) == 1:  # norm gains
            t = 1.0 + 0.1 * noise
        else:
            gain = 0.5 if "time_projection" in key else 1.0
            t = noise * (gain / math.sqrt(math.prod(shape[1:])))
        out[key] = t
    return out


def write_tiny(out_dir: Path, seed: int) -> list[Path]:
    """Write the three variant files under ``out_dir/Ovi/`` (a different seed per file); returns their paths."""
    from safetensors.torch import save_file

    folder = Path(out_dir) / "Ovi"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (variant, name) in enumerate(VARIANT_FILES.items()):
        sd = {k: v.to(torch.bfloat16).contiguous() for k, v in random_state_dict(TINY_CONFIG, seed + i).items()}
        path = folder / name
        save_file(sd, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(TINY_CONFIG.to_dict()),
                                           VARIANT_METADATA_KEY: variant})
        paths.append(path)
    return paths
