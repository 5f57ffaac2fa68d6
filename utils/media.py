"""ComfyUI's AUDIO, IMAGE and VIDEO as the user's media the engine holds as known regions (``ovi.media``).

AUDIO ``{"waveform": [B, C, N], "sample_rate"}`` -> a 16 kHz mono waveform [N'] (the first batch item, channels
mixed down by their mean, band-limited resampling). IMAGE [B, H, W, 3] float frames and their frame rate -> the
frames at 24 fps (the source frame on screen at each new frame's time). VIDEO (``comfy_api``'s VideoInput: what
core Load Video / Create Video make) -> its frames at 24 fps and its own frame rate, or its soundtrack. Nothing
here imports ComfyUI or torch at module level; a VIDEO is used only through its ``get_components()``.
"""

from __future__ import annotations


def audio_to_track(audio: dict):
    """AUDIO -> float32 [N] at 16 kHz mono, as ``ovi.media.load_audio`` reads a file."""
    from ..ovi.log import log
    from ..ovi.media import resample_audio

    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise TypeError("AUDIO must be a dict with 'waveform' [B, C, N] and 'sample_rate'")
    w = audio["waveform"]
    if not hasattr(w, "dim"):
        raise TypeError(f"AUDIO waveform must be a tensor, got {type(w).__name__}")
    if w.dim() == 1:
        w = w[None, None]
    elif w.dim() == 2:
        w = w[None]
    if w.dim() != 3 or w.shape[0] == 0 or w.shape[1] == 0 or w.shape[-1] == 0:
        raise ValueError(f"AUDIO waveform must be [B, C, N] with B, C, N > 0, got {list(w.shape)}")
    if w.shape[0] > 1:
        log.info("AUDIO batch of %d: using the first", w.shape[0])
    rate = audio["sample_rate"]
    track = resample_audio(w[0].float(), int(rate))
    log.info("AUDIO: %.2f s of %d-channel audio at %s Hz -> %d samples at 16 kHz mono", w.shape[-1] / int(rate),
             w.shape[1], rate, track.numel())
    return track


def image_to_frames(images, fps: float):
    """IMAGE [B, H, W, 3] float in 0..1 at ``fps`` -> frames [T, H, W, 3] at 24 fps (the same tensor at 24 fps)."""
    from ..ovi.media import resample_frames

    if not hasattr(images, "dim") or images.dim() != 4 or images.shape[-1] not in (3, 4):
        shape = list(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"IMAGE must be [B, H, W, 3], got {shape}")
    if images.shape[-1] == 4:
        images = images[..., :3]
    return resample_frames(images, float(fps))


def _components(video):
    get = getattr(video, "get_components", None)
    if get is None:
        raise TypeError(f"VIDEO must be ComfyUI's VideoInput (with get_components()), got {type(video).__name__}")
    return get()


def video_to_frames(video):
    """VIDEO -> (frames [T, H, W, 3] float at 24 fps, the video's frame rate)."""
    parts = _components(video)
    fps = float(parts.frame_rate)
    return image_to_frames(parts.images, fps), fps


def video_to_track(video):
    """VIDEO -> its soundtrack as float32 [N] at 16 kHz mono, or None when it has none."""
    parts = _components(video)
    return None if parts.audio is None else audio_to_track(parts.audio)
