"""Denoising-step time and memory of the fusion model against a plain reference forward, block swap and VAE decode.

    python benchmarks/engine.py [--variants 720x720_5s,960x960_10s] [--steps-timed N] [--attention sdpa,flash_attn]
                                [--quick] [--block-swap N] [--no-decode]

On a CUDA/ROCm device it builds the FULL-SIZE fusion model (30 fused layers, 3072 wide) with random bf16 weights
drawn on the device (no checkpoint) and reports, per variant and attention backend:

* seconds per denoising step (positive forward + negative forward with SLG) of ``FusionModel``, and beside it
  the same step through ``reference_forward`` below: a plain re-implementation of the official forward order
  (per-token [B, L, 6, D] modulation computed in float32, complex float64 RoPE, nothing cached), same weights
  and same attention kernel; the ratio ours / reference (goal <= 1.0);
* block swap under a 16 GB cap (``torch.cuda.set_per_process_memory_fraction``): step time against all-GPU
  (goal <= 1.2x);
* the peak memory of each phase, and the peak of a tiled 960x960_10s video decode with the full-size Wan2.2 VAE
  (goal <= 8 GB).

Without an accelerator it runs a REDUCED model (2 fused layers, 256 wide, text_len 64, small grids, float32) so
the script itself is exercised; those figures say nothing about the real model, and the output says so.
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ovi import memory  # noqa: E402
from ovi.attention import AttentionBackendError, make_attention  # noqa: E402
from ovi.block_swap import BlockSwapper  # noqa: E402
from ovi.fusion.config import OVI_FUSION_CONFIG, FusionConfig  # noqa: E402
from ovi.fusion.model import FusionModel  # noqa: E402
from ovi.fusion.rope import audio_rope, video_rope  # noqa: E402
from ovi.fusion.backbone import sinusoid  # noqa: E402

GiB = 1024 ** 3
# variant -> (latent frames, latent height, latent width, audio tokens); 16 pixels per latent pixel.
VARIANTS = {"720x720_5s": (31, 44, 44, 157), "960x960_10s": (61, 60, 60, 314)}
REDUCED_VARIANTS = {"720x720_5s": (3, 8, 8, 20), "960x960_10s": (5, 12, 12, 40)}
CAP_BYTES = 16 * 10 ** 9
SLG_LAYER = 11  # the official default


# -- weights ---------------------------------------------------------------------------------------
@torch.no_grad()
def randomize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """Materialise a meta-built module on ``device`` with random weights generated there: N(0, 1/fan_in) for
    matrices and kernels, gains near 1, small biases and modulation tables (activations stay O(1))."""
    module.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        p.data = torch.randn(p.shape, generator=g, device=device, dtype=dtype)
        if "modulation" in name:
            p.data.mul_(0.1)
        elif name.endswith("bias"):
            p.data.mul_(0.02)
        elif p.ndim == 1:
            p.data.mul_(0.1).add_(1.0)
        else:
            p.data.mul_(1.0 / math.sqrt(math.prod(p.shape[1:])))
    for b in module.buffers():
        b.zero_()


# -- the reference forward ------------------------------------------------------------------------------
def _rms(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _ln(x, norm):
    # the official norms compute in float32 and hand back the input dtype; callers upcast again to modulate
    return F.layer_norm(x.float(), norm.normalized_shape, None if norm.weight is None else norm.weight.float(),
                        None if norm.bias is None else norm.bias.float(), norm.eps).to(x.dtype)


def _rotate(x, freqs):
    """Complex float64 rotation of interleaved pairs; freqs [L, 1, P] complex128."""
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)


def _qk(lin, norm, x, heads, eps):
    y = lin(x)
    if not isinstance(norm, torch.nn.Identity):
        y = _rms(y, norm.weight, eps)
    return y.unflatten(-1, (heads, -1))


def _ref_self_attn(sa, x, freqs, attn, eps):
    n = sa.num_heads
    q = _rotate(_qk(sa.q, sa.norm_q, x, n, eps), freqs)
    k = _rotate(_qk(sa.k, sa.norm_k, x, n, eps), freqs)
    v = sa.v(x).unflatten(-1, (n, -1))
    return sa.o(attn(q, k, v).flatten(2))


def _ref_cross_attn(ca, x, ctx, freqs, other, other_freqs, attn, eps):
    n = ca.num_heads
    q = _qk(ca.q, ca.norm_q, x, n, eps)
    out = attn(q, _qk(ca.k, ca.norm_k, ctx, n, eps), ca.v(ctx).unflatten(-1, (n, -1)))
    t = _ln(other, ca.pre_attn_norm_fusion)
    k_t = _rotate(_qk(ca.k_fusion, ca.norm_k_fusion, t, n, eps), other_freqs)
    out = out + attn(_rotate(q, freqs), k_t, ca.v_fusion(t).unflatten(-1, (n, -1)))
    return ca.o(out.flatten(2))


def _ref_mod(block, e0):
    """Per-token modulation [B, L, 6, D] in float32, as the official blocks compute it."""
    return (block.modulation.modulation.float().unsqueeze(0) + e0.float()).unbind(2)


def _ref_self_phase(block, x, e, freqs, attn, eps):
    y = _ref_self_attn(block.self_attn, (_ln(x, block.norm1).float() * (1 + e[1]) + e[0]).to(x.dtype), freqs, attn, eps)
    return (x.float() + y.float() * e[2]).to(x.dtype)


def _ref_cross_phase(block, x, e, ctx, freqs, other, other_freqs, attn, eps):
    xn = _ln(x, block.norm3) if not isinstance(block.norm3, torch.nn.Identity) else x
    x = x + _ref_cross_attn(block.cross_attn, xn, ctx, freqs, other, other_freqs, attn, eps)
    y = block.ffn((_ln(x, block.norm2).float() * (1 + e[4]) + e[3]).to(x.dtype))
    return (x.float() + y.float() * e[5]).to(x.dtype)


def _freqs(rope, head_dim):
    """Complex table over every pair of the head; pairs the table leaves out (audio) rotate by 1."""
    f = torch.complex(rope.cos.double(), rope.sin.double())
    rest = head_dim // 2 - f.shape[-1]
    return torch.cat([f, torch.ones(*f.shape[:-1], rest, dtype=f.dtype, device=f.device)], -1) if rest else f


@torch.no_grad()
def reference_forward(model: FusionModel, video, audio, t, video_ctx, audio_ctx, attn, slg_layer=0):
    """The official order on the batched inputs: per-token timesteps -> per-token time embedding and 6-way
    modulation, audio self-attn, video self-attn, audio cross+FFN, video cross+FFN per layer, then the heads."""
    vm, am = model.video_model, model.audio_model
    dtype = model._dtype()
    xv = vm.patch_embedding(video.to(dtype))
    grid = tuple(xv.shape[2:])
    xv = xv.flatten(2).transpose(1, 2)
    xa = am.patch_embedding(audio.to(dtype))
    b, lv, la = xv.shape[0], xv.shape[1], xa.shape[1]

    def time(bb, tt, n):
        e = bb.time_embedding(sinusoid(tt.expand(b, n).flatten(), bb.config.freq_dim).to(dtype))
        e0 = bb.time_projection(e)
        return e.float().unflatten(0, (b, n)), e0.float().unflatten(0, (b, n)).unflatten(-1, (6, -1))

    ev, ev0 = time(vm, t[:, None], lv)
    ea, ea0 = time(am, t[:, None], la)
    cv, ca = vm.text_embedding(video_ctx.to(dtype)), am.text_embedding(audio_ctx.to(dtype))
    hv, ha = model.config.video.head_dim, model.config.audio.head_dim
    fv = _freqs(video_rope(grid, hv, xv.device), hv)
    fa = _freqs(audio_rope(la, ha, model.config.audio.temporal_rope_scaling_factor, xv.device), ha)
    eps_v, eps_a = model.config.video.eps, model.config.audio.eps
    for i in range(model.num_layers):
        if slg_layer > 0 and i == slg_layer:
            continue
        vb, ab = model.layer_modules(i)
        mv, ma = _ref_mod(vb, ev0), _ref_mod(ab, ea0)
        a_sa = _ref_self_phase(ab, xa, ma, fa, attn, eps_a)
        v_sa = _ref_self_phase(vb, xv, mv, fv, attn, eps_v)
        xa = _ref_cross_phase(ab, a_sa, ma, ca, fa, v_sa, fv, attn, eps_a)
        xv = _ref_cross_phase(vb, v_sa, mv, cv, fv, a_sa, fa, attn, eps_v)

    def head(bb, x, e):
        shift, scale = (bb.head.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return bb.head.head((_ln(x, bb.head.norm).float() * (1 + scale) + shift).to(x.dtype))

    return vm.unpatchify(head(vm, xv, ev), grid), am.unpatchify(head(am, xa, ea), (la,))


# -- timing ---------------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device, steps: int) -> float:
    """Seconds per call of ``fn`` (one warm-up call first)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def make_inputs(cfg: FusionConfig, grid, device, dtype, seed=0):
    f, h, w, la = grid
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32)  # noqa: E731
    ctx = lambda n, c: torch.cat([r(1, n, c.text_dim), torch.zeros(1, c.text_len - n, c.text_dim, device=device)],
                                 1).to(dtype)  # noqa: E731
    pair = lambda n: tuple(ctx(min(n, c.text_len // 2), c) for c in (cfg.video, cfg.audio))  # noqa: E731
    return dict(video=r(1, cfg.video.in_dim, f, h, w), audio=r(1, la, cfg.audio.in_dim),
                t=torch.tensor([900.0], device=device), pos=pair(60), neg=pair(20))


def step_fn(forward, x, slg):
    """One denoising step: the positive and the negative (SLG) forward."""
    def step():
        forward(x["video"], x["audio"], x["t"], *x["pos"], slg_layer=0)
        return forward(x["video"], x["audio"], x["t"], *x["neg"], slg_layer=slg)
    return step


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


# -- main -------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="720x720_5s,960x960_10s")
    ap.add_argument("--steps-timed", type=int, default=3)
    ap.add_argument("--attention", default=None, help="comma list of sdpa, flash_attn, sage (default: every one "
                                                      "available here)")
    ap.add_argument("--quick", action="store_true", help="one timed step, the first variant only, no decode")
    ap.add_argument("--block-swap", type=int, default=None, help="resident layers under the cap (default: sized "
                                                                  "from the measured activation peak)")
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args(argv)

    device = memory.pick_device(None)
    full = device.type == "cuda"
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    steps = args.steps_timed
    if args.quick:
        variants, steps, args.no_decode = variants[:1], 1, True
    if full:
        cfg, dtype, grids, slg = OVI_FUSION_CONFIG, torch.bfloat16, VARIANTS, SLG_LAYER
    else:
        small = dict(dim=256, num_heads=2, ffn_dim=512, num_layers=2, text_dim=256, text_len=64)
        cfg = FusionConfig(replace(OVI_FUSION_CONFIG.video, **small), replace(OVI_FUSION_CONFIG.audio, **small))
        dtype, grids, slg = torch.float32, REDUCED_VARIANTS, 1
        print("NOTE: no CUDA/ROCm device: running a REDUCED model (2 fused layers, 256 wide, text_len 64, small grids, "
              "float32) on the CPU. These figures only exercise the script; they say nothing about the real model.\n")
    backends = args.attention.split(",") if args.attention else ["sdpa", "flash_attn", "sage"]
    attns = {}
    for name in backends:
        try:
            attns[name] = make_attention(name, device, dtype)
        except AttentionBackendError as e:
            if args.attention:
                raise
            print(f"attention {name}: skipped ({e})".split(". To use")[0])
    report = memory.MemoryReport(device)
    rows, all_gpu = [], {}

    t0 = time.perf_counter()
    with report.phase("build"):
        with torch.device("meta"):
            model = FusionModel(cfg)
        randomize(model, device, dtype)
        model.compute_dtype = dtype
        model.eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"device: {memory.device_description(device)}; model {model_bytes / GiB:.2f} GiB "
          f"({cfg.num_layers} fused layers, dim {cfg.video.dim}), built in {time.perf_counter() - t0:.1f} s\n")

    act_peak = 0
    for v in variants:
        x = make_inputs(cfg, grids[v], device, dtype)
        tokens = grids[v][0] * (grids[v][1] // 2) * (grids[v][2] // 2)
        for name, attn in attns.items():
            model.set_attention(attn)
            with torch.no_grad(), report.phase(f"{v} {name} all_gpu"):
                ours = time_steps(step_fn(model, x, slg), device, steps)
                out = model(x["video"], x["audio"], x["t"], *x["neg"], slg_layer=slg)
            peak = report.peak(f"{v} {name} all_gpu")
            act_peak = max(act_peak, (peak or 0) - model_bytes)
            with torch.no_grad(), report.phase(f"{v} {name} reference"):
                ref_fwd = lambda *a, slg_layer=0: reference_forward(model, *a, attn=attn, slg_layer=slg_layer)  # noqa
                ref = time_steps(step_fn(ref_fwd, x, slg), device, steps)
                ref_out = ref_fwd(x["video"], x["audio"], x["t"], *x["neg"], slg_layer=slg)
            err = max(rel_err(out[0], ref_out[0]), rel_err(out[1], ref_out[1]))
            del out, ref_out
            all_gpu[(v, name)] = ours
            rows.append((v, f"{tokens:,} + {grids[v][3]}", name, "all_gpu", ours, ref, ours / ref,
                         f"{ours / ref:.2f}x of reference", peak, report.peak(f"{v} {name} reference"),
                         f"max rel diff vs ref {err:.1e}"))

    # Block swap: the model moves to pinned host memory and runs under the cap.
    name, attn = next(iter(attns.items()))
    model.set_attention(attn)
    layer_bytes = sum(p.numel() * p.element_size() for b in model.layer_modules(0) for p in b.parameters())
    fixed_bytes = model_bytes - cfg.num_layers * layer_bytes
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.cpu()
    memory.defragment(device)
    if full:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total), device)
    n = args.block_swap
    if n is None:
        budget = CAP_BYTES - act_peak - fixed_bytes - 2 * layer_bytes - GiB // 2
        n = max(0, min(cfg.num_layers, int(budget // layer_bytes))) if full else 1
    for v in variants:
        x = make_inputs(cfg, grids[v], device, dtype)
        while True:
            swapper = BlockSwapper(model, n, device)
            try:
                with torch.no_grad(), report.phase(f"{v} {name} block_swap"):
                    sec = time_steps(step_fn(swapper.forward, x, slg), device, steps)
                break
            except torch.OutOfMemoryError:
                swapper.detach()
                memory.defragment(device)
                if n == 0:
                    raise
                print(f"block_swap {n}: out of memory under the cap, retrying with {max(0, n - 2)}")
                n = max(0, n - 2)
        swapper.detach()
        memory.defragment(device)
        base = all_gpu[(v, name)]
        rows.append((v, "", name, f"block_swap {n}/{cfg.num_layers}" + (" (16 GB cap)" if full else ""), sec,
                     None, None, f"{sec / base:.2f}x of all_gpu", report.peak(f"{v} {name} block_swap"), None, ""))
    if full:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    del model, swapper
    memory.defragment(device)

    if not args.no_decode:
        rows.append(decode_row(device, full, report))

    print("| variant | tokens (video + audio) | attention | mode | s/step | reference s/step | ratio | peak GiB | "
          "reference peak GiB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    f = lambda s: "-" if s is None else f"{s:.3f}"  # noqa: E731
    g = lambda b: "-" if b is None else f"{b / GiB:.2f}"  # noqa: E731
    for v, tok, name, mode, sec, ref, _, ratio, peak, rpeak, note in rows:
        print(f"| {v} | {tok} | {name} | {mode} | {f(sec)} | {f(ref)} | {ratio} | {g(peak)} | {g(rpeak)} | {note} |")
    print("\nstep = positive forward + negative forward with SLG layer %d; peak = allocator peak (CPU: process RSS "
          "peak) of the phase\n" % slg)
    print(report.table())


def decode_row(device, full, report):
    from ovi.vae.wan22 import Wan22VAE, WanVAEConfig

    if full:
        cfg, (f, h, w), tile, overlap, dtype = WanVAEConfig(), VARIANTS["960x960_10s"][:3], 32, 8, torch.float32
    else:
        cfg = WanVAEConfig(dim=16, dec_dim=16)
        (f, h, w), tile, overlap, dtype = (2, 8, 8), 6, 2, torch.float32
    with torch.device("meta"):
        vae = Wan22VAE(cfg)
    randomize(vae, device, dtype)
    vae.eval()
    z = torch.randn(1, cfg.z_dim, f, h, w, device=device)
    memory.defragment(device)
    with report.phase("decode 960x960_10s tiled"):
        t0 = time.perf_counter()
        video = vae.decode(z, tile_size=tile, tile_overlap=overlap, output_device="cpu")
        _sync(device)
        sec = time.perf_counter() - t0
    shape = list(video.shape)
    del vae, video
    memory.defragment(device)
    return ("960x960_10s", f"latent {f}x{h}x{w}", "-", f"VAE decode, tiles {tile}/{overlap}", sec, None, None, "",
            report.peak("decode 960x960_10s tiled"), None, f"{'full-size' if full else 'REDUCED'} VAE -> {shape}")


if __name__ == "__main__":
    main()
