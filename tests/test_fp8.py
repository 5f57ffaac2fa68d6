"""FP8: quantisation, FP8Linear (upcast and the _scaled_mm plumbing), the converter, every FP8 layout the
fusion loader reads, ``ovi info``, block swap and errors. CPU only: ``_scaled_mm`` runs on torch's CPU kernel, and a
fake stands in where a GPU kernel's behaviour (refusing rowwise scales) is needed."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ovi.block_swap import BlockSwapper, _CloneCopier
from ovi.convert import main_convert
from ovi.detect import inspect_file
from ovi.fusion.checkpoint import load_fusion_model
from ovi.loading import CheckpointError
from ovi.quant import fp8 as fp8mod
from ovi.quant.fp8 import (E4M3, FP8Linear, cpu_scaled_mm_available, dequantise_fp8, fp8_compute_mode,
                           fp8_matmul_support, quantise_fp8, scaled_mm_linear, set_fp8_compute)
from ovi.quant.fp8_checkpoint import detect_fp8_layout, is_quantised_key
from ovi.tools.tiny.fusion import TINY_CONFIG, random_state_dict

ROOT = Path(__file__).resolve().parents[1]
# FP8 weights change every linear's output by ~2.6 % rms (e4m3 keeps 3 mantissa bits: relative rounding step
# 2^-3, rms 2^-3/sqrt(12)/~1.4). The random tiny model has no dominant residual path, so ~6 linears in series per
# layer over 2 layers add up: measured 4-6 %; 10 % leaves room for other seeds without hiding a broken scale
# (a scale off by any factor, or a transposed per-channel scale, gives errors of 50 % and more).
E2E_TOL = 0.10


@pytest.fixture(scope="module")
def sd32():
    return random_state_dict(TINY_CONFIG, 7)


@pytest.fixture(scope="module")
def bf16_file(sd32, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8src")
    p = d / "model_960x960_10s.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd32.items()}, str(p),
              metadata={"ovi.config": json.dumps(TINY_CONFIG.to_dict())})
    return p


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 48, 2, 4, 4, generator=g), torch.randn(1, 6, 20, generator=g),
            torch.randn(1, 7, 32, generator=g))


@torch.no_grad()
def _run(model):
    v, a, ctx = _inputs()
    return model(v, a, 500.0, ctx, ctx)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- quantisation and FP8Linear ------------------------------------------------------------------------------

def test_quantise_dequantise_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-3, 1, 256)  # many magnitudes per row
    for gran in ("tensor", "channel"):
        q, s = quantise_fp8(w, gran)
        assert q.dtype == E4M3 and s.dtype == torch.float32 and s.shape == (() if gran == "tensor" else (64, 1))
        back = dequantise_fp8(q, s)
        scaled = (w / s).abs()
        normal = scaled >= 2.0 ** -6  # e4m3's smallest normal
        # Round to nearest with 3 mantissa bits: at most half a step, 2^-4 of the value, for normal values...
        assert ((back - w).abs()[normal] <= 2.0 ** -4 * w.abs()[normal] * (1 + 1e-6)).all()
        # ...and half the subnormal step (2^-9) times the scale below that.
        sub_err = (back - w).abs()[~normal] / s.expand_as(w)[~normal]
        assert (sub_err <= 2.0 ** -10 * (1 + 1e-6)).all()
        if gran == "tensor":
            assert abs(scaled.amax().item() - 448) < 1e-3 * 448
    # The largest value maps onto e4m3's maximum, and a zero tensor gets a usable (finite, positive) scale.
    q, s = quantise_fp8(torch.zeros(4, 4))
    assert torch.isfinite(s) and s > 0 and dequantise_fp8(q, s).abs().max() == 0


def test_requantise_same_granularity_is_lossless():
    w = torch.randn(40, 48)
    for gran in ("tensor", "channel"):
        q, s = quantise_fp8(w, gran)
        q2, s2 = quantise_fp8(q, gran, src_scale=s)
        assert torch.equal(dequantise_fp8(q2, s2), dequantise_fp8(q, s))


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_fp8linear_upcast_equals_dequantised_linear(gran):
    torch.manual_seed(0)
    lin = torch.nn.Linear(70, 33)
    m = FP8Linear.from_linear(lin, gran)
    m.mode = "upcast"
    x = torch.randn(3, 5, 70)
    ref = F.linear(x, dequantise_fp8(m.weight, m.scale_weight), m.bias)
    assert torch.equal(m(x), ref)
    assert 0.005 < _rel(m(x), lin(x)) < 0.05  # quantised, and close
    assert m(x.bfloat16()).dtype == torch.bfloat16
    assert {k: v.dtype for k, v in m.state_dict().items()} == {"weight": E4M3, "bias": torch.float32,
                                                                 "scale_weight": torch.float32}


def _exact_input(shape, seed=0):
    """An input whose per-tensor FP8 quantisation is exact: e4m3 values with amax 448, times a power of two."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 100).clamp(-447, 447).to(E4M3).float()
    x.view(-1)[0] = 448.0
    return x * 2.0 ** -7


def _fake_scaled_mm(calls, refuse_rowwise=False):
    def fake(a, b, scale_a, scale_b, bias=None, out_dtype=None, **kw):
        assert a.dtype == E4M3 and b.dtype == E4M3
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0, "K and N must be padded"
        assert b.stride(0) == 1, "mat2 must be column-major"
        rowwise = scale_b.numel() > 1
        if rowwise:
            if refuse_rowwise:
                raise RuntimeError("rowwise scaling is not supported here")
            assert scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, b.shape[1])
            assert out_dtype == torch.bfloat16
        else:
            assert scale_a.numel() == 1 and scale_b.numel() == 1
        calls.append((tuple(a.shape), tuple(b.shape), rowwise, bias is not None))
        y = (a.float() * scale_a.float()) @ (b.float() * scale_b.float())
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype)
    return fake


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_scaled_mm_plumbing_with_fake_kernel(gran, monkeypatch):
    torch.manual_seed(1)
    lin = torch.nn.Linear(70, 33)  # neither K nor N a multiple of 16
    m = FP8Linear.from_linear(lin, gran)
    x = _exact_input((2, 3, 70))
    up = F.linear(x, dequantise_fp8(m.weight, m.scale_weight), m.bias)
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", _fake_scaled_mm(calls))
    monkeypatch.setattr(fp8mod, "_rowwise_ok", {})
    monkeypatch.setattr(fp8mod, "_forced_cache", {})
    y = scaled_mm_linear(x, m.weight, m.scale_weight, m.bias)  # float32 activations
    assert y.shape == (2, 3, 33) and y.dtype == torch.float32
    assert torch.allclose(y, up, rtol=1e-5, atol=1e-5)  # exact input quantisation: only float rounding differs
    assert calls[-1][:2] == ((6, 80), (80, 48))
    m.mode = "scaled_mm"
    asked = []
    monkeypatch.setattr(fp8mod, "fp8_matmul_support", lambda d: (asked.append(torch.device(d)) or True, "faked"))
    n = len(calls)
    yb = m(x.bfloat16())
    assert asked == [torch.device("cpu")]  # the forced mode was checked against the input's device
    assert len(calls) == n + 1  # and the module went through _scaled_mm
    assert yb.dtype == torch.bfloat16 and _rel(yb, up) < 1e-2
    assert calls[-1][2] == (gran == "channel")  # per-channel scales went into scale_b as a row


def test_scaled_mm_rowwise_refused_falls_back_to_output_scaling(monkeypatch):
    m = FP8Linear.from_linear(torch.nn.Linear(64, 48), "channel")
    x = _exact_input((5, 64), seed=3).bfloat16()
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", _fake_scaled_mm(calls, refuse_rowwise=True))
    monkeypatch.setattr(fp8mod, "_rowwise_ok", {})
    up = F.linear(x.float(), dequantise_fp8(m.weight, m.scale_weight), m.bias)
    y = scaled_mm_linear(x, m.weight, m.scale_weight, m.bias)
    assert _rel(y, up) < 1e-2 and calls[-1][2] is False
    scaled_mm_linear(x, m.weight, m.scale_weight, m.bias)
    assert all(not c[2] for c in calls)  # the refusal is remembered


@pytest.mark.skipif(not cpu_scaled_mm_available(), reason="this torch has no CPU torch._scaled_mm")
@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_scaled_mm_linear_on_torch_cpu_kernel(gran, monkeypatch):
    """The real torch._scaled_mm (its CPU kernel computes what the FP8 tensor cores compute): odd K and N padded,
    per-channel scales, bias; the result is the FP8 activations times the FP8 weights, accumulated in float32."""
    monkeypatch.setattr(fp8mod, "_rowwise_ok", {})
    torch.manual_seed(4)
    lin = torch.nn.Linear(1000, 300)
    m = FP8Linear.from_linear(lin, gran)
    x = torch.randn(3, 77, 1000).bfloat16()
    y = scaled_mm_linear(x, m.weight, m.scale_weight, m.bias)
    assert y.shape == (3, 77, 300) and y.dtype == torch.bfloat16
    x_scale = x.float().abs().amax() / 448
    xq = (x.float() / x_scale).to(E4M3).float() * x_scale  # the activations as the kernel sees them
    want = F.linear(xq, dequantise_fp8(m.weight, m.scale_weight), m.bias)
    assert _rel(y, want) < 5e-3  # bf16 output rounding and summation order only
    # against the upcast path, the difference is the activation quantisation (e4m3: 3 mantissa bits)
    up = F.linear(x.float(), dequantise_fp8(m.weight, m.scale_weight), m.bias)
    assert 5e-3 < _rel(y, up) < 6e-2
    monkeypatch.setattr(fp8mod, "_forced_cache", {})
    set_fp8_compute(m, "scaled_mm", cpu_kernel=True)  # the CPU kernel, asked for explicitly
    assert torch.equal(m(x), y)


def test_forced_scaled_mm_is_checked_against_the_device(monkeypatch):
    """Forcing "scaled_mm" where the device has no FP8 matrix multiply fails with the reason at the first forward
    on that device, the answer cached; nothing falls back to upcasting silently, and _scaled_mm is never reached."""
    monkeypatch.setattr(fp8mod, "_forced_cache", {})
    monkeypatch.setattr(fp8mod, "_mode_cache", {})
    m = FP8Linear.from_linear(torch.nn.Linear(32, 16), "tensor")
    x = torch.randn(4, 32)
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", _fake_scaled_mm(calls))
    # the real support check on this CPU: no FP8 tensor cores
    assert set_fp8_compute(m, "scaled_mm") == 1  # CPU-resident weights may compute elsewhere: checked at forward
    with pytest.raises(ValueError, match=r"'scaled_mm' was asked for, but cpu device has no FP8 matrix multiply"):
        m(x)
    # a GPU without FP8 tensor cores, through the device capability the real check reads
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    sm86 = r"but CUDA sm_86 \(FP8 tensor cores need sm_89 or newer\) has no FP8 matrix multiply; use 'auto' or 'upcast'"
    with pytest.raises(ValueError, match=sm86):
        fp8_compute_mode("cuda:0", "scaled_mm")
    # the layer computing on that GPU (its input's device stands in: the check is asked about the CPU input, and
    # answers with the GPU's capability)
    monkeypatch.setattr(fp8mod, "_forced_cache", {})
    real, asked = fp8mod.fp8_matmul_support, []
    monkeypatch.setattr(fp8mod, "fp8_matmul_support", lambda d: (asked.append(torch.device(d)), real("cuda:0"))[1])
    for _ in range(3):
        with pytest.raises(ValueError, match=sm86):
            m(x)
    assert asked == [torch.device("cpu")]  # decided once per device, for the device the layer computes on
    assert calls == []
    # with the device able (faked), the same forced layer computes through _scaled_mm; upcast asks nothing
    monkeypatch.setattr(fp8mod, "_forced_cache", {})
    monkeypatch.setattr(fp8mod, "fp8_matmul_support", lambda d: (True, "faked"))
    m(x)
    assert len(calls) == 1
    monkeypatch.setattr(fp8mod, "fp8_matmul_support", lambda d: pytest.fail("upcast asked about the device"))
    set_fp8_compute(m, "upcast")
    assert torch.equal(m(x), F.linear(x, dequantise_fp8(m.weight, m.scale_weight), m.bias))


def test_forced_scaled_mm_on_cpu_needs_the_cpu_kernel(monkeypatch):
    """cpu_kernel=True accepts torch's CPU _scaled_mm where it exists, and says so where it does not."""
    m = FP8Linear.from_linear(torch.nn.Linear(32, 16), "channel")
    x = torch.randn(4, 32)
    for available in (False, True):
        monkeypatch.setattr(fp8mod, "_forced_cache", {})
        monkeypatch.setattr(fp8mod, "cpu_scaled_mm_available", lambda a=available: a)
        calls = []
        monkeypatch.setattr(torch, "_scaled_mm", _fake_scaled_mm(calls))
        set_fp8_compute(m, "scaled_mm", cpu_kernel=True)
        if available:
            assert m(x).shape == (4, 16) and len(calls) == 1
        else:
            with pytest.raises(ValueError, match="without a CPU _scaled_mm kernel in this torch"):
                m(x)
            assert calls == []


def test_compute_mode_selection(monkeypatch):
    cuda = torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fp8mod, "_mode_cache", {})
    monkeypatch.setattr(torch.version, "hip", None)
    for cap, want in (((8, 9), True), ((9, 0), True), ((12, 0), True), ((8, 6), False), ((8, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        assert fp8_matmul_support(cuda)[0] is want, cap
    monkeypatch.setattr(torch.version, "hip", "6.2")
    for arch, want in (("gfx942:sramecc+:xnack-", True), ("gfx950", True), ("gfx90a:sramecc+:xnack-", False),
                       ("gfx1100", False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, a=arch: types.SimpleNamespace(gcnArchName=a))
        assert fp8_matmul_support(cuda)[0] is want, arch
    assert fp8mod._device_fp8_dtype(cuda) == E4M3  # the last arch of the loop, gfx1100: OCP e4m3fn
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-"))
    assert fp8mod._device_fp8_dtype(cuda) == torch.float8_e4m3fnuz
    assert fp8_compute_mode(cuda) == "scaled_mm" and fp8_compute_mode(cuda, "upcast") == "upcast"
    assert fp8_compute_mode("cpu") == "upcast" and fp8_compute_mode("cpu", "auto") == "upcast"
    with pytest.raises(ValueError, match="scaled_mm"):
        fp8_compute_mode("cpu", "scaled_mm")
    with pytest.raises(ValueError, match="one of"):
        fp8_compute_mode("cpu", "fast")


# -- converter ------------------------------------------------------------------------------------------------

def _header(p: Path) -> dict:
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


@pytest.fixture(scope="module")
def converted(bf16_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8out")
    out = {}
    for gran in ("tensor", "channel"):
        out[gran] = d / f"ovi_{gran}.safetensors"
        # the older scaled_fp8 convention, asked for explicitly (the default format: tests/test_comfy_quant_format.py)
        assert main_convert(["--to", "fp8", "--fp8-format", "scaled_fp8", "--granularity", gran, str(bf16_file),
                             str(out[gran])]) == 0
    return out


def test_converter_output_layout(converted, sd32):
    for gran, p in converted.items():
        h = _header(p)
        meta = h.pop("__metadata__")
        assert meta["ovi.quant.format"] == "fp8_e4m3fn_scaled" and meta["ovi.quant.granularity"] == gran
        assert meta["ovi.variant"] == "960x960_10s" and "model_960x960_10s.safetensors" in meta["ovi.quant.source"]
        assert json.loads(meta["ovi.config"]) == TINY_CONFIG.to_dict()
        assert h["scaled_fp8"]["dtype"] == "F8_E4M3" and h["scaled_fp8"]["shape"] == [0]
        quantised = [k for k in sd32 if is_quantised_key(k)]
        assert len(quantised) == 2 * TINY_CONFIG.num_layers * 12  # q k v o ×2, k/v fusion, ffn.0/2 per block
        for k in sd32:
            if k in quantised:
                scale = h[k[: -len(".weight")] + ".scale_weight"]
                assert h[k]["dtype"] == "F8_E4M3" and scale["dtype"] == "F32"
                assert scale["shape"] == ([] if gran == "tensor" else [sd32[k].shape[0], 1])
            else:
                assert h[k]["dtype"] == "BF16", k
        for kept in ("video_model.text_embedding.0.weight", "audio_model.time_projection.1.weight",
                     "video_model.head.head.weight", "video_model.blocks.0.modulation.modulation",
                     "video_model.blocks.0.self_attn.q.bias", "audio_model.patch_embedding.2.w1.weight"):
            assert h[kept]["dtype"] == "BF16"
        assert set(h) == set(sd32) | {"scaled_fp8"} | {k[:-7] + ".scale_weight" for k in quantised}


def test_converted_loads_close_to_bf16(converted, bf16_file):
    ref = _run(load_fusion_model(bf16_file, dtype=torch.float32))
    errs = {}
    for gran, p in converted.items():
        m = load_fusion_model(p, dtype=torch.float32)
        lin = [x for x in m.modules() if isinstance(x, FP8Linear)]
        assert len(lin) == 48 and all(x.granularity == gran and x.weight.dtype == E4M3 for x in lin)
        assert m.video_model.text_embedding[0].weight.dtype == torch.float32  # non-FP8 tensors at the load dtype
        out = _run(m)
        errs[gran] = max(_rel(out[0], ref[0]), _rel(out[1], ref[1]))
        assert 1e-3 < errs[gran] < E2E_TOL, errs


def test_streaming_converter_rss_bound(tmp_path):
    """Peak RSS growth of a conversion stays under 2x the largest tensor (the audio ConvMLP's 40 MB here, FFN
    weights 16 MB; the file is ~375 MB, so a memory-mapped read would grow by far more)."""
    code = f"""
import json, sys, torch
from dataclasses import replace
sys.path.insert(0, {str(ROOT)!r})
from ovi.fusion.config import OVI_AUDIO_CONFIG, OVI_VIDEO_CONFIG, FusionConfig
from ovi.fusion.model import FusionModel
from ovi.safetensors_stream import StreamingWriter
from ovi.convert import convert_fp8
small = dict(dim=1024, num_heads=8, num_layers=2, ffn_dim=8192, text_dim=64)
cfg = FusionConfig(replace(OVI_VIDEO_CONFIG, **small), replace(OVI_AUDIO_CONFIG, **small))
with torch.device("meta"):
    shapes = {{k: tuple(v.shape) for k, v in FusionModel(cfg).state_dict().items()}}
src = {str(tmp_path / 'src.safetensors')!r}
block = (torch.randn(1 << 16) * 0.02).bfloat16()
with StreamingWriter(src, [(k, s, torch.bfloat16) for k, s in shapes.items()], {{"ovi.config": json.dumps(cfg.to_dict())}}) as w:
    for k, s in shapes.items():
        n = torch.Size(s).numel()
        w.write(k, block.repeat(-(-n // block.numel()))[:n].reshape(s))
largest = max(torch.Size(s).numel() for s in shapes.values()) * 2
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
# a first, small conversion imports every module the converter loads lazily: only tensors count below
tiny = dict(dim=64, num_heads=2, num_layers=1, ffn_dim=128, text_dim=64)
tcfg = FusionConfig(replace(OVI_VIDEO_CONFIG, **tiny), replace(OVI_AUDIO_CONFIG, **tiny))
with torch.device("meta"):
    tshapes = {{k: tuple(v.shape) for k, v in FusionModel(tcfg).state_dict().items()}}
with StreamingWriter(src + ".warm.safetensors", [(k, s, torch.bfloat16) for k, s in tshapes.items()], {{"ovi.config": json.dumps(tcfg.to_dict())}}) as w:
    for k, s in tshapes.items():
        w.write(k, torch.zeros(s, dtype=torch.bfloat16))
convert_fp8(src + ".warm.safetensors", src + ".warm.out.safetensors", granularity="channel", variant="720x720_5s")
import gc; gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
convert_fp8(src, {str(tmp_path / 'dst.safetensors')!r}, granularity="channel", variant="720x720_5s")
print(json.dumps({{"growth": status("VmHWM") - base, "largest": largest}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["largest"] == 2816 * 1024 * 7 * 2
    assert res["growth"] <= 2 * res["largest"], res
    assert load_fusion_model(tmp_path / "dst.safetensors", dtype=torch.bfloat16).num_layers == 2


# -- the layouts users have ------------------------------------------------------------------------------------

def _fp8_effective(sd32, gran="tensor", scaled=True):
    """(fp8 state dict pieces, float32 reference state dict with the effective weights)."""
    q, scales, ref = {}, {}, {k: v.bfloat16().float() for k, v in sd32.items()}
    for k, v in sd32.items():
        if is_quantised_key(k):
            if scaled:
                w, s = quantise_fp8(v, gran)
            else:
                w, s = v.to(E4M3), torch.ones(())
            q[k], scales[k[:-7] + ".scale_weight"] = w, s
            ref[k] = dequantise_fp8(w, s)
    return q, scales, ref


def _save(sd, path, **meta):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta or None)
    return path


def _layout_files(sd32, d: Path) -> dict[str, tuple[list[Path], dict]]:
    files = {}
    bf = {k: v.to(torch.bfloat16) for k, v in sd32.items()}
    # official model_fp8_e4m3fn: plain casts, no scales
    q, _, ref = _fp8_effective(sd32, scaled=False)
    files["official-plain"] = ([_save({**bf, **q}, d / "model_fp8_e4m3fn.safetensors")], ref)
    # ComfyUI convention: marker + scalar scale_weight (+ an ignored scale_input)
    q, sc, ref = _fp8_effective(sd32)
    comfy = {**bf, **q, **sc, "scaled_fp8": torch.empty(0, dtype=E4M3),
             "video_model.blocks.0.self_attn.q.scale_input": torch.ones(())}
    files["comfy-scaled"] = ([_save(comfy, d / "ovi_comfy_scaled.safetensors")], ref)
    # KJ 1.1 single file: video keys unprefixed, audio under audio_model., scales shaped [1], WanVideoWrapper's
    # blocks.N.modulation name
    kj = {}
    for k, v in {**bf, **q, **{k: s.reshape(1) for k, s in sc.items()}}.items():
        k = k.replace("modulation.modulation", "modulation")
        kj[k.removeprefix("video_model.")] = v
    files["kj-scaled"] = ([_save(kj, d / "Wan2_2-5B-Ovi_960x960_10s_fp8_e4m3fn_scaled_KJ.safetensors")], ref)
    # KJ 1.0 split pair: video file without prefix, audio file with audio_model.
    video = {k: v for k, v in kj.items() if not k.startswith("audio_model.")}
    audio = {k: v for k, v in kj.items() if k.startswith("audio_model.")}
    files["kj-split"] = ([_save(audio, d / "Wan2_2_Ovi_Audio_fp8_e4m3fn_scaled_KJ.safetensors"),
                          _save(video, d / "Wan2_2_Ovi_Video_fp8_e4m3fn_scaled_KJ.safetensors")], ref)
    return files


def test_every_fp8_layout_loads(sd32, tmp_path):
    files = _layout_files(sd32, tmp_path)
    for name, (paths, ref_sd) in files.items():
        ref_path = _save(ref_sd, tmp_path / f"ref_{name}.safetensors",
                         **{"ovi.config": json.dumps(TINY_CONFIG.to_dict())})
        ref = _run(load_fusion_model(ref_path, dtype=torch.float32))
        m = load_fusion_model(paths if len(paths) > 1 else paths[0], dtype=torch.float32)
        assert sum(isinstance(x, FP8Linear) for x in m.modules()) == 48, name
        out = _run(m)
        # upcast computes weight.float() * scale, the same product as the reference weights: equal up to the
        # summation order of the matmuls
        assert _rel(out[0], ref[0]) < 1e-5 and _rel(out[1], ref[1]) < 1e-5, name
        if len(paths) == 1:
            from safetensors import safe_open
            with safe_open(str(paths[0]), "pt") as f:
                srcs = {k: types.SimpleNamespace(shape=tuple(f.get_slice(k).get_shape()), dtype=f.get_tensor(k).dtype)
                        for k in f.keys()}
            layout = detect_fp8_layout(srcs, {}, paths[0])
            assert layout.name == name and layout.granularity == ("none" if name == "official-plain" else "tensor")


def test_info_reports_fp8_format_granularity_variant(converted, sd32, tmp_path):
    info = inspect_file(converted["channel"])
    assert info.is_fusion and info.variant == "960x960_10s" and info.variant_source.startswith("metadata")
    assert "fp8_e4m3fn" in info.quantization and "per-output-channel" in info.quantization
    assert "python -m ovi convert" in info.quantization
    kj = _layout_files(sd32, tmp_path)["kj-scaled"][0][0]
    info = inspect_file(kj)
    assert info.component == "fusion" and info.variant == "960x960_10s"
    assert "per-tensor scales" in info.quantization and "WanVideoWrapper" in info.quantization
    plain = inspect_file(tmp_path / "model_fp8_e4m3fn.safetensors")
    assert "no scales" in plain.quantization and plain.variant == "720x720_5s"


def test_cli_info_output(converted, capsys):
    from ovi.__main__ import main

    assert main(["info", str(converted["tensor"])]) == 0
    out = capsys.readouterr().out
    assert "quantization: fp8_e4m3fn, per-tensor scales" in out and "variant:      960x960_10s" in out


def test_block_swap_with_fp8_model(converted):
    m = load_fusion_model(converted["channel"], dtype=torch.float32)
    ref = _run(m)
    v, a, ctx = _inputs()
    swapper = BlockSwapper(m, 1, "cpu", copier=_CloneCopier)
    with torch.no_grad():
        out = swapper(v, a, 500.0, ctx, ctx)
    swapper.detach()
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    # the FP8 tensors are what block swap moves: weight, bias and scale of every FP8 layer
    assert set_fp8_compute(m, "upcast") == 48


# -- errors ------------------------------------------------------------------------------------------------------

def test_unknown_fp8_layouts_are_clear_errors(sd32, tmp_path):
    bf = {k: v.to(torch.bfloat16) for k, v in sd32.items()}
    q, sc, _ = _fp8_effective(sd32)
    first = next(iter(sc))
    cases = {
        "marker_only": {**bf, "scaled_fp8": torch.empty(0, dtype=E4M3)},
        "mixed": {**bf, **q, **{k: v for k, v in sc.items() if k != first}},
        "bad_scale": {**bf, **q, **sc, first: torch.ones(3)},
        "orphan_scale": {**bf, **q, **sc, "video_model.blocks.0.self_attn.zz.scale_weight": torch.ones(())},
    }
    for name, sd in cases.items():
        p = _save(sd, tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointError, match="unknown FP8 layout") as e:
            load_fusion_model(p)
        assert str(p) in str(e.value)
        with pytest.raises(CheckpointError, match="unknown FP8 layout"):
            inspect_file(p)
    p = _save({**bf, **q, **sc}, tmp_path / "future.safetensors", **{"ovi.quant.format": "fp8_e4m3fn_blockwise"})
    with pytest.raises(CheckpointError, match="does not read"):
        load_fusion_model(p)


def test_convert_cli_errors(bf16_file, tmp_path, capsys):
    assert main_convert(["--to", "fp8", str(bf16_file), str(bf16_file)]) == 1
    assert "differ" in capsys.readouterr().err
    assert main_convert(["--to", "fp8", str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors")]) == 1
    assert not (tmp_path / "o.safetensors").exists() and not list(tmp_path.glob("*.partial"))
