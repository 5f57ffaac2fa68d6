"""Tiny fusion models in Wan2GP's file layout: one file per branch, keys without the branch prefix, bf16 or int8.

Wan2GP saves each branch's own state dict (``wan2.2_ovi*_{video,audio}_10B_bf16.safetensors``), and its int8
files (``..._quanto_bf16_int8``) in the optimum-quanto layout mmgp writes: the 12 linears of every block as
``<layer>.weight._data`` (int8) + ``<layer>.weight._scale`` (bf16, per-row absmax / 127) + unit
``input_scale`` / ``output_scale`` buffers, everything else bf16, and the map of quantised layers in the header
(``quantization_format``, ``quantization_map_base64``). No ``ovi.config`` is written: Wan2GP's files carry none,
so the loader infers the config from the shapes. The tests write these from a tiny fusion state dict.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Mapping

import torch

from ...quant.fp8_checkpoint import is_quantised_key
from ...quant.int8 import quantise_int8
from ...quant.quanto_int8 import BUFFERS, DATA, FORMAT, FORMAT_KEY, MAP_KEY, NO_QTYPE, WEIGHT_QTYPE, WEIGHT_SCALE

BRANCHES = ("video", "audio")
STEMS = {"720x720_5s": "wan2.2_ovi", "960x960_5s": "wan2.2_ovi1_1", "960x960_10s": "wan2.2_ovi1_1_10s"}
KINDS = ("bf16", "quanto_bf16_int8")


def file_name(variant: str, branch: str, kind: str = "bf16") -> str:
    """The published Wan2GP name of one branch file (``wan2.2_ovi1_1_10s_audio_10B_quanto_bf16_int8.safetensors``)."""
    return f"{STEMS[variant]}_{branch}_10B_{kind}.safetensors"


def branch_halves(fusion_sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"video" | "audio": that branch's tensors, keys without ``video_model.`` / ``audio_model.``} in bf16."""
    out = {}
    for b in BRANCHES:
        p = f"{b}_model."
        out[b] = {k[len(p):]: v.to(torch.bfloat16).contiguous() for k, v in fusion_sd.items() if k.startswith(p)}
    return out


def quanto_int8_half(half: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(state dict in the quanto layout, quantization map) of one branch: block linears qint8, the rest as is."""
    sd: dict[str, torch.Tensor] = {}
    qmap: dict[str, dict] = {}
    for key, w in half.items():
        if not is_quantised_key(key):
            sd[key] = w
            continue
        layer = key[: -len(".weight")]
        data, scale = quantise_int8(w, scale_dtype=w.dtype)
        sd[layer + DATA], sd[layer + WEIGHT_SCALE] = data.contiguous(), scale.contiguous()
        for suffix in BUFFERS:
            sd[layer + suffix] = torch.ones((), dtype=w.dtype)
        qmap[layer] = {"weights": WEIGHT_QTYPE, "activations": NO_QTYPE}
    return sd, qmap


def map_metadata(qmap: Mapping[str, dict]) -> dict[str, str]:
    """The header metadata mmgp writes beside a quanto state dict."""
    return {FORMAT_KEY: FORMAT, MAP_KEY: base64.b64encode(json.dumps(qmap).encode("utf-8")).decode("ascii")}


def write_pair(fusion_sd: Mapping[str, torch.Tensor], folder: str | Path, variant: str = "720x720_5s",
               kind: str = "bf16") -> dict[str, Path]:
    """Write ``fusion_sd`` (official ``video_model.`` / ``audio_model.`` keys) as a Wan2GP pair of ``kind``
    ("bf16" or "quanto_bf16_int8") under ``folder``; returns {"video" | "audio": path}."""
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for b, half in branch_halves(fusion_sd).items():
        path = folder / file_name(variant, b, kind)
        if kind == "bf16":
            save_file(half, str(path))
        else:
            sd, qmap = quanto_int8_half(half)
            save_file(sd, str(path), metadata=map_metadata(qmap))
        paths[b] = path
    return paths
