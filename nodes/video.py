"""OviSaveVideo: IMAGE frames + AUDIO -> one H.264/AAC mp4 in the output folder, written by the engine's writer."""

from __future__ import annotations

import os


class OviSaveVideo:
    DESCRIPTION = ("Writes the frames and soundtrack as an H.264 + AAC mp4 (one ffmpeg pass, audio at its own "
                   "rate) into the output folder and previews it, like the core SaveVideo.")
    CATEGORY = "Ovi"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "fps": ("FLOAT", {"default": 24.0, "min": 1.0, "max": 120.0, "step": 1.0}),
                "filename_prefix": ("STRING", {"default": "video/Ovi", "tooltip": "Under the output folder."}),
                "crf": ("INT", {"default": 18, "min": 0, "max": 51,
                                "tooltip": "H.264 quality: lower is better and larger; 18 is visually lossless."}),
            },
            "optional": {"audio": ("AUDIO",)},
        }

    def save(self, images, fps, filename_prefix, crf, audio=None):
        import folder_paths

        from ..ovi.video_io import write_mp4
        from ..utils.convert import audio_to_mono, image_to_uint8
        from ..utils.progress import progress_bar

        frames = image_to_uint8(images)
        waveform, sample_rate = audio_to_mono(audio) if audio is not None else (None, 16000)
        out = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, out, frames.shape[2], frames.shape[1])
        os.makedirs(folder, exist_ok=True)
        file = f"{name}_{counter:05}_.mp4"
        # The progress callback raises ComfyUI's interrupt after the frame where it was pressed (it polls the
        # flag itself: newer cores throttle the progress hook); write_mp4 then removes the unfinished file.
        write_mp4(os.path.join(folder, file), frames, waveform, fps=float(fps), sample_rate=sample_rate,
                  crf=int(crf), progress=progress_bar(frames.shape[0]))
        return {"ui": {"images": [{"filename": file, "subfolder": subfolder, "type": "output"}],
                       "animated": (True,)}}
