"""Load GGUF fusion models and umT5 encoders, keeping quantised weights quantised until the layer runs.

A quantised Linear weight becomes a ``GGUFLinear``: its ``weight`` buffer is the plain uint8 block bytes
(``[rows, row_bytes]``) and ``gguf`` (a ``GGUFWeight``) says how to read them; each forward dequantises on
the device the bytes are on, in torch. Because the bytes are an ordinary buffer, ``.to(device)`` and block
swap move them like any other tensor. A quantised token embedding becomes a ``GGUFEmbedding`` that
dequantises only the rows it looks up. Everything else (norms, biases, small or high-precision tensors, and
quantised tensors of layers that are not Linear) is dequantised once at load time to the target dtype.

Files: ours (architecture ``ovi`` with the official fusion keys, ``t5encoder`` with llama.cpp T5 names), the
published umt5-xxl-encoder GGUF files (llama.cpp T5 names), and GGUF files keeping the official / ComfyUI
umT5 names. Shapes changed for storage are restored from ``comfy.gguf.orig_shape.<name>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..fusion.config import FusionConfig
from ..fusion.metadata import check_config_matches_shapes, config_from_metadata
from ..fusion.model import FusionModel
from ..loading import VARIANT_METADATA_KEY, CheckpointError, TensorSource, check_keys, meta_device
from ..log import log
from ..text.names import LLAMA_CPP
from ..text.umt5 import UMT5Config, UMT5Encoder
from .gguf_dequant import PLAIN, READABLE, Q, dequantize
from .gguf_header import TensorInfo, orig_shape, read_header, show

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
FUSION_ARCH = "ovi"
T5_ARCH = "t5encoder"
_T5_ARCHS = ("t5encoder", "t5", "umt5")
_FUSION_ARCHS = ("ovi", "wan")  # "wan": files made with generic Wan tooling that kept Ovi's keys

# our official umT5 keys <-> llama.cpp's T5 encoder names (the published umt5-xxl-encoder GGUF files)
llama_t5_name = LLAMA_CPP.from_official
official_t5_name = LLAMA_CPP.to_official


# -- quantised modules -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFWeight:
    """How to read a quantised weight's bytes: the GGUF type and the logical shape."""

    qtype: Q
    shape: tuple[int, ...]

    def dequantize(self, raw: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(raw, self.qtype, self.shape, dtype)

    def __str__(self) -> str:
        return f"{self.qtype.name}{list(self.shape)}"


class GGUFLinear(nn.Module):
    """``nn.Linear`` whose weight stays as GGUF blocks (uint8 buffer ``weight``), dequantised per forward on
    the weight's device in the input's dtype."""

    def __init__(self, raw: torch.Tensor, gguf: GGUFWeight, bias: torch.Tensor | None):
        super().__init__()
        self.gguf = gguf
        self.out_features, self.in_features = gguf.shape
        self.register_buffer("weight", raw)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gguf.dequantize(self.weight, x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.gguf.qtype.name}"


class GGUFEmbedding(nn.Module):
    """``nn.Embedding`` over GGUF blocks: only the looked-up rows are dequantised (rows are whole blocks)."""

    def __init__(self, raw: torch.Tensor, gguf: GGUFWeight, dtype: torch.dtype):
        super().__init__()
        self.gguf = gguf
        self.num_embeddings, self.embedding_dim = gguf.shape
        self.dtype = dtype
        self.register_buffer("weight", raw)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids.reshape(-1).to(self.weight.device)]
        out = dequantize(rows, self.gguf.qtype, (rows.shape[0], self.embedding_dim), self.dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.gguf.qtype.name}"


# -- reading ---------------------------------------------------------------------------------------------

class GGUFSource(TensorSource):
    """One tensor of an open GGUF file (its layout validated by ``gguf_header``); ``load`` gives dense
    float32, ``raw`` the block bytes."""

    def __init__(self, info: TensorInfo, shape: tuple[int, ...], data: np.ndarray):
        self.info = info
        self.qtype = info.qtype
        self.shape = shape
        self.dtype = PLAIN.get(self.qtype, torch.uint8)
        self._data = data  # the whole file, a read-only uint8 memory map

    @property
    def quantized(self) -> bool:
        return self.qtype not in PLAIN

    def raw(self) -> torch.Tensor:
        """The bytes as a [rows, row_bytes] uint8 tensor (a copy: the file mapping is read-only)."""
        i = self.info
        data = self._data[i.offset:i.end].reshape(-1, i.row_bytes)
        return torch.from_numpy(np.array(data, copy=True))

    def load(self) -> torch.Tensor:
        return dequantize(self.raw(), self.qtype, self.shape)


def _kept_metadata(key: str) -> bool:
    return key.startswith(("general.", "ovi.", ORIG_SHAPE_KEY))


class GGUFFile:
    """An open GGUF file: architecture, string metadata and ``{name: GGUFSource}`` with logical shapes.

    The header is parsed and validated by ``gguf_header.read_header`` (every count, length, type, dim and
    offset checked against the file before use); tensors are read through one read-only memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header = read_header(self.path, keep=_kept_metadata)
        unreadable = next((t for t in self.header.tensors.values() if t.qtype not in READABLE), None)
        if unreadable is not None:
            raise CheckpointError(self.path, f"tensor {show(unreadable.name)} is stored as {unreadable.qtype.name}, "
                                             f"which this loader does not read (it reads "
                                             f"{', '.join(q.name for q in READABLE)}). Convert the model to one "
                                             "of those types.")
        self.architecture = self.header.string("general.architecture") or ""
        self.metadata: dict[str, object] = {k: kv.value for k, kv in self.header.fields.items()
                                            if k.startswith(("general.", "ovi."))}
        self.sources: dict[str, GGUFSource] = {}
        if not self.header.tensors:
            return
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        for t in self.header.tensors.values():
            shape = orig_shape(self.header, ORIG_SHAPE_KEY + t.name, t) or t.shape
            self.sources[t.name] = GGUFSource(t, shape, data)


def _replace_module(owners: dict[str, nn.Module], name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(owners[parent], child, new)


def _fill(model: nn.Module, sources: Mapping[str, GGUFSource], *, path, component: str, device, dtype,
          embeddings: bool = False) -> tuple[int, int]:
    """Fill a meta-built ``model`` from GGUF sources keyed by its own names; returns (quantised kept, dense)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    check_keys(component, path, expected, sources)
    owners = dict(model.named_modules())
    kept, done = 0, set()
    for name, src in sources.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = owners.get(owner_name)
        if not src.quantized or leaf != "weight" or len(src.shape) != 2:
            continue
        info = GGUFWeight(src.qtype, src.shape)
        if isinstance(owner, nn.Linear):
            bias_src = sources.get(owner_name + ".bias")
            bias = bias_src.load().to(device=device, dtype=dtype) if bias_src is not None else None
            _replace_module(owners, owner_name, GGUFLinear(src.raw().to(device), info, bias))
            done.update({name, owner_name + ".bias"})
        elif isinstance(owner, nn.Embedding) and embeddings:
            _replace_module(owners, owner_name, GGUFEmbedding(src.raw().to(device), info, dtype))
            done.add(name)
        else:
            continue
        kept += 1
    owners = dict(model.named_modules())
    dense = 0
    for name, src in sources.items():
        if name in done:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = owners[owner_name]
        t = src.load().to(device=device, dtype=dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t
        dense += 1
    left = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta]
    if left:
        raise CheckpointError(path, f"{len(left)} tensors were not filled (first: {', '.join(left[:3])}).")
    return kept, dense


def _check_arch(f: GGUFFile, allowed: tuple[str, ...], wanted: str) -> None:
    arch = f.architecture
    if arch in allowed:
        return
    if arch in _T5_ARCHS:
        what = "a T5 / umT5 text encoder"
    elif arch in _FUSION_ARCHS:
        what = "an Ovi fusion model (twin video/audio backbone)"
    else:
        what = f"a model of architecture {arch!r}" if arch else "a GGUF file without a general.architecture"
    raise CheckpointError(f.path, f"this GGUF file holds {what}, not {wanted}: the wrong file was given to this "
                                  "loader. Pick the right file.")


# -- fusion -----------------------------------------------------------------------------------------------

def _fusion_sources(f: GGUFFile) -> dict[str, GGUFSource]:
    sources = f.sources
    if any(k.startswith("video_model.") for k in sources):
        return sources
    for k in sources:  # a wrapper prefix such as model.diffusion_model.
        i = k.find("video_model.")
        if i > 0:
            wrap = k[:i]
            if all(key.startswith(wrap) for key in sources):
                return {key[len(wrap):]: s for key, s in sources.items()}
    first = ", ".join(list(sources)[:3]) or "no tensors"
    raise CheckpointError(f.path, f"not an Ovi fusion model: no video_model./audio_model. tensors (first: {first}). "
                                  "Split video/audio branch GGUF files are not supported; convert the whole model.")


def load_fusion_gguf(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.bfloat16, config: FusionConfig | None = None) -> FusionModel:
    """The fusion model from a GGUF file; quantised Linear weights stay quantised (``GGUFLinear``) on ``device``
    and compute in ``dtype``."""
    f = GGUFFile(path)
    _check_arch(f, _FUSION_ARCHS, "an Ovi fusion model")
    sources = _fusion_sources(f)
    if config is None:
        shapes = {k: s.shape for k, s in sources.items()}
        # a recorded config is checked as such (its error names the field, not missing tensors)
        config = config_from_metadata(f.metadata, f.path)
        if config is not None:
            check_config_matches_shapes(config, shapes, f.path)
        else:
            try:
                config = FusionConfig.from_shapes(shapes)
            except (KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f.path, f"cannot infer the fusion model configuration: {e}. Likely cause: "
                                              "tensors are missing (a partial file).") from e
    with meta_device():
        model = FusionModel(config)
    kept, dense = _fill(model, sources, path=f.path, component="fusion", device=device, dtype=dtype)
    model.compute_dtype = dtype
    model.eval().requires_grad_(False)
    types = sorted({s.qtype.name for s in sources.values() if s.quantized})
    log.info("fusion model loaded from %s: GGUF %s, %d layers, dim %d, %d Linear weights kept quantised, %d tensors "
             "dense, computing in %s on %s%s", f.path, "/".join(types) or "unquantised", config.num_layers,
             config.video.dim, kept, dense, str(dtype).replace("torch.", ""), device,
             f" (variant {f.metadata[VARIANT_METADATA_KEY]})" if f.metadata.get(VARIANT_METADATA_KEY) else "")
    return model


# -- umT5 -------------------------------------------------------------------------------------------------

_NOT_ENCODER = ("encoder.embed_tokens.weight", "spiece_model")  # tied embeddings, an embedded tokenizer


def _not_encoder(key: str) -> bool:
    """A decoder (full T5 files), tied-embedding or tokenizer tensor: not an encoder weight, skipped."""
    return key.startswith("dec.") or key in _NOT_ENCODER


def official_t5_names(path, keys) -> dict[str, str]:
    """{llama.cpp T5 name: official key} for ``keys`` of a file in llama.cpp's T5 names; the tensors that are
    not encoder weights keep their names. ``CheckpointError`` naming the first name outside the convention."""
    out = {}
    for k in keys:
        if _not_encoder(k):
            out[k] = k
            continue
        try:
            out[k] = official_t5_name(k)
        except KeyError:
            raise CheckpointError(path, f"tensor {show(k)} is not a umT5 encoder tensor in llama.cpp's T5 names, "
                                        "which the other tensors of this file use (token_embd.weight, "
                                        "enc.blk.N.attn_q.weight ... ffn_down.weight, enc.output_norm.weight). "
                                        "Likely cause: a damaged header or a file of another model; fetch or "
                                        "convert the file again.") from None
    return out


def _umt5_sources(f: GGUFFile) -> tuple[str, dict[str, GGUFSource]]:
    from ..text.checkpoint import official_key

    keys = set(f.sources)
    if "token_embd.weight" in keys or any(k.startswith("enc.blk.") for k in keys):
        names = official_t5_names(f.path, f.sources)
        return "llama.cpp T5 names", {names[k]: s for k, s in f.sources.items() if not _not_encoder(k)}
    if "token_embedding.weight" in keys:
        layout, rename = "official names", (lambda k: k)
    else:
        layout, rename = "ComfyUI / transformers names", official_key
    out: dict[str, GGUFSource] = {}
    for k, s in f.sources.items():
        if _not_encoder(k):
            continue
        try:
            out[rename(k)] = s
        except KeyError:
            out[k] = s  # reported as unexpected by check_keys
    return layout, out


def load_umt5_gguf(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.bfloat16, config: UMT5Config | None = None) -> UMT5Encoder:
    """The umT5 encoder from a GGUF file (ours, or a published umt5-xxl-encoder GGUF); quantised Linear
    and embedding weights stay quantised on ``device``."""
    from ..text.checkpoint import _check_v11

    f = GGUFFile(path)
    _check_arch(f, _T5_ARCHS, "a umT5 text encoder")
    layout, sources = _umt5_sources(f)
    shapes = {k: s.shape for k, s in sources.items()}
    _check_v11(f.path, shapes)
    if config is None:
        try:
            config = UMT5Config.from_shapes(shapes)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f.path, f"cannot infer the umT5 configuration: {e}") from e
    with meta_device():
        model = UMT5Encoder(config)
    kept, dense = _fill(model, sources, path=f.path, component="umt5", device=device, dtype=dtype, embeddings=True)
    log.info("umT5 encoder loaded from %s: GGUF (%s), %d layers, dim %d, %d weights kept quantised, %d dense, %s on %s",
             f.path, layout, config.num_layers, config.dim, kept, dense, str(dtype).replace("torch.", ""), device)
    return model.eval().requires_grad_(False)
