"""GGUF figures: weight error per type, one full-size fused layer's error, full-model file size per type,
torch dequant throughput against gguf-py's numpy dequant, and our K-quant search against round-to-nearest.

    python benchmarks/quant_gguf.py [--types q8_0,q6_k,q5_k,q4_k] [--rows N] [--no-layer] [--device cpu]

``gguf_section()`` returns the figures as text lines; ``benchmarks/quant.py`` (the FP8 figures) can call it so
one run prints both. ``--rows`` limits the rows of each weight-error matrix (the error is a per-block
statistic, so a row subset estimates it well; default: the full matrices). The fused layer needs about 3 GB
and, on a CPU, several minutes per K-quant type.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TYPES = ("q8_0", "q6_k", "q5_k", "q4_k")
SHAPES = ((3072, 3072), (14336, 3072))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _roundtrip(x: torch.Tensor, q, search: bool = True) -> torch.Tensor:
    from ovi.quant.gguf_dequant import dequantize
    from ovi.quant.gguf_quantize import quantize

    return dequantize(quantize(x, q, search=search).to(x.device), q, x.shape)


def weight_errors(types, rows: int | None, device) -> list[str]:
    from ovi.quant.gguf_write import parse_qtype

    out = ["weight RMS error (relative to the weight RMS), N(0, 0.02) and Student-t(3) weights; K-quants against "
           "round-to-nearest (RTN) of the same format:"]
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        n = min(rows or shape[0], shape[0])
        for dist in ("normal", "t3"):
            x = (torch.randn(n, shape[1], generator=g) if dist == "normal" else
                 torch.distributions.StudentT(3.0).sample((n, shape[1]))) * 0.02
            x = x.to(torch.bfloat16).float().to(device)
            cells = []
            for name in types:
                q = parse_qtype(name)
                t0 = time.perf_counter()
                err = _rel(_roundtrip(x, q), x)
                dt = time.perf_counter() - t0
                cell = f"{name} {100 * err:.3f}%"
                if name != "q8_0":
                    cell += f" (RTN {100 * _rel(_roundtrip(x, q, search=False), x):.3f}%, {dt:.1f}s)"
                cells.append(cell)
            out.append(f"  [{shape[0]}, {shape[1]}]{'' if n == shape[0] else f' ({n} rows)'} {dist}: " +
                       "; ".join(cells))
    return out


def fused_layer_errors(types, device) -> list[str]:
    """One full-size fused layer pair (video + audio block, random bf16 weights): output error per type."""
    from ovi.fusion.backbone import Block
    from ovi.fusion.config import OVI_AUDIO_CONFIG, OVI_VIDEO_CONFIG
    from ovi.fusion.rope import audio_rope, video_rope
    from ovi.quant.gguf_write import parse_qtype

    torch.manual_seed(0)
    vcfg, acfg = OVI_VIDEO_CONFIG, OVI_AUDIO_CONFIG
    blocks = [Block(vcfg).to(device), Block(acfg).to(device)]
    with torch.no_grad():
        for b in blocks:
            for name, p in b.named_parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
                elif "modulation" in name:
                    p.copy_(0.1 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.copy_(0.02 * torch.randn_like(p))
                else:
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                p.copy_(p.to(torch.bfloat16).float())  # the bf16 model is the reference
    grid, la, lt, d = (2, 8, 8), 64, 128, vcfg.dim
    xv, xa = torch.randn(1, math.prod(grid), d, device=device), torch.randn(1, la, d, device=device)
    ctx_v, ctx_a = torch.randn(1, lt, d, device=device), torch.randn(1, lt, d, device=device)
    e0v, e0a = 0.1 * torch.randn(1, 1, 6, d, device=device), 0.1 * torch.randn(1, 1, 6, d, device=device)
    rope_v = video_rope(grid, vcfg.head_dim, device)
    rope_a = audio_rope(la, acfg.head_dim, acfg.temporal_rope_scaling_factor, device)

    def layer():
        vb, ab = blocks
        vmod, amod = vb.modulation_for(e0v), ab.modulation_for(e0a)
        a_sa = ab.self_attn_phase(xa, amod, rope_a)
        v_sa = vb.self_attn_phase(xv, vmod, rope_v)
        return (vb.cross_ffn_phase(v_sa, vmod, ctx_v, rope_v, a_sa, rope_a),
                ab.cross_ffn_phase(a_sa, amod, ctx_a, rope_a, v_sa, rope_v))

    with torch.no_grad():
        ref = layer()
        masters = {id(p): p.detach().clone() for b in blocks for p in b.parameters() if p.ndim == 2}
        out = [f"one full-size fused layer (dim {d}, FFN {vcfg.ffn_dim}, {sum(p.numel() for p in masters.values()) / 1e6:.0f}M "
               f"quantised weights), relative error vs bf16 weights (float32 compute) of the output / of the "
               "layer's update (output - input):"]
        for name in types:
            q = parse_qtype(name)
            t0 = time.perf_counter()
            for b in blocks:
                for p in b.parameters():
                    if p.ndim == 2:
                        p.copy_(_roundtrip(masters[id(p)], q))
            dt = time.perf_counter() - t0
            got = layer()
            ev = (_rel(got[0], ref[0]), _rel(got[0] - xv, ref[0] - xv))
            ea = (_rel(got[1], ref[1]), _rel(got[1] - xa, ref[1] - xa))
            goal = {"q8_0": 0.005, "q4_k": 0.05}.get(name)
            out.append(f"  {name}: video {100 * ev[0]:.3f}% / {100 * ev[1]:.3f}%, audio {100 * ea[0]:.3f}% / "
                       f"{100 * ea[1]:.3f}%" + (f" (goal <= {100 * goal:.1f}% on the output: "
                                                  f"{'met' if max(ev[0], ea[0]) <= goal else 'NOT met'})"
                                                  if goal else "") + f"; quantised in {dt:.0f}s")
            for b in blocks:
                for p in b.parameters():
                    if p.ndim == 2:
                        p.copy_(masters[id(p)])
    return out


def file_sizes() -> list[str]:
    from ovi.fusion.config import OVI_FUSION_CONFIG
    from ovi.fusion.model import FusionModel
    from ovi.loading import meta_device
    from ovi.quant.gguf_write import fusion_plan, parse_qtype

    with meta_device():
        shapes = {k: tuple(v.shape) for k, v in FusionModel(OVI_FUSION_CONFIG).state_dict().items()}
    bf16 = sum(math.prod(s) for s in shapes.values()) * 2
    out = [f"full fusion model file size from shapes (bf16 safetensors {bf16 / 1e9:.2f} GB; tensor data only):"]
    for name in ("bf16", "f16", "q8_0", "q6_k", "q5_k", "q4_k"):
        plans = fusion_plan(shapes, parse_qtype(name))
        total = sum(p.nbytes for p in plans)
        quant = sum(p.nbytes for p in plans if p.qtype.name.lower() == name)
        out.append(f"  {name}: {total / 1e9:.2f} GB ({100 * total / bf16:.0f}% of bf16; {quant / 1e9:.2f} GB in "
                   f"{name.upper()} tensors, the rest F32 norms/biases/modulation and bf16 patch-embedding convs)")
    return out


def _blocks(q, x: np.ndarray) -> np.ndarray:
    """Raw blocks of ``x``: our quantiser for the types we write, gguf-py's where it has one, else random bytes
    with small finite fp16 scales (Q3_K / Q2_K: only the byte layout matters for speed)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from ovi.quant.gguf_dequant import block_sizes
    from ovi.quant.gguf_quantize import quantize

    if q in (Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q4_K):
        return quantize(torch.from_numpy(x), q).numpy()
    if q in (Q.Q3_K, Q.Q2_K):
        rng = np.random.default_rng(int(q))
        block, size = block_sizes(q)
        raw = rng.integers(0, 256, (x.size // block, size), dtype=np.uint8)
        for off in {Q.Q2_K: (80, 82), Q.Q3_K: (108,)}[q]:
            raw[:, off:off + 2] = (rng.standard_normal(len(raw)) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
        return raw.reshape(x.shape[0], -1)
    return np.ascontiguousarray(gguf.quantize(x, q)).view(np.uint8).reshape(x.shape[0], -1)


def dequant_throughput(repeats: int = 7) -> list[str]:
    """Our torch dequantisers against gguf-py's numpy ones on the same [3072, 3072] blocks.

    gguf-py returns a fresh float32 array. Ours is timed three ways: a fresh float32 tensor (the same
    contract), into a reused float32 buffer (what a layer gets on a GPU, whose caching allocator hands back
    the same memory every step, and what the CPU would get without the page faults of a fresh 36 MB
    allocation), and a fresh bf16 tensor (what the engine's layers ask for). Timings alternate between the
    two implementations so drift on a shared machine hits both alike; all results are checked identical."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from ovi.quant.gguf_dequant import dequantize

    shape = (3072, 3072)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.02
    out = [f"dequant throughput, {list(shape)} on the CPU ({torch.get_num_threads()} torch threads), median of "
           f"{repeats}; gguf-py numpy vs ours (speed-up in brackets; goal >= 5x):",
           "  type  numpy ms | fp32 fresh ms      | fp32 reused ms     | bf16 fresh ms"]
    for q in (Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1, Q.Q3_K, Q.Q2_K, Q.BF16, Q.F16):
        raw = _blocks(q, x)
        np_in = raw.view(np.float16) if q == Q.F16 else raw
        traw = torch.from_numpy(raw)
        buf = torch.empty(shape)
        runs = {"numpy": lambda: gguf.quants.dequantize(np_in, q),
                "fresh": lambda: dequantize(traw, q, shape),
                "reused": lambda: dequantize(traw, q, shape, out=buf),
                "bf16": lambda: dequantize(traw, q, shape, torch.bfloat16)}
        times = {k: [] for k in runs}
        results = {}
        for _ in range(repeats):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                results[k] = fn()
                times[k].append(time.perf_counter() - t0)
        ref = torch.from_numpy(np.ascontiguousarray(results["numpy"], dtype=np.float32)).reshape(shape)
        same = (torch.equal(results["fresh"], ref) and torch.equal(buf, ref)
                and torch.equal(results["bf16"], ref.to(torch.bfloat16)))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        cells = " | ".join(f"{1e3 * med[k]:6.1f} ({med['numpy'] / med[k]:4.1f}x)     " for k in ("fresh", "reused", "bf16"))
        out.append(f"  {q.name:5s} {1e3 * med['numpy']:6.1f}   | {cells}{'' if same else ' VALUES DIFFER'}")
    return out


def gguf_section(types=TYPES, rows: int | None = None, layer: bool = True, device="cpu") -> list[str]:
    """All GGUF figures as text lines (see the module docstring)."""
    lines = ["== GGUF =="]
    lines += file_sizes()
    lines += dequant_throughput()
    lines += weight_errors(types, rows, device)
    if layer:
        lines += fused_layer_errors(types, device)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--no-layer", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    for line in gguf_section(tuple(a.types.split(",")), a.rows, not a.no_layer, a.device):
        print(line, flush=True)


if __name__ == "__main__":
    main()
