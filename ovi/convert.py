"""``python -m ovi convert``: rewrite a fusion checkpoint in another storage format, one tensor at a time.

    python -m ovi convert --to fp8|gguf-<type> [--fp8-format comfy_quant|scaled_fp8] [--granularity tensor|channel]
                          [--variant NAME] SRC [SRC2] DST

FP8: the 2-D linear weights of every block of both backbones (self/cross attention q, k, v, o, the fusion
k/v, FFN in/out) become float8_e4m3fn with a float32 scale (absmax / 448), per tensor or per output channel;
everything else is kept in bf16 (norms, biases, modulation tables, patch/time/text embeddings, time
projection, heads). The embeddings and the time projection run once per step on a few hundred tokens at
most, so FP8 would save no time there, and they are 0.4 % of the weights; the time projection feeds the
shift/scale/gate of every block, so its error would reach every layer.

With per-tensor scales (the default) the output is ComfyUI's mixed-precision format (``comfy_quant``): header
metadata ``_quantization_metadata`` lists exactly the quantized layers (``{"format": "float8_e4m3fn"}`` each), and
each has a float32 ``<layer>.weight_scale``; the bf16 linears are not listed, so no reader can take them for FP8.
ComfyUI documents per-tensor float8 scales only, so per-channel scales are written in the older ``scaled_fp8``
convention (``scaled_fp8`` marker, ``<layer>.scale_weight``), which this package reads; that convention is also
written per tensor when asked for (``--fp8-format scaled_fp8``). Both carry header metadata naming format,
granularity, source and variant.
No static input scales are written: activation scales are computed per call (a source's are dropped).
Sources: our/official bf16 files, split video/audio pairs, and every FP8 layout the loader reads (scaled sources
are re-quantised; a source already in the asked granularity passes through unchanged). GGUF
(``quant.gguf_write``) takes the same sources and opens them the same way; FP8 weights are dequantised first
(``quant.fp8_checkpoint.dequantised_sources``).

Reading goes through plain file reads and writing through ``StreamingWriter``, so peak memory stays near the
largest tensor instead of the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .choices import CONVERT_TARGETS as TARGETS
from .choices import GGUF_TARGETS
from .loading import CONFIG_METADATA_KEY, FP8_DTYPES, VARIANT_METADATA_KEY, CheckpointError, TensorSource
from .log import log
from .quant.fp8 import E4M3, GRANULARITIES, dequantise_fp8, quantise_fp8
from .quant.comfy_quant import INPUT_SCALE, QUANT_METADATA_KEY, WEIGHT_SCALE, quantization_metadata
from .quant.fp8_checkpoint import (FORMAT_FP8, FORMAT_KEY, GRANULARITY_KEY, MARKER, SCALE, SOURCE_KEY,
                                   effective_weight, is_quantised_key)
from .safetensors_stream import StreamingWriter

DEFAULT_GRANULARITY = "tensor"  # per-channel measured no better (benchmarks/quant.py), and scalars are what ComfyUI reads
# How the FP8 file marks its quantized layers: ComfyUI's per-layer metadata, or the older scaled_fp8 marker.
FP8_FORMATS = ("comfy_quant", "scaled_fp8")
DEFAULT_FP8_FORMAT = "comfy_quant"  # names exactly the quantized layers; what current ComfyUI writes and reads
COMFY_FP8_FORMAT = "float8_e4m3fn"  # the layer format string of our e4m3fn weights in _quantization_metadata


def _plan(sources: dict[str, TensorSource], granularity: str, out_dtype: torch.dtype, fp8_format: str):
    """([(name, shape, dtype, produce)] in source order, the quantized layer names); produce() returns the tensor
    to write."""
    entries: list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]] = []
    if fp8_format == "scaled_fp8":
        entries.append((MARKER, (0,), E4M3, lambda: torch.empty(0, dtype=E4M3)))
    scale_suffix = SCALE if fp8_format == "scaled_fp8" else WEIGHT_SCALE
    layers: list[str] = []
    for key, s in sources.items():
        if key.endswith((SCALE, INPUT_SCALE)):
            continue
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        scale = sources.get(module + SCALE) if module else None
        shape = tuple(s.shape)
        if is_quantised_key(key) and len(shape) == 2:
            sshape = () if granularity == "tensor" else (shape[0], 1)
            cache: dict[str, torch.Tensor] = {}

            def weight(s=s, scale=scale, cache=cache):
                w = s.load()
                src_scale = scale.load() if scale is not None else None
                if w.dtype in FP8_DTYPES and w.dtype != E4M3:
                    w, src_scale = dequantise_fp8(w, src_scale, torch.bfloat16), None
                if w.dtype == E4M3 and src_scale is not None and _same_granularity(src_scale, granularity):
                    q, sc = w, src_scale.float()  # already in the asked form: pass through, no re-rounding
                elif w.dtype == E4M3:
                    q, sc = quantise_fp8(w, granularity, src_scale=src_scale if src_scale is not None
                                         else torch.ones((), dtype=torch.float32))
                else:
                    q, sc = quantise_fp8(w, granularity)
                cache["scale"] = sc.reshape(()) if granularity == "tensor" else sc.reshape(-1, 1)
                return q

            entries.append((key, shape, E4M3, weight))
            entries.append((module + scale_suffix, sshape, torch.float32, lambda cache=cache: cache.pop("scale")))
            layers.append(module)
        elif s.dtype.is_floating_point:
            def keep(s=s, scale=scale):
                t = s.load()
                if t.dtype in FP8_DTYPES or scale is not None:
                    return effective_weight(t, scale.load() if scale is not None else None, out_dtype)
                return t.to(out_dtype)

            entries.append((key, shape, out_dtype, keep))
        else:
            entries.append((key, shape, s.dtype, s.load))
    return entries, layers


def default_fp8_format(granularity: str) -> str:
    """comfy_quant for per-tensor scales; scaled_fp8 for per-channel ones, which ComfyUI's float8 format lacks."""
    return DEFAULT_FP8_FORMAT if granularity == "tensor" else "scaled_fp8"


def _same_granularity(scale: torch.Tensor, granularity: str) -> bool:
    return (scale.numel() == 1) == (granularity == "tensor")


def convert_fp8(src: str | os.PathLike | Sequence[str | os.PathLike], dst: str | os.PathLike, *,
                granularity: str = DEFAULT_GRANULARITY, variant: str | None = None,
                progress: Callable[[int, int], None] | None = None, fp8_format: str | None = None) -> dict:
    """Write ``dst`` (one safetensors file, official ``video_model.``/``audio_model.`` keys) from a fusion
    checkpoint (one file or a split pair, any layout the loader reads), its quantized layers marked the
    ``fp8_format`` way (None: ``default_fp8_format(granularity)``). Returns figures of the run."""
    from .fusion.checkpoint import describe_sources, fusion_sources, output_variant

    if granularity not in GRANULARITIES:
        raise ValueError(f"--granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if fp8_format is None:
        fp8_format = default_fp8_format(granularity)
    if fp8_format not in FP8_FORMATS:
        raise ValueError(f"--fp8-format must be one of {FP8_FORMATS}, got {fp8_format!r}")
    if fp8_format == "comfy_quant" and granularity != "tensor":
        raise ValueError("ComfyUI's float8 format has per-tensor scales only; per-channel scales are written with "
                         "--fp8-format scaled_fp8 (read by this package; ComfyUI has no per-channel FP8 format)")
    paths = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(p) for p in src]
    dst = Path(dst)
    if any(dst.resolve() == p.resolve() for p in paths):
        raise ValueError("the destination must differ from the source")
    if dst.suffix.lower() != ".safetensors":
        raise ValueError(f"the destination must be a .safetensors file, got {dst.name}")
    t0 = time.perf_counter()
    files, readers, sources, cfg, label = fusion_sources(paths, streaming=True)
    try:
        name = output_variant(paths, files, variant)
        metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(cfg.to_dict()), FORMAT_KEY: FORMAT_FP8,
                    GRANULARITY_KEY: granularity, SOURCE_KEY: describe_sources(files)}
        if name:
            metadata[VARIANT_METADATA_KEY] = name
        entries, layers = _plan(sources, granularity, torch.bfloat16, fp8_format)
        if fp8_format == "comfy_quant":
            metadata[QUANT_METADATA_KEY] = quantization_metadata({name: COMFY_FP8_FORMAT for name in layers})
        quantised = len(layers)
        bytes_in = sum(_numel(s.shape) * s.dtype.itemsize for s in sources.values())
        with StreamingWriter(dst, [(n, s, dt) for n, s, dt, _ in entries], metadata) as w:
            for i, (n, _, _, produce) in enumerate(entries):
                w.write(n, produce())
                if progress is not None:
                    progress(i + 1, len(entries))
            bytes_out = w.data_bytes
    finally:
        for r in readers:
            r.close()
    seconds = time.perf_counter() - t0
    log.info("converted %s -> %s: %d linear weights to fp8 (per-%s scales, %s), %d tensors, %.2f GB -> %.2f GB "
             "in %.1f s%s", label, dst, quantised, granularity, fp8_format, len(entries), bytes_in / 1e9,
             bytes_out / 1e9, seconds, f", variant {name}" if name else "")
    return {"tensors": len(entries), "quantised": quantised, "bytes_in": bytes_in, "bytes_out": bytes_out,
            "seconds": seconds, "variant": name, "fp8_format": fp8_format}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def convert(src, dst, *, to: str, granularity: str = DEFAULT_GRANULARITY, variant: str | None = None,
            fp8_format: str | None = None) -> dict:
    """Dispatch on the target format (``fp8`` here; ``gguf-*`` in ``quant.gguf_write``)."""
    if to == "fp8":
        return convert_fp8(src, dst, granularity=granularity, variant=variant, fp8_format=fp8_format)
    if to in GGUF_TARGETS:
        from .quant.gguf_write import convert_gguf

        path = convert_gguf(src, dst, to.removeprefix("gguf-"), variant=variant)
        return {"path": str(path), "bytes": Path(path).stat().st_size}
    raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")


def main_convert(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovi convert", description="Convert an Ovi fusion checkpoint "
                                "(one file or a video + audio pair) to FP8 or GGUF, tensor by tensor.")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--granularity", choices=GRANULARITIES, default=DEFAULT_GRANULARITY,
                   help=f"FP8 scale per tensor or per output channel (default {DEFAULT_GRANULARITY})")
    p.add_argument("--fp8-format", choices=FP8_FORMATS, default=None,
                   help=f"how an FP8 file marks its quantized layers: {DEFAULT_FP8_FORMAT} (ComfyUI's per-layer "
                        "_quantization_metadata; per-tensor scales only) or scaled_fp8 (the older marker "
                        f"convention). Default: {DEFAULT_FP8_FORMAT}, scaled_fp8 with --granularity channel")
    p.add_argument("--variant", help="record this variant when neither metadata nor the file name tells it")
    p.add_argument("files", nargs="+", type=Path, help="SRC [SRC2] DST")
    a = p.parse_args(argv)
    if len(a.files) not in (2, 3):
        p.error("give one or two source files and the destination")
    if a.fp8_format is not None and a.to != "fp8":
        p.error("--fp8-format applies to --to fp8 only")
    src, dst = a.files[:-1], a.files[-1]
    try:
        convert(src[0] if len(src) == 1 else src, dst, to=a.to, granularity=a.granularity, variant=a.variant,
                fp8_format=a.fp8_format)
    except (CheckpointError, ValueError, OSError) as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
