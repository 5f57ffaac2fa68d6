"""The decoder node: an Ovi LATENT -> IMAGE frames, AUDIO, fps (and a VIDEO where this ComfyUI has the type)."""

from __future__ import annotations

from ..utils.convert import video_type_available
from .latents import from_latent

VAE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_HAS_VIDEO = video_type_available()


class OviDecode:
    DESCRIPTION = ("Decodes an Ovi latent: the frames as an IMAGE batch, the 16 kHz soundtrack as AUDIO and the "
                   "frame rate, ready for CreateVideo -> SaveVideo or OviSaveVideo"
                   + (", plus the clip as a VIDEO." if _HAS_VIDEO else "."))
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

        result = from_latent(latent)
        if tile_size and tile_overlap >= tile_size:
            raise ValueError(f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size}), or set "
                             "tile_size to 0 for whole frames.")
        with interruptible():
            prepare(engine)
            clip = engine.engine.decode(result, tile_size=int(tile_size), tile_overlap=int(tile_overlap),
                                        vae_dtype=None if vae_precision == "auto" else vae_precision,
                                        progress=progress_bar(result.video_latent.shape[1]), should_stop=should_stop)
        images = frames_to_image(clip.frames)
        audio = waveform_to_audio(clip.waveform, clip.sample_rate)
        fps = float(clip.fps)
        if _HAS_VIDEO:
            return images, audio, fps, make_video(images, audio, fps)
        return images, audio, fps
