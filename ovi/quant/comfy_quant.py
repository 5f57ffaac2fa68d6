"""ComfyUI's mixed-precision quantization metadata: which layers of a file are quantized, and in which format.

ComfyUI marks quantized layers one by one, in either of two places (both read here, merged):

* the safetensors header metadata key ``_quantization_metadata``, a JSON string
  ``{"format_version": "1.0", "layers": {"<layer>": {"format": "float8_e4m3fn"}, ...}}``;
* a uint8 tensor ``<layer>.comfy_quant`` holding the same per-layer JSON object as UTF-8 bytes (what ComfyUI
  writes when it saves a quantized model).

``<layer>`` is the weight key as stored without ``.weight`` (a ``model.diffusion_model.`` prefix may be left out,
as ComfyUI allows for diffusion models). A layer not listed is a plain tensor. This module parses and checks the
JSON only; ``fp8_checkpoint`` checks the tensors against it. Every problem is a ``CheckpointError`` naming the file
and the layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import torch

from ..loading import CheckpointError, TensorSource

QUANT_METADATA_KEY = "_quantization_metadata"
LAYER_SUFFIX = ".comfy_quant"
FORMAT_VERSION = "1.0"
WEIGHT_SCALE = ".weight_scale"
INPUT_SCALE = ".input_scale"
# ComfyUI keeps both spellings of a diffusion model's layer names working (the names are matched before and after
# this prefix is stripped), so a listed name may omit it.
DIFFUSION_PREFIX = "model.diffusion_model."

# The formats read here and their weight storage dtype. ComfyUI defines more (mxfp8, nvfp4, the int4 ones), all
# block-scaled; no int8 block-wise format exists in ComfyUI.
WEIGHT_DTYPES: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8_tensorwise": torch.int8,
}
FLOAT8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
# Per-layer options ComfyUI reads (from the entry itself or its "params"): the ones that change nothing for the
# formats above, and the ones that would (a rotated or grouped int8 layer) and are refused.
_HARMLESS_OPTIONS = {"full_precision_matrix_mult": bool, "linear_dtype": str}
_REFUSED_OPTIONS = ("convrot", "convrot_groupsize", "group_size")
# One layer's JSON is a few dozen bytes; anything past this is not a comfy_quant entry.
_MAX_LAYER_JSON_BYTES = 64 * 1024


@dataclass(frozen=True)
class QuantLayer:
    name: str      # the layer as stored in the file (the weight key without ".weight")
    format: str    # a WEIGHT_DTYPES key
    origin: str    # where it was listed: QUANT_METADATA_KEY or "<layer>.comfy_quant"


def has_comfy_quant(keys, metadata: Mapping[str, str] | None) -> bool:
    """Whether a file marks layers the ComfyUI mixed-precision way (header key or per-layer tensors)."""
    return QUANT_METADATA_KEY in (metadata or {}) or any(str(k).endswith(LAYER_SUFFIX) for k in keys)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _loads(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; hostile nesting recurses
        raise ValueError(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None


def _entry_format(entry: object, where: str, path) -> str:
    """The format of one layer entry, after checking every option it carries."""
    if not isinstance(entry, dict):
        raise CheckpointError(path, f"{where}: a layer entry is a JSON object like {{\"format\": \"float8_e4m3fn\"}}, "
                                    f"got {type(entry).__name__}. The quantization metadata is corrupt.")
    params = entry.get("params", {})
    if not isinstance(params, dict):
        raise CheckpointError(path, f"{where}: \"params\" is {type(params).__name__}, not a JSON object. The "
                                    "quantization metadata is corrupt.")
    fmt = entry.get("format")
    if not isinstance(fmt, str):
        raise CheckpointError(path, f"{where}: the entry has no \"format\" string (got {fmt!r}). The quantization "
                                    "metadata is corrupt.")
    if fmt not in WEIGHT_DTYPES:
        raise CheckpointError(path, f"{where}: unknown quantization format {fmt[:80]!r}; this loader reads "
                                    f"{', '.join(WEIGHT_DTYPES)}. Use a bf16 file, or convert one with "
                                    "`python -m ovi convert --to fp8`.")
    for options in (entry, params):
        for key, value in options.items():
            if key in ("format", "params") and options is entry:
                continue
            if key in _REFUSED_OPTIONS:
                if value in (False, None):
                    continue
                raise CheckpointError(path, f"{where}: option {key}={value!r} (a rotated or group-quantized layer) is "
                                            f"not part of plain {fmt} and is not read here.")
            if key not in _HARMLESS_OPTIONS:
                raise CheckpointError(path, f"{where}: unknown option {str(key)[:80]!r} in the layer entry. The "
                                            "quantization metadata is corrupt or from a newer ComfyUI.")
            if not isinstance(value, _HARMLESS_OPTIONS[key]):
                raise CheckpointError(path, f"{where}: option {key} is {type(value).__name__}, not "
                                            f"{_HARMLESS_OPTIONS[key].__name__}. The quantization metadata is corrupt.")
    return fmt


def _header_layers(text: str, path) -> dict[str, str]:
    where = f"header metadata {QUANT_METADATA_KEY}"
    try:
        doc = _loads(text)
    except ValueError as e:
        raise CheckpointError(path, f"{where} is not valid JSON ({e}). The file is corrupt.") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), dict):
        raise CheckpointError(path, f"{where} must be a JSON object with a \"layers\" object ({{\"format_version\": "
                                    f"\"{FORMAT_VERSION}\", \"layers\": {{...}}}}). The file is corrupt.")
    version = doc.get("format_version", FORMAT_VERSION)
    if not isinstance(version, str):
        raise CheckpointError(path, f"{where}: format_version is {type(version).__name__}, not a string. The file is "
                                    "corrupt.")
    return {str(name): _entry_format(entry, f"{where}, layer {str(name)[:120]!r}", path)
            for name, entry in doc["layers"].items()}


def _tensor_layer(key: str, source: TensorSource, path) -> str:
    where = f"tensor {key}"
    n = 1
    for d in source.shape:
        n *= int(d)
    if source.dtype != torch.uint8 or len(source.shape) != 1 or n > _MAX_LAYER_JSON_BYTES:
        raise CheckpointError(path, f"{where} is {str(source.dtype).removeprefix('torch.')} {list(source.shape)}; a "
                                    "comfy_quant entry is a 1-D uint8 tensor of JSON bytes. The file is corrupt.")
    raw = bytes(source.load().tolist())
    try:
        entry = _loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(path, f"{where} is not UTF-8 JSON ({str(e)[:120]}). The file is corrupt.") from None
    return _entry_format(entry, where, path)


def _stored_name(name: str, sources: Mapping[str, TensorSource]) -> str | None:
    for candidate in (name, DIFFUSION_PREFIX + name):
        if candidate + ".weight" in sources:
            return candidate
    return None


def read_quant_layers(sources: Mapping[str, TensorSource], metadata: Mapping[str, str] | None,
                      path) -> dict[str, QuantLayer] | None:
    """{layer as stored: QuantLayer} for a file in ComfyUI's mixed-precision format, None for any other file.
    Raises ``CheckpointError`` for malformed JSON, an unknown format or option, a listed layer without a weight,
    and a layer listed twice with different formats."""
    metadata = metadata or {}
    if not has_comfy_quant(sources, metadata):
        return None
    listed: list[tuple[str, str, str]] = []  # (name as listed, format, origin)
    if QUANT_METADATA_KEY in metadata:
        listed += [(n, f, QUANT_METADATA_KEY) for n, f in _header_layers(metadata[QUANT_METADATA_KEY], path).items()]
    for key, s in sources.items():
        if key.endswith(LAYER_SUFFIX):
            listed.append((key[: -len(LAYER_SUFFIX)], _tensor_layer(key, s, path), key))
    layers: dict[str, QuantLayer] = {}
    for name, fmt, origin in listed:
        stored = _stored_name(name, sources)
        if stored is None:
            raise CheckpointError(path, f"{origin} lists layer {name[:120]!r}, but the file has no "
                                        f"{name[:120]}.weight. The quantization metadata does not belong to these "
                                        "tensors.")
        prior = layers.get(stored)
        if prior is not None and prior.format != fmt:
            raise CheckpointError(path, f"layer {stored!r} is listed as {prior.format} in {prior.origin} and as "
                                        f"{fmt} in {origin}. The file is corrupt.")
        layers[stored] = prior or QuantLayer(stored, fmt, origin)
    return layers


def quantization_metadata(layers: Mapping[str, str]) -> str:
    """The ``_quantization_metadata`` header value naming ``layers`` ({layer: format}), for writers."""
    for fmt in layers.values():
        if fmt not in WEIGHT_DTYPES:
            raise ValueError(f"unknown quantization format {fmt!r}")
    return json.dumps({"format_version": FORMAT_VERSION,
                       "layers": {name: {"format": fmt} for name, fmt in layers.items()}}, separators=(",", ":"))
