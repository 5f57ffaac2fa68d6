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

Fusion sources are opened as the FP8 converter opens them (``fusion.checkpoint.fusion_sources``): one file or
a split video/audio pair in either order, bf16/fp32 or any FP8 layout the loader reads. FP8 weights are
dequantised with their scales to float32 before quantising, so their FP8 rounding stays in the result; the
scales and the ``scaled_fp8`` marker are not written.

The header is written from the shapes alone, then each tensor is read, quantised and appended, so memory
holds one tensor (plus its temporaries) at a time. The output appears under its name only when complete
(``atomic_write.AtomicOutput``: a hidden temporary file beside it, removed on any failure).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..loading import CONFIG_METADATA_KEY, VARIANT_METADATA_KEY, CheckpointError, CheckpointReader, TensorSource
from ..atomic_write import AtomicOutput
from ..log import log
from .fp8_checkpoint import SOURCE_KEY, dequantised_sources
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


@dataclass
class _Opened:
    """One conversion's input: tensors under their GGUF names, string header fields, readers to close."""

    arch: str
    component: str
    named: dict[str, TensorSource]
    hiprec: tuple[str, ...]
    fields: dict[str, str]
    readers: list

    def close(self) -> None:
        for r in self.readers:
            r.close()


def _open_fusion(paths: list[Path], target: Q, variant: str | None) -> _Opened:
    """A fusion model from one file or a split pair, in any layout the FP8 converter reads; FP8 weights come
    back dequantised to float32 (their scales folded in)."""
    from ..fusion.checkpoint import describe_sources, fusion_sources, output_variant

    files, readers, sources, cfg, label = fusion_sources(paths, streaming=True)
    try:
        fields = {CONFIG_METADATA_KEY: json.dumps(cfg.to_dict()), SOURCE_KEY: describe_sources(files)}
        name = output_variant(paths, files, variant)
        if name:
            fields[VARIANT_METADATA_KEY] = name
        fp8 = [f for f in files if f.fp8 is not None]
        if fp8:
            sources, count = dequantised_sources(sources)
            layouts = "; ".join(f.fp8.summary() for f in fp8)
            if target in PLAIN:
                log.info("convert: %s holds FP8 weights (%s): %d tensors are stored dequantised as %s, a larger "
                         "file than the FP8 source and no more precise", label, layouts, count, target.name)
            else:
                log.warning("convert: %s holds FP8 weights (%s): %d tensors are dequantised and quantised again to "
                            "%s, so the GGUF file carries the FP8 rounding error on top of its own. Convert the "
                            "bf16 model instead when you have it.", label, layouts, count, target.name)
    except BaseException:
        for r in readers:
            r.close()
        raise
    return _Opened(FUSION_ARCH, "fusion", sources, _FUSION_HIPREC, fields, readers)


def _open_umt5(path: Path) -> _Opened | None:
    """The umT5 encoder in ``path`` under llama.cpp's T5 names; None when the file holds no umT5 keys."""
    from ..text.checkpoint import detect_layout, umt5_sources

    reader = CheckpointReader(path, entry="module")
    try:
        if detect_layout(reader.keys())[0] is None:
            reader.close()
            return None
        _, t5 = umt5_sources(reader)
        try:
            named = {llama_t5_name(k): s for k, s in t5.items()}
        except KeyError as e:
            raise CheckpointError(path, f"unexpected umT5 tensor: {e}") from e
    except BaseException:
        reader.close()
        raise
    return _Opened(T5_ARCH, "umt5", named, _T5_HIPREC, {}, [reader])


def _open(paths: list[Path], target: Q, variant: str | None) -> _Opened:
    try:
        return _open_fusion(paths, target, variant)
    except CheckpointError as e:
        if len(paths) == 1:
            opened = _open_umt5(paths[0])
            if opened is not None:
                if variant is not None:
                    log.warning("convert: --variant applies to the fusion model; ignored for the umT5 encoder")
                return opened
        # the fusion reader's message says what the file is; add what this converter takes
        raise CheckpointError(None, f"{e} (GGUF conversion takes an Ovi fusion model, as one file or a video + "
                                    "audio pair, or a umT5 encoder.)") from e


def convert_gguf(src: str | os.PathLike | Sequence[str | os.PathLike], dst: str | os.PathLike, qtype: str | Q, *,
                 variant: str | None = None, progress: Callable[[int, int, str], None] | None = None,
                 device: torch.device | str | None = None) -> Path:
    """Write ``src`` as GGUF ``qtype`` to ``dst``: a fusion model (one file, or a video + audio pair in either
    order; bf16/fp32 or any FP8 layout the loader reads) or a umT5 encoder, detected from the keys.

    ``qtype``: q8_0, q6_k, q5_k, q4_k, f16, bf16 (or f32). ``variant`` is recorded when neither the sources'
    metadata nor their names tell it. ``progress(done, total, name)`` is called after each tensor. ``device``
    runs the K-quant search there (a GPU makes it much faster); default: CUDA when present.
    """
    import gguf

    target = parse_qtype(qtype)
    paths = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(p) for p in src]
    dst = Path(dst)
    if not paths or len(paths) > 2:
        raise ValueError(f"give one source file or a video + audio pair, got {len(paths)}")
    if any(dst.resolve() == p.resolve() for p in paths):
        raise ValueError("the destination must differ from the source")
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise CheckpointError(missing, "file not found. Check the path, or download the file "
                                       "(python -m ovi download --variant ...).")
    if device is None and torch.cuda.is_available():
        device = "cuda"
    opened = _open(paths, target, variant)
    try:
        plans = [(plan_tensor(name, s.shape, s.dtype, target, opened.hiprec), s) for name, s in opened.named.items()]
        dst.parent.mkdir(parents=True, exist_ok=True)
        # gguf's writer opens the file by name: it fills the temporary file, which appears at dst only once
        # complete, fsynced and renamed; any failure (a full disk, an interrupt) removes it and names dst.
        with AtomicOutput(dst, keep_open=False) as out:
            writer = gguf.GGUFWriter(str(out.tmp), opened.arch)
            try:
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
                writer.add_string("general.name", paths[0].stem if len(paths) == 1 else dst.stem)
                writer.add_string("ovi.component", opened.component)
                writer.add_string("ovi.quantization", target.name)
                for key, value in opened.fields.items():
                    writer.add_string(key, value)
                for p, _ in plans:
                    if p.stored != p.shape:
                        writer.add_array(ORIG_SHAPE_KEY + p.name, list(p.shape))
                    if p.qtype in (Q.F32, Q.F16):
                        np_dtype = np.dtype(np.float32 if p.qtype == Q.F32 else np.float16)
                        writer.add_tensor_info(p.name, p.stored, np_dtype, p.nbytes)
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
                with contextlib.suppress(OSError):  # the disk may still be full; the failure is already known
                    writer.close()
                raise
            writer.close()  # flushes: a full disk shows here, inside the block, and aborts the output
    finally:
        opened.close()
    counts: dict[str, int] = {}
    for p, _ in plans:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    log.info("GGUF %s written: %s (%s, %s), %.2f GB; tensor types %s", target.name, dst, opened.component,
             opened.arch, dst.stat().st_size / 1e9, ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return dst
