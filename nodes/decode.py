"""The decoder node: an Ovi LATENT -> IMAGE frames, AUDIO, fps (and a VIDEO where this ComfyUI has the type)."""

from __future__ import annotations

from ..utils.convert import video_type_available
from .latents import from_latent_windows

VAE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_HAS_VIDEO = video_type_available()


class OviDecode:
    DESCRIPTION = ("Decodes an Ovi latent: the frames as an IMAGE batch, the 16 kHz soundtrack as AUDIO and the "
                   "frame rate, ready for CreateVideo -> SaveVideo or OviSaveVideo"
                   + (", plus the clip as a VIDEO." if _HAS_VIDEO else ".") + " A long clip's latent (Ovi Extend, "
                   "or the sampler on long audio or video) is decoded window by window and stitched into one "
                   "IMAGE batch, which must fit in RAM (the memory it takes is logged first); for long clips "
                   "connect the latent to Ovi Save Video instead, which writes window by window.")
    CATEGORY = "Ovi"
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT") + (("VIDEO",) if _HAS_VIDEO else ())
    RETURN_NAMES = ("images", "audio", "fps") + (("video",) if _HAS_VIDEO else ())
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "engine": ("OVI_ENGINE",),
            "latent": ("LATENT",),
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 512, "step": 8, "tooltip":
                                  "Spatial tiles for the video decode, in latent pixels (16 image pixels each); "
                                  "0 decodes whole frames. Smaller tiles use less memory."}),
            "tile_overlap": ("INT", {"default": 8, "min": 0, "max": 256, "step": 1,
                                     "tooltip": "Overlap between tiles in latent pixels; below tile_size."}),
            "vae_precision": (list(VAE_PRECISIONS), {"default": "auto",
                                                     "tooltip": "VAE dtype; auto is fp32 (the reference)."}),
        }}

    def decode(self, engine, latent, tile_size, tile_overlap, vae_precision):
        from ..utils.convert import frames_to_image, make_video, waveform_to_audio
        from ..utils.model_management import prepare
        from ..utils.progress import interruptible, progress_bar, should_stop

        windows = from_latent_windows(latent)
        result = windows.results[0]
        if tile_size and tile_overlap >= tile_size:
            raise ValueError(f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size}), or set "
                             "tile_size to 0 for whole frames.")
        with interruptible():
            prepare(engine)
            if windows.count > 1 or windows.frames is not None or windows.track is not None:
                # a long clip, or one cut to the user's media: stitched as Ovi Save Video writes it
                clip = _decode_windows(engine.engine, windows, int(tile_size), should_stop,
                                       tile_overlap=int(tile_overlap),
                                       vae_dtype=None if vae_precision == "auto" else vae_precision)
            else:
                clip = engine.engine.decode(result, tile_size=int(tile_size), tile_overlap=int(tile_overlap),
                                            vae_dtype=None if vae_precision == "auto" else vae_precision,
                                            progress=progress_bar(result.video_latent.shape[1]),
                                            should_stop=should_stop)
        images = frames_to_image(clip.frames)
        audio = waveform_to_audio(clip.waveform, clip.sample_rate)
        fps = float(clip.fps)
        if _HAS_VIDEO:
            return images, audio, fps, make_video(images, audio, fps)
        return images, audio, fps


def _decode_windows(engine, windows, tile_size: int, should_stop, **decode_kw):
    """A long clip's windows stitched in memory (``latent_windows.decode_clip``), after checking the RAM it takes."""
    from ..ovi.log import log
    from ..ovi.long_clip.latent_windows import clip_bytes, decode_clip
    from ..ovi.memory import available_ram
    from ..utils.progress import progress_bar

    need, free = clip_bytes(windows), available_ram()
    frames, samples = windows.length
    first = windows.results[0]
    what = (f"{windows.count} window{'s' if windows.count > 1 else ''} ({frames} frames at {first.width}x"
            f"{first.height}, {samples / 16000:.2f} s)")
    log.info("decoding %s into one IMAGE batch: %.2f GB (%.2f GB of RAM free)", what, need / 1e9, free / 1e9)
    if free and need > free:
        raise MemoryError(f"decoding {what} into one IMAGE batch takes {need / 1e9:.2f} GB, but only "
                          f"{free / 1e9:.2f} GB of RAM is free. Connect the latent (and the engine) to Ovi Save "
                          "Video instead: it decodes and writes one window at a time.")
    latent_frames = first.video_latent.shape[1]
    bar = progress_bar(windows.count * latent_frames)
    return decode_clip(engine, windows, tile_size=tile_size, should_stop=should_stop,
                       progress=lambda w, n, done, total: bar((w - 1) * total + done, n * total), **decode_kw)
