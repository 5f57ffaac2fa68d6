"""Ovi's LATENT and the nodes that save it to and load it from one .safetensors file.

The LATENT is a plain ComfyUI latent dict, so core latent plumbing (reroutes, caches, previews of "samples")
passes it through: ``samples`` is the video latent [N, 48, F, h, w]; ``ovi_audio`` the audio latent [N, L, 20];
``ovi`` a dict of metadata (variant, seed, frame size, mode, prompt and settings) the decoder needs. N is 1 for
one window; a long clip (the sampler on a long track or video, Ovi Extend) has one batch entry per window and
its metadata lists them (``windows``: each window's seed, mode, prompt and settings, its place on the clip in
``settings["window"]``), with ``clip`` (the length as written) and ``ovi_track`` (a lip-sync clip's own
16 kHz track [1, samples]) when made from the user's media.
The file format, its checks and the atomic save live in ``ovi.latent_file``: a latent, from a file or from
another node, is checked whole before anything runs, and a save is complete or absent.
"""

from __future__ import annotations

import os

AUDIO_KEY = "ovi_audio"  # = ovi.latent_file.AUDIO_KEY (not imported here: importing the nodes imports no torch)
TRACK_KEY = "ovi_track"  # = ovi.latent_file.TRACK_KEY
META_KEY = "ovi"
LATENT_DIR = "latents"  # under the output folder; OviLoadLatent also lists files saved there
NOT_OVI = ("this LATENT is not an Ovi latent (it has no audio latent): connect the output of OviSampler, "
           "OviExtend or OviLoadLatent.")


def _window_fields(result) -> dict:
    return {"seed": int(result.seed), "mode": result.mode, "prompt": result.prompt,
            "settings": dict(result.settings)}


def to_latent(result) -> dict:
    """An engine GenerationResult (one window) or a long clip's ``ClipWindows`` -> LATENT. One window alone
    gives the one-window form, exactly as before long clips."""
    import torch

    results = getattr(result, "results", None)
    if results is None:
        meta = {"variant": result.variant, "height": int(result.height), "width": int(result.width),
                **_window_fields(result)}
        meta = {k: meta[k] for k in ("variant", "seed", "height", "width", "mode", "prompt", "settings")}
        return {"samples": result.video_latent[None].float(), AUDIO_KEY: result.audio_latent[None].float(),
                META_KEY: meta}
    clip, first = result, results[0]
    latent = to_latent(first) if len(results) == 1 else {
        "samples": torch.stack([r.video_latent.float() for r in results]),
        AUDIO_KEY: torch.stack([r.audio_latent.float() for r in results]),
        META_KEY: {**to_latent(first)[META_KEY], "windows": [_window_fields(r) for r in results]}}
    if clip.frames is not None or clip.track is not None:
        frames, samples = clip.length
        latent[META_KEY]["clip"] = {"frames": int(frames), "samples": int(samples)}
    if clip.track is not None:
        latent[TRACK_KEY] = clip.track.float().reshape(1, -1)
    return latent


def _parts(latent):
    if not isinstance(latent, dict) or AUDIO_KEY not in latent or META_KEY not in latent:
        raise ValueError(NOT_OVI)
    return latent.get("samples"), latent[AUDIO_KEY], latent[META_KEY], latent.get(TRACK_KEY)


def from_latent_windows(latent):
    """LATENT -> ``ovi.long_clip.latent_windows.ClipWindows`` (one window or many), checked whole: a clear
    error for any other latent, or for an Ovi latent whose shapes, metadata or values a decode would trip
    over (``LatentError``)."""
    from ..ovi.engine import GenerationResult
    from ..ovi.latent_file import VAE_SPATIAL_STRIDE, check_latent
    from ..ovi.long_clip.latent_windows import ClipWindows

    video, audio, meta, track = _parts(latent)
    check_latent(video, audio, meta, track=track)
    height = int(meta.get("height", video.shape[-2] * VAE_SPATIAL_STRIDE))
    width = int(meta.get("width", video.shape[-1] * VAE_SPATIAL_STRIDE))
    results = [GenerationResult(video_latent=video[k].float(), audio_latent=audio[k].float(), height=height,
                                width=width, variant=meta["variant"], seed=int(entry.get("seed", 0)),
                                mode=entry.get("mode", "t2av"), prompt=entry.get("prompt", ""),
                                settings=dict(entry.get("settings", {})))
               for k, entry in enumerate(meta.get("windows") or [meta])]
    clip = meta.get("clip") or {}
    return ClipWindows(results, frames=clip.get("frames"), samples=clip.get("samples"),
                       track=None if track is None else track[0].float())


def from_latent(latent) -> object:
    """LATENT of one window -> an engine GenerationResult for ``OviEngine.decode``; a clear error for any other
    latent, for a long clip's (``from_latent_windows``), or for an Ovi latent whose shapes, metadata or values
    a decode would trip over (``LatentError``)."""
    clip = from_latent_windows(latent)
    if clip.count > 1:
        raise ValueError(f"this LATENT holds the {clip.count} windows of a long clip; this takes one window.")
    return clip.results[0]


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
    DESCRIPTION = ("Saves an Ovi latent (video + audio latents and their metadata; every window of a long clip) "
                   "as one .safetensors file.")
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

        clip = from_latent_windows(latent)  # validates before anything is written
        result = clip.results[0]
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
        write_latent_file(path, latent["samples"], latent[AUDIO_KEY], latent[META_KEY], track=latent.get(TRACK_KEY))
        log.info("saved the %s latent (seed %d%s) to %s", result.variant, result.seed,
                 f", {clip.count} windows" if clip.count > 1 else "", path)
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
        from ..ovi.latent_file import read_latent

        # the whole file is checked here, as untrusted input, so a bad file fails now and not after a decode
        parts = read_latent(self._path(latent))
        out = {"samples": parts.video, AUDIO_KEY: parts.audio, META_KEY: parts.meta}
        if parts.track is not None:
            out[TRACK_KEY] = parts.track
        return (out,)
