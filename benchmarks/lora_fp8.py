"""LoRA on FP8 weights: merged in float32 and re-quantised against a low-rank side path.

    python benchmarks/lora_fp8.py [--tokens 1024] [--rank 128] [--repeats 5]

Both ways go through ``ovi.lora.apply_by_format`` (``fp8="merge"`` / ``fp8="side"``). Reported, each against the
float32 reference ``x @ (W + delta).T`` with the bf16 base weights ``W`` (and, for context, the bf16 merge
``round_bf16(W + delta)`` and the FP8 model without any LoRA against ``W`` alone):

* the tiny random fusion model converted with ``ovi convert --to fp8`` (per-tensor scales) and a tiny Ovi-convention
  LoRA on both branches (rank 4, deltas about ``--delta`` of the weights): relative error of one forward (video / audio), forward time, apply time;
* one full-size Wan 2.2 5B block's linears (dim 3072, FFN 14336: self- and cross-attention q/k/v/o, FFN in and
  out) with random fan-in weights and a rank-``--rank`` LoRA whose delta is ``--delta`` of each weight's norm
  (FastWan's file is rank 128): relative error of each linear's output on ``--tokens`` random tokens, time of the
  ten linears' forwards (what the LoRA adds to a step's share of one block), and the apply time.

CPU, float32 activations (the upcast FP8 path): the side path's cost relative to the layer is what a GPU sees too
(two thin matmuls of rank r beside one of the full width); the merged layer costs what the plain FP8 layer costs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

DIM, FFN = 3072, 14336  # Wan 2.2 TI2V-5B / Ovi backbone width and FFN width
BLOCK_LINEARS = {"self_attn.q": (DIM, DIM), "self_attn.k": (DIM, DIM), "self_attn.v": (DIM, DIM),
                 "self_attn.o": (DIM, DIM), "cross_attn.q": (DIM, DIM), "cross_attn.k": (DIM, DIM),
                 "cross_attn.v": (DIM, DIM), "cross_attn.o": (DIM, DIM), "ffn.0": (FFN, DIM), "ffn.2": (DIM, FFN)}


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _interleaved_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median time of each callable, run in turn ``repeats`` times (after one warm-up each), so that load from
    other jobs on the machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# -- the tiny model ------------------------------------------------------------------------------------------

def tiny_section(a) -> list[str]:
    from ovi.convert import convert_fp8
    from ovi.fusion.checkpoint import load_fusion_model
    from ovi.lora import LoraStrength, apply_by_format, apply_merged, load_lora, lora_target_shapes
    from ovi.tools.tiny.fusion import write_tiny
    from ovi.tools.tiny.lora import FACTOR_STD, write_tiny_lora

    tmp = Path(tempfile.mkdtemp(prefix="ovi_lora_fp8_"))
    src = write_tiny(tmp, 0)[0]
    fp8_file = tmp / "tiny_fp8.safetensors"
    convert_fp8(src, fp8_file, granularity="tensor")
    # alpha such that each delta is about --delta of its weight's norm, as for the full-size layers: the tiny
    # weights have entries ~ 1/sqrt(256), a rank-r pair of FACTOR_STD entries gives ~ FACTOR_STD^2 sqrt(r) * alpha / r
    rank = 4
    alpha = a.delta * rank / (256 ** 0.5 * FACTOR_STD ** 2 * rank ** 0.5)
    lora_file = write_tiny_lora(tmp / "tiny_ovi_lora.safetensors", convention="ovi", seed=3, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(0)
    v, au, ctx = (torch.randn(1, 48, 3, 8, 8, generator=g), torch.randn(1, 30, 20, generator=g),
                  torch.randn(1, 20, 32, generator=g))
    strength = [LoraStrength(1.0, 1.0)]

    @torch.no_grad()
    def run(m):
        return m(v, au, 500.0, ctx, ctx)

    base32 = load_fusion_model(src, dtype=torch.float32)
    plan = load_lora(lora_file, lora_target_shapes(base32))
    base_out = run(base32)
    apply_merged(base32, [plan], strength)
    ref = run(base32)
    bf16 = load_fusion_model(src, dtype=torch.bfloat16)
    apply_merged(bf16, [plan], strength)
    bf16_out = [t.float() for t in bf16(v.bfloat16(), au.bfloat16(), 500.0, ctx.bfloat16(), ctx.bfloat16())]
    fp8_plain = run(load_fusion_model(fp8_file, dtype=torch.float32))

    rows = [f"| bf16 model, LoRA merged in bf16 | {_rel(bf16_out[0], ref[0]):.2%} / {_rel(bf16_out[1], ref[1]):.2%} "
            "| – | – |",
            f"| FP8 model without the LoRA, against the float32 model without it | {_rel(fp8_plain[0], base_out[0]):.2%}"
            f" / {_rel(fp8_plain[1], base_out[1]):.2%} | – | – |"]
    models = {"plain": load_fusion_model(fp8_file, dtype=torch.float32)}
    applied = {}
    for mode in ("merge", "side"):
        m = load_fusion_model(fp8_file, dtype=torch.float32)
        t0 = time.perf_counter()
        apply_by_format(m, [plan], strength, fp8=mode, keep_originals=False)
        applied[mode] = (run(m), time.perf_counter() - t0)
        models[mode] = m
    times = _interleaved_times({k: (lambda m=m: run(m)) for k, m in models.items()}, a.repeats)
    for mode in ("merge", "side"):
        out, apply_s = applied[mode]
        rows.append(f"| FP8 model, LoRA {'merged + re-quantised' if mode == 'merge' else 'as a side path'} | "
                    f"{_rel(out[0], ref[0]):.2%} / {_rel(out[1], ref[1]):.2%} | {times[mode] * 1e3:.1f} | "
                    f"{apply_s * 1e3:.1f} |")
    rows.append(f"| FP8 model without LoRA (time only) | – | {times['plain'] * 1e3:.1f} | – |")
    return [f"Tiny random model (2 layers, 256 wide), per-tensor FP8, tiny Ovi LoRA (rank 4, both branches, strength "
            f"1, ||delta|| ~ {a.delta:g} ||W||); error of one forward against the float32 model with the LoRA merged in float32 (video / audio):",
            "", "| model | error | forward ms | apply ms |", "|---|---|---|---|", *rows]


# -- one full-size block's linears ---------------------------------------------------------------------------

class _Block(nn.Module):
    """The ten linears of one Wan block under their Ovi names (``video_model.blocks.0.<name>``)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.video_model = nn.Module()
        self.video_model.blocks = nn.ModuleList([nn.Module()])
        for name, w in weights.items():
            parent = self.video_model.blocks[0]
            *path, leaf = name.split(".")
            for piece in path:
                if not hasattr(parent, piece):
                    parent.add_module(piece, nn.Module())
                parent = getattr(parent, piece)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w.clone()
            parent.add_module(leaf, lin)

    def linear(self, name: str) -> nn.Module:
        return self.video_model.blocks[0].get_submodule(name)


def _to_fp8(block: _Block) -> _Block:
    from ovi.quant.fp8 import FP8Linear

    for name in BLOCK_LINEARS:
        parent_name, _, leaf = name.rpartition(".")
        parent = block.video_model.blocks[0].get_submodule(parent_name) if parent_name else block.video_model.blocks[0]
        fp8 = FP8Linear.from_linear(getattr(parent, leaf), "tensor")
        fp8.mode = "upcast"
        setattr(parent, leaf, fp8)
    return block


def full_section(a) -> list[str]:
    from ovi.lora import LoraStrength, LowRank, apply_by_format
    from ovi.lora.plan import LoraPlan, PlannedPatch

    g = torch.Generator().manual_seed(1)
    weights, patches = {}, []
    for name, (n_out, n_in) in BLOCK_LINEARS.items():
        w = (torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)).to(torch.bfloat16).float()
        down = torch.randn(a.rank, n_in, generator=g) / math.sqrt(n_in)
        up = torch.randn(n_out, a.rank, generator=g)
        # scale the pair so that ||up @ down|| = delta * ||W||
        up *= a.delta * w.norm() / (up @ down).norm()
        weights[name] = w
        patches.append(PlannedPatch(f"video_model.blocks.0.{name}.weight", "video",
                                    LowRank(up=up.to(torch.bfloat16), down=down.to(torch.bfloat16), alpha=float(a.rank)),
                                    name))
    plan = LoraPlan(path=Path("full_size_rank_lora.safetensors"), convention="synthetic", patches=tuple(patches),
                    modules=len(patches), matched=len(patches), unmatched=(), plain_wan=True)
    strength = [LoraStrength(1.0, 0.0)]
    x = torch.randn(a.tokens, DIM, generator=g)
    xf = torch.randn(a.tokens, FFN, generator=g)

    def inputs(name):
        return xf if name == "ffn.2" else x

    deltas = {p.source: p.patch.delta() for p in patches}
    ref = {n: inputs(n) @ (w + deltas[n]).T for n, w in weights.items()}
    bf16_merge = {n: inputs(n) @ (w + deltas[n]).to(torch.bfloat16).float().T for n, w in weights.items()}

    def outputs(block):
        with torch.no_grad():
            return {n: block.linear(n)(inputs(n)) for n in BLOCK_LINEARS}

    plain = _to_fp8(_Block(weights))
    plain_out = outputs(plain)
    base_err = max(_rel(plain_out[n], inputs(n) @ w.T) for n, w in weights.items())
    blocks, results = {"plain": plain}, {}
    for mode in ("merge", "side"):
        block = _to_fp8(_Block(weights))
        t0 = time.perf_counter()
        apply_by_format(block, [plan], strength, fp8=mode, keep_originals=False)
        apply_s = time.perf_counter() - t0
        out = outputs(block)
        results[mode] = ({n: _rel(out[n], ref[n]) for n in BLOCK_LINEARS}, apply_s)
        blocks[mode] = block
    times = _interleaved_times({k: (lambda b=b: outputs(b)) for k, b in blocks.items()}, a.repeats)
    t_plain = times["plain"]
    shapes = ("self_attn.q", "ffn.0", "ffn.2")
    head = " | ".join(f"{n} [{BLOCK_LINEARS[n][0]}x{BLOCK_LINEARS[n][1]}]" for n in shapes)
    rows = [f"| bf16 model, LoRA merged in bf16 | "
            + " | ".join(f"{_rel(bf16_merge[n], ref[n]):.3%}" for n in shapes) + " | – | – |"]
    for mode, label in (("merge", "FP8, merged + re-quantised"), ("side", "FP8, side path")):
        (errs, apply_s), t = results[mode], times[mode]
        rows.append(f"| {label} | " + " | ".join(f"{errs[n]:.3%}" for n in shapes)
                    + f" | {t * 1e3:.0f} ({t / t_plain:.2f}x) | {apply_s:.2f} |")
    rows.append(f"| FP8 without LoRA (its own error against W: {base_err:.3%}) | – | – | – | "
                f"{t_plain * 1e3:.0f} (1.00x) | – |")
    return [f"One full-size block's ten linears (dim {DIM}, FFN {FFN}), per-tensor FP8, rank-{a.rank} LoRA with "
            f"||delta|| = {a.delta:g} ||W||, {a.tokens} tokens, float32 activations; error of each linear's output "
            "against x @ (W + delta).T in float32; time of the ten forwards (median of "
            f"{a.repeats}); apply time for the ten layers:", "",
            f"| way | {head} | ten linears ms | apply s |", "|---|---|---|---|---|---|", *rows]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--delta", type=float, default=0.1, help="||up @ down|| as a fraction of ||W||")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sections", default="tiny,full")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    for name in a.sections.split(","):
        print("\n".join({"tiny": tiny_section, "full": full_section}[name.strip()](a)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
