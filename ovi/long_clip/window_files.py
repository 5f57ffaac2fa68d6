"""Each finished window of a long clip saved as a latent file, so a stopped clip resumes where it stopped.

``window_latents/window_000.safetensors`` ... are ordinary Ovi latent files (``ovi.latent_file``: written
atomically, read as untrusted input; OviLoadLatent opens them too). Their metadata's ``settings`` hold the
engine's sampling settings, the window's place (``"window"``) and, under ``"clip"``, the request that made
it: the prompt, seed, frame size, sampling settings, known-region modes, the model file and digests of the
image and of the window's part of the user's audio or frames. A rerun with the same request loads the window
instead of generating it; a different request is an error naming the file and the settings that differ,
so a folder of another clip is never stitched in by mistake.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..engine import GenerationResult
from ..latent_file import LatentError, read_latent_file, write_latent_file

WINDOW_FILE = "window_{index:03d}.safetensors"
REQUEST_KEY = "clip"  # where in a window file's settings the request that made it is kept


def window_path(folder: str | os.PathLike, index: int) -> Path:
    return Path(folder) / WINDOW_FILE.format(index=index)


def prepare_folder(folder: str | os.PathLike) -> Path:
    """The window_latents folder, created when missing; a file of that name is an error naming it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"window_latents {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def digest(value: Any) -> str | None:
    """A short content digest of an image, waveform or frames (a path: the file's bytes), for the request."""
    if value is None:
        return None
    h = hashlib.sha256()
    if isinstance(value, (str, os.PathLike)):
        p = Path(value)
        if p.is_file():
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(p).encode())
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        h.update(f"{a.dtype}{list(a.shape)}".encode())
        h.update(a.tobytes())
    elif hasattr(value, "tobytes") and hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
        h.update(f"{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()[:16]


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so requests compare as stored."""
    return json.loads(json.dumps(value))


def save_window(folder: str | os.PathLike, result: GenerationResult, request: Mapping) -> Path:
    """Write ``result`` (its settings already holding its ``"window"``) with ``request`` to its window file."""
    index = result.settings["window"]["index"]
    settings = {**result.settings, REQUEST_KEY: as_json(dict(request))}
    meta = dict(variant=result.variant, seed=result.seed, height=result.height, width=result.width,
                mode=result.mode, prompt=result.prompt, settings=settings)
    return write_latent_file(window_path(folder, index), result.video_latent[None], result.audio_latent[None], meta)


def load_window(folder: str | os.PathLike, index: int, request: Mapping) -> GenerationResult | None:
    """The saved window ``index`` if its file is there (None if not); LatentError naming the file when it was
    made by another request, or is not a window of this clip."""
    path = window_path(folder, index)
    if not path.is_file():
        return None
    video, audio, meta = read_latent_file(path)
    settings = dict(meta.get("settings") or {})
    saved = settings.get(REQUEST_KEY)
    want = as_json(dict(request))
    if not isinstance(saved, Mapping):
        raise LatentError(path, "is not a window of a long clip (its settings hold no request); delete it or "
                                "choose another window_latents folder.")
    if saved != want:
        differ = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, asked {want.get(k)!r}" for k in differ)
        raise LatentError(path, f"was made with other settings than this run ({detail}). Delete it (or the "
                                f"folder) to generate the clip anew, or choose another window_latents folder.")
    settings.pop(REQUEST_KEY)
    return GenerationResult(video_latent=video[0], audio_latent=audio[0], height=meta["height"],
                            width=meta["width"], variant=meta["variant"], seed=meta["seed"], mode=meta["mode"],
                            prompt=meta["prompt"], settings=settings, timings={"resumed": True})
