"""One prepared GPU check of the speed and memory figures, full-size random weights, at most 8 minutes on an H100/H200.

    python benchmarks/gpu_check.py [--out DIR] [--variant 720x720_5s] [--budget SECONDS] [--sections a,b,...]
    python benchmarks/gpu_check.py --dry [--out DIR]        # the same code path at toy size on the CPU

Writes ``gpu_check.json`` and ``gpu_check.md`` in ``--out`` (default: the current folder). Nothing is read from
disk: every model is built on the ``meta`` device and filled with random weights drawn on the GPU itself
(bf16; ``benchmarks/engine.py``'s ``randomize``). Sections, in the order they run:

* ``phases``: the all-GPU memory table of one 960x960_10s generation (``ovi.memory.MemoryReport``): load (fusion
  model + umT5-XXL), encode text, diffusion (one step), release (the fusion model and the text encoder dropped
  and the allocator defragmented, as ``OviEngine`` does before decoding), decode video (Wan2.2 VAE, tiled 32/8,
  frames collected on the CPU), decode audio (MMAudio VAE + BigVGAN);
* ``decode``: that tiled 960x960_10s video decode's peak and time (a decode cut by its budget says how far it got);
* ``bf16_sdpa`` / ``bf16_flash_attn``: seconds per denoising step (positive + negative SLG pass) of ``FusionModel``
  against ``reference_forward`` (the official order, in ``benchmarks/engine.py``) with the same attention kernel;
  flash-attn only when it is importable, else the row says why not;
* ``lora``: merging a rank-128 LoRA on every video-branch block linear (the shape of the FastWan LoRA) into the
  bf16 weights (``ovi.lora.apply_merged``) and restoring them; the side path (``apply_side_path``) step against
  the plain step;
* ``block_swap``: the step with the model in pinned host memory under a 16 GB device cap
  (``torch.cuda.set_per_process_memory_fraction``), against the all-GPU step;
* ``compile``: ``ovi.compile`` on the fused layer: compile time, compiled step against eager, recompiles;
* ``fp8``: the block linears quantised to FP8 (``ovi.quant.fp8.FP8Linear``, per-tensor scales) computing with
  ``torch._scaled_mm``: step time against bf16 and the output's difference from the bf16 model's.

Budgets: the whole run has ``--budget`` seconds (default 450, so with start-up it ends within 8 minutes); each
section has its own cap (``SECTION_BUDGET_S``) and starts only when its minimum (``SECTION_MIN_S``) is left. Inside
a section every timed step checks the clock, so a slow device gets fewer timed steps, never an overrun; a section
that cannot start, or cannot run here (no flash-attn, no FP8 tensor cores), says so in the table.

``--dry`` runs every section on the CPU with toy models (2 fused layers, 64 wide; a 4-wide VAE; a 32-wide umT5)
and the CPU's kernels (``_scaled_mm``'s CPU kernel for FP8, the C++ compiler for torch.compile, no device cap):
its figures mean nothing, it only keeps the script working (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from engine import make_inputs, randomize, reference_forward  # noqa: E402  (benchmarks/engine.py)
from ovi import memory  # noqa: E402
from ovi.fusion.config import OVI_FUSION_CONFIG, FusionConfig  # noqa: E402
from ovi.fusion.model import FusionModel  # noqa: E402

GiB = 1024 ** 3
TOTAL_BUDGET_S = 450.0  # the sections' share of the 8 minutes; the rest covers start-up, imports and writing
# Seconds each section may take at most, and the least that must be left for it to start (full size, H100/H200).
SECTION_BUDGET_S = {"phases": 110, "decode": 0, "bf16_sdpa": 45, "bf16_flash_attn": 40, "lora": 40,
                    "block_swap": 60, "compile": 110, "fp8": 40}
SECTION_MIN_S = {"phases": 40, "decode": 0, "bf16_sdpa": 15, "bf16_flash_attn": 15, "lora": 15, "block_swap": 25,
                 "compile": 70, "fp8": 15}
SECTIONS = tuple(SECTION_BUDGET_S)
DECODE_BUDGET_S = 60.0  # of the phases section: the tiled decode stops there and reports how far it got
STEPS_TIMED = 2          # timed steps after one warm-up step, when the budget allows
CAP_BYTES = 16 * 10 ** 9
SLG_LAYER = 11           # the official default
LORA_RANK = 128          # the FastWan LoRA's rank
# (latent frames, latent height, latent width, audio tokens) per variant; 16 pixels per latent pixel.
GRIDS = {"720x720_5s": (31, 44, 44, 157), "960x960_10s": (61, 60, 60, 314)}
DRY_GRIDS = {"720x720_5s": (3, 4, 4, 8), "960x960_10s": (5, 6, 6, 16)}
PROMPT_TOKENS = (120, 40, 30)  # positive, video negative, audio negative prompt lengths (of 512)


class SectionSkipped(Exception):
    """A section that did not run, or stopped early: the message says why."""


class Budget:
    """The run's deadline and the current section's."""

    def __init__(self, total_s: float):
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + total_s
        self.section_deadline = self.deadline

    def left(self) -> float:
        return min(self.deadline, self.section_deadline) - time.perf_counter()

    def open(self, name: str, cap_s: float, min_s: float) -> None:
        left = self.deadline - time.perf_counter()
        if left < min_s:
            raise SectionSkipped(f"time budget: {left:.0f} s left of the run, the section needs {min_s:.0f} s")
        self.section_deadline = time.perf_counter() + min(cap_s, left)

    def close(self) -> None:
        self.section_deadline = self.deadline


@dataclass
class Setup:
    dry: bool
    device: torch.device
    dtype: torch.dtype
    config: FusionConfig
    grids: dict[str, tuple[int, int, int, int]]
    variant: str
    slg: int
    budget: Budget
    cap_bytes: int | None
    results: dict[str, dict] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # figures later sections compare against


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], Any], s: Setup) -> tuple[float, int, Any]:
    """(seconds per step, timed steps, the last step's result): one warm-up step, then up to STEPS_TIMED while
    the budget lasts (at least one, unless the warm-up already used the section's time: SectionSkipped)."""
    t0 = time.perf_counter()
    out = step()
    _sync(s.device)
    once = time.perf_counter() - t0
    times = []
    # the first timed step needs one step's time left, later ones a margin more
    while len(times) < STEPS_TIMED and ((not times and s.budget.left() > once) or s.budget.left() > 1.2 * once):
        del out
        t0 = time.perf_counter()
        out = step()
        _sync(s.device)
        times.append(time.perf_counter() - t0)
    if not times:
        raise SectionSkipped(f"time budget: the warm-up step took {once:.1f} s, no time was left for a timed one")
    return sum(times) / len(times), len(times), out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, the parity rule of benchmarks/engine.py."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


# -- models ------------------------------------------------------------------------------------------------------
def fusion_config(dry: bool) -> FusionConfig:
    if not dry:
        return OVI_FUSION_CONFIG
    small = dict(dim=64, num_heads=2, ffn_dim=128, num_layers=2, text_dim=64, text_len=16)
    return FusionConfig(replace(OVI_FUSION_CONFIG.video, **small), replace(OVI_FUSION_CONFIG.audio, **small))


def build_fusion(s: Setup, seed: int = 0) -> FusionModel:
    with torch.device("meta"):
        model = FusionModel(s.config)
    randomize(model, s.device, s.dtype, seed=seed)
    model.compute_dtype = s.dtype
    return model.eval().requires_grad_(False)


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def step_fn(model: FusionModel, x: dict, slg: int) -> Callable[[], Any]:
    """One denoising step: the positive pass, then the negative one with SLG (whose output it returns)."""
    def step():
        with torch.no_grad():
            model(x["video"], x["audio"], x["t"], *x["pos"], slg_layer=0)
            return model(x["video"], x["audio"], x["t"], *x["neg"], slg_layer=slg)
    return step


def fusion(s: Setup) -> FusionModel:
    """The bf16 fusion model the step sections share (built once, after the phases section released its own)."""
    if "model" not in s.state:
        memory.defragment(s.device)
        s.state["model"] = build_fusion(s)
        s.state["inputs"] = make_inputs(s.config, s.grids[s.variant], s.device, s.dtype)
    return s.state["model"]


# -- sections ----------------------------------------------------------------------------------------------------
def section_phases(s: Setup) -> dict:
    from ovi.text.umt5 import UMT5_XXL, UMT5Config, UMT5Encoder

    report = memory.MemoryReport(s.device)
    variant = "960x960_10s"
    memory.defragment(s.device)
    with report.phase("load"):
        model = build_fusion(s, seed=1)
        cfg = UMT5Config(vocab=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2) if s.dry else UMT5_XXL
        with torch.device("meta"):
            text = UMT5Encoder(cfg)
        randomize(text, s.device, s.dtype, seed=2)
        text.eval().requires_grad_(False)
    weights = nbytes(model) + nbytes(text)
    with report.phase("encode text"):
        length = s.config.video.text_len
        g = torch.Generator(device=s.device).manual_seed(3)
        ids = torch.randint(0, cfg.vocab, (len(PROMPT_TOKENS), length), generator=g, device=s.device)
        mask = torch.zeros(len(PROMPT_TOKENS), length, dtype=torch.long, device=s.device)
        for i, n in enumerate(PROMPT_TOKENS):
            mask[i, :min(n, length)] = 1
        pos, vneg, aneg = (c.to(s.dtype) for c in text.encode(ids, mask))
        if pos.shape[-1] != s.config.video.text_dim:  # the toy umT5 is narrower than the toy fusion's text input
            pos, vneg, aneg = (torch.nn.functional.pad(c, (0, s.config.video.text_dim - c.shape[-1]))
                               for c in (pos, vneg, aneg))
        _sync(s.device)
    grid = s.grids[variant]
    with report.phase("diffusion"):
        x = make_inputs(s.config, grid, s.device, s.dtype)
        with torch.no_grad():
            model(x["video"], x["audio"], x["t"], pos, pos, slg_layer=0)
            out = model(x["video"], x["audio"], x["t"], vneg, aneg, slg_layer=s.slg)
        latent = out[0].float()
        _sync(s.device)
    with report.phase("release"):
        del model, text, out, x, pos, vneg, aneg
        memory.defragment(s.device)
    decode = _decode_video(s, report, variant, latent)
    del latent
    with report.phase("decode audio"):
        from ovi.audio.bigvgan import BigVGAN, BigVGANConfig
        from ovi.audio.decoder import AudioDecoder
        from ovi.audio.mmaudio_vae import MMAudioVAE, MMAudioVAEConfig

        vae_cfg, voc_cfg = ((MMAudioVAEConfig(hidden_dim=16), BigVGANConfig(upsample_initial_channel=64)) if s.dry
                            else (MMAudioVAEConfig(), BigVGANConfig()))
        with torch.device("meta"):
            vae, vocoder = MMAudioVAE(vae_cfg, encoder=False), BigVGAN(voc_cfg)
        randomize(vae, s.device, torch.float32, seed=5)
        randomize(vocoder, s.device, torch.float32, seed=6)
        audio = AudioDecoder(vae.eval(), vocoder.eval()).to(s.device)
        wave = audio.decode(torch.randn(1, grid[3], vae_cfg.embed_dim, device=s.device))
        samples = int(wave.shape[-1])
        del audio, vae, vocoder, wave
        memory.defragment(s.device)
    rows = [dict(phase=r.phase, allocated=r.allocated, reserved=r.reserved, free=r.free, peak=r.peak,
                 seconds=r.seconds, note=r.note) for r in report.rows]
    by = {r["phase"]: r for r in rows}
    s.state["decode"] = decode
    return dict(variant=variant, tokens=grid[0] * (grid[1] // 2) * (grid[2] // 2) + grid[3], weights_bytes=weights,
                rows=rows, released_bytes=(by["diffusion"]["allocated"] or 0) - (by["release"]["allocated"] or 0),
                audio_samples=samples, table=report.table())


class _DecodeBudget(Exception):
    pass


def _decode_video(s: Setup, report: memory.MemoryReport, variant: str, latent: torch.Tensor) -> dict:
    """The tiled decode of a random latent of the variant's size (the decode's cost does not depend on the
    values; the diffusion's latent is only checked for its shape), stopped at DECODE_BUDGET_S."""
    from ovi.vae.wan22 import Wan22VAE, WanVAEConfig

    f, h, w, _ = s.grids[variant]
    cfg, tile, overlap = (WanVAEConfig(dim=4, dec_dim=6), 4, 2) if s.dry else (WanVAEConfig(), 32, 8)
    assert latent.shape[-3:] == (f, h, w), latent.shape
    with torch.device("meta"):
        vae = Wan22VAE(cfg)
    randomize(vae, s.device, torch.float32, seed=4)
    vae.eval()
    z = torch.randn(1, cfg.z_dim, f, h, w, device=s.device)
    memory.defragment(s.device)
    stop_at = time.perf_counter() + min(DECODE_BUDGET_S, max(1.0, s.budget.left() - 10))
    done = [0, 0]

    def progress(n, total):
        done[:] = [n, total]
        if time.perf_counter() > stop_at:
            raise _DecodeBudget()

    t0 = time.perf_counter()
    cut = False
    report.start("decode video")
    try:
        with torch.no_grad():
            video = vae.decode(z, tile_size=tile, tile_overlap=overlap, output_device="cpu", progress=progress)
        shape = list(video.shape)
        del video
    except _DecodeBudget:
        cut, shape = True, None
    _sync(s.device)
    row = report.stop(note=f"cut by the budget at {done[0]}/{done[1]} tile frames" if cut else "")
    seconds = time.perf_counter() - t0
    del vae, z
    memory.defragment(s.device)
    return dict(variant=variant, latent=[f, h, w], tile=tile, overlap=overlap, peak_bytes=row.peak,
                seconds=seconds, complete=not cut, progress=done, output_shape=shape,
                seconds_full_estimate=None if not cut or not done[0] else seconds * done[1] / done[0])


def section_decode(s: Setup) -> dict:
    if "decode" not in s.state:
        raise SectionSkipped("the phases section did not run, and the decode is measured there")
    return s.state["decode"]


def _bf16_step(s: Setup, backend: str) -> dict:
    from ovi.attention import AttentionBackendError, make_attention

    try:
        attn = make_attention(backend, s.device, s.dtype)
    except AttentionBackendError as e:
        raise SectionSkipped(f"not available: {str(e).split('. To use')[0]}") from None
    model = fusion(s)
    x = s.state["inputs"]
    model.set_attention(attn)
    try:
        return _steps_against_reference(s, model, x, attn, backend)
    finally:
        model.set_attention(make_attention("sdpa", s.device, s.dtype))


def _steps_against_reference(s: Setup, model: FusionModel, x: dict, attn, backend: str) -> dict:
    report = memory.MemoryReport(s.device)
    with report.phase("ours"):
        ours, n, out = timed_steps(step_fn(model, x, s.slg), s)
    s.state.setdefault("step", {})[backend] = ours
    s.state.setdefault("activation_peak", (report.peak("ours") or 0) - nbytes(model))
    s.state.setdefault("reference_out", out)
    result = dict(attention=attn.detail, variant=s.variant, seconds_per_step=ours, timed_steps=n,
                  peak_bytes=report.peak("ours"))

    def ref_step():
        with torch.no_grad():
            reference_forward(model, x["video"], x["audio"], x["t"], *x["pos"], attn=attn, slg_layer=0)
            return reference_forward(model, x["video"], x["audio"], x["t"], *x["neg"], attn=attn, slg_layer=s.slg)

    try:
        with report.phase("reference"):
            ref, n_ref, ref_out = timed_steps(ref_step, s)
        result.update(reference_seconds_per_step=ref, reference_timed_steps=n_ref, ratio_to_reference=ours / ref,
                      max_rel_diff_vs_reference=max(rel_err(out[0], ref_out[0]), rel_err(out[1], ref_out[1])),
                      reference_peak_bytes=report.peak("reference"))
        del ref_out
    except SectionSkipped as e:
        result["reference"] = str(e)
    return result


def section_bf16_sdpa(s: Setup) -> dict:
    return _bf16_step(s, "sdpa")


def section_bf16_flash_attn(s: Setup) -> dict:
    return _bf16_step(s, "flash_attn")


def _base_step(s: Setup) -> float:
    if "sdpa" not in s.state.get("step", {}):
        raise SectionSkipped("needs the bf16_sdpa section's step time, which did not run")
    return s.state["step"]["sdpa"]


def section_lora(s: Setup) -> dict:
    from ovi.lora import LoraPlan, LoraStrength, LowRank, PlannedPatch, apply_merged, apply_side_path
    from ovi.quant.fp8_checkpoint import is_quantised_key

    base = _base_step(s)
    model = fusion(s)
    g = torch.Generator(device=s.device).manual_seed(7)
    patches, ranks = [], set()
    for name, m in model.video_model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks.") and is_quantised_key(name + ".weight"):
            rank = min(LORA_RANK, m.in_features, m.out_features)  # toy (dry) layers are narrower than 128
            ranks.add(rank)
            down = torch.randn(rank, m.in_features, generator=g, device=s.device, dtype=s.dtype) / m.in_features ** 0.5
            up = torch.randn(m.out_features, rank, generator=g, device=s.device, dtype=s.dtype) * 1e-3
            patches.append(PlannedPatch(f"video_model.{name}.weight", "video", LowRank(up, down, float(rank)),
                                        f"blocks.{name}"))
    plan = LoraPlan(path=Path(f"random_rank{LORA_RANK}.safetensors"), convention="random (benchmark)",
                    patches=tuple(patches), modules=len(patches), matched=len(patches), unmatched=(), plain_wan=True)
    strength = [LoraStrength(video=1.0)]
    _sync(s.device)
    t0 = time.perf_counter()
    handle = apply_merged(model, [plan], strength)
    _sync(s.device)
    merge = time.perf_counter() - t0
    t0 = time.perf_counter()
    handle.restore()
    _sync(s.device)
    restore = time.perf_counter() - t0
    result = dict(linears=len(patches), rank=max(ranks), merge_seconds=merge, restore_seconds=restore,
                  plain_seconds_per_step=base)
    handle = apply_side_path(model, [plan], strength)
    try:
        side, n, _ = timed_steps(step_fn(model, s.state["inputs"], s.slg), s)
    finally:
        handle.restore()
    result.update(side_path_seconds_per_step=side, timed_steps=n, side_path_overhead=side / base - 1.0)
    return result


def section_block_swap(s: Setup) -> dict:
    from ovi.block_swap import BlockSwapper, _CloneCopier

    base = _base_step(s)
    model = fusion(s)
    x = s.state["inputs"]
    layer_bytes = nbytes(torch.nn.ModuleList(model.layer_modules(0)))
    fixed_bytes = nbytes(model) - s.config.num_layers * layer_bytes
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.cpu()
    memory.defragment(s.device)
    cap = s.cap_bytes
    if cap is not None:
        total = torch.cuda.get_device_properties(s.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), s.device)
        act = s.state.get("activation_peak", 0)
        room = cap - act - fixed_bytes - 2 * layer_bytes - GiB // 2
        resident = max(0, min(s.config.num_layers, int(room // layer_bytes)))
    else:
        resident = 1
    swapper = None
    report = memory.MemoryReport(s.device)

    def step():
        with torch.no_grad():
            swapper.forward(x["video"], x["audio"], x["t"], *x["pos"], slg_layer=0)
            return swapper.forward(x["video"], x["audio"], x["t"], *x["neg"], slg_layer=s.slg)

    try:
        while True:
            # On the CPU (dry) the layers would run in place; clones take the streamed path as a GPU would.
            swapper = BlockSwapper(model, resident, s.device, copier=None if cap is not None else _CloneCopier)
            try:
                with report.phase("block swap"):
                    sec, n, _ = timed_steps(step, s)
                break
            except torch.OutOfMemoryError:
                swapper.detach()
                memory.defragment(s.device)
                if resident == 0:
                    raise
                resident = max(0, resident - 2)
    finally:
        if swapper is not None:
            swapper.detach()
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, s.device)
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(s.device)
        memory.defragment(s.device)
    return dict(cap_bytes=cap, resident_layers=resident, layers=s.config.num_layers, seconds_per_step=sec,
                timed_steps=n, all_gpu_seconds_per_step=base, ratio_to_all_gpu=sec / base,
                peak_bytes=report.peak("block swap"))


def section_compile(s: Setup) -> dict:
    from ovi import compile as ovi_compile

    problem = ovi_compile.compile_problem(s.device)
    if problem:
        raise SectionSkipped(f"not available: {problem}")
    base = _base_step(s)
    model = fusion(s)
    x = s.state["inputs"]
    layer = ovi_compile.CompiledLayer()
    ovi_compile.use_compiled(model, layer)
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x["video"], x["audio"], x["t"], *x["neg"], slg_layer=s.slg)  # compiles
        _sync(s.device)
        first = time.perf_counter() - t0
        sec, n, out = timed_steps(step_fn(model, x, s.slg), s)
    finally:
        ovi_compile.use_compiled(model, None)
    ref = s.state["reference_out"]
    return dict(first_forward_seconds=first, compile_seconds=layer.compile_seconds, graphs=layer.graphs,
                compiles=layer.compiles, recompiles=layer.recompiles, seconds_per_step=sec, timed_steps=n,
                eager_seconds_per_step=base, speedup=base / sec,
                max_rel_diff_vs_eager=max(rel_err(out[0], ref[0]), rel_err(out[1], ref[1])))


def section_fp8(s: Setup) -> dict:
    from ovi.quant.fp8 import FP8Linear, cpu_scaled_mm_available, fp8_matmul_support, set_fp8_compute
    from ovi.quant.fp8_checkpoint import is_quantised_key

    if s.dry:
        if not cpu_scaled_mm_available():
            raise SectionSkipped("not available: this torch has no CPU _scaled_mm kernel")
    else:
        ok, why = fp8_matmul_support(s.device)
        if not ok:
            raise SectionSkipped(f"not available: {why}")
    base = _base_step(s)
    model = fusion(s)
    x = s.state["inputs"]
    t0 = time.perf_counter()
    count = 0
    with torch.no_grad():
        for name, m in list(model.named_modules()):
            if isinstance(m, torch.nn.Linear) and ".blocks." in name and is_quantised_key(name + ".weight"):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, FP8Linear.from_linear(m, "tensor"))
                count += 1
    memory.defragment(s.device)
    quantise = time.perf_counter() - t0
    set_fp8_compute(model, "scaled_mm", cpu_kernel=s.dry)
    sec, n, out = timed_steps(step_fn(model, x, s.slg), s)
    ref = s.state["reference_out"]
    s.state.pop("model")  # no longer the bf16 model
    return dict(linears=count, quantise_seconds=quantise, weights_bytes=nbytes(model), seconds_per_step=sec,
                timed_steps=n, bf16_seconds_per_step=base, ratio_to_bf16=sec / base, speedup=base / sec,
                max_rel_diff_vs_bf16=max(rel_err(out[0], ref[0]), rel_err(out[1], ref[1])))


RUNNERS: dict[str, Callable[[Setup], dict]] = {
    "phases": section_phases, "decode": section_decode, "bf16_sdpa": section_bf16_sdpa,
    "bf16_flash_attn": section_bf16_flash_attn, "lora": section_lora, "block_swap": section_block_swap,
    "compile": section_compile, "fp8": section_fp8,
}


# -- report ------------------------------------------------------------------------------------------------------
def _gib(n) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB // 10 else f"{n / 2 ** 20:.1f} MiB"


def _sec(x) -> str:
    return "-" if x is None else f"{x:.3f} s"


def summary_rows(results: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(section, measurement, value) for the Markdown table; a section that did not run gets one row saying why."""
    out = []
    for name in SECTIONS:
        r = results.get(name)
        if r is None:
            out.append((name, "status", "not requested"))
            continue
        if r["status"] != "ok":
            out.append((name, r["status"], r["reason"]))
            continue
        if name == "phases":
            out += [(name, "fusion + umT5 weights", _gib(r["weights_bytes"])),
                    (name, "released after diffusion", _gib(r["released_bytes"]))]
            out += [(name, f"{row['phase']} peak / allocated after", f"{_gib(row['peak'])} / {_gib(row['allocated'])}")
                    for row in r["rows"]]
        elif name == "decode":
            what = "complete" if r["complete"] else (f"cut at {r['progress'][0]}/{r['progress'][1]} tile frames, "
                                                     f"full decode ~{r['seconds_full_estimate'] or 0:.0f} s")
            out += [(name, f"{r['variant']} tiled {r['tile']}/{r['overlap']} peak", _gib(r["peak_bytes"])),
                    (name, "seconds", f"{r['seconds']:.1f} s ({what})")]
        elif name.startswith("bf16_"):
            out += [(name, f"s/step ({r['variant']}, {r['attention']})", _sec(r["seconds_per_step"])),
                    (name, "reference s/step", _sec(r.get("reference_seconds_per_step")) if "ratio_to_reference" in r
                     else r.get("reference", "-")),
                    (name, "ours / reference", f"{r['ratio_to_reference']:.2f}x" if "ratio_to_reference" in r else "-"),
                    (name, "max rel diff vs reference", f"{r['max_rel_diff_vs_reference']:.1e}"
                     if "max_rel_diff_vs_reference" in r else "-"),
                    (name, "peak", _gib(r["peak_bytes"]))]
        elif name == "lora":
            out += [(name, f"merge rank {r['rank']} into {r['linears']} video linears", _sec(r["merge_seconds"])),
                    (name, "restore", _sec(r["restore_seconds"])),
                    (name, "side path s/step (plain)", f"{_sec(r['side_path_seconds_per_step'])} "
                                                       f"({_sec(r['plain_seconds_per_step'])})"),
                    (name, "side path overhead", f"{100 * r['side_path_overhead']:+.1f} %")]
        elif name == "block_swap":
            cap = "no cap (CPU)" if r["cap_bytes"] is None else f"{r['cap_bytes'] / 1e9:.0f} GB cap"
            out += [(name, f"s/step, {r['resident_layers']}/{r['layers']} layers resident, {cap}",
                     _sec(r["seconds_per_step"])),
                    (name, "ratio to all-GPU", f"{r['ratio_to_all_gpu']:.2f}x"), (name, "peak", _gib(r["peak_bytes"]))]
        elif name == "compile":
            out += [(name, "first forward (compiles)", f"{r['first_forward_seconds']:.1f} s "
                                                       f"({r['graphs']} graph, {r['recompiles']} recompiles)"),
                    (name, "compiled s/step (eager)", f"{_sec(r['seconds_per_step'])} "
                                                      f"({_sec(r['eager_seconds_per_step'])})"),
                    (name, "speed-up", f"{r['speedup']:.2f}x"),
                    (name, "max rel diff vs eager", f"{r['max_rel_diff_vs_eager']:.1e}")]
        elif name == "fp8":
            out += [(name, f"s/step, {r['linears']} linears FP8 (_scaled_mm)", _sec(r["seconds_per_step"])),
                    (name, "ratio to bf16 (speed-up)", f"{r['ratio_to_bf16']:.2f}x ({r['speedup']:.2f}x)"),
                    (name, "max rel diff vs bf16", f"{r['max_rel_diff_vs_bf16']:.1e}"),
                    (name, "weights", _gib(r["weights_bytes"]))]
    return out


def markdown(meta: dict, results: dict[str, dict]) -> str:
    lines = [f"# GPU check ({'DRY RUN on the CPU, toy sizes: the figures mean nothing' if meta['dry'] else 'full size'})",
             "", f"{meta['date']}, {meta['device']}, torch {meta['torch']}, CUDA {meta['cuda'] or '-'}; step variant "
                 f"{meta['variant']}; {meta['seconds']:.0f} s of {meta['budget_s']:.0f} s budget", "",
             "| section | measurement | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(results)]
    phases = results.get("phases", {})
    if phases.get("status") == "ok":
        lines += ["", f"All-GPU phase memory, one {phases['variant']} generation ({phases['tokens']:,} tokens):", "",
                  "```", phases["table"], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="toy sizes on the CPU (keeps the script working)")
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--variant", choices=list(GRIDS), default="720x720_5s", help="frame size of the step timings")
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all sections together")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    a = ap.parse_args(argv)
    wanted = [x.strip() for x in a.sections.split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if a.dry:
        device, dtype, cap = torch.device("cpu"), torch.bfloat16, None
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA/ROCm device here; --dry runs the same code path on the CPU at toy size")
        device, dtype, cap = torch.device("cuda"), torch.bfloat16, CAP_BYTES
    config = fusion_config(a.dry)
    s = Setup(dry=a.dry, device=device, dtype=dtype, config=config, grids=DRY_GRIDS if a.dry else GRIDS,
              variant=a.variant, slg=1 if a.dry else SLG_LAYER, budget=Budget(a.budget), cap_bytes=cap)
    a.out.mkdir(parents=True, exist_ok=True)
    meta = dict(dry=a.dry, date=datetime.date.today().isoformat(), device=memory.device_description(device),
                torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                variant=a.variant, budget_s=a.budget, sections=wanted)
    print(f"gpu check: {meta['device']}, torch {meta['torch']}{' (DRY RUN)' if a.dry else ''}", flush=True)
    for name in SECTIONS:
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            s.budget.open(name, SECTION_BUDGET_S[name] or a.budget, SECTION_MIN_S[name])
            r = dict(status="ok", **RUNNERS[name](s))
        except SectionSkipped as e:
            r = dict(status="not available" if str(e).startswith("not available") else "skipped",
                     reason=str(e).removeprefix("not available: "))
        except Exception as e:  # one failed section (out of memory, a kernel error) leaves the others their turn
            r = dict(status="error", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300],
                     traceback=traceback.format_exc(limit=6))
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        finally:
            s.budget.close()
        r["section_seconds"] = time.perf_counter() - t0
        s.results[name] = r
        print(f"  {name}: {r['status']} in {r['section_seconds']:.1f} s"
              + (f" ({r['reason']})" if r["status"] != "ok" else ""), flush=True)
        gc.collect()
    meta["seconds"] = time.perf_counter() - s.budget.t0
    (a.out / "gpu_check.json").write_text(json.dumps(dict(meta=meta, results=s.results), indent=1, default=str))
    md = markdown(meta, s.results)
    (a.out / "gpu_check.md").write_text(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
