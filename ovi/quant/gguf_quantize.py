"""Our GGUF quantisers (torch, vectorised over all blocks): Q8_0, Q6_K, Q5_K, Q4_K, plus the plain F32/F16/BF16.

Q8_0 reproduces ggml's reference rounding (|max|/127 scale, ties away from zero) bit for bit. The K-quants
search each sub-block's scale (and min) instead of taking it from the block's extremes: a set of candidate
scales around the round-to-nearest one is tried, each followed by a least-squares refit of scale and min to
the integers it produced, and the candidate with the least squared error wins. The sub-block scales are then
stored in 6 (Q4_K/Q5_K) or 8 (Q6_K) bits under an fp16 super-scale, and the integers are re-derived from the
stored scales, so what is scored is what a reader reconstructs. ``quantize_rtn`` is the plain baseline with
the same storage (scale from the extremes, no search), kept for the error comparison.

Input: a float tensor whose last dim is a multiple of the block size; output: uint8 ``[*lead, row_bytes]``.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q

from .gguf_dequant import QK_K, block_sizes

QUANTIZERS = (Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q4_K)
# Values per pass, bounding the temporaries of the candidate search. On the CPU they should stay in cache and
# under malloc's mmap threshold, so each op reuses warm memory instead of faulting in fresh pages (2^18 measured
# 1.5-1.9x faster than 2^22 on 2 cores, identical bytes); a GPU wants few, large launches.
_CPU_CHUNK = 1 << 18
_DEVICE_CHUNK = 1 << 22
# Candidate scales tried per sub-block, as offsets from the round-to-nearest level count; more candidates
# lower the error a little further and cost time linearly.
_AFFINE_DELTAS = (-0.8, -0.5, -0.3, -0.1, 0.1, 0.3, 0.5, 0.8)
_SYMMETRIC_STEPS = (-0.4, 0.3, 1.0, 2.0, 3.5, 5.0)


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    """[n] or [n, 1] float32 -> [n, 2] bytes of the fp16 value."""
    return v.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    # ggml's roundf: ties away from zero, written as numpy's reference does so that every value agrees
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


# -- Q8_0 ---------------------------------------------------------------------------------------------------

def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_away(blocks * inv).to(torch.int8).view(torch.uint8)
    return torch.cat([_half_bytes(d), q], dim=1)


# -- scale searches ---------------------------------------------------------------------------------------

def _affine_search(x: torch.Tensor, nmax: int, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [m, L]: (scale >= 0, offset <= 0) with x ~ scale*q + offset, q in [0, nmax]."""
    lo = x.amin(dim=1).clamp(max=0)
    hi = x.amax(dim=1)
    rng = hi - lo
    base = torch.where(rng > 0, rng / nmax, torch.ones_like(rng))
    if not search:
        return torch.where(rng > 0, base, torch.zeros_like(rng)), lo
    n = x.shape[1]
    sx = x.sum(dim=1)
    best_s, best_b = base.clone(), lo.clone()
    xl = x - lo[:, None]
    best_err = torch.square(torch.clamp(torch.round(xl / base[:, None]), 0, nmax) * base[:, None] + lo[:, None]
                            - x).sum(dim=1)
    for delta in _AFFINE_DELTAS:
        inv = (nmax + delta) / torch.where(rng > 0, rng, torch.ones_like(rng))
        q = torch.clamp(torch.round(xl * inv[:, None]), 0, nmax)
        for _ in range(2):  # refit (scale, offset) to q, re-round with the refit, refit again
            sq, sqq, sqx = q.sum(dim=1), (q * q).sum(dim=1), (q * x).sum(dim=1)
            det = n * sqq - sq * sq
            ok = det > 0
            safe = torch.where(ok, det, torch.ones_like(det))
            s = torch.where(ok, (n * sqx - sq * sx) / safe, base)
            b = torch.where(ok, (sqq * sx - sq * sqx) / safe, lo)
            pos = b > 0  # the format stores a non-negative min: offset is capped at 0, refit the scale alone
            s = torch.where(pos, sqx / sqq.clamp(min=1), s)
            b = torch.where(pos, torch.zeros_like(b), b)
            s = torch.where(s > 0, s, base)
            q = torch.clamp(torch.round((x - b[:, None]) / s[:, None]), 0, nmax)
        err = torch.square(q * s[:, None] + b[:, None] - x).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_b = torch.where(better, b, best_b)
    return torch.where(rng > 0, best_s, torch.zeros_like(best_s)), best_b


def _symmetric_search(x: torch.Tensor, qmin: int, qmax: int, search: bool) -> torch.Tensor:
    """Per row of x [m, L]: a signed scale with x ~ scale*q, q in [qmin, qmax]."""
    amax = x.abs().amax(dim=1)
    nz = amax > 0
    safe = torch.where(nz, amax, torch.ones_like(amax))
    base = safe / qmax
    if not search:
        return torch.where(nz, base, torch.zeros_like(base))
    idx = x.abs().argmax(dim=1, keepdim=True)
    xm = torch.where(nz, x.gather(1, idx)[:, 0], torch.ones_like(amax))  # the signed extreme value
    best_s = base.clone()
    q0 = torch.clamp(torch.round(x / base[:, None]), qmin, qmax)
    best_err = torch.square(q0 * base[:, None] - x).sum(dim=1)
    for t in [qmin + v for v in _SYMMETRIC_STEPS] + [qmax - v for v in _SYMMETRIC_STEPS]:
        q = torch.clamp(torch.round(x * (t / xm)[:, None]), qmin, qmax)
        sqq = (q * q).sum(dim=1)
        s = torch.where(sqq > 0, (q * x).sum(dim=1) / sqq.clamp(min=1), base)
        err = torch.square(q * s[:, None] - x).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return torch.where(nz, best_s, torch.zeros_like(best_s))


# -- K-quant packing --------------------------------------------------------------------------------------

def _pack_nibbles(q: torch.Tensor, groups: int) -> torch.Tensor:
    """[n, groups*2*w] values < 16 -> [n, groups*w] bytes: per group, first half in low nibbles."""
    n = q.shape[0]
    q = q.reshape(n, groups, 2, -1)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1)


def _pack_fields(v: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """[n, count, w] values < 2**width -> [n, w] bytes: field i at bits i*width."""
    out = torch.zeros_like(v[:, 0])
    for i in range(count):
        out |= v[:, i] << (i * width)
    return out


def _pack_scale_min(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins [n, 8] -> the 12 packed bytes of Q4_K / Q5_K."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat([lo, mid, hi], dim=1)


def _qk_affine(x: torch.Tensor, bits: int, search: bool) -> torch.Tensor:
    """Q4_K (bits=4) or Q5_K (bits=5) blocks from x [n, 256]."""
    n, nmax = x.shape[0], (1 << bits) - 1
    sub = x.reshape(n * 8, 32)
    scale, offset = _affine_search(sub, nmax, search)
    scale, mins = scale.reshape(n, 8), (-offset).reshape(n, 8)
    d = (scale.amax(dim=1, keepdim=True) / 63).to(torch.float16).float()
    dmin = (mins.amax(dim=1, keepdim=True) / 63).to(torch.float16).float()
    sc = torch.where(d > 0, torch.round(scale / torch.where(d > 0, d, torch.ones_like(d))), 0).clamp(0, 63)
    mn = torch.where(dmin > 0, torch.round(mins / torch.where(dmin > 0, dmin, torch.ones_like(dmin))), 0).clamp(0, 63)
    eff = (d * sc).reshape(n, 8, 1)  # exactly what the reader multiplies by
    off = (dmin * mn).reshape(n, 8, 1)
    xs = x.reshape(n, 8, 32)
    q = torch.where(eff > 0, torch.round((xs + off) / torch.where(eff > 0, eff, torch.ones_like(eff))), 0)
    q = q.clamp(0, nmax).to(torch.uint8).reshape(n, QK_K)
    head = [_half_bytes(d), _half_bytes(dmin), _pack_scale_min(sc.to(torch.uint8), mn.to(torch.uint8))]
    if bits == 4:
        return torch.cat(head + [_pack_nibbles(q, 4)], dim=1)
    qh = _pack_fields((q >> 4).reshape(n, 8, 32), 8, 1)
    return torch.cat(head + [qh, _pack_nibbles(q & 0x0F, 4)], dim=1)


def _q6_k(x: torch.Tensor, search: bool) -> torch.Tensor:
    n = x.shape[0]
    scale = _symmetric_search(x.reshape(n * 16, 16), -32, 31, search).reshape(n, 16)
    idx = scale.abs().argmax(dim=1, keepdim=True)
    top = scale.gather(1, idx)
    d = (top / -128).to(torch.float16).float()  # the largest sub-scale lands on -128, the full int8 range
    safe = torch.where(d != 0, d, torch.ones_like(d))
    sc = torch.where(d != 0, torch.round(scale / safe), 0).clamp(-128, 127)
    eff = (d * sc).reshape(n, 16, 1)
    xs = x.reshape(n, 16, 16)
    q = torch.where(eff != 0, torch.round(xs / torch.where(eff != 0, eff, torch.ones_like(eff))), 0)
    q = (q.clamp(-32, 31) + 32).to(torch.uint8).reshape(n, QK_K)
    ql = _pack_nibbles((q & 0x0F).reshape(n, 2, 2, 64).reshape(n, -1), 2)
    qh = _pack_fields((q >> 4).reshape(n * 2, 4, 32), 4, 2).reshape(n, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _half_bytes(d)], dim=1)


# -- entry points -----------------------------------------------------------------------------------------

def _blocks(x: torch.Tensor, qtype: Q, search: bool) -> torch.Tensor:
    if qtype == Q.Q8_0:
        return _q8_0(x)
    if qtype == Q.Q6_K:
        return _q6_k(x, search)
    if qtype == Q.Q5_K:
        return _qk_affine(x, 5, search)
    if qtype == Q.Q4_K:
        return _qk_affine(x, 4, search)
    raise NotImplementedError(f"no quantiser for {Q(qtype).name} (ours: {', '.join(t.name for t in QUANTIZERS)})")


def can_quantize(shape, qtype: Q) -> bool:
    return len(shape) >= 1 and shape[-1] % block_sizes(qtype)[0] == 0


def quantize(x: torch.Tensor, qtype: Q | int, *, search: bool = True) -> torch.Tensor:
    """``x`` (any float dtype, last dim a multiple of the block size) -> GGUF bytes [*lead, row_bytes] on the CPU;
    the work runs on ``x``'s device."""
    qtype = Q(qtype)
    x = x.detach().to(torch.float32)
    if qtype == Q.F32:
        return x.cpu().contiguous().view(torch.uint8)
    if qtype == Q.F16:
        return x.to(torch.float16).cpu().contiguous().view(torch.uint8)
    if qtype == Q.BF16:
        return x.to(torch.bfloat16).cpu().contiguous().view(torch.uint8)
    block, type_size = block_sizes(qtype)
    if not can_quantize(x.shape, qtype):
        raise ValueError(f"cannot quantise a tensor of shape {list(x.shape)} to {qtype.name}: the last dim must "
                         f"be a multiple of {block}")
    flat = x.reshape(-1, block)
    step = max(1, (_CPU_CHUNK if x.device.type == "cpu" else _DEVICE_CHUNK) // block)
    out = torch.cat([_blocks(flat[i:i + step], qtype, search) for i in range(0, flat.shape[0], step)])
    return out.reshape(*x.shape[:-1], x.shape[-1] // block * type_size).cpu()


def quantize_rtn(x: torch.Tensor, qtype: Q | int) -> torch.Tensor:
    """The round-to-nearest baseline of the same format (scales from each sub-block's extremes, no search)."""
    return quantize(x, qtype, search=False)
