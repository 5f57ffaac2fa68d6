"""Quantisation figures: error against bf16, file sizes, converter throughput, FP8 matmul speed.

    python benchmarks/quant.py [--sections fp8] [--tokens 1024] [--convert-layers 1] [--dir DIR]

One function per section returns markdown lines (``fp8_section``; a ``gguf_section`` can sit beside it and
is picked up by ``SECTIONS``). The FP8 section reports:

* the relative error (||y - y_bf16|| / ||y_bf16||) of one forward of the tiny random fusion model converted with
  ``ovi convert --to fp8``, per-tensor and per-channel scales, upcast path;
* the same for one full-size fused layer pair (dim 3072, FFN 14336, random fan-in weights, ``--tokens`` video
  tokens, 512 text tokens) against float32 compute from bf16 weights: bf16 compute without FP8, the upcast path
  (float32 and bf16 activations) and ``torch._scaled_mm`` with bf16 activations, per-tensor and per-channel
  (``_scaled_mm`` on an FP8 GPU, else on torch's CPU kernel, whose arithmetic is the same);
* the size of the full 11B fusion file in bf16 and in FP8, computed from the shapes;
* converter throughput on a full-width file with ``--convert-layers`` fused layers against a plain copy;
* on an FP8-capable GPU: linear-layer time of ``_scaled_mm`` against bf16 ``F.linear`` at full-size shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import types
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _random_fill(module: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled random weights (as the tiny checkpoints), drawn layer by layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "modulation" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))


def _to_fp8(block: torch.nn.Module, granularity: str) -> torch.nn.Module:
    """A copy of ``block`` whose quantised linears (the converter's choice) are FP8Linear."""
    import copy

    from ovi.quant.fp8 import FP8Linear
    from ovi.quant.fp8_checkpoint import is_quantised_key

    out = copy.deepcopy(block)
    for name, m in list(out.named_modules()):
        if isinstance(m, torch.nn.Linear) and is_quantised_key("blocks.0." + name + ".weight"):
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, FP8Linear.from_linear(m, granularity))
    return out


def _tiny_errors(tmp: Path) -> dict[str, tuple[float, float]]:
    from ovi.convert import convert_fp8
    from ovi.fusion.checkpoint import load_fusion_model
    from ovi.quant.fp8 import cpu_scaled_mm_available, set_fp8_compute
    from ovi.tools.tiny.fusion import write_tiny

    src = write_tiny(tmp, 0)[2]
    g = torch.Generator().manual_seed(0)
    v, a, ctx = torch.randn(1, 48, 3, 8, 8, generator=g), torch.randn(1, 30, 20, generator=g), torch.randn(1, 20, 32, generator=g)
    bf16 = torch.bfloat16

    def forward(path, dtype, mode=None):
        model = load_fusion_model(path, dtype=dtype)
        if mode:
            set_fp8_compute(model, mode, cpu_kernel=True)  # the error of torch's CPU kernel is what is measured
        return model(v.to(dtype), a.to(dtype), 500.0, ctx.to(dtype), ctx.to(dtype))

    with torch.no_grad():
        ref = forward(src, torch.float32)
        errs = {}

        def record(label, out):
            errs[label] = (_rel(out[0], ref[0]), _rel(out[1], ref[1]))

        record("bf16 compute (no FP8)", forward(src, bf16))
        for gran in ("tensor", "channel"):
            dst = tmp / f"tiny_{gran}.safetensors"
            convert_fp8(src, dst, granularity=gran)
            record(f"upcast, per-{gran}", forward(dst, torch.float32))
            if cpu_scaled_mm_available():
                record(f"scaled_mm on cpu (bf16), per-{gran}", forward(dst, bf16, "scaled_mm"))
    return errs


def _layer_state(cfg, tokens: int, seed: int):
    from ovi.fusion.model import FusionState
    from ovi.fusion.rope import audio_rope, video_rope

    side = max(1, int(math.sqrt(tokens)))
    grid_v, la = (1, side, tokens // side), 157
    dim = cfg.video.dim

    def make():  # the same inputs on every call
        g = torch.Generator().manual_seed(seed)

        def r(*s):
            return torch.randn(*s, generator=g)

        return FusionState(
            video=r(1, grid_v[1] * grid_v[2], dim), audio=r(1, la, dim), video_e=r(1, 1, dim), audio_e=r(1, 1, dim),
            video_e0=0.1 * r(1, 1, 6, dim), audio_e0=0.1 * r(1, 1, 6, dim), video_context=r(1, 512, dim),
            audio_context=r(1, 512, dim), video_rope=video_rope(grid_v, cfg.video.head_dim, "cpu"),
            audio_rope=audio_rope(la, cfg.audio.head_dim, cfg.audio.temporal_rope_scaling_factor, "cpu"),
            video_grid=grid_v, audio_grid=(la,))

    return make


def _full_layer_errors(tokens: int, device: str) -> dict[str, dict[str, float]]:
    """One full-size fused layer pair: bf16 weights computed in float32 vs FP8 weights (upcast, scaled_mm)."""
    from ovi.fusion.backbone import Block
    from ovi.fusion.config import OVI_FUSION_CONFIG
    from ovi.fusion.model import FusionModel, fused_layer
    from ovi.quant.fp8 import cpu_scaled_mm_available, fp8_matmul_support, set_fp8_compute

    cfg = OVI_FUSION_CONFIG
    vb, ab = Block(cfg.video), Block(cfg.audio)
    _random_fill(vb, 1)
    _random_fill(ab, 2)
    for b in (vb, ab):  # the reference is the bf16 checkpoint
        for p in b.parameters():
            p.data = p.data.to(torch.bfloat16).float()
    make_state = _layer_state(cfg, tokens, 3)

    def run(v, a, dtype=torch.float32, dev="cpu"):
        s = make_state()
        for f in ("video", "audio", "video_e0", "audio_e0", "video_context", "audio_context"):
            setattr(s, f, getattr(s, f).to(dev, dtype))
        s.video_rope = type(s.video_rope)(*(t.to(dev) for t in s.video_rope))
        s.audio_rope = type(s.audio_rope)(*(t.to(dev) for t in s.audio_rope))
        ns = types.SimpleNamespace(layer_modules=lambda i: (v, a), layer_fn=fused_layer)
        with torch.no_grad():
            FusionModel.forward_layer(ns, 0, s)
        return s.video.float().cpu(), s.audio.float().cpu()

    ref = run(vb, ab)
    out: dict[str, dict[str, float]] = {}

    def record(label, y):
        out[label] = {"video": _rel(y[0], ref[0]), "audio": _rel(y[1], ref[1])}

    # _scaled_mm's arithmetic (FP8 activations x FP8 weights, float32 accumulation) is the same on torch's CPU
    # kernel and on the tensor cores, so the error is measured wherever it runs; its speed only on the GPU.
    mm_device = (device if device != "cpu" and fp8_matmul_support(device)[0]
                 else "cpu" if cpu_scaled_mm_available() else None)
    bf16 = torch.bfloat16
    record("bf16 weights, bf16 activations (no FP8)", run(_compute_dtype(vb, bf16), _compute_dtype(ab, bf16), bf16))
    for gran in ("tensor", "channel"):
        qv, qa = _to_fp8(vb, gran), _to_fp8(ab, gran)
        record(f"upcast, per-{gran}", run(qv, qa))
        qv, qa = _compute_dtype(qv, bf16), _compute_dtype(qa, bf16)
        record(f"upcast (bf16 activations), per-{gran}", run(qv, qa, bf16))
        if mm_device is not None:
            qv, qa = qv.to(mm_device), qa.to(mm_device)
            for m in (qv, qa):
                set_fp8_compute(m, "scaled_mm", cpu_kernel=True)  # mm_device may be the CPU kernel
            record(f"scaled_mm on {mm_device} (bf16 activations), per-{gran}", run(qv, qa, bf16, mm_device))
        del qv, qa
    return out


def _compute_dtype(block: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``block`` as the loader leaves it for ``dtype`` compute: float tensors in ``dtype``, FP8 weights
    and their float32 scales as stored."""
    import copy

    from ovi.quant.fp8 import FP8Linear

    out = copy.deepcopy(block)
    for mod in out.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                keep = isinstance(mod, FP8Linear) and name in ("weight", "scale_weight")
                if t is not None and t.is_floating_point() and not keep:
                    t.data = t.data.to(dtype)
    return out


def _sizes() -> dict[str, float]:
    from ovi.fusion.config import OVI_FUSION_CONFIG
    from ovi.fusion.model import FusionModel
    from ovi.quant.fp8_checkpoint import is_quantised_key

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FusionModel(OVI_FUSION_CONFIG).state_dict().items()}
    bf16 = sum(2 * math.prod(s) for s in shapes.values())
    fp8 = {}
    for gran in ("tensor", "channel"):
        fp8[gran] = sum((math.prod(s) + 4 * (1 if gran == "tensor" else s[0])) if is_quantised_key(k) else 2 * math.prod(s)
                        for k, s in shapes.items())
    share = sum(math.prod(s) for k, s in shapes.items() if is_quantised_key(k)) / sum(math.prod(s) for s in shapes.values())
    return {"bf16": bf16, "fp8_tensor": fp8["tensor"], "fp8_channel": fp8["channel"], "quantised_share": share}


def _throughput(tmp: Path, layers: int) -> dict[str, float]:
    from ovi.convert import convert_fp8
    from ovi.fusion.config import OVI_AUDIO_CONFIG, OVI_VIDEO_CONFIG, FusionConfig
    from ovi.fusion.model import FusionModel
    from ovi.safetensors_stream import StreamingWriter

    cfg = FusionConfig(replace(OVI_VIDEO_CONFIG, num_layers=layers), replace(OVI_AUDIO_CONFIG, num_layers=layers))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FusionModel(cfg).state_dict().items()}
    src = tmp / "throughput_src.safetensors"
    block = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    with StreamingWriter(src, [(k, s, torch.bfloat16) for k, s in shapes.items()],
                         {"ovi.config": json.dumps(cfg.to_dict())}) as w:
        for k, s in shapes.items():
            n = math.prod(s)
            w.write(k, block.repeat(-(-n // block.numel()))[:n].reshape(s))
    size = src.stat().st_size
    t0 = time.perf_counter()
    shutil.copyfile(src, tmp / "copy.safetensors")
    copy_s = time.perf_counter() - t0
    (tmp / "copy.safetensors").unlink()
    res = {"bytes": size, "copy_s": copy_s}
    for gran in ("tensor", "channel"):
        t0 = time.perf_counter()
        convert_fp8(src, tmp / "throughput_dst.safetensors", granularity=gran, variant="960x960_10s")
        res[f"convert_{gran}_s"] = time.perf_counter() - t0
        (tmp / "throughput_dst.safetensors").unlink()
    src.unlink()
    return res


def _gpu_speed(device: str, tokens: int) -> list[tuple[str, float, float]]:
    import torch.nn.functional as F

    from ovi.quant.fp8 import FP8Linear

    rows = []
    for k, n in ((3072, 3072), (3072, 14336), (14336, 3072)):
        lin = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        q = FP8Linear.from_linear(lin.float(), "tensor").to(device)
        lin = lin.to(torch.bfloat16)
        q.mode = "scaled_mm"
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        times = []
        for fn in (lambda: F.linear(x, lin.weight, lin.bias), lambda: q(x)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / 20)
        rows.append((f"{k}->{n}", times[0] * 1e3, times[1] * 1e3))
    return rows


def fp8_section(args) -> list[str]:
    lines = ["## FP8", ""]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        tiny = _tiny_errors(tmp)
        lines += ["Tiny random fusion model (2 layers, dim 256), one forward, relative error vs the bf16 file computed "
                  "in float32:", "", "| path, scales | video | audio |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {a:.4f} |" for k, (v, a) in tiny.items()]
        full = _full_layer_errors(args.tokens, device)
        lines += ["", f"One full-size fused layer pair (dim 3072, FFN 14336, {args.tokens} video + 157 audio tokens, "
                      "512 text tokens, random fan-in weights), relative error of the layer output vs bf16 weights:",
                  "", "| path, scales | video | audio |", "|---|---|---|"]
        lines += [f"| {k} | {v['video']:.5f} | {v['audio']:.5f} |" for k, v in full.items()]
        sz = _sizes()
        lines += ["", f"Full 11B fusion file from shapes: bf16 {sz['bf16'] / 1e9:.2f} GB; FP8 per-tensor "
                      f"{sz['fp8_tensor'] / 1e9:.2f} GB, per-channel {sz['fp8_channel'] / 1e9:.2f} GB "
                      f"({100 * sz['quantised_share']:.1f} % of the weights are quantised linears)."]
        if args.convert_layers > 0:
            tp = _throughput(tmp, args.convert_layers)
            gb = tp["bytes"] / 1e9
            lines += ["", f"Converter on a full-width {args.convert_layers}-layer bf16 file ({gb:.2f} GB, page cache "
                          f"warm): plain copy {tp['copy_s']:.2f} s ({gb / tp['copy_s']:.2f} GB/s); convert per-tensor "
                          f"{tp['convert_tensor_s']:.2f} s ({gb / tp['convert_tensor_s']:.2f} GB/s), per-channel "
                          f"{tp['convert_channel_s']:.2f} s ({gb / tp['convert_channel_s']:.2f} GB/s)."]
    if device != "cpu":
        from ovi.quant.fp8 import fp8_matmul_support

        ok, why = fp8_matmul_support(device)
        if ok:
            rows = _gpu_speed(device, 15004)
            lines += ["", f"Linear layers, 15004 tokens, {torch.cuda.get_device_name()}:", "",
                      "| shape | bf16 ms | fp8 scaled_mm ms | speed-up |", "|---|---|---|---|"]
            lines += [f"| {s} | {b:.3f} | {f:.3f} | {b / f:.2f}x |" for s, b, f in rows]
        else:
            lines += ["", f"No FP8 matmul speed figures: {why}."]
    else:
        lines += ["", "No GPU: `_scaled_mm` speed figures need a CUDA/ROCm device with FP8 matrix cores (its error is "
                      "measured above, on torch's CPU kernel)."]
    return lines


def gguf_section(args) -> list[str]:
    from quant_gguf import gguf_section as run

    return run(device="cuda" if torch.cuda.is_available() else "cpu")


SECTIONS = {"fp8": fp8_section, "gguf": gguf_section}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--tokens", type=int, default=1024, help="video tokens through the full-size layer")
    p.add_argument("--convert-layers", type=int, default=1, help="fused layers of the converter test file (0: skip)")
    p.add_argument("--dir", default=None, help="scratch folder (default: the system temp folder)")
    a = p.parse_args()
    for name in a.sections.split(","):
        print("\n".join(SECTIONS[name.strip()](a)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
