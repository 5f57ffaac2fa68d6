"""Unmasked multi-head attention over [B, L, H, D] tensors, the one primitive the fusion DiT uses, and its backends.

The softmax scale is always 1/sqrt(D). Backends:

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. Works on every device and dtype; on CUDA/ROCm
  PyTorch picks its own fused kernel (flash, memory-efficient, cuDNN, AOTriton) beneath it. The parity reference.
* ``flash_attn``: FlashAttention 3 (``flash_attn_interface``, Hopper) if importable, else FlashAttention 2
  (``flash_attn``). fp16/bf16 on a GPU only, which is what the official Ovi code runs.
* ``sage``: ``sageattention.sageattn``. Quantises q/k to int8 (and p·v to fp8 on some GPUs), so it changes the
  numerics beyond bf16 rounding: only used when asked for by name, never by ``auto``.
* ``auto``: ``flash_attn`` on a GPU with fp16/bf16 when it is importable and the GPU can run it, else ``sdpa``.

A backend asked for by name that cannot run here raises ``AttentionBackendError``; nothing falls back silently.
An engine builds one ``Attention`` with ``make_attention`` and hands it to its model
(``FusionModel.set_attention``): the choice lives with the engine, not in a process-wide setting.

Agreement with sdpa on the same bf16 inputs, under the parity rule max|out - sdpa| <= tol * max|sdpa|, is given
in ``AGREEMENT_TOL``; benchmarks/engine.py checks the real kernels against it on a GPU. The unit tests can only
check the plumbing (layout, dtype, dispatch) with stand-in kernels, since no kernel package is installed there.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .choices import ATTENTION_BACKENDS as BACKENDS
from .log import log

# bf16 output rounding alone is ~4e-3 relative; flash kernels also round p to bf16 before p·v. Sage's int8 q·k is
# coarser still: its bound is a sanity check that the kernel is wired right, not a claim of equivalence.
AGREEMENT_TOL = {"flash_attn": 2e-2, "sage": 1e-1}

INSTALL_HINTS = {
    "flash_attn": "install FlashAttention 2 with `pip install flash-attn --no-build-isolation` (Ampere or newer), "
                  "or FlashAttention 3 from the hopper/ directory of github.com/Dao-AILab/flash-attention "
                  "(H100/H200); or choose attention 'sdpa'",
    "sage": "install SageAttention with `pip install sageattention` (Ampere or newer); or choose attention 'sdpa'",
}

_HALF = (torch.float16, torch.bfloat16)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionBackendError(RuntimeError):
    """An attention backend was asked for by name but cannot run with this device, dtype or installation."""


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√D)·v for q [B, Lq, H, D], k/v [B, Lk, H, D] via sdpa; returns [B, Lq, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


# -- availability (lazy, cached) ----------------------------------------------------------------
class _Probe(NamedTuple):
    module: object | None  # the imported module, or None
    reason: str            # why it is unusable, or what it is


@functools.cache
def _probe(impl: str) -> _Probe:
    """Import one kernel package on first use; ``impl`` is "fa3", "fa2" or "sage". Cached: imports are slow and
    a package does not appear mid-process (tests clear the cache with ``_probe.cache_clear()``)."""
    module_name, attr, label = {
        "fa3": ("flash_attn_interface", "flash_attn_func", "FlashAttention 3 (flash_attn_interface)"),
        "fa2": ("flash_attn", "flash_attn_func", "FlashAttention 2 (flash_attn)"),
        "sage": ("sageattention", "sageattn", "SageAttention (sageattention)"),
    }[impl]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return _Probe(None, f"{module_name} is not installed")
        return _Probe(None, f"{module_name} is installed but failed to import ({type(e).__name__}: {e})")
    except Exception as e:  # broken builds raise ImportError, OSError (missing .so), RuntimeError (ABI) ...
        return _Probe(None, f"{module_name} is installed but failed to import ({type(e).__name__}: {e})")
    if not callable(getattr(module, attr, None)):
        return _Probe(None, f"{module_name} has no {attr}(); the installed version is not supported")
    version = getattr(module, "__version__", None)
    return _Probe(module, label + (f" {version}" if version else ""))


def _gpu_kind(device: torch.device) -> tuple[int, int] | str | None:
    """None for a non-GPU device, "rocm" on ROCm, else the NVIDIA compute capability (major, minor)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if torch.version.hip:
        return "rocm"
    return torch.cuda.get_device_capability(device)


def _flash_impl(device: torch.device, dtype: torch.dtype) -> tuple[str | None, str]:
    """("fa3" | "fa2", description) if FlashAttention can run here, else (None, reason)."""
    gpu = _gpu_kind(device)
    if gpu is None:
        return None, f"it needs a CUDA or ROCm GPU, the device is {device}"
    if dtype not in _HALF:
        return None, f"it needs float16 or bfloat16, the dtype is {_name(dtype)}"
    reasons = []
    # FA3 kernels are built for Hopper (sm90) and newer; FA2 for Ampere (sm80) and newer. ROCm builds pick
    # their own architectures, so there an importable package is taken as usable.
    for impl, min_cap in (("fa3", (9, 0)), ("fa2", (8, 0))):
        probe = _probe(impl)
        if probe.module is None:
            reasons.append(probe.reason)
        elif gpu != "rocm" and gpu < min_cap:
            reasons.append(f"{probe.reason} needs compute capability {min_cap[0]}.{min_cap[1]}+, "
                           f"this GPU has {gpu[0]}.{gpu[1]}")
        else:
            return impl, probe.reason
    return None, "; ".join(reasons)


def _sage_ok(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    gpu = _gpu_kind(device)
    if gpu is None:
        return False, f"it needs a CUDA GPU, the device is {device}"
    if dtype not in _HALF:
        return False, f"it needs float16 or bfloat16, the dtype is {_name(dtype)}"
    probe = _probe("sage")
    if probe.module is None:
        return False, probe.reason
    if gpu != "rocm" and gpu < (8, 0):
        return False, f"{probe.reason} needs compute capability 8.0+, this GPU has {gpu[0]}.{gpu[1]}"
    return True, probe.reason


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _auto(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(backend, reason) for "auto", without logging."""
    impl, why = _flash_impl(device, dtype)
    if impl is not None:
        return "flash_attn", f"{why} runs on {device} with {_name(dtype)}"
    return "sdpa", f"flash_attn is not usable: {why}"


_logged: set[tuple] = set()


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The concrete backend ("sdpa", "flash_attn" or "sage") for ``name`` on this device and dtype.

    "auto" logs its choice and the reason once per (device type, dtype, choice). A named backend that cannot
    run here raises ``AttentionBackendError`` with the reason and the install hint.
    """
    device = torch.device(device)
    if name == "auto":
        backend, why = _auto(device, dtype)
        key = (device.type, dtype, backend)
        if key not in _logged:
            _logged.add(key)
            log.info("attention: auto -> %s (%s)", backend, why)
        return backend
    if name == "sdpa":
        return "sdpa"
    if name == "flash_attn":
        impl, why = _flash_impl(device, dtype)
        ok = impl is not None
    elif name == "sage":
        ok, why = _sage_ok(device, dtype)
    else:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if not ok:
        raise AttentionBackendError(f"attention backend {name!r} cannot run here: {why}. "
                                    f"To use it, {INSTALL_HINTS[name]}.")
    return name


def available_backends(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """{backend: one-line status} for reports such as ``python -m ovi info``; probes (imports) lazily."""
    device = torch.device(device)
    status = {"auto": "-> %s (%s)" % _auto(device, dtype)}
    gpu = _gpu_kind(device)
    status["sdpa"] = f"available (torch {torch.__version__}" + (
        "; PyTorch picks flash / memory-efficient / math beneath it)" if gpu is not None else ")")
    impl, why = _flash_impl(device, dtype)
    status["flash_attn"] = f"available: {why}" if impl else f"unavailable: {why}"
    ok, why = _sage_ok(device, dtype)
    status["sage"] = f"available: {why} (8-bit, changes numerics)" if ok else f"unavailable: {why}"
    return status


# -- the per-engine callable ---------------------------------------------------------------------
def _half_contiguous(backend: str, q, k, v) -> tuple[torch.Tensor, ...]:
    if q.dtype not in _HALF or k.dtype != q.dtype or v.dtype != q.dtype:
        raise AttentionBackendError(f"attention backend {backend!r} needs float16/bfloat16 q, k, v of one dtype, "
                                    f"got {_name(q.dtype)}, {_name(k.dtype)}, {_name(v.dtype)}; build the "
                                    "engine's attention for its compute dtype")
    return q.contiguous(), k.contiguous(), v.contiguous()


def _run_flash(fn, q, k, v):
    q, k, v = _half_contiguous("flash_attn", q, k, v)
    out = fn(q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=False)
    return out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the log-sum-exp


def _run_sage(fn, q, k, v):
    q, k, v = _half_contiguous("sage", q, k, v)
    return fn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=q.shape[-1] ** -0.5)


class Attention:
    """A resolved attention backend, called as ``attn(q, k, v)`` on [B, L, H, D] tensors like ``attention``."""

    __slots__ = ("backend", "detail", "device", "dtype", "_kernel")

    def __init__(self, backend: str, detail: str, device: torch.device, dtype: torch.dtype, kernel: Kernel):
        self.backend, self.detail, self.device, self.dtype, self._kernel = backend, detail, device, dtype, kernel

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._kernel(q, k, v)

    def __repr__(self) -> str:
        return f"Attention({self.backend!r}: {self.detail}; {self.device}, {_name(self.dtype)})"


def make_attention(name: str = "auto", device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> Attention:
    """Resolve ``name`` for this device and compute dtype (see ``resolve_backend``) into an ``Attention``."""
    device = torch.device(device)
    backend = resolve_backend(name, device, dtype)
    if backend == "flash_attn":
        impl, detail = _flash_impl(device, dtype)
        return Attention(backend, detail, device, dtype, functools.partial(_run_flash, _probe(impl).module.flash_attn_func))
    if backend == "sage":
        probe = _probe("sage")
        log.info("attention: sage quantises q/k to 8 bits; results differ from sdpa beyond bf16 rounding")
        return Attention(backend, probe.reason, device, dtype, functools.partial(_run_sage, probe.module.sageattn))
    return Attention("sdpa", "torch.nn.functional.scaled_dot_product_attention", device, dtype, attention)
