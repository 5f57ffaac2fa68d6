"""The optimum-quanto int8 layout of Wan2GP's ``*_quanto_bf16_int8.safetensors`` files, read into ``Int8Linear``.

mmgp (Wan2GP's offload library) saves a quanto-quantised module's state dict as is. Per quantised Linear:

* ``<layer>.weight._data``: int8 ``[out, in]``, ``round(w / scale)``;
* ``<layer>.weight._scale``: the weight's float dtype (bf16 in these files), ``[out, 1]``, per-row absmax / 127;
* ``<layer>.input_scale`` / ``<layer>.output_scale``: 0-dim buffers, unused without activation quantisation;
* ``<layer>.bias`` unchanged.

The header metadata says which layers are quantised: ``quantization_format = "quanto"`` and
``quantization_map_base64``, base64 of the JSON ``{"<layer>": {"weights": "qint8", "activations": "none"}}``.
Layers outside the map are stored (and load) as ordinary float tensors. Effective weight = ``_data * _scale``.

Only qint8 weights without activation quantisation are read; everything the layout does not allow (a ``_data``
that is not int8 or not 2-D, a scale that is not float, of the wrong shape, non-finite or <= 0, a ``_data``
without its ``_scale`` or the reverse, a map entry for a layer the file does not hold, another qtype, a
malformed map) is a ``CheckpointError`` naming the file and the key. The header is checked by
``detect_quanto_layout``, the scale values (read) by ``check_quanto_scale_values``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..loading import CheckpointError, DerivedSource, TensorSource, meta_device
from ..log import log
from .int8 import SCALE, Int8Linear, dequantise_int8

FORMAT_KEY = "quantization_format"
FORMAT = "quanto"
MAP_KEY = "quantization_map_base64"
DATA = ".weight._data"
WEIGHT_SCALE = ".weight._scale"
BUFFERS = (".input_scale", ".output_scale")  # quanto's activation scales, 1.0 and unused for weight-only quantisation
WEIGHT_QTYPE = "qint8"
NO_QTYPE = "none"
# Scale dtypes quanto can have written: the weight's own float dtype at quantisation time.
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_LISTED = 3  # keys named in a message


@dataclass(frozen=True)
class QuantoLayout:
    """What one quanto file holds: its qint8 layers (file names, without ``.weight``) and their scale dtype."""

    int8_layers: tuple[str, ...]
    scale_dtype: torch.dtype | None
    unquantised_entries: int = 0  # map entries with weights "none": stored as floats

    def summary(self) -> str:
        dt = str(self.scale_dtype).removeprefix("torch.") if self.scale_dtype is not None else "-"
        return (f"qint8 weights, per-output-channel {dt} scales (optimum-quanto layout, Wan2GP/mmgp), "
                f"{len(self.int8_layers)} linear layers")


def looks_quanto(keys, metadata: Mapping[str, str]) -> bool:
    """Whether a file is in the quanto layout at all (its header metadata or its key suffixes say so)."""
    return (FORMAT_KEY in metadata or MAP_KEY in metadata
            or any(k.endswith((DATA, WEIGHT_SCALE)) for k in keys))


def read_quantization_map(metadata: Mapping[str, str], path) -> dict[str, tuple[str, str]]:
    """{layer: (weight qtype, activation qtype)} from ``quantization_map_base64``; ``CheckpointError`` for a
    missing or malformed map (bad base64, not UTF-8, not JSON, not the quanto shape)."""
    raw = metadata.get(MAP_KEY)
    if raw is None:
        raise CheckpointError(path, f"the file is in the optimum-quanto layout but its header metadata has no "
                                    f"{MAP_KEY} (the map of quantised layers). The file is incomplete or was not "
                                    "written by mmgp / Wan2GP; fetch it again.")
    try:
        text = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as e:
        raise CheckpointError(path, f"header metadata {MAP_KEY} is not valid base64 of UTF-8 text ({e}). The "
                                    "header is corrupt; fetch the file again.") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"header metadata {MAP_KEY} does not decode to JSON ({e.msg} at character "
                                    f"{e.pos}). The header is corrupt; fetch the file again.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"header metadata {MAP_KEY} decodes to a JSON {type(obj).__name__}; the quanto "
                                    'map is an object {"<layer>": {"weights": "qint8", "activations": "none"}}.')
    out: dict[str, tuple[str, str]] = {}
    for layer, entry in obj.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("weights"), str)
                and isinstance(entry.get("activations", NO_QTYPE), str)):
            raise CheckpointError(path, f"header metadata {MAP_KEY}: the entry for {layer!r} is "
                                        f"{json.dumps(entry)[:80]}; an entry is "
                                        '{"weights": "<qtype>", "activations": "<qtype>"}.')
        out[layer] = (entry["weights"], entry.get("activations", NO_QTYPE))
    return out


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _scale_shape_ok(scale_shape: tuple[int, ...], out: int) -> bool:
    """quanto's per-row ``[out, 1]`` (``[out]`` accepted too), or one scale for the whole weight."""
    return tuple(scale_shape) in ((out, 1), (out,)) or (_numel(scale_shape) == 1 and len(scale_shape) <= 2)


def detect_quanto_layout(sources: Mapping[str, TensorSource], metadata: Mapping[str, str],
                         path) -> QuantoLayout | None:
    """The quanto layout of one file's tensors, checked from the header alone; None when the file is not in it.
    ``sources``: the file's keys as stored (``.weight._data`` etc.)."""
    if not looks_quanto(sources, metadata):
        return None
    fmt = metadata.get(FORMAT_KEY)
    if fmt is not None and fmt != FORMAT:
        raise CheckpointError(path, f"header metadata {FORMAT_KEY}={fmt!r}: this loader reads the {FORMAT!r} "
                                    "(optimum-quanto) layout only.")
    qmap = read_quantization_map(metadata, path)
    int8_layers: list[str] = []
    unquantised = 0
    for layer, (wq, aq) in qmap.items():
        if aq != NO_QTYPE:
            raise CheckpointError(path, f"quantization map entry {layer!r} quantises activations ({aq}); only "
                                        f"weight-only {WEIGHT_QTYPE} files (activations \"none\") are supported.")
        if wq == NO_QTYPE:
            if layer + ".weight" not in sources:
                raise CheckpointError(path, f"quantization map entry {layer!r} names a layer the file does not hold "
                                            f"(no {layer}.weight). The map and the tensors disagree; the file is "
                                            "damaged.")
            unquantised += 1
            continue
        if wq != WEIGHT_QTYPE:
            raise CheckpointError(path, f"quantization map entry {layer!r} has weights {wq!r}; only {WEIGHT_QTYPE} "
                                        "weights are supported (Wan2GP's *_quanto_bf16_int8 files). Use the bf16 "
                                        "files for other quantisations.")
        if layer + DATA not in sources:
            raise CheckpointError(path, f"quantization map entry {layer!r} names a layer the file does not hold "
                                        f"(no {layer}{DATA}). The map and the tensors disagree; the file is damaged.")
        int8_layers.append(layer)
    listed = set(int8_layers)
    scale_dtypes = set()
    for key, s in sources.items():
        if key.endswith(DATA):
            layer = key[: -len(DATA)]
            if layer not in listed:
                raise CheckpointError(path, f"{key} is quantised, but {layer!r} is not a {WEIGHT_QTYPE} entry of the "
                                            f"quantization map ({MAP_KEY}). The file is damaged.")
            if s.dtype != torch.int8:
                raise CheckpointError(path, f"{key} is {_name(s.dtype)} {list(s.shape)}; quanto {WEIGHT_QTYPE} data is "
                                            "int8. The file is corrupt.")
            if len(s.shape) != 2:
                raise CheckpointError(path, f"{key} has shape {list(s.shape)}; only Linear weights [out, in] are "
                                            "read as int8.")
            if layer + ".weight" in sources:
                raise CheckpointError(path, f"{layer} has both a plain .weight and {DATA}; the file mixes two "
                                            "layouts and is damaged.")
            sk = layer + WEIGHT_SCALE
            sc = sources.get(sk)
            if sc is None:
                raise CheckpointError(path, f"{key} has no {sk} beside it: int8 data without its scale cannot be "
                                            "read. The file is incomplete.")
            if sc.dtype not in SCALE_DTYPES:
                raise CheckpointError(path, f"{sk} is {_name(sc.dtype)}; a weight scale is "
                                            f"{'/'.join(map(_name, SCALE_DTYPES))}. The file is corrupt.")
            if not _scale_shape_ok(tuple(sc.shape), s.shape[0]):
                raise CheckpointError(path, f"{sk} has shape {list(sc.shape)}; the scale of {key} {list(s.shape)} is "
                                            f"one per output row, [{s.shape[0]}, 1]. The file is corrupt.")
            scale_dtypes.add(sc.dtype)
        elif key.endswith(WEIGHT_SCALE) and key[: -len(WEIGHT_SCALE)] + DATA not in sources:
            raise CheckpointError(path, f"{key} is a scale without its {key[: -len(WEIGHT_SCALE)]}{DATA}. The file "
                                        "is incomplete.")
        elif key.endswith(BUFFERS):
            if not s.dtype.is_floating_point or _numel(s.shape) != 1:
                raise CheckpointError(path, f"{key} is {_name(s.dtype)} {list(s.shape)}; quanto's activation scale "
                                            "is one float. The file is corrupt.")
    dtype = next(iter(scale_dtypes)) if len(scale_dtypes) == 1 else (torch.float32 if scale_dtypes else None)
    return QuantoLayout(tuple(int8_layers), dtype, unquantised)


def check_quanto_scale_values(sources: Mapping[str, TensorSource], layout: QuantoLayout, path) -> None:
    """Raise ``CheckpointError`` naming the first weight scale that is not finite and > 0 (reads the scales:
    a few MB for a full-size branch)."""
    for layer in layout.int8_layers:
        key = layer + WEIGHT_SCALE
        t = sources[key].load().to(torch.float32)
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            raise CheckpointError(path, f"{key} holds {t[~finite].reshape(-1)[0].item():g}; a weight scale is "
                                        "finite and > 0. The file is corrupt.")
        if not bool((t > 0).all()):
            raise CheckpointError(path, f"{key} holds {t[t <= 0].reshape(-1)[0].item():g}; a weight scale is "
                                        "finite and > 0 (zero erases the layer, a negative one flips it). The file "
                                        "is corrupt.")


def _rows(t: torch.Tensor, out: int) -> torch.Tensor:
    return t.to(torch.float32).reshape(-1, 1).expand(out, 1).contiguous()


def model_sources(sources: Mapping[str, TensorSource]) -> dict[str, TensorSource]:
    """The file's sources keyed as the model loads them: ``<layer>.weight._data`` -> ``<layer>.weight`` (int8),
    ``<layer>.weight._scale`` -> ``<layer>.scale`` (float32 ``[out, 1]``); quanto's activation scales dropped.
    Call after ``detect_quanto_layout``."""
    out: dict[str, TensorSource] = {}
    for key, s in sources.items():
        if key.endswith(DATA):
            layer = key[: -len(DATA)]
            rows = int(s.shape[0])
            out[layer + ".weight"] = s
            out[f"{layer}.{SCALE}"] = DerivedSource((sources[layer + WEIGHT_SCALE],), lambda t, n=rows: _rows(t, n),
                                                    (rows, 1), torch.float32)
        elif key.endswith(WEIGHT_SCALE) or key.endswith(BUFFERS):
            continue
        else:
            out[key] = s
    return out


def stored_bytes(sources: Mapping[str, TensorSource]) -> dict[str, int]:
    """{key: bytes} of the tensors kept as stored (int8 weights, float32 scales) in ``model_sources`` keys."""
    out = {}
    for key, s in sources.items():
        if s.dtype == torch.int8 and key.endswith(".weight"):
            out[key] = _numel(s.shape)
            out[key[: -len("weight")] + SCALE] = int(s.shape[0]) * 4
    return out


def _scale_key(weight_key: str) -> str:
    return weight_key[: -len("weight")] + SCALE


def dequantised_sources(sources: Mapping[str, TensorSource], dtype: torch.dtype = torch.float32
                        ) -> dict[str, TensorSource]:
    """``model_sources`` with each int8 weight replaced by ``data * scale`` in ``dtype`` (computed when loaded)
    and the scales dropped: what a converter reads."""
    out: dict[str, TensorSource] = {}
    for key, s in sources.items():
        if s.dtype == torch.int8 and key.endswith(".weight") and _scale_key(key) in sources:
            out[key] = DerivedSource((s, sources[_scale_key(key)]),
                                     lambda d, sc: dequantise_int8(d, sc, dtype), tuple(s.shape), dtype)
        elif key.endswith("." + SCALE) and key[: -len(SCALE)] + "weight" in sources and \
                sources[key[: -len(SCALE)] + "weight"].dtype == torch.int8:
            continue
        else:
            out[key] = s
    return out


def prepare_int8_model(model: nn.Module, sources: Mapping[str, TensorSource], path
                       ) -> tuple[dict[str, TensorSource], int]:
    """Swap every ``nn.Linear`` of ``model`` (built on meta) whose weight is int8 in ``sources`` (``model_sources``
    keys) for an ``Int8Linear``; an int8 weight of any other module is dequantised at load. Returns the sources
    keyed for the changed model and the number of int8 linears."""
    owners = dict(model.named_modules())
    out: dict[str, TensorSource] = {}
    count = 0
    for key, s in sources.items():
        module_name, _, leaf = key.rpartition(".")
        if leaf == SCALE and sources.get(module_name + ".weight") is not None and \
                sources[module_name + ".weight"].dtype == torch.int8:
            continue  # placed with its weight below
        if s.dtype != torch.int8 or leaf != "weight":
            out[key] = s
            continue
        scale = sources.get(f"{module_name}.{SCALE}")
        if scale is None:
            raise CheckpointError(path, f"{key} is int8 without a scale; the file is incomplete.")
        module = owners.get(module_name)
        if isinstance(module, nn.Linear) and tuple(s.shape) == (module.out_features, module.in_features):
            with meta_device():
                q = Int8Linear(module.in_features, module.out_features, module.bias is not None)
            parent, _, child = module_name.rpartition(".")
            setattr(owners[parent] if parent else model, child, q)
            owners[module_name] = q
            out[key] = s
            out[f"{module_name}.{SCALE}"] = scale
            count += 1
        else:  # not a Linear here (or a shape the key check will report): an ordinary float tensor
            out[key] = DerivedSource((s, scale), lambda d, sc: dequantise_int8(d, sc, torch.float32),
                                     tuple(s.shape), torch.float32)
    log.debug("quanto int8: %d linear layers keep int8 weights", count)
    return out, count


@dataclass(frozen=True)
class QuantoHeader:
    """What ``ovi info`` and memory planning need of a quanto file, from its header: the layout, the shapes keyed
    as the model loads them, and the bytes kept as stored (int8 weights, float32 scales) under those keys."""

    layout: QuantoLayout
    shapes: dict[str, tuple[int, ...]]
    stored: dict[str, int]


def inspect_header(sources: Mapping[str, TensorSource], metadata: Mapping[str, str], path) -> QuantoHeader | None:
    """``QuantoHeader`` of a file in the quanto layout (checked as ``detect_quanto_layout`` does), else None."""
    layout = detect_quanto_layout(sources, metadata, path)
    if layout is None:
        return None
    model = model_sources(sources)
    return QuantoHeader(layout, {k: tuple(s.shape) for k, s in model.items()}, stored_bytes(model))
