"""Model folders: where each Ovi file is looked for, registered with ComfyUI's ``folder_paths``.

The fusion model lives in ``diffusion_models``, umT5 in ``text_encoders``, the Wan2.2 VAE in ``vae`` (ComfyUI's
own folders, so files other workflows use are listed), and the MMAudio VAE + BigVGAN vocoder in ``mmaudio``
(the folder MMAudio packs already use). Nothing another pack registered is replaced: ``.gguf`` is added only
where missing, on a new extension set, because several folders share one set object in ``folder_paths``.
"""

from __future__ import annotations

import os

FUSION_FOLDER = "diffusion_models"
TEXT_FOLDER = "text_encoders"
VAE_FOLDER = "vae"
AUDIO_FOLDER = "mmaudio"
LORA_FOLDER = "loras"  # ComfyUI's own: Wan 2.2 5B LoRAs other workflows use are listed for Ovi too
GGUF = ".gguf"
_LEGACY = {FUSION_FOLDER: "unet", TEXT_FOLDER: "clip"}  # ComfyUI releases before the folder rename
_AUDIO_EXTENSIONS = {".pth", ".pt", ".safetensors", ".bin", ".ckpt"}


def _folder_paths():
    try:
        import folder_paths
    except ImportError:  # imported outside ComfyUI (tools, tests): there are no folders to register
        return None
    return folder_paths


def _key(fp, name: str) -> str | None:
    table = fp.folder_names_and_paths
    if name in table:
        return name
    legacy = _LEGACY.get(name)
    return legacy if legacy in table else None


def _add_extension(fp, name: str, ext: str) -> None:
    key = _key(fp, name)
    if key is None:
        return
    paths, exts = fp.folder_names_and_paths[key]
    if not exts or ext in exts:  # an empty set already lists every file
        return
    # A new set (or list): the old one is shared with checkpoints, loras, ... which must not start listing .gguf.
    fp.folder_names_and_paths[key] = (paths, list(exts) + [ext] if isinstance(exts, list) else set(exts) | {ext})
    getattr(fp, "filename_list_cache", {}).pop(key, None)


def _register_audio_folder(fp) -> None:
    default = os.path.join(fp.models_dir, AUDIO_FOLDER)
    table = fp.folder_names_and_paths
    if AUDIO_FOLDER not in table:
        table[AUDIO_FOLDER] = ([default], set(_AUDIO_EXTENSIONS))
        return
    paths, exts = table[AUDIO_FOLDER]  # e.g. from extra_model_paths.yaml or another MMAudio pack
    if default not in paths:
        paths.append(default)
    if exts and not _AUDIO_EXTENSIONS <= set(exts):
        table[AUDIO_FOLDER] = (paths, set(exts) | _AUDIO_EXTENSIONS)


def register() -> bool:
    """Register the folders with ComfyUI; False when not running inside ComfyUI."""
    fp = _folder_paths()
    if fp is None:
        return False
    _add_extension(fp, FUSION_FOLDER, GGUF)
    _add_extension(fp, TEXT_FOLDER, GGUF)
    _register_audio_folder(fp)
    return True


def list_files(folder: str, extensions: tuple[str, ...] = (), prefer: tuple[str, ...] = ()) -> list[str]:
    """File names ComfyUI lists for ``folder`` (only ``extensions`` when given); names containing one of the
    ``prefer`` words (case-insensitive) come first, so the default choice is the likely Ovi file."""
    fp = _folder_paths()
    if fp is None:
        return []
    key = _key(fp, folder)
    if key is None:
        return []
    names = fp.get_filename_list(key)
    if extensions:
        names = [n for n in names if n.lower().endswith(extensions)]

    def rank(name: str) -> int:
        low = name.lower()
        return next((i for i, word in enumerate(prefer) if word in low), len(prefer))

    # .safetensors first among equals: it loads without unpickling and is what Comfy-Org ships
    return sorted(names, key=lambda n: (rank(n), not n.lower().endswith(".safetensors"), n.lower()))


def full_path(folder: str, name: str) -> str:
    """The absolute path of ``name`` in ``folder``; FileNotFoundError naming the folders searched."""
    fp = _folder_paths()
    if fp is None:
        raise RuntimeError("model folders are only known inside ComfyUI")
    key = _key(fp, folder) or folder
    path = fp.get_full_path(key, name) if key in fp.folder_names_and_paths else None
    if path is None:
        where = ", ".join(fp.folder_names_and_paths.get(key, ([],))[0]) or f"models/{folder}"
        raise FileNotFoundError(f"model file {name!r} not found in the {folder} folder ({where}). Put it there, "
                                f"or pick a file the list offers.")
    return path
