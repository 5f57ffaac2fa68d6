"""Attention backends: sdpa against the textbook formula, backend resolution and its errors, and the dispatch
of flash_attn / sage through stand-in kernels.

No kernel package is installed here, so fakes are injected into ``sys.modules``. They compute the exact float64
reference, which makes these tests about the plumbing (layout, dtype, contiguity, scale, which kernel is called),
not about the kernels' numerics: on a GPU, benchmarks/engine.py compares the real kernels with sdpa under
``AGREEMENT_TOL`` (max|out - sdpa| <= 2e-2 · max|sdpa| for bf16 flash_attn, 1e-1 for 8-bit sage).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import ovi.attention as A
from ovi.fusion.config import FusionConfig
from ovi.fusion.checkpoint import load_fusion_model
from ovi.tools.parity import compare_tensors, load_fixture

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("flash_attn_interface", "flash_attn", "sageattention")


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    # Whatever this machine has installed, every test starts from "nothing installed" unless it injects a fake.
    for name in KERNEL_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    A._probe.cache_clear()
    A._logged.clear()
    yield
    A._probe.cache_clear()
    A._logged.clear()


def reference(q, k, v):
    """softmax(q·kᵀ/√D)·v in float64 for [B, L, H, D] inputs."""
    q, k, v = (x.double() for x in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def qkv(dtype=torch.float32, seed=0, b=2, lq=7, lk=11, h=3, d=16):
    g = torch.Generator().manual_seed(seed)
    # Built head-major then transposed: non-contiguous [B, L, H, D] views, as a caller might pass.
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype).transpose(1, 2) for n in (lq, lk, lk))


def rel(out, ref) -> float:
    return compare_tensors("attn", out, ref, 0.0)[0]


def gpu(monkeypatch, cap=(9, 0)):
    """Pretend the (CPU) device is an NVIDIA GPU with this compute capability."""
    monkeypatch.setattr(A, "_gpu_kind", lambda device: cap)


class FakeKernel:
    """A stand-in kernel: checks what it is given, records the call, returns the exact reference."""

    def __init__(self, returns_lse=False):
        self.calls, self.returns_lse = [], returns_lse

    def __call__(self, q, k, v, **kw):
        assert all(x.is_contiguous() for x in (q, k, v))
        assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
        assert q.shape[:1] + q.shape[2:] == k.shape[:1] + k.shape[2:] and k.shape == v.shape  # [B, L, H, D]
        self.calls.append((tuple(q.shape), tuple(k.shape), kw))
        out = reference(q, k, v).to(q.dtype)
        return (out, torch.zeros(1)) if self.returns_lse else out


def install(monkeypatch, name, attr, kernel, version="9.9"):
    mod = types.ModuleType(name)
    setattr(mod, attr, kernel)
    mod.__version__ = version
    monkeypatch.setitem(sys.modules, name, mod)
    return kernel


# -- sdpa ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sdpa_equals_reference(dtype, tol):
    q, k, v = qkv(dtype)
    ref = reference(q, k, v)
    attn = A.make_attention("sdpa", "cpu", dtype)
    assert attn.backend == "sdpa"
    for out in (A.attention(q, k, v), attn(q, k, v)):
        assert out.shape == (2, 7, 3, 16) and out.dtype == dtype
        assert rel(out, ref) < tol


# -- resolution ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_on_cpu_is_sdpa_logged_once(caplog, dtype):
    caplog.set_level(logging.INFO, logger="ovi")
    assert A.resolve_backend("auto", "cpu", dtype) == "sdpa"
    msgs = [r.getMessage() for r in caplog.records if "auto" in r.getMessage()]
    assert len(msgs) == 1 and "sdpa" in msgs[0] and "device is cpu" in msgs[0]
    assert A.make_attention("auto", torch.device("cpu"), dtype).backend == "sdpa"
    assert len([r for r in caplog.records if "auto" in r.getMessage()]) == 1  # not logged again
    assert A._probe.cache_info().currsize == 0  # nothing was imported to decide


@pytest.mark.parametrize("name,needle", [("flash_attn", "flash-attn"), ("sage", "pip install sageattention")])
def test_missing_backend_raises_with_install_hint(monkeypatch, name, needle):
    gpu(monkeypatch)  # a capable GPU, so "not installed" is the only obstacle
    with pytest.raises(A.AttentionBackendError) as e:
        A.make_attention(name, "cuda", torch.bfloat16)
    msg = str(e.value)
    assert repr(name) in msg and "is not installed" in msg and needle in msg
    if name == "flash_attn":
        assert "flash_attn_interface is not installed" in msg and "flash_attn is not installed" in msg
    assert A.resolve_backend("auto", "cuda", torch.bfloat16) == "sdpa"  # auto does not raise


def test_named_backend_unusable_here_raises(monkeypatch):
    install(monkeypatch, "flash_attn", "flash_attn_func", FakeKernel())
    install(monkeypatch, "sageattention", "sageattn", FakeKernel())
    for name in ("flash_attn", "sage"):
        with pytest.raises(A.AttentionBackendError, match=f"'{name}'.*device is cpu.*pip install"):
            A.resolve_backend(name, "cpu", torch.bfloat16)
    gpu(monkeypatch)
    for name in ("flash_attn", "sage"):  # no silent cast of float32 inputs to half
        with pytest.raises(A.AttentionBackendError, match=f"'{name}'.*float16 or bfloat16.*float32"):
            A.make_attention(name, "cuda", torch.float32)
    assert A.resolve_backend("auto", "cuda", torch.float32) == "sdpa"
    gpu(monkeypatch, (7, 5))  # Turing: FlashAttention 2 needs Ampere
    with pytest.raises(A.AttentionBackendError, match=r"compute capability 8\.0\+, this GPU has 7\.5"):
        A.resolve_backend("flash_attn", "cuda", torch.float16)
    with pytest.raises(A.AttentionBackendError, match="unknown attention backend 'xformers'"):
        A.resolve_backend("xformers", "cpu", torch.float32)


def test_broken_install_is_reported(monkeypatch):
    gpu(monkeypatch)
    broken = types.ModuleType("flash_attn")  # imports, but lacks the entry point
    monkeypatch.setitem(sys.modules, "flash_attn", broken)
    with pytest.raises(A.AttentionBackendError, match="flash_attn has no flash_attn_func"):
        A.resolve_backend("flash_attn", "cuda", torch.bfloat16)


def test_auto_prefers_fa3_then_fa2_and_never_sage(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ovi")
    install(monkeypatch, "sageattention", "sageattn", FakeKernel())
    gpu(monkeypatch)
    assert A.resolve_backend("auto", "cuda", torch.bfloat16) == "sdpa"  # sage is installed but 8-bit
    fa2 = install(monkeypatch, "flash_attn", "flash_attn_func", FakeKernel())
    fa3 = install(monkeypatch, "flash_attn_interface", "flash_attn_func", FakeKernel(returns_lse=True))
    A._probe.cache_clear()
    attn = A.make_attention("auto", "cuda", torch.bfloat16)
    assert attn.backend == "flash_attn" and "FlashAttention 3" in attn.detail
    assert any("auto -> flash_attn (FlashAttention 3" in r.getMessage() for r in caplog.records)
    attn(*qkv(torch.bfloat16))
    assert len(fa3.calls) == 1 and not fa2.calls
    gpu(monkeypatch, (8, 6))  # Ampere: FA3 is not built for it, FA2 is
    attn = A.make_attention("auto", "cuda", torch.float16)
    assert "FlashAttention 2" in attn.detail
    attn(*qkv(torch.float16))
    assert len(fa2.calls) == 1 and len(fa3.calls) == 1


def test_available_backends_report(monkeypatch):
    cpu = A.available_backends("cpu")
    assert set(cpu) == {"auto", "sdpa", "flash_attn", "sage"}
    assert cpu["auto"].startswith("-> sdpa") and cpu["sdpa"].startswith("available")
    assert cpu["flash_attn"].startswith("unavailable") and cpu["sage"].startswith("unavailable")
    gpu(monkeypatch)
    install(monkeypatch, "flash_attn", "flash_attn_func", FakeKernel(), version="2.8.3")
    st = A.available_backends("cuda")
    assert st["flash_attn"] == "available: FlashAttention 2 (flash_attn) 2.8.3"
    assert st["auto"].startswith("-> flash_attn") and "not installed" in st["sage"]


# -- dispatch through fake kernels -----------------------------------------------------------
@pytest.mark.parametrize("backend,module,attr,lse", [
    ("flash_attn", "flash_attn_interface", "flash_attn_func", True),
    ("flash_attn", "flash_attn", "flash_attn_func", False),
    ("sage", "sageattention", "sageattn", False),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_dispatch_matches_sdpa(monkeypatch, backend, module, attr, lse, dtype):
    gpu(monkeypatch)
    kernel = install(monkeypatch, module, attr, FakeKernel(returns_lse=lse))
    attn = A.make_attention(backend, "cuda", dtype)
    assert attn.backend == backend
    q, k, v = qkv(dtype, seed=3)
    assert not q.is_contiguous()
    out = attn(q, k, v)
    (qs, ks, kw), = kernel.calls
    assert qs == (2, 7, 3, 16) and ks == (2, 11, 3, 16)  # [B, L, H, D], no transpose to head-major
    if backend == "sage":
        assert kw == {"tensor_layout": "NHD", "is_causal": False, "sm_scale": 0.25}
    else:
        assert kw == {"softmax_scale": 0.25, "causal": False}
    assert out.shape == (2, 7, 3, 16) and out.dtype == dtype
    sdpa = A.attention(q, k, v)
    assert rel(out, sdpa) <= A.AGREEMENT_TOL[backend]
    assert rel(out, reference(q, k, v)) < 1e-2  # the fake is exact up to half rounding
    with pytest.raises(A.AttentionBackendError, match=f"'{backend}' needs float16/bfloat16"):
        attn(*qkv(torch.float32))


def test_availability_is_cached(monkeypatch):
    gpu(monkeypatch)
    install(monkeypatch, "flash_attn", "flash_attn_func", FakeKernel())
    for _ in range(3):
        A.resolve_backend("flash_attn", "cuda", torch.bfloat16)
    info = A._probe.cache_info()
    assert info.misses == 2 and info.hits >= 4  # fa3 and fa2 probed once each


def test_kernel_packages_imported_lazily():
    # A fresh interpreter that records every attempt to find a kernel package.
    code = textwrap.dedent("""
        import sys, torch
        seen = []
        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {kernels!r}:
                    seen.append(name)
                return None
        sys.meta_path.insert(0, Spy())
        import ovi.attention as A, ovi.fusion.model
        A.make_attention('auto', 'cpu', torch.bfloat16)
        A.available_backends('cpu')
        assert seen == [], seen
        A._gpu_kind = lambda device: (9, 0)
        for _ in range(3):
            A.available_backends('cuda')
        print(sorted(seen))
    """).format(kernels=set(KERNEL_MODULES))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # Probed once each despite three reports (a real install may import submodules; none are installed here).
    assert r.stdout.split("\n")[-2] == str(sorted(KERNEL_MODULES))


# -- the fusion model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fx(parity_dir):
    return load_fixture(parity_dir / "fusion_forward_t2v.safetensors")


def _run(model, fx, dtype=torch.float32):
    i = fx.inputs
    return model(i["video_latent"].to(dtype), i["audio_latent"].to(dtype), i["timestep"],
                 i["video_context"].to(dtype), i["audio_context"].to(dtype))


def _load(fx, dtype):
    return load_fusion_model(fx.weights_path, prefix=fx.weights_prefix, dtype=dtype,
                             config=FusionConfig.from_dict(fx.config))


@torch.no_grad()
def test_fusion_model_with_explicit_sdpa_is_identical(fx):
    model = _load(fx, torch.float32)
    ref = _run(model, fx)
    sdpa = A.make_attention("sdpa", "cpu", torch.float32)
    calls = []

    def counting(q, k, v):
        calls.append(q.shape)
        return sdpa(q, k, v)

    model.set_attention(counting)
    out = _run(model, fx)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert len(calls) == 3 * 2 * model.num_layers  # self, text and fusion attention in both backbones
    model.set_attention(sdpa)
    assert model.attn_fn is sdpa
    assert all(torch.equal(a, b) for a, b in zip(_run(model, fx), ref))
    assert compare_tensors("video", out[0], fx.outputs["video_pred"], 1e-4)[1]


@torch.no_grad()
def test_fusion_model_bf16_through_fake_flash(monkeypatch, fx):
    gpu(monkeypatch)
    kernel = install(monkeypatch, "flash_attn", "flash_attn_func", FakeKernel())
    model = _load(fx, torch.bfloat16)
    ref = _run(model, fx, torch.bfloat16)
    model.set_attention(A.make_attention("auto", "cuda", torch.bfloat16))
    out = _run(model, fx, torch.bfloat16)
    assert len(kernel.calls) == 3 * 2 * model.num_layers
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16 and rel(a, b) <= A.AGREEMENT_TOL["flash_attn"]
