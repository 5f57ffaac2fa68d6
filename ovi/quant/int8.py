"""Int8 weights for the fusion backbones: ``Int8Linear`` and the per-output-channel quantise/dequantise helpers.

A weight is stored as int8 ``[out, in]`` with one float32 scale per output row (``[out, 1]``); the effective
weight is ``data * scale``. ``Int8Linear`` keeps both as buffers on whatever device the model is on and
dequantises them in the input's dtype for each forward, so the layer occupies about a quarter of its float32
size (half of bf16) between calls. Being ordinary buffers, ``.to(device)`` and block swap move them like any
other tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127  # symmetric absmax quantisation maps the largest |w| of a row onto 127 (-128 is never produced)
SCALE = "scale"  # the Int8Linear buffer holding the [out, 1] float32 scales
# a row of zeros still gets a finite, positive scale
_MIN_SCALE = 1e-12


def quantise_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [out, in] -> (int8 data [out, in], scale [out, 1] in ``scale_dtype``) with ``data * scale ≈ w``:
    per-row absmax / 127, the scale rounded to ``scale_dtype`` before dividing by it (so the stored scale is the
    one the data was made with)."""
    if w.ndim != 2:
        raise ValueError(f"int8 quantisation takes a 2-D weight, got shape {list(w.shape)}")
    x = w.to(torch.float32)
    scale = (x.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=_MIN_SCALE).to(scale_dtype)
    data = torch.round(x / scale.to(torch.float32)).clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
    return data, scale


def dequantise_int8(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``data * scale`` computed in ``dtype`` (scale: [out, 1], [out] or a scalar)."""
    if scale.numel() > 1:
        scale = scale.reshape(-1, 1)
    return data.to(dtype) * scale.to(dtype)


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight (buffer ``weight``, ``[out, in]``) and float32 per-row scales (buffer
    ``scale``, ``[out, 1]``), dequantised per forward on the weight's device in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer(SCALE, torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def dequantised_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantise_int8(self.weight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantised_weight(x.dtype), b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
