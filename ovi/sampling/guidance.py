"""Classifier-free guidance with separate video and audio scales, and when the negative pass can go."""

from __future__ import annotations

import torch


def needs_negative_pass(video_guidance: float, audio_guidance: float) -> bool:
    """False when both scales are 1: guidance is then the positive pass itself, so the negative pass (and the
    SLG it carries) would change nothing but the float32 rounding of ``neg + 1 * (pos - neg)``."""
    return not (float(video_guidance) == 1.0 and float(audio_guidance) == 1.0)


def guided(pos: torch.Tensor, neg: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``neg + scale * (pos - neg)``; ``pos`` itself when there is no negative pass."""
    if neg is None:
        return pos
    return neg + scale * (pos - neg)
