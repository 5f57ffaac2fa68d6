"""Load the umT5 encoder and its tokenizer from any of the layouts users have.

* official ``models_t5_umt5-xxl-enc-bf16.pth``: a torch state dict with the module's own names;
* ComfyUI / Comfy-Org ``umt5_xxl_fp16.safetensors`` (also transformers' ``UMT5EncoderModel`` names):
  ``shared.weight``, ``encoder.block.i.layer.*``, ``encoder.final_layer_norm.weight``, plus a ``spiece_model``
  uint8 tensor holding the tokenizer;
* ComfyUI scaled fp8 ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``: the same names, a ``scaled_fp8`` marker,
  fp8 Linear weights each with a float32 ``<linear>.scale_weight`` (effective weight = weight * scale).

The layout is recognised from the keys, never from the file name. Renames and fp8 dequantisation are
``TensorSource`` mappings, so every tensor is read, converted and placed one at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..loading import (is_gguf, meta_device, FP8_DTYPES, CheckpointError, CheckpointReader, DerivedSource, TensorSource, check_keys,
                       load_into_module)
from ..log import log
from .names import COMFY
from .tokenizer import UMT5Tokenizer
from .umt5 import UMT5_XXL, UMT5Config, UMT5Encoder

# ComfyUI-file tensors that are not encoder weights: the tokenizer, the fp8 marker, transformers' tied copy
# of the embedding, and input scales (unused for text encoders)
_COMFY_IGNORED = {"spiece_model", "scaled_fp8", "encoder.embed_tokens.weight"}
_OFFICIAL_ANCHOR = "token_embedding.weight"
_COMFY_ANCHOR = "encoder.final_layer_norm.weight"


# official key (``blocks.3.attn.q.weight``) <-> ComfyUI key (``encoder.block.3.layer.0.SelfAttention.q.weight``)
comfy_key = COMFY.from_official
official_key = COMFY.to_official


def detect_layout(keys) -> tuple[str | None, str]:
    """(``"official"`` | ``"comfy"`` | None, key prefix) from the key names alone.

    A prefix is recognised when an anchor key appears under one (a file saved from a bigger checkpoint).
    """
    keys = list(keys)
    keyset = set(keys)
    if _OFFICIAL_ANCHOR in keyset:
        return "official", ""
    if _COMFY_ANCHOR in keyset or "shared.weight" in keyset:
        return "comfy", ""
    for k in keys:
        for layout, anchor in (("official", _OFFICIAL_ANCHOR), ("comfy", _COMFY_ANCHOR)):
            if k.endswith("." + anchor):
                return layout, k[: -len(anchor)]
    return None, ""


def _dequant(weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    w = weight.float()
    if scale is None:
        return w
    s = scale.float()
    if s.numel() == 1:
        return w * s.reshape(())
    return w * s.reshape(w.shape[0], *([1] * (w.dim() - 1)))  # per-output-channel scales


def comfy_sources(raw: Mapping[str, TensorSource], path, prefix: str = "") -> dict[str, TensorSource]:
    """Official key -> source for a ComfyUI-layout file; fp8 weights become float32 ``DerivedSource``s."""
    out: dict[str, TensorSource] = {}
    scales = {k[len(prefix):-len(".scale_weight")]: s for k, s in raw.items()
              if k.startswith(prefix) and k.endswith(".scale_weight")}
    for key, src in raw.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in _COMFY_IGNORED or name.endswith((".scale_weight", ".scale_input")):
            continue
        try:
            target = official_key(name)
        except KeyError:
            out[name] = src  # reported as unexpected by check_keys
            continue
        scale = scales.get(name.rpartition(".")[0])
        if scale is not None and scale.shape and int(torch.Size(scale.shape).numel()) not in (1, src.shape[0]):
            raise CheckpointError(path, f"{name.rpartition('.')[0]}.scale_weight has shape {list(scale.shape)}; "
                                        "expected a scalar (scaled fp8) or one scale per output row.")
        if scale is not None or src.dtype in FP8_DTYPES:
            inputs = (src,) if scale is None else (src, scale)
            out[target] = DerivedSource(inputs=inputs, fn=_dequant, shape=tuple(src.shape), dtype=torch.float32)
        else:
            out[target] = src
    return out


def umt5_sources(reader: CheckpointReader) -> tuple[str, dict[str, TensorSource]]:
    """(layout, {official key: source}) for the umT5 tensors of an open checkpoint."""
    raw = reader.sources()
    layout, prefix = detect_layout(raw)
    if layout is None:
        check_keys("umt5", reader.path, _full_size_shapes(), raw)  # names the component the file does hold
        raise CheckpointError(reader.path, "no umT5 encoder tensors found.")
    if layout == "comfy":
        return layout, comfy_sources(raw, reader.path, prefix)
    return layout, {k[len(prefix):]: s for k, s in raw.items()
                    if k.startswith(prefix) and k != prefix + "spiece_model"}


def _full_size_shapes() -> dict[str, tuple[int, ...]]:
    with meta_device():
        m = UMT5Encoder(UMT5_XXL)
    return {k: tuple(v.shape) for k, v in m.state_dict(keep_vars=True).items()}


def _check_v11(path, shapes: Mapping[str, tuple[int, ...]]) -> None:
    # a T5 v1.1 encoder (Flux / SD3 t5xxl) has a relative bias in block 0 only; name it instead of listing keys
    if ("blocks.0.pos_embedding.embedding.weight" in shapes and "blocks.1.norm1.weight" in shapes
            and "blocks.1.pos_embedding.embedding.weight" not in shapes):
        raise CheckpointError(path, "this is a T5 v1.1 encoder (like the t5xxl used by Flux/SD3: one relative "
                                    "position table shared by all layers), not umT5-XXL. Ovi needs umT5-XXL: "
                                    "models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_fp16 / umt5_xxl_fp8_e4m3fn_scaled.")


def load_umt5(path: str | os.PathLike, *, prefix: str = "", device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.bfloat16, config: UMT5Config | None = None) -> UMT5Encoder:
    """Build the encoder on ``meta`` and fill it from ``path`` (any supported layout, GGUF included), tensor by
    tensor."""
    if is_gguf(path):
        from ..quant.gguf_load import load_umt5_gguf

        return load_umt5_gguf(path, device=device, dtype=dtype, config=config)
    with CheckpointReader(path, prefix=prefix) as reader:
        layout, sources = umt5_sources(reader)
        shapes = {k: tuple(s.shape) for k, s in sources.items()}
        _check_v11(path, shapes)
        if config is None:
            try:
                config = UMT5Config.from_shapes(shapes)
            except (KeyError, ValueError) as e:
                check_keys("umt5", path, _full_size_shapes(), sources)
                raise CheckpointError(path, f"cannot infer the umT5 configuration: {e}") from e
        with meta_device():
            model = UMT5Encoder(config)
        fp8 = any(isinstance(s, DerivedSource) for s in sources.values())
        load_into_module(model, sources, path=path, component="umt5", device=device, dtype=dtype)
    log.info("umT5 encoder: %s layout%s, %d layers, dim %d, %s on %s", layout, " (fp8 dequantised)" if fp8 else "",
             config.num_layers, config.dim, str(dtype).replace("torch.", ""), device)
    return model.eval().requires_grad_(False)


# -- tokenizer ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizerSource:
    """Where the sentencepiece model comes from: a ``spiece_model`` tensor in a checkpoint, or a file."""

    path: Path
    key: str | None = None  # set when the model is a uint8 tensor inside ``path``

    def read(self) -> bytes:
        if self.key is None:
            return self.path.read_bytes()
        with CheckpointReader(self.path) as r:
            t = r.get(self.key)
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise CheckpointError(self.path, f"{self.key!r} should be a 1-D uint8 tensor (the bytes of spiece.model), "
                                             f"found {str(t.dtype)} {list(t.shape)}.")
        return t.contiguous().numpy().tobytes()


_FOLDER_CANDIDATES = ("spiece.model", "google/umt5-xxl/spiece.model", "umt5-xxl/spiece.model")


def _from_folder(folder: Path) -> TokenizerSource | None:
    for rel in _FOLDER_CANDIDATES:
        if (folder / rel).is_file():
            return TokenizerSource(folder / rel)
    for rel in ("tokenizer.json", "google/umt5-xxl/tokenizer.json", "umt5-xxl/tokenizer.json"):
        if (folder / rel).is_file():
            raise CheckpointError(folder / rel, "only tokenizer.json is here, and this tokenizer reads the "
                                                "sentencepiece model: spiece.model is needed (it is in the "
                                                "google/umt5-xxl folder of Wan-AI/Wan2.2-TI2V-5B).")
    return None


def find_tokenizer_source(tokenizer: str | os.PathLike | None = None, *, checkpoint: str | os.PathLike | None = None,
                          prefix: str = "") -> TokenizerSource:
    """Locate the umT5 sentencepiece model.

    ``tokenizer`` (a ``spiece.model`` file or a folder holding one, e.g. ``google/umt5-xxl``) wins; otherwise the
    ``spiece_model`` tensor of ``checkpoint`` (ComfyUI files carry one), then a ``google/umt5-xxl`` folder next
    to the checkpoint (the official Wan2.2-TI2V-5B download layout).
    """
    tried = []
    if tokenizer is not None:
        p = Path(tokenizer)
        if p.is_file():
            if p.suffix.lower() == ".json":
                raise CheckpointError(p, "tokenizer.json cannot be read here: spiece.model is needed (it is in the "
                                         "google/umt5-xxl folder of Wan-AI/Wan2.2-TI2V-5B).")
            if p.suffix.lower() in (".safetensors", ".pth", ".pt", ".bin"):
                return find_tokenizer_source(checkpoint=p, prefix=prefix)
            return TokenizerSource(p)
        if p.is_dir():
            src = _from_folder(p)
            if src is not None:
                return src
        tried.append(str(p))
    if checkpoint is not None:
        c = Path(checkpoint)
        keys = []
        if not is_gguf(c):  # GGUF umT5 files carry no sentencepiece tensor: the folder beside them must
            with CheckpointReader(c) as r:
                keys = [k for k in r.keys() if k.startswith(prefix) and (k == prefix + "spiece_model"
                                                                        or k.endswith(".spiece_model"))]
        if keys:
            return TokenizerSource(c, keys[0])
        tried.append(f"{c} (no spiece_model tensor)")
        src = _from_folder(c.parent)
        if src is not None:
            return src
        tried.append(str(c.parent / "google" / "umt5-xxl"))
    raise CheckpointError(None, "no umT5 tokenizer found (tried: " + "; ".join(tried or ["nothing given"]) +
                                "). Give the google/umt5-xxl folder with spiece.model, or a ComfyUI umT5 file "
                                "that carries its spiece_model tensor.")


def load_tokenizer(tokenizer: str | os.PathLike | None = None, *, checkpoint: str | os.PathLike | None = None,
                   prefix: str = "", seq_len: int = 512) -> UMT5Tokenizer:
    src = find_tokenizer_source(tokenizer, checkpoint=checkpoint, prefix=prefix)
    data = src.read()
    try:
        tok = UMT5Tokenizer(data, seq_len=seq_len)
    except RuntimeError as e:  # sentencepiece's parse failure
        raise CheckpointError(src.path, f"not a sentencepiece model{f' (tensor {src.key})' if src.key else ''}: "
                                        f"{e}") from e
    log.info("umT5 tokenizer: %s%s, %d pieces", src.path, f" [{src.key}]" if src.key else "", tok.vocab_size)
    return tok
