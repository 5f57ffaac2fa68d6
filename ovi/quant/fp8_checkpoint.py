"""FP8 fusion checkpoints: which FP8 layout a file uses, and the sources that load it into ``FP8Linear`` layers.

Layouts read (all keep norms, biases and modulation tables in bf16/fp32):

* ``official-plain``: Character.AI's ``model_fp8_e4m3fn.safetensors`` (720x720_5s): weights cast to
  float8_e4m3fn with no scale tensors, so the scale is 1.
* ``kj-scaled``: ComfyUI-WanVideoWrapper's ``*_fp8_e4m3fn_scaled_KJ.safetensors``: e4m3fn weights, each with a
  float32 ``<layer>.scale_weight`` (WanVideoWrapper also accepts the name ``<layer>.weight_scale``); one file
  (Ovi 1.1 10 s) or a video file plus an audio file (Ovi 1.0). A WanVideoWrapper file may keep the video keys
  without a prefix next to ``audio_model.`` keys; that is handled by the fusion loader.
* ``comfy-scaled``: ComfyUI's scaled-fp8 convention: a ``scaled_fp8`` marker tensor (its dtype names the
  FP8 format, its values are unused) and ``<layer>.scale_weight`` per FP8 layer; ``<layer>.scale_input``
  (static activation scales) is ignored, activation scales being dynamic here.
* ``ovi``: files written by ``python -m ovi convert --to fp8 --fp8-format scaled_fp8``: the ComfyUI convention
  plus header metadata naming the format, scale granularity and source variant.
* ``comfy-quant``: ComfyUI's mixed-precision format (``quant.comfy_quant``): the quantized layers are listed by
  name in the header metadata ``_quantization_metadata`` and/or per-layer ``<layer>.comfy_quant`` tensors, each
  with ``<layer>.weight_scale`` and, for float8, an optional static ``<layer>.input_scale``; layers not listed are
  plain tensors. float8_e4m3fn / float8_e5m2 layers load into ``FP8Linear`` (an input scale is used as the
  activation scale of ``_scaled_mm``); int8_tensorwise layers are dequantised at load.
* ``ovi-comfy-quant``: that format as ``python -m ovi convert --to fp8`` writes it by default, with our header
  metadata as for ``ovi``.

Effective weight = ``weight.float() * scale_weight``; a scale is a scalar ([] or [1]) or one per output row
([out] or [out, 1]), stored as float32, float16 or bfloat16, finite and positive; a weight with a scale is FP8.
Anything else (an int32 scale, a NaN or zero scale, a bf16 weight beside a scale, a malformed marker, FP8 header
metadata that disagrees with the tensors) is a ``CheckpointError`` naming the key, raised when the layout is
detected (the scale values by ``check_scale_values``, which reads them), before a model is built or an output
written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..loading import FP8_DTYPES, CheckpointError, DerivedSource, TensorSource, meta_device
from ..log import log
from .comfy_quant import (FLOAT8_FORMATS, INPUT_SCALE, LAYER_SUFFIX, QUANT_METADATA_KEY, WEIGHT_DTYPES, WEIGHT_SCALE,
                          QuantLayer, read_quant_layers)
from .fp8 import FP8Linear, dequantise_fp8

MARKER = "scaled_fp8"
SCALE = ".scale_weight"
_SCALE_ALIASES = (".weight_scale",)
_IGNORED_SUFFIXES = (".scale_input", ".input_scale")

# Scale dtypes the known writers use (ComfyUI, WanVideoWrapper and ours store float32; half types are harmless).
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The scaled_fp8 marker's values are unused (ComfyUI writes an empty tensor); more than one element is no marker.
_MARKER_MAX_NUMEL = 1

FORMAT_KEY = "ovi.quant.format"
GRANULARITY_KEY = "ovi.quant.granularity"
SOURCE_KEY = "ovi.quant.source"
FORMAT_FP8 = "fp8_e4m3fn_scaled"

LAYOUT_DESCRIPTIONS = {
    "official-plain": "plain e4m3fn casts without scales (official model_fp8_e4m3fn layout)",
    "kj-scaled": "e4m3fn + float32 scale_weight per layer (ComfyUI-WanVideoWrapper *_fp8_e4m3fn_scaled_KJ layout)",
    "comfy-scaled": "ComfyUI scaled-fp8 convention (scaled_fp8 marker + <layer>.scale_weight)",
    "ovi": "ComfyUI scaled-fp8 convention, written by `python -m ovi convert`",
    "comfy-quant": "ComfyUI mixed-precision ({origin})",
    "ovi-comfy-quant": "ComfyUI mixed-precision ({origin}), written by `python -m ovi convert`",
}
# Where a comfy-quant file lists its layers, as the layout's description names it.
ORIGIN_HEADER = QUANT_METADATA_KEY
ORIGIN_TENSORS = "per-layer .comfy_quant tensors"


@dataclass(frozen=True)
class Fp8Layout:
    name: str             # a LAYOUT_DESCRIPTIONS key
    weight_dtype: torch.dtype
    granularity: str      # "tensor", "channel", "mixed" or "none" (no scales)
    fp8_tensors: int
    source: str | None = None  # what an ovi file was converted from (header metadata)
    # comfy-quant only: where the layers are listed, (format, layer count) pairs, static input scales
    origin: str = ""
    formats: tuple[tuple[str, int], ...] = ()
    input_scales: int = 0

    @property
    def description(self) -> str:
        return LAYOUT_DESCRIPTIONS[self.name].format(origin=self.origin)

    def summary(self) -> str:
        fmt = str(self.weight_dtype).removeprefix("torch.").replace("float8", "fp8")
        gran = {"tensor": "per-tensor scales", "channel": "per-output-channel scales", "mixed":
                "per-tensor and per-channel scales", "none": "no scales (scale 1)"}[self.granularity]
        src = f"; converted from {self.source}" if self.source else ""
        if self.formats:
            layers = ", ".join(f"{n} layers {f}" + (" (dequantised at load)" if f not in FLOAT8_FORMATS else "")
                               for f, n in self.formats)
            statics = f", {self.input_scales} with a static input_scale" if self.input_scales else ""
            return f"{fmt}, {gran}, {self.description}: {layers}{statics}{src}"
        return f"{fmt}, {gran}, {self.description}{src}"


def _scale_key(key: str) -> str | None:
    for alias in _SCALE_ALIASES:
        if key.endswith(alias):
            return key[: -len(alias)] + SCALE
    return None


def strip_fp8_extras(sources: Mapping[str, TensorSource]) -> dict[str, TensorSource]:
    """Drop the marker and static input scales, and spell every weight scale ``<layer>.scale_weight``."""
    out: dict[str, TensorSource] = {}
    for k, s in sources.items():
        if k == MARKER or k.endswith("." + MARKER) or k.endswith(_IGNORED_SUFFIXES):
            continue
        out[_scale_key(k) or k] = s
    return out


def _granularity(scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str | None:
    n = 1
    for d in scale_shape:
        n *= int(d)
    if n == 1 and len(scale_shape) <= 2:
        return "tensor"
    if weight_shape and len(weight_shape) == 2 and tuple(scale_shape) in ((weight_shape[0],), (weight_shape[0], 1)):
        return "channel"
    return None


def detect_fp8_layout(sources: Mapping[str, TensorSource], metadata: Mapping[str, str] | None = None,
                      path: str | Path | None = None) -> Fp8Layout | None:
    """The FP8 layout of one file's tensors (None when it holds no FP8 weights). Raises ``CheckpointError``
    for an FP8 layout this package does not know: a marker without FP8 tensors, a scale of the wrong shape,
    scales on some FP8 weights but not others, or FP8 header metadata in an unknown format."""
    metadata = metadata or {}
    fmt, gran_meta = _ovi_metadata(metadata, path)
    layers = read_quant_layers(sources, metadata, path)
    if layers is not None:
        return _comfy_quant(sources, metadata, layers, path, read_values=False)[1]
    markers = [(k, s) for k, s in sources.items() if k == MARKER or k.endswith("." + MARKER)]
    for k, s in markers:
        if s.dtype not in FP8_DTYPES or math.prod(s.shape) > _MARKER_MAX_NUMEL:
            raise CheckpointError(path, f"malformed {MARKER} marker {k}: {_describe(s)}; the marker is an empty "
                                        "FP8 tensor whose dtype names the weights' format. The file is corrupt.")
    marker = markers[0][1] if markers else None
    plain = strip_fp8_extras(sources)
    named = {(_scale_key(k) or k): k for k in sources}  # the names as stored, for the messages
    _check_scale_tensors(sources, plain, named, path)
    fp8 = {k: s for k, s in plain.items() if s.dtype in FP8_DTYPES}
    if not fp8:
        if marker is not None or any(k.endswith(SCALE) for k in plain):
            raise CheckpointError(path, "unknown FP8 layout: the file has a scaled_fp8 marker or scale_weight "
                                        "tensors but no FP8 weights. It is corrupt or in a format this loader "
                                        "does not know; use a bf16 file or convert it with `python -m ovi convert`.")
        if fmt is not None or gran_meta is not None:
            raise CheckpointError(path, f"header metadata {FORMAT_KEY if fmt is not None else GRANULARITY_KEY} says "
                                        "FP8, but the file holds no FP8 weights; the header metadata is corrupt — "
                                        "re-convert the file or remove the metadata.")
        return None
    if marker is not None and marker.dtype not in {s.dtype for s in fp8.values()}:
        raise CheckpointError(path, f"malformed {MARKER} marker: it names {_dtype_name(marker.dtype)}, but the FP8 "
                                    f"weights are {', '.join(sorted({_dtype_name(s.dtype) for s in fp8.values()}))}.")
    not_float = [k for k, s in plain.items() if k.endswith(".weight") and not s.dtype.is_floating_point]
    if not_float:
        k = not_float[0]
        raise CheckpointError(path, f"{named.get(k, k)} is {_dtype_name(plain[k].dtype)}; in an FP8 file a weight is "
                                    "FP8 (quantised layers) or a float dtype. The file is corrupt or in a format this "
                                    "loader does not know.")
    dtypes = {s.dtype for s in fp8.values()}
    if len(dtypes) > 1:
        raise CheckpointError(path, "unknown FP8 layout: the file mixes float8_e4m3fn and float8_e5m2 weights.")
    grans, scaled, unscaled = set(), 0, []
    for k, s in fp8.items():
        sk = k[: -len(".weight")] + SCALE if k.endswith(".weight") else None
        if sk is not None and sk in plain:
            g = _granularity(tuple(plain[sk].shape), tuple(s.shape))
            if g is None:
                raise CheckpointError(path, f"unknown FP8 layout: {sk} has shape {list(plain[sk].shape)}; a scale is "
                                            f"a scalar or one value per output row of {k} {list(s.shape)}.")
            grans.add(g)
            scaled += 1
        elif len(s.shape) == 2:
            unscaled.append(k)
    if scaled and unscaled:
        raise CheckpointError(path, f"unknown FP8 layout: {scaled} FP8 weights carry a scale_weight but {len(unscaled)} "
                                    f"do not (first: {unscaled[0]}). The file is damaged or mixes two formats.")
    orphan = [k for k in plain if k.endswith(SCALE) and k[: -len(SCALE)] + ".weight" not in plain]
    if orphan:
        raise CheckpointError(path, f"unknown FP8 layout: {len(orphan)} scale tensors have no weight (first: "
                              f"{orphan[0]}). The file is incomplete or in a format this loader does not know.")
    granularity = "none" if not scaled else (grans.pop() if len(grans) == 1 else "mixed")
    if gran_meta is not None and gran_meta != granularity:
        raise CheckpointError(path, f"header metadata {GRANULARITY_KEY}={gran_meta!r}, but the scales are "
                                    f"{granularity}; the header metadata is corrupt — re-convert the file.")
    if fmt == FORMAT_FP8 or gran_meta:
        name = "ovi"
    elif not scaled:
        name = "official-plain"
    elif marker is not None and "_kj" not in (Path(path).name.lower() if path else ""):
        name = "comfy-scaled"
    else:
        name = "kj-scaled"
    return Fp8Layout(name, dtypes.pop(), granularity, len(fp8), metadata.get(SOURCE_KEY))


_META_GRANULARITIES = ("tensor", "channel")  # what the converter writes under GRANULARITY_KEY


def _ovi_metadata(metadata: Mapping[str, str], path) -> tuple[str | None, str | None]:
    """Our FP8 header metadata (format, granularity), each checked when present."""
    fmt = metadata.get(FORMAT_KEY)
    if fmt is not None and fmt != FORMAT_FP8:
        raise CheckpointError(path, f"header metadata {FORMAT_KEY}={fmt!r} names an FP8 format this version does "
                                    f"not read (known: {FORMAT_FP8}). Convert the file again with this version.")
    gran_meta = metadata.get(GRANULARITY_KEY)
    if gran_meta is not None and gran_meta not in _META_GRANULARITIES:
        raise CheckpointError(path, f"header metadata {GRANULARITY_KEY}={gran_meta!r} is not a scale granularity "
                                    f"({', '.join(_META_GRANULARITIES)}); the header metadata is corrupt — "
                                    "re-convert the file.")
    return fmt, gran_meta


def fp8_file_sources(sources: Mapping[str, TensorSource], metadata: Mapping[str, str] | None,
                     path) -> tuple[dict[str, TensorSource], Fp8Layout | None]:
    """One file's tensors in the form the FP8 loader and the converters take, and its FP8 layout (None: not a
    quantized file). Every layout is checked from the header, then its scale values are read and checked.

    The form: an FP8 weight's scale is ``<layer>.scale_weight``; a comfy-quant float8 layer keeps its static
    ``<layer>.input_scale``; int8 layers are their dequantised float32 weights; markers, other input scales and
    ``.comfy_quant`` entries are gone."""
    metadata = metadata or {}
    _ovi_metadata(metadata, path)
    layers = read_quant_layers(sources, metadata, path)
    if layers is not None:
        return _comfy_quant(sources, metadata, layers, path, read_values=True)
    layout = detect_fp8_layout(sources, metadata, path)
    if layout is not None:
        check_scale_values(sources, path)
    return strip_fp8_extras(sources), layout


def _layer_of(key: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def _comfy_quant(sources: Mapping[str, TensorSource], metadata: Mapping[str, str], layers: Mapping[str, QuantLayer],
                 path, *, read_values: bool) -> tuple[dict[str, TensorSource], Fp8Layout | None]:
    """Check a comfy-quant file's tensors against its listed ``layers``; (sources in the loader's form, layout)."""
    old = [k for k in sources if k == MARKER or k.endswith(("." + MARKER, SCALE, ".scale_input"))]
    if old:
        raise CheckpointError(path, f"{old[0]} belongs to the older scaled_fp8 convention, but the file also lists "
                                    f"its quantized layers the mixed-precision way ({QUANT_METADATA_KEY} / "
                                    f"{LAYER_SUFFIX}). It mixes two formats; convert it again.")
    float8: dict[str, torch.dtype] = {}
    grans: dict[str, str] = {}
    inputs: list[str] = []
    for name, layer in layers.items():
        w = sources[name + ".weight"]
        want = WEIGHT_DTYPES[layer.format]
        if w.dtype != want or len(w.shape) != 2:
            raise CheckpointError(path, f"{name}.weight is {_describe(w)}, but {layer.origin} lists {name} as "
                                        f"{layer.format}, whose weight is a 2-D {_dtype_name(want)} tensor. The file "
                                        "is corrupt or its quantization metadata belongs to other tensors.")
        scale = sources.get(name + WEIGHT_SCALE)
        if scale is None:
            raise CheckpointError(path, f"{layer.origin} lists {name} as {layer.format}, but the file has no "
                                        f"{name}{WEIGHT_SCALE}. The file is incomplete or corrupt.")
        if scale.dtype not in SCALE_DTYPES:
            raise CheckpointError(path, f"{name}{WEIGHT_SCALE} is {_dtype_name(scale.dtype)}; a weight scale is "
                                        f"{'/'.join(map(_dtype_name, SCALE_DTYPES))} (an integer scale would multiply "
                                        "the layer by its raw bits). The file is corrupt.")
        g = _granularity(tuple(scale.shape), tuple(w.shape))
        if g is None:
            raise CheckpointError(path, f"{name}{WEIGHT_SCALE} has shape {list(scale.shape)}; a scale is a scalar or "
                                        f"one value per output row of {name}.weight {list(w.shape)}. The file is "
                                        "corrupt.")
        grans[name] = g
        static = sources.get(name + INPUT_SCALE)
        if static is not None:
            if layer.format not in FLOAT8_FORMATS:
                raise CheckpointError(path, f"{name}{INPUT_SCALE}: {layer.format} layers have no static input scale "
                                            "(activations are scaled per row at run time). The file is corrupt.")
            if static.dtype not in SCALE_DTYPES or math.prod(static.shape) != 1 or len(static.shape) > 1:
                raise CheckpointError(path, f"{name}{INPUT_SCALE} is {_describe(static)}; an input scale is one "
                                            f"{'/'.join(map(_dtype_name, SCALE_DTYPES))} value. The file is corrupt.")
            inputs.append(name)
        if layer.format in FLOAT8_FORMATS:
            float8[name] = want
    for key, s in sources.items():
        owner = _layer_of(key, (WEIGHT_SCALE, INPUT_SCALE))
        if owner is not None and owner not in layers:
            raise CheckpointError(path, f"{key} belongs to layer {owner}, which {QUANT_METADATA_KEY} / "
                                        f"{LAYER_SUFFIX} does not list. The file is corrupt or its quantization "
                                        "metadata is incomplete.")
        listed = key.endswith(".weight") and key[: -len(".weight")] in layers
        stored_quantized = s.dtype in FP8_DTYPES or (key.endswith(".weight") and not s.dtype.is_floating_point)
        if owner is None and not key.endswith(LAYER_SUFFIX) and not listed and stored_quantized:
            raise CheckpointError(path, f"{key} is {_dtype_name(s.dtype)} but its layer is not listed in "
                                        f"{QUANT_METADATA_KEY} / {LAYER_SUFFIX}: without an entry a reader takes the "
                                        "raw values unscaled. The file is corrupt or its quantization metadata is "
                                        "incomplete.")
    if len(set(float8.values())) > 1:
        raise CheckpointError(path, "unknown FP8 layout: the file mixes float8_e4m3fn and float8_e5m2 layers.")
    if read_values:
        check_scale_values({n + WEIGHT_SCALE: sources[n + WEIGHT_SCALE] for n in layers}, path)
        for name in inputs:
            t = sources[name + INPUT_SCALE].load().float()
            if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                raise CheckpointError(path, f"{name}{INPUT_SCALE} holds {t.reshape(-1)[0].item():g}; an input scale "
                                            "is finite and > 0. The file is corrupt.")
    out: dict[str, TensorSource] = {}
    for key, s in sources.items():
        if key.endswith(LAYER_SUFFIX):
            continue
        owner = _layer_of(key, (WEIGHT_SCALE,))
        if owner is not None:
            if owner in float8:
                out[owner + SCALE] = s
            continue  # an int8 layer's scale is folded into its weight below
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        if name in layers and name not in float8:
            out[key] = _dequantised(s, sources[name + WEIGHT_SCALE], torch.float32)
        else:
            out[key] = s
    if not layers:
        return out, None
    counts = {f: sum(1 for x in layers.values() if x.format == f) for f in WEIGHT_DTYPES}
    gran_set = {g for n, g in grans.items() if n in float8} or set(grans.values())
    granularity = gran_set.pop() if len(gran_set) == 1 else "mixed"
    gran_meta = metadata.get(GRANULARITY_KEY)
    if gran_meta is not None and gran_meta != granularity:
        raise CheckpointError(path, f"header metadata {GRANULARITY_KEY}={gran_meta!r}, but the scales are "
                                    f"{granularity}; the header metadata is corrupt — re-convert the file.")
    if metadata.get(FORMAT_KEY) is not None and not float8:
        raise CheckpointError(path, f"header metadata {FORMAT_KEY} says FP8, but the file lists no float8 layers; "
                              "the header metadata is corrupt — re-convert the file or remove the metadata.")
    origin = ORIGIN_HEADER if any(x.origin == QUANT_METADATA_KEY for x in layers.values()) else ORIGIN_TENSORS
    name = "ovi-comfy-quant" if metadata.get(FORMAT_KEY) == FORMAT_FP8 else "comfy-quant"
    weight_dtype = next(iter(float8.values())) if float8 else torch.int8
    return out, Fp8Layout(name, weight_dtype, granularity, len(float8), metadata.get(SOURCE_KEY), origin,
                          tuple((f, n) for f, n in counts.items() if n), len(inputs))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(s: TensorSource) -> str:
    return f"{_dtype_name(s.dtype)} {list(s.shape)}"


def _check_scale_tensors(sources: Mapping[str, TensorSource], plain: Mapping[str, TensorSource],
                         named: Mapping[str, str], path) -> None:
    """From the header alone: every scale (weight scales and the ignored input scales) is a float tensor, and a
    weight scale sits beside an FP8 weight."""
    for k, s in sources.items():
        if k.endswith(_IGNORED_SUFFIXES) and s.dtype not in SCALE_DTYPES:
            raise CheckpointError(path, f"{k} is {_dtype_name(s.dtype)}; a scale is "
                                        f"{'/'.join(map(_dtype_name, SCALE_DTYPES))}. The file is corrupt.")
    for k, s in plain.items():
        if not k.endswith(SCALE):
            continue
        if s.dtype not in SCALE_DTYPES:
            raise CheckpointError(path, f"{named.get(k, k)} is {_dtype_name(s.dtype)}; a weight scale is "
                                        f"{'/'.join(map(_dtype_name, SCALE_DTYPES))} (an integer scale would "
                                        "multiply the layer by its raw bits). The file is corrupt.")
        w = plain.get(k[: -len(SCALE)] + ".weight")
        if w is not None and w.dtype not in FP8_DTYPES:
            raise CheckpointError(path, f"{k[: -len(SCALE)]}.weight is {_dtype_name(w.dtype)}, but has a scale "
                                        f"{named.get(k, k)} beside it: in a scaled FP8 file a scaled weight is FP8. "
                                        "The file is corrupt or mixes two formats.")


def check_scale_values(sources: Mapping[str, TensorSource], path) -> None:
    """Raise ``CheckpointError`` naming the first weight scale (``scale_weight`` / ``weight_scale``) of a file's
    ``sources`` that is not finite and > 0. Reads the scales (a few kB to a few MB in all); ``detect_fp8_layout``
    has checked their dtypes and shapes from the header."""
    for k, s in sources.items():
        if not (k.endswith(SCALE) or _scale_key(k)):
            continue
        t = s.load()
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = t[~finite].reshape(-1)[0].item()
            raise CheckpointError(path, f"{k} holds {bad:g}; a weight scale is finite and > 0. The file is corrupt.")
        if not bool((t > 0).all()):
            bad = t[t <= 0].reshape(-1)[0].item()
            raise CheckpointError(path, f"{k} holds {bad:g}; a weight scale is finite and > 0 (zero "
                                        "erases the layer, a negative one flips it). The file is corrupt.")


def _scalar_or_rows(scale: torch.Tensor, gran: str) -> torch.Tensor:
    s = scale.to(torch.float32)
    return s.reshape(()) if gran == "tensor" else s.reshape(-1, 1)


def effective_weight(w: torch.Tensor, scale: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w * scale`` in ``dtype`` (a per-row scale may be stored [out] as well as [out, 1])."""
    if scale is not None and scale.numel() > 1:
        scale = scale.reshape(-1, *[1] * (w.ndim - 1))
    return dequantise_fp8(w, scale, dtype)


def _dequantised(s: TensorSource, scale: TensorSource | None, dtype: torch.dtype) -> DerivedSource:
    inputs = (s,) if scale is None else (s, scale)
    return DerivedSource(inputs, lambda w, sc=None: effective_weight(w, sc, dtype), tuple(s.shape), dtype)


def dequantised_sources(sources: Mapping[str, TensorSource], dtype: torch.dtype = torch.float32
                        ) -> tuple[dict[str, TensorSource], int]:
    """(sources with every FP8 tensor, and every weight that has a ``<layer>.scale_weight``, replaced by its
    effective value in ``dtype``, the scales dropped; how many were replaced). Each is computed when loaded, so
    a converter still holds one tensor at a time."""
    out: dict[str, TensorSource] = {}
    for key, s in sources.items():
        if key.endswith((SCALE, INPUT_SCALE)):  # static input scales mean nothing once the weights are dequantised
            continue
        scale = sources.get(key[: -len(".weight")] + SCALE) if key.endswith(".weight") else None
        out[key] = _dequantised(s, scale, dtype) if s.dtype in FP8_DTYPES or scale is not None else s
    return out, sum(1 for k, s in out.items() if s is not sources[k])


def prepare_fp8_model(model: nn.Module, sources: Mapping[str, TensorSource], path) -> tuple[dict[str, TensorSource], int]:
    """Swap every ``nn.Linear`` of ``model`` (built on meta) whose weight is FP8 in ``sources`` for an
    ``FP8Linear`` with the file's scale granularity; any other FP8 tensor (or scaled non-FP8 weight) is
    dequantised at load. ``sources``: in ``fp8_file_sources``' form, so a ``<layer>.input_scale`` left in them is
    a comfy-quant static activation scale, which the layer keeps. Returns the sources keyed for the changed model
    and the number of FP8 linears."""
    src = dict(sources)
    owners = dict(model.named_modules())
    out: dict[str, TensorSource] = {}
    count = 0
    consumed: set[str] = set()
    for key, s in src.items():
        if key.endswith((SCALE, INPUT_SCALE)):
            continue
        module_name, _, leaf = key.rpartition(".")
        scale = src.get(module_name + SCALE) if leaf == "weight" else None
        if scale is not None:
            consumed.add(module_name + SCALE)
        static = src.get(module_name + INPUT_SCALE) if leaf == "weight" else None
        if static is not None:
            consumed.add(module_name + INPUT_SCALE)
        module = owners.get(module_name)
        if s.dtype in FP8_DTYPES and leaf == "weight" and isinstance(module, nn.Linear) and len(s.shape) == 2:
            gran = "tensor" if scale is None else _granularity(tuple(scale.shape), tuple(s.shape))
            if gran is None:
                raise CheckpointError(path, f"unknown FP8 layout: {module_name}{SCALE} has shape {list(scale.shape)}.")
            with meta_device():
                fp8 = FP8Linear(module.in_features, module.out_features, module.bias is not None, gran, s.dtype,
                                static_input_scale=static is not None)
            if static is not None:
                out[module_name + INPUT_SCALE] = DerivedSource((static,), lambda t: t.to(torch.float32).reshape(()),
                                                               (), torch.float32)
            parent, _, child = module_name.rpartition(".")
            setattr(owners[parent] if parent else model, child, fp8)
            owners[module_name] = fp8
            out[key] = s
            shape = () if gran == "tensor" else (module.out_features, 1)
            out[module_name + SCALE] = (
                DerivedSource((), lambda: torch.ones((), dtype=torch.float32), shape, torch.float32) if scale is None
                else DerivedSource((scale,), lambda t, g=gran: _scalar_or_rows(t, g), shape, torch.float32))
            count += 1
        elif s.dtype in FP8_DTYPES or scale is not None:
            out[key] = _dequantised(s, scale, torch.float32)
        else:
            out[key] = s
    stray = [k for k in src if k.endswith((SCALE, INPUT_SCALE)) and k not in consumed]
    if stray:
        raise CheckpointError(path, f"unknown FP8 layout: {len(stray)} scale tensors have no matching weight (first: "
                                    f"{stray[0]}).")
    log.debug("fp8: %d linear layers keep FP8 weights", count)
    return out, count


def keeps_stored_dtype(name: str, t: torch.Tensor) -> bool:
    """For the loader: FP8 weights and their float32 weight/input scales keep the dtype they were prepared in."""
    return t.dtype in FP8_DTYPES or name.endswith((SCALE, INPUT_SCALE))


# Which weights the converter quantises: the 2-D linears of every block (attention, fusion k/v, FFN).
QUANTISED_RE = re.compile(r"(?:^|\.)blocks\.\d+\.(?:(?:self_attn|cross_attn)\.(?:q|k|v|o|k_fusion|v_fusion)|ffn\.(?:0|2))"
                          r"\.weight$")


def is_quantised_key(key: str) -> bool:
    return QUANTISED_RE.search(key) is not None
