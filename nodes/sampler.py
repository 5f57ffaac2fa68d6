"""The sampler node: prompt (+ optional first frame, or the user's audio or video) -> video and audio latents as
one LATENT (one window, or every window of a clip as long as the user's media)."""

from __future__ import annotations

from ..ovi.choices import AUDIO_NEGATIVE_PROMPT as AUDIO_NEGATIVE
from ..ovi.choices import SOLVERS
from ..ovi.choices import VIDEO_NEGATIVE_PROMPT as VIDEO_NEGATIVE
from .latents import to_latent

EXAMPLE_PROMPT = ("A woman in a yellow raincoat stands on a pier at dusk, waves rolling in behind her. She smiles "
                  "and says <S>The storm is finally over.<E> Audio: waves breaking, distant gulls, a calm female "
                  "voice.")
SEED_MAX = 2 ** 63 - 1  # the engine's seeded generators take signed 64-bit seeds


def frame_size(width: int, height: int) -> tuple[int, int] | None:
    """(H, W) used exactly, or None (both 0) for the variant's default; anything else is a clear error."""
    if width == 0 and height == 0:
        return None
    if width == 0 or height == 0:
        raise ValueError(f"width {width} x height {height}: give both, or set both to 0 for the variant's "
                         "default size.")
    if width % 32 or height % 32:
        w, h = max(32, round(width / 32) * 32), max(32, round(height / 32) * 32)
        raise ValueError(f"width {width} x height {height}: both must be multiples of 32 (the VAE downsamples by "
                         f"16 and the model patches 2x2). The size is used exactly, never snapped: try {w} x {h}.")
    return height, width


class OviSampler:
    DESCRIPTION = ("Generates video and audio latents together: text to audio+video, or image to audio+video when "
                   "an IMAGE is connected (it becomes the first frame). Speech goes in <S>...<E>, sounds after "
                   "'Audio:'. With audio connected the picture is made for that sound (lip-sync; the image, if any, "
                   "gives the first frame); with video or video_frames the sound is made for that picture "
                   "(soundtrack). Media longer than one window gives a long clip of windows sharing 'overlap' "
                   "seconds: connect it to Ovi Save Video's latent input.")
    CATEGORY = "Ovi"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "engine": ("OVI_ENGINE",),
                "prompt": ("STRING", {"multiline": True, "default": EXAMPLE_PROMPT,
                                      "tooltip": "Scene, speech in <S>...<E>, and the sound after 'Audio:'."}),
                "video_negative_prompt": ("STRING", {"multiline": True, "default": VIDEO_NEGATIVE}),
                "audio_negative_prompt": ("STRING", {"multiline": True, "default": AUDIO_NEGATIVE}),
                "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 32, "tooltip":
                                  "Frame width, a multiple of 32, used exactly. 0 (with height 0): the variant's "
                                  "default (704x704 or 960x960), or the image's shape at the variant's area."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 32,
                                   "tooltip": "Frame height, a multiple of 32, used exactly (see width)."}),
                "seed": ("INT", {"default": 100, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
                "solver": (list(SOLVERS), {"default": "unipc"}),
                "shift": ("FLOAT", {"default": 5.0, "min": 0.01, "max": 100.0, "step": 0.1,
                                    "tooltip": "Flow-matching timestep shift."}),
                "video_guidance": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 30.0, "step": 0.1}),
                "audio_guidance": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 30.0, "step": 0.1}),
                "slg_layer": ("INT", {"default": 11, "min": -1, "max": 100, "tooltip":
                                      "Fused layer skipped in the negative pass (skip-layer guidance); "
                                      "0 or -1: none."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "First frame for image-to-video (the first image of a batch)."}),
                "cache_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.01, "tooltip":
                                              "Step cache: steps whose estimated output change stays below this "
                                              "reuse the last full step instead of running the model; higher "
                                              "skips more steps and changes the result more (the log says how "
                                              "many were reused). 0: off, every step runs."}),
                "audio": ("AUDIO", {"tooltip": "Lip-sync: the clip's sound (resampled to 16 kHz mono), held as known "
                                               "audio; the clip lasts as long as it, in windows when longer than one. "
                                               "Its own samples are the clip's soundtrack."}),
                "video": ("VIDEO", {"tooltip": "Soundtrack: the clip's frames (at 24 fps, resized to width x height "
                                               "or the variant's area, multiples of 32), held as known video; the "
                                               "model makes the sound. In windows when longer than one."}),
                "video_frames": ("IMAGE", {"tooltip": "Soundtrack from an IMAGE batch instead of a VIDEO: the "
                                                      "frames, at video_fps."}),
                "video_fps": ("FLOAT", {"default": 24.0, "min": 1.0, "max": 240.0, "step": 0.01,
                                        "tooltip": "Frame rate of video_frames (converted to 24 fps)."}),
                "overlap": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.1, "tooltip":
                                      "Seconds each window of a long clip shares with the one before, picture "
                                      "and sound (1 s = 25 frames; 0: the last frame only). Used when the "
                                      "audio or video is longer than one window."}),
            },
        }

    def sample(self, engine, prompt, video_negative_prompt, audio_negative_prompt, width, height, seed, steps, solver,
               shift, video_guidance, audio_guidance, slg_layer, image=None, audio=None, video=None,
               video_frames=None, video_fps=24.0, overlap=1.0, cache_threshold=0.0):
        from ..utils.model_management import prepare
        from ..utils.progress import interruptible, latent_preview, progress_bar, should_stop
        from ..utils.user_media import sample_windows, user_media

        size = frame_size(int(width), int(height))
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty: describe the video, with speech in <S>...<E> and the sound after "
                             "'Audio:'.")
        chosen = user_media(engine.engine.variant, audio=audio, video=video, video_frames=video_frames,
                            video_fps=video_fps, image=image, size=size, overlap=overlap, seed=int(seed))
        if chosen is not None:
            with interruptible():
                prepare(engine)
                clip = sample_windows(
                    engine.engine, prompt, chosen, image=image, size=size, steps=int(steps),
                    video_negative_prompt=video_negative_prompt, audio_negative_prompt=audio_negative_prompt,
                    solver=solver, shift=float(shift), video_guidance=float(video_guidance),
                    audio_guidance=float(audio_guidance), slg_layer=int(slg_layer),
                    cache_threshold=float(cache_threshold))
            return (to_latent(clip),)
        with interruptible():
            prepare(engine)
            preview = latent_preview(int(steps))
            result = engine.engine.generate(
                prompt, image=image, video_negative_prompt=video_negative_prompt,
                audio_negative_prompt=audio_negative_prompt, size=size, seed=int(seed), steps=int(steps),
                solver=solver, shift=float(shift), video_guidance=float(video_guidance),
                audio_guidance=float(audio_guidance), slg_layer=int(slg_layer),
                progress=None if preview is not None else progress_bar(int(steps)), preview=preview,
                should_stop=should_stop, cache_threshold=float(cache_threshold))
        return (to_latent(result),)
