"""Load the fusion model from the released single file, a ``.pt`` container, or a split video/audio pair.

Layouts accepted:
- one file with ``video_model.``/``audio_model.`` keys (``model*.safetensors``; ``.pt`` with the state
  dict at the top, under ``module``, or under ``app`` -> ``model``);
- two files, one per branch, keys without the branch prefix (as ComfyUI-WanVideoWrapper users keep
  them); which is which is read from the audio patch embedding (a 3-D conv) vs the video one (5-D).
The config comes from ``config``, else the header metadata ``ovi.config``, else the tensor shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..loading import (meta_device, FP8_DTYPES, KNOWN_COMPONENTS, CheckpointError, CheckpointReader, DerivedSource,
                       TensorSource, check_keys, identify_component, load_into_module)
from ..log import log
from .config import FusionConfig
from .model import FusionModel

CONFIG_METADATA_KEY = "ovi.config"
VARIANT_METADATA_KEY = "ovi.variant"

_BRANCH_PREFIX = {"video": "video_model.", "audio": "audio_model."}
# Keys that tell the branches apart, with the rank of the tensor.
_ANCHORS = {"video": ("patch_embedding.weight", 5), "audio": ("patch_embedding.0.weight", 3)}


class _File:
    """The tensors and header metadata of one checkpoint file."""

    def __init__(self, path: Path, sources: dict[str, TensorSource], metadata: dict[str, str]):
        self.path, self.sources, self.metadata = path, sources, metadata


def _open(path: Path, prefix: str) -> tuple[_File, CheckpointReader]:
    reader = CheckpointReader(path, prefix=prefix, entry="module")
    sources = reader.sources()
    if not sources and path.suffix.lower() != ".safetensors":
        sources = _app_model_sources(path, prefix)
    return _File(path, sources, dict(reader.metadata)), reader


def _app_model_sources(path: Path, prefix: str) -> dict[str, TensorSource]:
    """The ``{"app": {"model": state_dict}}`` container of the official training checkpoints.

    CheckpointReader descends one level only; the file has already been read by it with
    ``weights_only=True``, so loading it again here is safe.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    app = obj.get("app") if isinstance(obj, Mapping) else None
    inner = app.get("model") if isinstance(app, Mapping) else None
    if not isinstance(inner, Mapping):
        return {}
    return {k[len(prefix):]: DerivedSource((), (lambda v=v: v), tuple(v.shape), v.dtype)
            for k, v in inner.items() if torch.is_tensor(v) and k.startswith(prefix)}


def _strip_wrapper(sources: dict[str, TensorSource]) -> dict[str, TensorSource]:
    """Drop a wrapper prefix shared by all keys (``model.diffusion_model.``, ``module.``, ...)."""
    anchors = ("video_model.patch_embedding.weight", "audio_model.patch_embedding.0.weight",
               "patch_embedding.weight", "patch_embedding.0.weight")
    for anchor in anchors:
        for k in sources:
            if k.endswith(anchor):
                wrap = k[: -len(anchor)]
                if wrap and all(key.startswith(wrap) for key in sources):
                    return {key[len(wrap):]: s for key, s in sources.items()}
                return sources
    return sources


def _classify(f: _File) -> tuple[str, dict[str, TensorSource]]:
    """("fusion" | "video" | "audio", sources keyed for that) for one file."""
    sources = _strip_wrapper(f.sources)
    present = [b for b, p in _BRANCH_PREFIX.items() if any(k.startswith(p) for k in sources)]
    if len(present) == 2:
        return "fusion", sources
    if len(present) == 1:
        p = _BRANCH_PREFIX[present[0]]
        return present[0], {k[len(p):]: s for k, s in sources.items() if k.startswith(p)}
    for branch, (anchor, rank) in _ANCHORS.items():
        if anchor in sources and len(sources[anchor].shape) == rank and "blocks.0.cross_attn.q.weight" in sources:
            if "blocks.0.cross_attn.k_fusion.weight" not in sources:
                raise CheckpointError(f.path, "this is a single Wan-style DiT without Ovi's fusion layers (no "
                                              "cross_attn.k_fusion), e.g. a Wan2.2 TI2V-5B model, not an Ovi fusion "
                                              "model. Give the Ovi model file (or its two split branch files).")
            return branch, sources
    found = identify_component(sources)
    if found is not None and not found.startswith("fusion"):
        raise CheckpointError(f.path, f"this file looks like {KNOWN_COMPONENTS[found][0]}, not an Ovi fusion "
                                      "model: the wrong file was given to the fusion model loader.")
    first = ", ".join(list(sources)[:3]) or "no tensors"
    raise CheckpointError(f.path, f"not an Ovi fusion model: no video_model./audio_model. keys and no backbone "
                                  f"patch embedding (first keys: {first}). Give the Ovi model file "
                                  "(model.safetensors, model_960x960.safetensors, ...).")


def _gather(files: list[_File]) -> dict[str, tuple[Path, dict[str, TensorSource]]]:
    """{"video" | "audio": (file, sources keyed without the branch prefix)} from one or two files."""
    kinds = [(f, *_classify(f)) for f in files]
    if len(files) == 1:
        f, kind, sources = kinds[0]
        if kind != "fusion":
            other = "audio" if kind == "video" else "video"
            raise CheckpointError(f.path, f"this file holds only the {kind} branch of the fusion model: it is one "
                                          f"half of a split checkpoint. Give both files (the {kind} branch and the "
                                          f"{other} branch) together.")
        stray = [k for k in sources if not k.startswith(tuple(_BRANCH_PREFIX.values()))]
        if stray:
            raise CheckpointError(f.path, f"{len(stray)} unexpected keys outside video_model./audio_model. (first: "
                                          f"{', '.join(stray[:3])}). Likely cause: a different model or a wrapper "
                                          "layout this loader does not know.")
        return {b: (f.path, {k[len(p):]: s for k, s in sources.items() if k.startswith(p)})
                for b, p in _BRANCH_PREFIX.items()}
    out: dict[str, tuple[Path, dict[str, TensorSource]]] = {}
    for f, kind, sources in kinds:
        if kind == "fusion":
            raise CheckpointError(f.path, "this file already holds the whole fusion model (both branches); give it "
                                          "alone, not as one half of a split pair.")
        if kind in out:
            raise CheckpointError(f.path, f"both files hold the {kind} branch; a split checkpoint needs one video "
                                          "and one audio file.")
        out[kind] = (f.path, sources)
    return out


def _config(files: list[_File], branches: dict[str, tuple[Path, dict[str, TensorSource]]], label) -> FusionConfig:
    for f in files:
        raw = f.metadata.get(CONFIG_METADATA_KEY)
        if raw:
            try:
                return FusionConfig.from_dict(json.loads(raw))
            except (ValueError, TypeError) as e:
                raise CheckpointError(f.path, f"invalid '{CONFIG_METADATA_KEY}' header metadata: {e}") from e
    shapes = {_BRANCH_PREFIX[b] + k: s.shape for b, (_, srcs) in branches.items() for k, s in srcs.items()}
    try:
        return FusionConfig.from_shapes(shapes)
    except (KeyError, ValueError) as e:
        msg = e.args[0] if e.args else str(e)
        raise CheckpointError(label, f"cannot infer the model configuration: {msg}. Likely cause: tensors are "
                                     "missing (a partial or interrupted file); use the complete file.") from e


def load_fusion_model(path: str | os.PathLike | Sequence[str | os.PathLike], *, prefix: str = "",
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      config: FusionConfig | None = None) -> FusionModel:
    """Build the fusion model on ``meta`` and fill it tensor by tensor from one file or a [video, audio] pair
    (either order). ``prefix`` selects and strips a key prefix (``weights/`` for the parity fixtures)."""
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if len(paths) not in (1, 2):
        raise CheckpointError(None, f"give one fusion model file, or two (video and audio branch); got {len(paths)}")
    files, readers = [], []
    try:
        for p in paths:
            f, r = _open(p, prefix)
            files.append(f)
            readers.append(r)
        label = paths[0] if len(paths) == 1 else " + ".join(str(p) for p in paths)
        for f in files:
            if any(s.dtype in FP8_DTYPES for s in f.sources.values()):
                raise CheckpointError(f.path, "this file holds FP8 weights (e.g. model_fp8_e4m3fn.safetensors); "
                                              "load it with the FP8-capable loader, or use the bf16 model file.")
        branches = _gather(files)
        cfg = config or _config(files, branches, label)
        with meta_device():
            model = FusionModel(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        if len(files) == 2:  # report a problem against the file of the branch that has it
            for b, (p, srcs) in branches.items():
                pre = _BRANCH_PREFIX[b]
                check_keys("fusion", p, {k[len(pre):]: s for k, s in expected.items() if k.startswith(pre)}, srcs)
        sources = {_BRANCH_PREFIX[b] + k: s for b, (_, srcs) in branches.items() for k, s in srcs.items()}
        load_into_module(model, sources, path=label, component="fusion", device=device, dtype=dtype)
    finally:
        for r in readers:
            r.close()
    model.compute_dtype = dtype
    model.eval().requires_grad_(False)
    variant = next((f.metadata[VARIANT_METADATA_KEY] for f in files if VARIANT_METADATA_KEY in f.metadata), None)
    log.info("fusion model loaded from %s: %d layers, dim %d, %s on %s%s", label, cfg.num_layers, cfg.video.dim,
             str(dtype).replace("torch.", ""), device, f" (variant {variant})" if variant else "")
    return model
