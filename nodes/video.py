"""OviSaveVideo: IMAGE frames + AUDIO, or an Ovi LATENT decoded window by window, -> one H.264/AAC mp4 in the
output folder, written by the engine's writers."""

from __future__ import annotations

import os


class OviSaveVideo:
    DESCRIPTION = ("Writes the frames and soundtrack as an H.264 + AAC mp4 (one ffmpeg pass, audio at its own "
                   "rate) into the output folder and previews it, like the core SaveVideo. Connect either images "
                   "(+ audio), or an Ovi latent + the engine: a long clip's latent (Ovi Extend, or the sampler on "
                   "long audio or video) is then decoded one window at a time while it is written, so the whole "
                   "clip's frames are never in memory at once.")
    CATEGORY = "Ovi"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "fps": ("FLOAT", {"default": 24.0, "min": 1.0, "max": 120.0, "step": 1.0,
                                  "tooltip": "Frame rate of images; a latent is written at its own 24 fps."}),
                "filename_prefix": ("STRING", {"default": "video/Ovi", "tooltip": "Under the output folder."}),
                "crf": ("INT", {"default": 18, "min": 0, "max": 51,
                                "tooltip": "H.264 quality: lower is better and larger; 18 is visually lossless."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "The frames (e.g. from Ovi Decode); or connect latent + engine."}),
                "audio": ("AUDIO", {"tooltip": "The soundtrack of images."}),
                "latent": ("LATENT", {"tooltip": "An Ovi latent (one window or a long clip's), decoded window by "
                                                 "window while written; needs engine, replaces images and audio."}),
                "engine": ("OVI_ENGINE", {"tooltip": "Decodes the latent."}),
            },
        }

    def save(self, fps, filename_prefix, crf, images=None, audio=None, latent=None, engine=None):
        if latent is not None or engine is not None:
            if latent is None or engine is None or images is not None or audio is not None:
                raise ValueError("connect either images (+ audio), or latent + engine (the clip decoded while it is "
                                 f"written); got {self._given(images, audio, latent, engine)}.")
            return self._save_latent(latent, engine, filename_prefix, crf, fps)
        if images is None:
            raise ValueError("nothing to save: connect images (+ audio), or latent + engine.")
        return self._save_images(images, fps, filename_prefix, crf, audio)

    @staticmethod
    def _given(images, audio, latent, engine) -> str:
        names = [n for n, x in (("images", images), ("audio", audio), ("latent", latent), ("engine", engine))
                 if x is not None]
        return " + ".join(names)

    @staticmethod
    def _target(filename_prefix, width, height):
        import folder_paths

        out = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out, width, height)
        os.makedirs(folder, exist_ok=True)
        file = f"{name}_{counter:05}_.mp4"
        return os.path.join(folder, file), file, subfolder

    @staticmethod
    def _ui(file, subfolder) -> dict:
        return {"ui": {"images": [{"filename": file, "subfolder": subfolder, "type": "output"}], "animated": (True,)}}

    def _save_latent(self, latent, engine, filename_prefix, crf, fps):
        from ..ovi.log import log
        from ..ovi.long_clip.latent_windows import write_clip
        from ..utils.model_management import prepare
        from ..utils.progress import interruptible, progress_bar, should_stop
        from .latents import from_latent_windows

        from ..ovi.variants import get_variant

        clip = from_latent_windows(latent)
        first = clip.results[0]
        variant_fps = get_variant(first.variant).fps
        if float(fps) != variant_fps:
            log.info("fps %g ignored: a latent is written at its own %d fps", float(fps), variant_fps)
        path, file, subfolder = self._target(filename_prefix, first.width, first.height)
        latent_frames = first.video_latent.shape[1]
        bar = progress_bar(clip.count * latent_frames)
        with interruptible():
            prepare(engine)
            # An interrupt after a finished window leaves those windows as a valid, shorter mp4 (ClipWriter).
            write_clip(engine.engine, clip, path, crf=int(crf), should_stop=should_stop,
                       progress=lambda w, n, done, total: bar((w - 1) * total + done, n * total))
        return self._ui(file, subfolder)

    def _save_images(self, images, fps, filename_prefix, crf, audio):
        from ..ovi.video_io import write_mp4
        from ..utils.convert import audio_to_mono, image_to_uint8
        from ..utils.progress import progress_bar

        frames = image_to_uint8(images)
        waveform, sample_rate = audio_to_mono(audio) if audio is not None else (None, 16000)
        path, file, subfolder = self._target(filename_prefix, frames.shape[2], frames.shape[1])
        # The progress callback raises ComfyUI's interrupt after the frame where it was pressed (it polls the
        # flag itself: newer cores throttle the progress hook); write_mp4 then removes the unfinished file.
        write_mp4(path, frames, waveform, fps=float(fps), sample_rate=sample_rate, crf=int(crf),
                  progress=progress_bar(frames.shape[0]))
        return self._ui(file, subfolder)
