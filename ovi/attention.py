"""Unmasked multi-head attention over [B, L, H, D] tensors, the one primitive every transformer here uses.

Callers pass contiguous q/k/v; the softmax scale is 1/sqrt(D). Other backends (flash-attn, sage) will
sit behind the same function, chosen through ``BACKEND``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKEND = "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√D)·v for q [B, Lq, H, D], k/v [B, Lk, H, D]; returns [B, Lq, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
