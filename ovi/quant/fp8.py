"""FP8 weights for the fusion backbones: quantise/dequantise helpers and ``FP8Linear``.

A weight is stored as ``float8_e4m3fn`` with a float32 scale, one per tensor ([]) or per output channel
([out, 1]); the effective weight is ``weight.float() * scale``. ``FP8Linear`` computes in one of two ways:

* ``"scaled_mm"`` on hardware with FP8 tensor cores (CUDA sm_89+, ROCm gfx942/gfx950): the activation is
  quantised per call with a dynamic per-tensor scale (amax / max), or with the layer's static ``input_scale``
  when its file has one (ComfyUI's mixed-precision files), and ``torch._scaled_mm`` multiplies the two FP8
  operands, the scales applied in its epilogue;
* ``"upcast"`` anywhere else: the weight is cast to the compute dtype and scaled for this one call.

The choice is automatic per device (logged once) and can be forced per model (``set_fp8_compute``). A forced
"scaled_mm" is checked against the device the layer computes on at its first forward there (once per device,
cached): a device without FP8 matrix multiply is a ``ValueError`` saying why, never a silent upcast or a kernel
error deep inside a step. torch's CPU ``_scaled_mm`` kernel (the tensor cores' arithmetic, no faster than
upcasting) is accepted only when asked for (``cpu_kernel=True``), as tests and benchmarks do.
Weight, bias and scale are ordinary parameters/buffers, so block swap moves them like any other tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..log import log

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
GRANULARITIES = ("tensor", "channel")
COMPUTE_MODES = ("auto", "scaled_mm", "upcast")
# The ROCm architectures whose matrix cores take FP8 operands (gfx942 in the fnuz encoding).
_ROCM_FP8_ARCHS = ("gfx942", "gfx950")
_MIN_SCALE = 1e-12  # an all-zero tensor still gets a finite, positive scale
_ROW_CHUNK = 1 << 19  # elements quantised at once: the float32 temporaries stay at 2 MB

_mode_cache: dict[tuple[str, int | None], str] = {}
# (device type, index, CPU kernel accepted) -> None when a forced "scaled_mm" can run there, else the error text
_forced_cache: dict[tuple[str, int | None, bool], str | None] = {}
_rowwise_ok: dict[tuple[str, int | None], bool] = {}


# -- quantisation ------------------------------------------------------------------------------------

def _row_chunks(w: torch.Tensor, src_scale: torch.Tensor | None = None):
    """float32 pieces of ``w`` (times ``src_scale``, a scalar or one per row) a few million elements at a time."""
    if w.ndim < 2:
        yield slice(None), _times(w.to(torch.float32, copy=True), src_scale)
        return
    rows = max(1, _ROW_CHUNK // max(1, w[0].numel()))
    for i in range(0, w.shape[0], rows):
        sc = src_scale if src_scale is None or src_scale.numel() == 1 else src_scale.reshape(-1)[i:i + rows]
        yield slice(i, i + rows), _times(w[i:i + rows].to(torch.float32, copy=True), sc)


def _times(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return x
    scale = scale.float()
    return x.mul_(scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *[1] * (x.ndim - 1)))


def fp8_scale(w: torch.Tensor, granularity: str = "tensor", fmax: float = E4M3_MAX, *,
              src_scale: torch.Tensor | None = None) -> torch.Tensor:
    """float32 scale mapping the absolute maximum of ``w`` (per tensor [] or per row [out, 1]) onto ``fmax``.
    ``src_scale``: ``w`` is itself a scaled FP8 weight whose effective value is ``w * src_scale``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"scale granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "channel" and w.ndim != 2:
        raise ValueError(f"per-channel scales need a 2-D weight, got shape {list(w.shape)}")
    parts = [x.abs_().amax(dim=1, keepdim=True) if granularity == "channel" else x.abs_().amax().reshape(1)
             for _, x in _row_chunks(w, src_scale)]
    amax = torch.cat(parts) if granularity == "channel" else torch.cat(parts).amax()
    return (amax / fmax).clamp(min=_MIN_SCALE)


def quantise_fp8(w: torch.Tensor, granularity: str = "tensor", *, dtype: torch.dtype = E4M3,
                 scale: torch.Tensor | None = None,
                 src_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (any float dtype, or FP8 with ``src_scale``) -> (fp8 weight, float32 scale), ``fp8.float() * scale ≈ w``.

    Works through the rows in chunks, so the float32 temporaries stay small next to the tensor itself.
    """
    fmax = float(torch.finfo(dtype).max)
    scale = fp8_scale(w, granularity, fmax, src_scale=src_scale) if scale is None else scale.float()
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    for rows, x in _row_chunks(w, src_scale):
        s = scale if scale.ndim == 0 else scale[rows]
        out[rows] = x.div_(s).clamp_(-fmax, fmax).to(dtype)
    return out, scale


def dequantise_fp8(w: torch.Tensor, scale: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The effective weight ``w.float() * scale`` in ``dtype`` (scale None: a plain cast)."""
    out = w.to(torch.float32)
    if scale is not None:
        out = out * scale.to(device=out.device, dtype=torch.float32)
    return out.to(dtype)


# -- compute mode ------------------------------------------------------------------------------------

def _key(device: torch.device) -> tuple[str, int | None]:
    index = device.index
    if device.type == "cuda" and index is None and torch.cuda.is_available():
        index = torch.cuda.current_device()
    return device.type, index


def _rocm_arch(device: torch.device) -> str:
    return str(getattr(torch.cuda.get_device_properties(device), "gcnArchName", "")).split(":")[0]


def fp8_matmul_support(device: torch.device | str) -> tuple[bool, str]:
    """(whether ``torch._scaled_mm`` has FP8 tensor cores on ``device``, the reason in words)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"{device.type} device"
    if not hasattr(torch, "_scaled_mm"):
        return False, "this torch has no _scaled_mm"
    if torch.version.hip:
        arch = _rocm_arch(device)
        ok = arch in _ROCM_FP8_ARCHS
        return ok, f"ROCm {arch or 'unknown arch'}" + ("" if ok else f" (FP8 matrix cores need {'/'.join(_ROCM_FP8_ARCHS)})")
    major, minor = torch.cuda.get_device_capability(device)
    ok = (major, minor) >= (8, 9)
    return ok, f"CUDA sm_{major}{minor}" + ("" if ok else " (FP8 tensor cores need sm_89 or newer)")


def cpu_scaled_mm_available() -> bool:
    """Whether this torch has a CPU ``_scaled_mm`` kernel. It is no faster than upcasting, so it is never chosen
    for compute; its arithmetic is that of the FP8 tensor cores, so tests and benchmarks measure errors with it."""
    one = torch.ones(())
    try:
        torch._scaled_mm(torch.zeros(16, 16, dtype=E4M3), torch.zeros(16, 16, dtype=E4M3).t(), scale_a=one,
                         scale_b=one, out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def check_forced_scaled_mm(device: torch.device | str, cpu_kernel: bool = False) -> None:
    """Raise ``ValueError`` (saying why) unless ``torch._scaled_mm`` can compute FP8 linears on ``device``: FP8
    tensor cores (``fp8_matmul_support``), or with ``cpu_kernel`` a CPU whose torch has the CPU kernel. Decided
    once per device; later calls only look the answer up."""
    device = torch.device(device)
    key = (*_key(device), bool(cpu_kernel))
    if key not in _forced_cache:
        ok, why = fp8_matmul_support(device)
        if not ok and cpu_kernel and device.type == "cpu":
            ok = cpu_scaled_mm_available()
            why += "" if ok else " without a CPU _scaled_mm kernel in this torch"
        _forced_cache[key] = None if ok else (f"FP8 compute 'scaled_mm' was asked for, but {why} has no FP8 matrix "
                                              "multiply; use 'auto' or 'upcast'.")
    if _forced_cache[key] is not None:
        raise ValueError(_forced_cache[key])


def fp8_compute_mode(device: torch.device | str, override: str | None = None) -> str:
    """"scaled_mm" or "upcast" for FP8 linears on ``device``: ``override`` ("auto" | "scaled_mm" | "upcast")
    or, for None/"auto", what the hardware supports (decided and logged once per device). A forced "scaled_mm"
    on a device without FP8 matrix multiply is a ``ValueError`` (``check_forced_scaled_mm``)."""
    device = torch.device(device)
    if override not in (None, "auto"):
        if override not in COMPUTE_MODES:
            raise ValueError(f"FP8 compute mode must be one of {COMPUTE_MODES}, got {override!r}")
        if override == "scaled_mm":
            check_forced_scaled_mm(device)
        return override
    key = _key(device)
    if key not in _mode_cache:
        ok, why = fp8_matmul_support(device)
        _mode_cache[key] = "scaled_mm" if ok else "upcast"
        log.info("FP8 linears on %s: %s (%s)", device, "torch._scaled_mm with dynamic activation scales" if ok
                 else "weights upcast to the compute dtype per layer", why)
    return _mode_cache[key]


# -- the two compute paths ---------------------------------------------------------------------------

def _device_fp8_dtype(device: torch.device) -> torch.dtype:
    """The FP8 operand encoding the matrix cores take: MI300 (gfx942) uses the fnuz variant."""
    if device.type == "cuda" and torch.version.hip and _rocm_arch(device) == "gfx942":
        return torch.float8_e4m3fnuz
    return E4M3


def _pad2(t: torch.Tensor, cols: int, rows: int = 0) -> torch.Tensor:
    """Zero-pad a 2-D tensor by ``cols`` columns and ``rows`` rows, keeping it row-major (FP8 through a uint8
    view: the zero byte is +0.0 in e4m3)."""
    if cols == 0 and rows == 0:
        return t
    if t.dtype.itemsize == 1 and t.is_floating_point():
        return F.pad(t.view(torch.uint8), (0, cols, 0, rows)).view(t.dtype)
    return F.pad(t, (0, cols, 0, rows))


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` through ``torch._scaled_mm``: ``x`` quantised per call with a per-tensor
    scale amax/max (or the static ``input_scale``: x / input_scale, clamped to the FP8 range), K and N
    zero-padded to multiples of 16 as the kernel requires, per-channel weight scales in ``scale_b`` as a [1, N]
    row (rowwise scaling) or, where the kernel refuses that, applied to the output."""
    out_features, in_features = weight.shape
    lead = x.shape[:-1]
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    fp8 = _device_fp8_dtype(x.device)
    fmax = float(torch.finfo(fp8).max)
    w, w_scale = weight, scale.to(device=x.device, dtype=torch.float32)
    if fp8 != weight.dtype:  # e4m3fn -> fnuz: halve so 448 fits under 240; exact, the exponent just shifts
        w, w_scale = (weight.float() * 0.5).to(fp8), w_scale * 2.0

    x2 = x.reshape(-1, in_features)
    pad_k, pad_n = -in_features % 16, -out_features % 16
    if input_scale is None:
        x_scale = (x2.abs().amax().float() / fmax).clamp(min=_MIN_SCALE)
    else:
        x_scale = input_scale.to(device=x.device, dtype=torch.float32).reshape(())
        if fp8 != E4M3:  # fnuz holds half of e4m3fn's range: a doubled scale keeps the same values in range
            x_scale = x_scale * 2.0
    xq = (x2.float() / x_scale).clamp(-fmax, fmax).to(fp8)
    xq = _pad2(xq, pad_k)
    w = _pad2(w, pad_k, pad_n)  # [N, K] row-major, so w.t() is the column-major [K, N] the kernel wants
    channel = w_scale.numel() > 1
    b = None if bias is None else bias.to(device=x.device, dtype=out_dtype)
    key = _key(x.device)
    y = None
    if channel and out_dtype == torch.bfloat16 and _rowwise_ok.get(key, True):
        sb = w_scale.reshape(1, -1)
        sb = F.pad(sb, (0, pad_n), value=1.0) if pad_n else sb
        sa = x_scale.expand(xq.shape[0], 1).contiguous()
        try:
            y = torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=sb.contiguous(), bias=_pad_bias(b, pad_n),
                                 out_dtype=out_dtype)
        except (RuntimeError, NotImplementedError) as e:
            _rowwise_ok[key] = False
            log.info("FP8 rowwise scaling unavailable on %s (%s); per-channel scales are applied to the output",
                     x.device, str(e).splitlines()[0])
    if y is None:
        one = torch.ones((), dtype=torch.float32, device=x.device)
        fused_bias = not channel and out_dtype != torch.float32
        y = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=one if channel else w_scale.reshape(()),
                             bias=_pad_bias(b, pad_n) if fused_bias else None, out_dtype=out_dtype)
        if isinstance(y, tuple):  # torch < 2.5 also returned the amax
            y = y[0]
        if channel:
            y = y * F.pad(w_scale.reshape(1, -1), (0, pad_n), value=1.0).to(out_dtype)
        if b is not None and not fused_bias:
            y = y + _pad_bias(b, pad_n)
    if isinstance(y, tuple):
        y = y[0]
    if pad_n:
        y = y[:, :out_features]
    return y.reshape(*lead, out_features).to(x.dtype)


def _pad_bias(b: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return b if b is None or n == 0 else F.pad(b, (0, n))


# -- the module --------------------------------------------------------------------------------------

class FP8Linear(nn.Module):
    """A linear layer with an FP8 weight and a float32 ``scale_weight`` ([] per tensor, [out, 1] per channel).

    The state-dict names (``weight``, ``bias``, ``scale_weight``) are those of ComfyUI's scaled-fp8 files, so
    such a file maps onto the module key for key. ``static_input_scale``: the layer has a float32 scalar buffer
    ``input_scale`` (a file's static activation scale, used by "scaled_mm"; upcasting needs none). ``mode`` None
    follows ``fp8_compute_mode`` for the device.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, granularity: str = "tensor",
                 weight_dtype: torch.dtype = E4M3, device=None, static_input_scale: bool = False):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"scale granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.in_features, self.out_features, self.granularity = in_features, out_features, granularity
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=weight_dtype, device=device),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        shape = () if granularity == "tensor" else (out_features, 1)
        self.register_buffer("scale_weight", torch.ones(shape, dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device)
                             if static_input_scale else None)
        self.mode: str | None = None
        self.cpu_kernel = False  # a forced "scaled_mm" may run on torch's CPU kernel (tests, benchmarks)

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "tensor") -> "FP8Linear":
        """Quantise a float ``nn.Linear`` (bias kept in its dtype)."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, granularity,
                device=linear.weight.device)
        w, s = quantise_fp8(linear.weight.detach(), granularity)
        m.weight.data, m.scale_weight = w, s
        if linear.bias is not None:
            m.bias.data = linear.bias.detach().clone()
        return m

    def dequantised_weight(self, dtype: torch.dtype) -> torch.Tensor:
        # e4m3 values are exact in bf16/fp16/fp32; only the product with the scale rounds.
        return self.weight.to(dtype) * self.scale_weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in (None, "auto"):
            mode = fp8_compute_mode(x.device)
        else:
            mode = self.mode
            if mode == "scaled_mm":  # forced: the device must be able to (a cached look-up after the first call)
                check_forced_scaled_mm(x.device, self.cpu_kernel)
        if mode == "scaled_mm" and self.weight.dtype == E4M3:
            return scaled_mm_linear(x, self.weight, self.scale_weight, self.bias, self.input_scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantised_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{str(self.weight.dtype).removeprefix('torch.')}, per-{self.granularity} scale"
                + (", static input scale" if self.input_scale is not None else ""))


def set_fp8_compute(model: nn.Module, mode: str | None, *, cpu_kernel: bool = False) -> int:
    """Force every ``FP8Linear`` of ``model`` to ``mode`` ("auto"/None, "scaled_mm", "upcast"); returns how many.

    A forced "scaled_mm" is checked against the device each layer computes on at its first forward there
    (``check_forced_scaled_mm``: a ``ValueError`` for a device without FP8 matrix multiply), and right away for
    the devices the FP8 weights already sit on (not meta, not CPU: a CPU-resident model may compute elsewhere
    under block swap). ``cpu_kernel`` accepts torch's CPU kernel too (error measurements, not speed)."""
    if mode not in (None,) + COMPUTE_MODES:
        raise ValueError(f"FP8 compute mode must be one of {COMPUTE_MODES}, got {mode!r}")
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    if mode == "scaled_mm":
        for device in {m.weight.device for m in layers} - {torch.device("meta"), torch.device("cpu")}:
            check_forced_scaled_mm(device, cpu_kernel)
    for m in layers:
        m.mode = None if mode == "auto" else mode
        m.cpu_kernel = cpu_kernel
    return len(layers)
