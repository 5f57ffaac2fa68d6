"""Ovi's LATENT and the nodes that save it to and load it from one .safetensors file.

The LATENT is a plain ComfyUI latent dict, so core latent plumbing (reroutes, caches, previews of "samples")
passes it through: ``samples`` is the video latent [1, 48, F, h, w]; ``ovi_audio`` the audio latent [1, L, 20];
``ovi`` a dict of metadata (variant, seed, frame size, mode, prompt and settings) the decoder needs.
The file format, its checks and the atomic save live in ``ovi.latent_file``: a latent, from a file or from
another node, is checked whole before anything runs, and a save is complete or absent.
"""

from __future__ import annotations

import os

AUDIO_KEY = "ovi_audio"  # = ovi.latent_file.AUDIO_KEY (not imported here: importing the nodes imports no torch)
META_KEY = "ovi"
LATENT_DIR = "latents"  # under the output folder; OviLoadLatent also lists files saved there


def to_latent(result) -> dict:
    """An engine GenerationResult -> LATENT."""
    meta = {"variant": result.variant, "seed": int(result.seed), "height": int(result.height),
            "width": int(result.width), "mode": result.mode, "prompt": result.prompt,
            "settings": dict(result.settings)}
    return {"samples": result.video_latent[None].float(), AUDIO_KEY: result.audio_latent[None].float(),
            META_KEY: meta}


def from_latent(latent) -> object:
    """LATENT -> an engine GenerationResult for ``OviEngine.decode``; a clear error for any other latent,
    or for an Ovi latent whose shapes, metadata or values a decode would trip over (``LatentError``)."""
    from ..ovi.engine import GenerationResult
    from ..ovi.latent_file import VAE_SPATIAL_STRIDE, check_latent

    if not isinstance(latent, dict) or AUDIO_KEY not in latent or META_KEY not in latent:
        raise ValueError("this LATENT is not an Ovi latent (it has no audio latent): connect the output of "
                         "OviSampler or OviLoadLatent.")
    video, audio, meta = latent.get("samples"), latent[AUDIO_KEY], latent[META_KEY]
    check_latent(video, audio, meta)
    return GenerationResult(video_latent=video[0].float(), audio_latent=audio[0].float(),
                            height=int(meta.get("height", video.shape[-2] * VAE_SPATIAL_STRIDE)),
                            width=int(meta.get("width", video.shape[-1] * VAE_SPATIAL_STRIDE)),
                            variant=meta["variant"],
                            seed=int(meta.get("seed", 0)), mode=meta.get("mode", "t2av"),
                            prompt=meta.get("prompt", ""), settings=dict(meta.get("settings", {})))


def _latent_files() -> list[str]:
    import folder_paths

    found = []
    for base, suffix in ((folder_paths.get_input_directory(), ""),
                         (os.path.join(folder_paths.get_output_directory(), LATENT_DIR), " [output]")):
        prefix = "" if not suffix else LATENT_DIR + "/"
        for root, _, files in os.walk(base, followlinks=True):
            for f in files:
                if f.lower().endswith(".safetensors"):
                    rel = os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/")
                    found.append(f"{prefix}{rel}{suffix}")
    return sorted(found)


class OviSaveLatent:
    DESCRIPTION = "Saves an Ovi latent (video + audio latents and their metadata) as one .safetensors file."
    CATEGORY = "Ovi"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent": ("LATENT",),
            "filename_prefix": ("STRING", {"default": f"{LATENT_DIR}/Ovi",
                                           "tooltip": "Under the output folder; OviLoadLatent lists files saved "
                                                      f"in output/{LATENT_DIR}."}),
        }}

    def save(self, latent, filename_prefix):
        import folder_paths

        from ..ovi.atomic_write import named_error
        from ..ovi.latent_file import write_latent_file
        from ..ovi.log import log

        result = from_latent(latent)  # validates before anything is written
        out = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out)
        file = f"{name}_{counter:05}_.safetensors"
        path = os.path.join(folder, file)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise named_error(e, path) from e
        # a temporary file beside it, fsynced and renamed: a full disk or an interrupt leaves neither a
        # truncated latent nor the temporary file, and the error names the file
        write_latent_file(path, latent["samples"], latent[AUDIO_KEY], latent[META_KEY])
        log.info("saved the %s latent (seed %d) to %s", result.variant, result.seed, path)
        return {"ui": {"latents": [{"filename": file, "subfolder": subfolder, "type": "output"}]}}


class OviLoadLatent:
    DESCRIPTION = (f"Loads a latent saved by OviSaveLatent, from the input folder or output/{LATENT_DIR}, so it "
                   "can be decoded again without sampling.")
    CATEGORY = "Ovi"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": (_latent_files(), {"tooltip": "A .safetensors file from OviSaveLatent."})}}

    @classmethod
    def _path(cls, name: str) -> str:
        import folder_paths

        return folder_paths.get_annotated_filepath(name)

    @classmethod
    def IS_CHANGED(cls, latent):
        # ValueError: newer cores refuse a name whose real path leaves its folder (a traversal, or a symlink
        # pointing outside input/ or output/latents)
        try:
            st = os.stat(cls._path(latent))
        except (OSError, ValueError):
            return float("nan")  # never equal: re-run and let load() report the missing file
        return f"{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def VALIDATE_INPUTS(cls, latent):
        try:
            path = cls._path(latent)
        except ValueError as e:
            return f"latent file not usable: {latent}: {e}"
        if not os.path.isfile(path):
            return f"latent file not found: {latent}"
        return True

    def load(self, latent):
        from ..ovi.latent_file import read_latent_file

        # the whole file is checked here, as untrusted input, so a bad file fails now and not after a decode
        video, audio, meta = read_latent_file(self._path(latent))
        return ({"samples": video, AUDIO_KEY: audio, META_KEY: meta},)
