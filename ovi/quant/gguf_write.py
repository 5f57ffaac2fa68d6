"""Convert the fusion model (any variant) or the umT5 encoder to GGUF, one tensor at a time.

What gets quantised follows ComfyUI-GGUF's practice: 2-D weights with more than 1024 values whose row is a
whole number of blocks; 1-D tensors (norms, biases), small tensors and the precision-sensitive ones
(modulation tables, the relative position bias) stay F32; the patch-embedding convolutions keep the source
precision. A 2-D weight whose row does not
fit the K-quant block (256) falls back to Q8_0 (block 32), else to the plain source precision. Tensors with
more than 4 dims (the video patch embedding) are stored flattened to 2-D and their shape recorded under
``comfy.gguf.orig_shape.<name>``. Fusion files keep the official keys under architecture ``ovi`` with the
config and variant in ``ovi.config`` / ``ovi.variant``; umT5 files use llama.cpp's T5 names under
architecture ``t5encoder``, like the published umt5-xxl-encoder GGUF files, so ComfyUI-GGUF reads them too.

The header is written from the shapes alone, then each tensor is read, quantised and appended, so memory
holds one tensor (plus its temporaries) at a time. The output appears under its name only when complete.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from ..fusion.config import FusionConfig
from ..loading import FP8_DTYPES, CheckpointError, CheckpointReader, TensorSource
from ..log import log
from .gguf_dequant import PLAIN, Q, block_sizes
from .gguf_load import FUSION_ARCH, ORIG_SHAPE_KEY, T5_ARCH, llama_t5_name
from .gguf_quantize import QUANTIZERS, can_quantize, quantize

QUANTIZATION_THRESHOLD = 1024  # tensors with at most this many values are not worth quantising
TARGETS = {"q8_0": Q.Q8_0, "q6_k": Q.Q6_K, "q5_k": Q.Q5_K, "q4_k": Q.Q4_K, "f16": Q.F16, "bf16": Q.BF16,
           "f32": Q.F32}
_FUSION_HIPREC = ("modulation",)
# Convolutions are read dense anyway, so quantising them would only shrink the file: kept at source precision.
_UNQUANTISED = ("patch_embedding",)
_T5_HIPREC = ("attn_rel_b",)
_PLAIN_OF = {torch.float16: Q.F16, torch.bfloat16: Q.BF16}


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is stored: file name, logical shape, stored (numpy-order) shape and GGUF type."""

    name: str
    shape: tuple[int, ...]
    stored: tuple[int, ...]
    qtype: Q

    @property
    def nbytes(self) -> int:
        block, size = block_sizes(self.qtype)
        return math.prod(self.stored) // block * size


def parse_qtype(qtype: str | Q | int) -> Q:
    if isinstance(qtype, str):
        key = qtype.lower().removeprefix("gguf-").removeprefix("gguf_")
        if key not in TARGETS:
            raise ValueError(f"unknown GGUF target {qtype!r}; choose one of {', '.join(TARGETS)}")
        return TARGETS[key]
    q = Q(qtype)
    if q not in QUANTIZERS and q not in PLAIN:
        raise ValueError(f"GGUF target {q.name} has no quantiser here (ours: {', '.join(TARGETS)})")
    return q


def plan_tensor(name: str, shape: tuple[int, ...], src_dtype: torch.dtype, target: Q,
                hiprec: tuple[str, ...] = _FUSION_HIPREC) -> TensorPlan:
    """The storage of one tensor for ``target`` (see the module docstring for the rules)."""
    shape = tuple(int(d) for d in shape)
    stored = shape if len(shape) <= 4 else (shape[0], math.prod(shape[1:]))
    plain = _PLAIN_OF.get(src_dtype, Q.F32)
    if len(shape) <= 1 or math.prod(shape) <= QUANTIZATION_THRESHOLD or any(h in name for h in hiprec):
        qtype = Q.F32
    elif target in PLAIN:
        qtype = target
    elif any(u in name for u in _UNQUANTISED):
        qtype = plain
    elif len(shape) == 2 and can_quantize(shape, target):
        qtype = target
    elif len(shape) == 2 and can_quantize(shape, Q.Q8_0):
        qtype = Q.Q8_0
    else:
        qtype = plain
    return TensorPlan(name, shape, stored, qtype)


def fusion_plan(shapes: Mapping[str, tuple[int, ...]], target: Q, src_dtype: torch.dtype = torch.bfloat16
                ) -> list[TensorPlan]:
    """The plan of every fusion tensor ({official key: shape}); also what the size estimate uses."""
    return [plan_tensor(k, s, src_dtype, target) for k, s in shapes.items()]


def _encode(src: torch.Tensor, p: TensorPlan, device) -> np.ndarray:
    x = src.reshape(p.stored)
    if device is not None and p.qtype not in PLAIN:
        x = x.to(device)
    if p.qtype == Q.BF16 and x.dtype == torch.bfloat16:
        raw = x.contiguous().view(torch.uint8)
    else:
        raw = quantize(x, p.qtype)
    return raw.cpu().numpy()


def _fusion_sources(reader: CheckpointReader) -> tuple[dict[str, TensorSource], str | None, str | None]:
    sources = reader.sources()
    if not any(k.startswith("video_model.") for k in sources):
        for k in sources:
            i = k.find("video_model.")
            if i > 0 and all(key.startswith(k[:i]) for key in sources):
                sources = {key[i:]: s for key, s in sources.items()}
                break
    if not (any(k.startswith("video_model.") for k in sources) and any(k.startswith("audio_model.") for k in sources)):
        return {}, None, None
    if any(s.dtype in FP8_DTYPES for s in sources.values()):
        raise CheckpointError(reader.path, "this fusion file holds FP8 weights; convert the bf16 model to GGUF "
                                           "(quantising already-quantised weights again compounds the error).")
    stray = [k for k in sources if not k.startswith(("video_model.", "audio_model."))]
    if stray:
        raise CheckpointError(reader.path, f"{len(stray)} tensors outside video_model./audio_model. (first: "
                                           f"{', '.join(stray[:3])}): not a fusion model layout this converter knows.")
    config = reader.metadata.get("ovi.config")
    if not config:
        config = json.dumps(FusionConfig.from_shapes({k: s.shape for k, s in sources.items()}).to_dict())
    variant = reader.metadata.get("ovi.variant")
    if variant is None:
        try:
            from ..detect import resolve_variant

            variant = resolve_variant([reader.path]).variant.name
        except (ValueError, KeyError, CheckpointError):
            variant = None
    return sources, config, variant


def convert_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str | Q, *,
                 progress: Callable[[int, int, str], None] | None = None,
                 device: torch.device | str | None = None) -> Path:
    """Write ``src`` (a fusion model or a umT5 encoder, detected from its keys) as GGUF ``qtype`` to ``dst``.

    ``qtype``: q8_0, q6_k, q5_k, q4_k, f16, bf16 (or f32). ``progress(done, total, name)`` is called after each
    tensor. ``device`` runs the K-quant search there (a GPU makes it much faster); default: CUDA when present.
    """
    import gguf

    target = parse_qtype(qtype)
    src, dst = Path(src), Path(dst)
    if device is None and torch.cuda.is_available():
        device = "cuda"
    with CheckpointReader(src, entry="module") as reader:
        sources, config, variant = _fusion_sources(reader)
        if sources:
            arch, component = FUSION_ARCH, "fusion"
            named = {k: (k, s) for k, s in sources.items()}
            hiprec = _FUSION_HIPREC
        else:
            from ..text.checkpoint import umt5_sources

            try:
                _, t5 = umt5_sources(reader)
            except CheckpointError as e:
                raise CheckpointError(src, "neither an Ovi fusion model nor a umT5 encoder: only these two convert "
                                           f"to GGUF. ({e})") from e
            arch, component, hiprec = T5_ARCH, "umt5", _T5_HIPREC
            try:
                named = {k: (llama_t5_name(k), s) for k, s in t5.items()}
            except KeyError as e:
                raise CheckpointError(src, f"unexpected umT5 tensor: {e}") from e
        plans = [(plan_tensor(name, s.shape, s.dtype, target, hiprec), s) for name, s in named.values()]

        tmp = dst.with_name(dst.name + ".part")
        dst.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_string("general.name", src.stem)
            writer.add_string("ovi.component", component)
            writer.add_string("ovi.quantization", target.name)
            if config:
                writer.add_string("ovi.config", config)
            if variant:
                writer.add_string("ovi.variant", variant)
            for p, _ in plans:
                if p.stored != p.shape:
                    writer.add_array(ORIG_SHAPE_KEY + p.name, list(p.shape))
                if p.qtype in (Q.F32, Q.F16):
                    writer.add_tensor_info(p.name, p.stored, np.dtype(np.float32 if p.qtype == Q.F32 else np.float16),
                                           p.nbytes)
                else:
                    block, size = block_sizes(p.qtype)
                    byte_shape = (*p.stored[:-1], p.stored[-1] // block * size)
                    writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for i, (p, s) in enumerate(plans):
                writer.write_tensor_data(_encode(s.load(), p, device))
                if progress is not None:
                    progress(i + 1, len(plans), p.name)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
        writer.close()
    os.replace(tmp, dst)
    counts: dict[str, int] = {}
    for p, _ in plans:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    log.info("GGUF %s written: %s (%s, %s), %.2f GB; tensor types %s", target.name, dst, component, arch,
             dst.stat().st_size / 1e9, ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return dst
