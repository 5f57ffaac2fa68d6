"""OviExtend: an Ovi LATENT (one window or a long clip's) + a prompt -> the same LATENT with one more window."""

from __future__ import annotations

from ..ovi.choices import KNOWN_MODES, SOLVERS
from .latents import from_latent_windows, to_latent
from .sampler import SEED_MAX

PREVIOUS = "previous"  # the combo value meaning "the previous window's setting"


class OviExtend:
    DESCRIPTION = ("Appends one window to an Ovi latent (from Ovi Sampler, Ovi Load Latent or another Ovi Extend), "
                   "so a clip goes on with a new prompt: chain Extend -> Extend -> Ovi Save Video for a storyboard. "
                   "The new window starts 'overlap' seconds before the previous one ends: it decodes the last "
                   "window (one window's video decode) and re-encodes its last frames as the new window's first "
                   "frames, and takes the previous window's audio over those seconds, so picture and sound carry "
                   "on. Frame size and the settings left at 'previous' are the previous window's.")
    CATEGORY = "Ovi"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "extend"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "engine": ("OVI_ENGINE",),
                "latent": ("LATENT", {"tooltip": "The clip so far: an Ovi latent of one window or more."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The new window: scene, speech in <S>...<E>, sound after "
                                                 "'Audio:'."}),
                "seed": ("INT", {"default": -1, "min": -1, "max": SEED_MAX, "tooltip":
                                 "-1: the clip's next seed (its first window's seed + window index x 1000003), "
                                 "so a rerun makes the same clip."}),
                "overlap": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.1, "tooltip":
                                      "Seconds shared with the previous window, picture and sound (1 s = 25 "
                                      "frames; 0: the last frame only)."}),
            },
            "optional": {
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "0: the previous window's."}),
                "solver": ([PREVIOUS, *SOLVERS], {"default": PREVIOUS}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "0: the previous window's."}),
                "video_guidance": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1,
                                             "tooltip": "-1: the previous window's."}),
                "audio_guidance": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 30.0, "step": 0.1,
                                             "tooltip": "-1: the previous window's."}),
                "video_mode": (list(KNOWN_MODES), {"default": "clean", "tooltip":
                               "How the shared frames are held: clean (written back every step at t = 0, as "
                               "the model was trained to hold a first frame) or renoise (noised to each "
                               "step's level)."}),
                "audio_mode": (list(KNOWN_MODES), {"default": "renoise", "tooltip":
                               "How the shared sound is held: renoise (the default: the audio branch was "
                               "never trained with per-token timesteps) or clean."}),
            },
        }

    def extend(self, engine, latent, prompt, seed, overlap, steps=0, solver=PREVIOUS, shift=0.0,
               video_guidance=-1.0, audio_guidance=-1.0, video_mode="clean", audio_mode="renoise"):
        from ..ovi.long_clip.latent_windows import extend_clip
        from ..utils.model_management import prepare
        from ..utils.progress import interruptible, latent_preview, progress_bar, should_stop

        clip = from_latent_windows(latent)  # any other LATENT is refused here, before anything runs
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty: describe the next window, with speech in <S>...<E> and the sound "
                             "after 'Audio:'.")
        given = {"seed": int(seed) if seed >= 0 else None, "steps": int(steps) or None,
                 "solver": None if solver == PREVIOUS else solver, "shift": float(shift) if shift > 0 else None,
                 "video_guidance": float(video_guidance) if video_guidance >= 0 else None,
                 "audio_guidance": float(audio_guidance) if audio_guidance >= 0 else None}
        kw = {k: x for k, x in given.items() if x is not None}
        n_steps = int(kw.get("steps", clip.results[-1].settings.get("steps", 50)))
        with interruptible():
            prepare(engine)
            preview = latent_preview(n_steps)
            longer = extend_clip(engine.engine, clip, prompt, overlap=float(overlap), video_mode=video_mode,
                                 audio_mode=audio_mode, should_stop=should_stop, preview=preview,
                                 progress=None if preview is not None else progress_bar(n_steps), **kw)
        return (to_latent(longer),)
