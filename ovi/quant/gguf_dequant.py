"""GGUF block dequantisation in torch, on whatever device the raw blocks live (CPU or GPU).

Every kernel does its float arithmetic in float32 in the same order as gguf-py's numpy reference, so the
two agree bit for bit (and a bf16 result is exactly the float32 result rounded once).

On the CPU, torch costs a few microseconds per op and is slow wherever an op writes short strided rows,
so the kernels are shaped around that: bit fields are cut out eight bytes at a time (int64) into whole
contiguous planes, the planes are put in value order by a ``stack`` of 16-byte units, the values are widened
to float32 once and scaled in place; the per-block factors are computed once per tensor, and the values in
cache-sized chunks so that a chunk's float32 intermediates (and a bf16 result's rounding) stay in cache.
The same code runs on a GPU, where the chunks are simply large.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

QK_K = 256
# Values per chunk on the CPU: large enough that per-op overhead is small, small enough that the float32
# working set (4 bytes a value, plus the uint8 unpacking) stays in the last-level cache (best of 2^15..2^20
# on a 2-core EPYC with 8 MB L3: torch's per-op cost makes smaller chunks lose).
CPU_CHUNK_VALUES = 1 << 20
# Elsewhere chunks only bound the float32 temporaries of a bf16 result.
DEVICE_CHUNK_VALUES = 1 << 24


def _reinterpret(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes seen as ``dtype`` in place where the offsets allow it (the common case), else from a copy."""
    try:
        return b.view(dtype)
    except RuntimeError:
        return b.clone(memory_format=torch.contiguous_format).view(dtype)


def _half(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian fp16 at byte ``offset`` (even) of each block, as float32 [n, 1]."""
    return _reinterpret(b, torch.float16)[:, offset // 2:offset // 2 + 1].float()


def _signed(mask: int, bits: int) -> int:
    return mask - (1 << bits) if mask >= 1 << (bits - 1) else mask


def _planes(region: torch.Tensor, count: int, width: int, at: int = 0) -> torch.Tensor:
    """[n, k] bytes (k a multiple of 8) -> [count, n, k] uint8: plane i holds, for every byte, its bits
    ``i*width`` and up (``width`` of them) moved to bit ``at``; other bits zero.

    Eight bytes are handled at a time as one int64, and every op writes a whole contiguous plane: torch's
    CPU kernels are fast on long contiguous outputs and slow on strided ones (``_interleave`` then puts
    the planes in value order).
    """
    n, k = region.shape
    words = _reinterpret(region, torch.int64)
    out = torch.empty((count, *words.shape), dtype=torch.int64, device=region.device)
    mask = _signed((((1 << width) - 1) << at) * 0x0101010101010101, 64)
    for i in range(count):
        shift = i * width - at
        if shift > 0:
            torch.bitwise_right_shift(words, shift, out=out[i])
        elif shift < 0:
            torch.bitwise_left_shift(words, -shift, out=out[i])
        else:
            torch.bitwise_and(words, mask, out=out[i])
    # arithmetic shifts only disturb bits outside each byte's field, which the mask clears
    (out[1:] if at == 0 else out).bitwise_and_(mask)
    return out.view(torch.uint8).view(count, n, k)


def _interleave(planes: torch.Tensor, dim: int, unit: torch.dtype | None = None) -> torch.Tensor:
    """[count, n, ..., k] uint8 planes (k a multiple of 16) -> a new contiguous tensor with the plane axis
    moved to ``dim``.

    A permuting ``copy_`` of short rows is slow on the CPU; ``stack`` of 16-byte units (bytes seen as
    complex128, only ever copied whole, never computed on) runs at memcpy speed. Other devices (some lack
    complex128) stack 8-byte units."""
    unit = unit or (torch.complex128 if planes.device.type == "cpu" else torch.int64)
    return torch.stack(planes.view(unit).unbind(0), dim=dim).view(torch.uint8)


def _values(dst: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Contiguous integer values -> float32 into ``dst`` viewed as ``q``'s shape; returns that view."""
    return dst.view(q.shape).copy_(q)


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """[n, groups*w] bytes -> [n, groups, 2, w]: per group the w low then the w high nibbles."""
    n = qs.shape[0]
    return _interleave(_planes(qs, 2, 4).view(2, n, groups, -1), 2)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1: [n, 4] bytes, one little-endian uint32 whose bit i is the fifth bit of element i ->
    [n, 32] bytes of 0 / 16.

    Each byte spreads to eight in one int64: multiplying by 0x0101... copies it to every byte, the mask
    keeps bit k in byte k, and adding 0x7F to a byte carries into its top bit exactly when bit k was set."""
    x = qh.to(torch.int64)
    x.mul_(0x0101010101010101).bitwise_and_(_signed(0x8040201008040201, 64))
    x.add_(0x7F7F7F7F7F7F7F7F).bitwise_right_shift_(3).bitwise_and_(0x1010101010101010)
    return x.view(torch.uint8).view(qh.shape[0], 32)


# Each block type is two steps: ``scales`` turns the per-block header bytes of all blocks into float32
# factors once (many small ops, so never repeated per chunk), ``fill`` unpacks one chunk of blocks into
# float32 ``dst`` and applies the chunk's factors.


def _d(b: torch.Tensor) -> tuple[torch.Tensor]:
    return (_half(b, 0),)


def _dm(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _half(b, 0), _half(b, 2)


def _fill_q8_0(b: torch.Tensor, dst: torch.Tensor, d: torch.Tensor) -> None:
    dst.copy_(b[:, 2:].view(torch.int8)).mul_(d)


def _fill_q4_0(b: torch.Tensor, dst: torch.Tensor, d: torch.Tensor) -> None:
    q = _nibbles(b[:, 2:], 1).view(torch.int8).sub_(8)
    dst.copy_(q.view(dst.shape)).mul_(d)


def _fill_q4_1(b: torch.Tensor, dst: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> None:
    dst.copy_(_nibbles(b[:, 4:], 1).view(dst.shape)).mul_(d).add_(m)


def _q5(qs: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1 unsigned 5-bit values [n, 32]."""
    return _nibbles(qs, 1).view(qs.shape[0], 32).bitwise_or_(_fifth_bits(qh))


def _fill_q5_0(b: torch.Tensor, dst: torch.Tensor, d: torch.Tensor) -> None:
    dst.copy_(_q5(b[:, 6:], b[:, 2:6]).view(torch.int8).sub_(16)).mul_(d)


def _fill_q5_1(b: torch.Tensor, dst: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> None:
    dst.copy_(_q5(b[:, 8:], b[:, 4:8])).mul_(d).add_(m)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K / Q3_K low bits: [n, 64] bytes -> [n, 2, 4, 32]: 32-byte half g, 2-bit field s."""
    n = qs.shape[0]
    return _interleave(_planes(qs, 4, 2).view(4, n, 2, 32), 2)


def _scales_q2_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    scales = b[:, :16]
    dl = (_half(b, 80) * (scales & 0x0F).float()).reshape(n, 2, 4, 2, 1)
    ml = (_half(b, 82) * (scales >> 4).float()).reshape(n, 2, 4, 2, 1)
    return dl, ml


def _fill_q2_k(b: torch.Tensor, dst: torch.Tensor, dl: torch.Tensor, ml: torch.Tensor) -> None:
    q = _crumbs(b[:, 16:80]).view(dl.shape[:-1] + (16,))
    _values(dst, q).mul_(dl).sub_(ml)


def _scales_q3_k(b: torch.Tensor) -> tuple[torch.Tensor]:
    n = b.shape[0]
    sc = b[:, 96:108].contiguous()
    low = torch.stack([sc[:, :8] & 0x0F, sc[:, :8] >> 4], dim=1).reshape(n, 16)
    high = torch.stack([sc[:, 8:12] >> s for s in (0, 2, 4, 6)], dim=1).reshape(n, 16)
    scales = low.bitwise_or_(high.bitwise_and_(0x03).bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    return ((_half(b, 108) * scales.float()).reshape(n, 2, 4, 2, 1),)


def _fill_q3_k(b: torch.Tensor, dst: torch.Tensor, dl: torch.Tensor) -> None:
    n = b.shape[0]
    q = _crumbs(b[:, 32:96]).view(torch.int8)
    # hmask bit i of byte w belongs to row i of 32 values; a set bit means "no offset", a clear one -4
    offset = _interleave(_planes(b[:, :32], 8, 1, at=2), 1).bitwise_xor_(4)
    q.view(n, 8, 32).sub_(offset.view(torch.int8))
    _values(dst, q.view(n, 2, 4, 2, 16)).mul_(dl)


def _scales_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: d * 6-bit scale and dmin * 6-bit min for the 8 rows of 32, each [n, 4, 2, 1].

    The 12 packed bytes are three little-endian words (scales 0-3, mins 0-3, the high parts): unpacked
    four bytes at a time."""
    n = b.shape[0]
    d, m, md = _reinterpret(b[:, 4:16], torch.int32).unbind(1)
    scale = torch.stack([d & 0x3F3F3F3F, (md & 0x0F0F0F0F) | ((d >> 2) & 0x30303030)], dim=1)
    mins = torch.stack([m & 0x3F3F3F3F, ((md >> 4) & 0x0F0F0F0F) | ((m >> 2) & 0x30303030)], dim=1)
    scale, mins = scale.view(torch.uint8).float(), mins.view(torch.uint8).float()
    return ((_half(b, 0) * scale).reshape(n, 4, 2, 1), (_half(b, 2) * mins).reshape(n, 4, 2, 1))


def _fill_q4_k(b: torch.Tensor, dst: torch.Tensor, d: torch.Tensor, dm: torch.Tensor) -> None:
    _values(dst, _nibbles(b[:, 16:], 4)).mul_(d).sub_(dm)


def _fill_q5_k(b: torch.Tensor, dst: torch.Tensor, d: torch.Tensor, dm: torch.Tensor) -> None:
    n = b.shape[0]
    q = _nibbles(b[:, 48:], 4)
    q.view(n, 8, 32).bitwise_or_(_interleave(_planes(b[:, 16:48], 8, 1, at=4), 1))
    _values(dst, q).mul_(d).sub_(dm)


def _scales_q6_k(b: torch.Tensor) -> tuple[torch.Tensor]:
    n = b.shape[0]
    return ((_half(b, 208) * b[:, 192:208].view(torch.int8).float()).reshape(n, 8, 2, 1),)


def _fill_q6_k(b: torch.Tensor, dst: torch.Tensor, d: torch.Tensor) -> None:
    n = b.shape[0]
    # row r of 32 = 4*g + 2*h + c: half g of ql/qh, low/high nibble h, 32-byte column c; qh field s = 2*h + c
    q = _interleave(_planes(b[:, :128], 2, 4).view(2, n, 2, 64), 2)
    q.view(n, 2, 4, 32).bitwise_or_(_interleave(_planes(b[:, 128:192], 4, 2, at=4).view(4, n, 2, 32), 2))
    q = q.view(torch.int8).sub_(32)
    _values(dst, q.view(n, 8, 2, 16)).mul_(d)


@dataclass(frozen=True)
class BlockKernel:
    scales: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    fill: Callable[..., None]


DEQUANTIZERS: dict[Q, BlockKernel] = {
    Q.Q8_0: BlockKernel(_d, _fill_q8_0), Q.Q6_K: BlockKernel(_scales_q6_k, _fill_q6_k),
    Q.Q5_K: BlockKernel(_scales_k, _fill_q5_k), Q.Q5_0: BlockKernel(_d, _fill_q5_0),
    Q.Q5_1: BlockKernel(_dm, _fill_q5_1), Q.Q4_K: BlockKernel(_scales_k, _fill_q4_k),
    Q.Q4_0: BlockKernel(_d, _fill_q4_0), Q.Q4_1: BlockKernel(_dm, _fill_q4_1),
    Q.Q3_K: BlockKernel(_scales_q3_k, _fill_q3_k), Q.Q2_K: BlockKernel(_scales_q2_k, _fill_q2_k),
}
PLAIN: dict[Q, torch.dtype] = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
READABLE: tuple[Q, ...] = (*DEQUANTIZERS, *PLAIN)


def block_sizes(qtype: Q) -> tuple[int, int]:
    """(values per block, bytes per block)."""
    return GGML_QUANT_SIZES[Q(qtype)]


def dequantize(raw: torch.Tensor, qtype: Q | int, shape: Sequence[int], dtype: torch.dtype | None = None, *,
               out: torch.Tensor | None = None, chunk_values: int | None = None) -> torch.Tensor:
    """Raw GGUF bytes (uint8, any shape, rows contiguous) of a tensor with logical ``shape`` -> values.

    Computed on ``raw.device`` into ``out`` when given (contiguous, ``shape``, on that device; a caller that
    reuses one buffer per layer shape skips the page faults of a fresh allocation), else into a new tensor of
    ``dtype`` (float32 when None). ``chunk_values`` overrides the chunk size (tests use it to cross chunk edges).
    """
    qtype = Q(qtype)
    shape = tuple(int(s) for s in shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype or torch.float32, device=raw.device)
    elif tuple(out.shape) != shape or not out.is_contiguous() or out.device != raw.device:
        raise ValueError(f"out must be a contiguous {shape} tensor on {raw.device}, got {tuple(out.shape)} "
                         f"on {out.device}")
    if qtype in PLAIN:
        out.copy_(_reinterpret(raw.reshape(-1), PLAIN[qtype]).reshape(shape))
        return out
    kernel = DEQUANTIZERS.get(qtype)
    if kernel is None:
        raise NotImplementedError(f"GGUF type {qtype.name} cannot be dequantised here (supported: "
                                  f"{', '.join(t.name for t in READABLE)})")
    block, type_size = block_sizes(qtype)
    blocks = raw.reshape(-1, type_size)
    n = blocks.shape[0]
    if n * block != out.numel():
        raise ValueError(f"{n} {qtype.name} blocks hold {n * block} values, shape {shape} needs {out.numel()}")
    if chunk_values is None:
        chunk_values = CPU_CHUNK_VALUES if raw.device.type == "cpu" else DEVICE_CHUNK_VALUES
    step = max(1, chunk_values // block)
    flat = out.view(n, block)
    direct = out.dtype == torch.float32
    scratch = None if direct else torch.empty(min(step, n), block, dtype=torch.float32, device=raw.device)
    scales = kernel.scales(blocks)
    for s in range(0, n, step):
        e = min(s + step, n)
        chunk = tuple(f[s:e] for f in scales)
        if direct:
            kernel.fill(blocks[s:e], flat[s:e], *chunk)
        else:
            kernel.fill(blocks[s:e], scratch[:e - s], *chunk)
            flat[s:e].copy_(scratch[:e - s])
    return out
