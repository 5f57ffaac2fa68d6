"""ComfyUI's native types from and to what the engine uses.

IMAGE: float32 [B, H, W, 3] in 0..1 (a clip's frames are one batch). AUDIO: ``{"waveform": [B, C, T],
"sample_rate": int}``. VIDEO: ``comfy_api``'s ``VideoFromComponents`` on ComfyUI releases that have it.
"""

from __future__ import annotations

import importlib.util
from fractions import Fraction


def video_type_available() -> bool:
    """Whether this ComfyUI has the VIDEO type (``comfy_api.input_impl.VideoFromComponents``); checked without
    importing it."""
    try:
        return importlib.util.find_spec("comfy_api.input_impl") is not None
    except (ImportError, ValueError):
        return False


def frames_to_image(frames):
    """Decoded frames [T, H, W, 3] in 0..1 -> IMAGE (a float32 batch of T frames on the CPU)."""
    import torch

    return frames.detach().to("cpu", torch.float32).contiguous()


def waveform_to_audio(waveform, sample_rate: int) -> dict:
    """A mono waveform [N] -> AUDIO with one batch and one channel."""
    import torch

    return {"waveform": waveform.detach().to("cpu", torch.float32).reshape(1, 1, -1).contiguous(),
            "sample_rate": int(sample_rate)}


def audio_to_mono(audio: dict):
    """AUDIO -> (mono waveform [N] float32, sample rate); the first batch item, channels averaged."""
    import torch

    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise TypeError("AUDIO must be a dict with 'waveform' [B, C, T] and 'sample_rate'")
    w = audio["waveform"]
    if w.dim() == 1:
        w = w[None, None]
    elif w.dim() == 2:
        w = w[None]
    if w.dim() != 3 or w.shape[-1] == 0:
        raise ValueError(f"AUDIO waveform must be [B, C, T] with T > 0, got {list(w.shape)}")
    return w[0].to("cpu", torch.float32).mean(0), int(audio["sample_rate"])


def image_to_uint8(images):
    """IMAGE -> uint8 [T, H, W, 3], mapped as the engine's mp4 writer maps decoded frames (x * 255, truncated)."""
    import torch

    if images.dim() != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"IMAGE must be [B, H, W, 3], got {list(images.shape)}")
    return (images[..., :3].to("cpu", torch.float32).clamp(0, 1) * 255.0).to(torch.uint8)


def make_video(images, audio: dict | None, fps: float):
    """IMAGE + AUDIO + fps -> ComfyUI VIDEO (what core ``CreateVideo`` makes), or None without that type."""
    if not video_type_available():
        return None
    from comfy_api.input_impl import VideoFromComponents
    from comfy_api.util import VideoComponents

    return VideoFromComponents(VideoComponents(images=images, audio=audio,
                                               frame_rate=Fraction(fps).limit_denominator(1001)))
