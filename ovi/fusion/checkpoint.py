"""Load the fusion model from the released single file, a ``.pt`` container, or a split video/audio pair.

Layouts accepted:
- one file with ``video_model.``/``audio_model.`` keys (``model*.safetensors``; ``.pt`` with the state
  dict at the top, under ``module``, or under ``app`` -> ``model``);
- two files, one per branch, keys without the branch prefix (as ComfyUI-WanVideoWrapper users keep
  them); which is which is read from the audio patch embedding (a 3-D conv) vs the video one (5-D);
- one file with the video keys unprefixed next to ``audio_model.`` keys (ComfyUI-WanVideoWrapper's Ovi 1.1
  files), and ``blocks.N.modulation`` for the official ``blocks.N.modulation.modulation``;
- FP8 files in any layout of ``ovi.quant.fp8_checkpoint`` (official plain casts, KJ scaled, ComfyUI scaled,
  ComfyUI mixed-precision, our converted files): FP8 linear weights stay FP8 in ``FP8Linear`` layers,
  everything else as usual;
- Wan2GP's split pairs (``wan2.2_ovi*_{video,audio}_10B_{bf16,quanto_bf16_int8}``, keys without the branch
  prefix), the int8 ones in the optimum-quanto layout of ``ovi.quant.quanto_int8``: qint8 linear weights stay
  int8 in ``Int8Linear`` layers, the layers outside the quantization map load as usual.
The config comes from ``config``, else the header metadata ``ovi.config``, else the tensor shapes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..loading import (is_gguf, meta_device, CONFIG_METADATA_KEY, FP8_DTYPES, KNOWN_COMPONENTS, VARIANT_METADATA_KEY,
                       CheckpointError, CheckpointReader, DerivedSource,
                       TensorSource, check_keys, identify_component, load_into_module)
from ..log import log
from ..quant.fp8_checkpoint import Fp8Layout, fp8_file_sources, keeps_stored_dtype, prepare_fp8_model
from ..quant.quanto_int8 import (QuantoLayout, check_quanto_scale_values, dequantised_sources as int8_dequantised,
                                 detect_quanto_layout, model_sources as quanto_model_sources, prepare_int8_model)
from .config import ConfigError, FusionConfig
from .metadata import check_config_matches_shapes, config_from_metadata, variant_from_metadata
from .model import FusionModel

_BRANCH_PREFIX = {"video": "video_model.", "audio": "audio_model."}
# Keys that tell the branches apart, with the rank of the tensor.
_ANCHORS = {"video": ("patch_embedding.weight", 5), "audio": ("patch_embedding.0.weight", 3)}


class _File:
    """The tensors and header metadata of one checkpoint file, and its FP8 or quanto int8 layout (None: not that
    format). The sources of an int8 file are keyed as the model loads them (``<layer>.weight`` int8 and
    ``<layer>.scale``)."""

    def __init__(self, path: Path, sources: dict[str, TensorSource], metadata: dict[str, str],
                 fp8: Fp8Layout | None = None, int8: QuantoLayout | None = None):
        self.path, self.sources, self.metadata, self.fp8, self.int8 = path, sources, metadata, fp8, int8


def _open(path: Path, prefix: str, streaming: bool = False):
    """(_File, reader to close). ``streaming`` reads safetensors tensors with file reads instead of a memory
    map (the converter: mapped pages would pile up in its resident set)."""
    if streaming and path.suffix.lower() == ".safetensors":
        from ..safetensors_stream import StreamingReader

        reader = StreamingReader(path, prefix=prefix)
    else:
        reader = CheckpointReader(path, prefix=prefix, entry="module")
    sources = reader.sources()
    if not sources and path.suffix.lower() != ".safetensors":
        sources = _app_model_sources(path, prefix)
    metadata = dict(reader.metadata)
    try:
        int8 = detect_quanto_layout(sources, metadata, path)
        if int8 is not None:
            fp8_keys = [k for k, s in sources.items() if s.dtype in FP8_DTYPES]
            if fp8_keys:
                raise CheckpointError(path, f"the file is in the optimum-quanto int8 layout but also holds FP8 "
                                            f"tensors (first: {fp8_keys[0]}); it mixes two formats.")
            check_quanto_scale_values(sources, int8, path)
            return _File(path, quanto_model_sources(sources), metadata, int8=int8), reader
        sources, fp8 = fp8_file_sources(sources, metadata, path)
    except BaseException:
        reader.close()
        raise
    return _File(path, sources, metadata, fp8), reader


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


_BLOCK_MODULATION = re.compile(r"(?:^|\.)blocks\.\d+\.modulation$")


def _normalise(sources: dict[str, TensorSource]) -> dict[str, TensorSource]:
    """WanVideoWrapper spellings -> official keys: ``blocks.N.modulation`` gains its inner ``.modulation``, and
    in a file that has ``audio_model.`` keys but unprefixed video keys the latter gain ``video_model.``."""
    sources = {(k + ".modulation" if _BLOCK_MODULATION.search(k) else k): s for k, s in sources.items()}
    if ("patch_embedding.weight" in sources and any(k.startswith("audio_model.") for k in sources)
            and not any(k.startswith("video_model.") for k in sources)):
        sources = {(k if k.startswith("audio_model.") else "video_model." + k): s for k, s in sources.items()}
    return sources


def _classify(f: _File) -> tuple[str, dict[str, TensorSource]]:
    """("fusion" | "video" | "audio", sources keyed for that) for one file."""
    sources = _normalise(_strip_wrapper(f.sources))
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
    """The config from the header metadata (checked, and against the tensor shapes), else from the shapes."""
    shapes = {_BRANCH_PREFIX[b] + k: tuple(s.shape) for b, (_, srcs) in branches.items() for k, s in srcs.items()}
    recorded = [(f, c) for f in files if (c := config_from_metadata(f.metadata, f.path)) is not None]
    for f in files:
        variant_from_metadata(f.metadata, f.path)
    if recorded:
        f, cfg = recorded[0]
        if any(c != cfg for _, c in recorded[1:]):
            raise CheckpointError(label, f"the two files record different {CONFIG_METADATA_KEY} header metadata; "
                                         "give a matching pair.")
        check_config_matches_shapes(cfg, shapes, f.path)
        return cfg
    try:
        return FusionConfig.from_shapes(shapes)
    except ConfigError as e:
        raise CheckpointError(label, f"the tensor shapes give no valid model configuration: {e}. The file is "
                                     "corrupt or not an Ovi fusion model.") from None
    except KeyError as e:
        msg = e.args[0] if e.args else str(e)
        raise CheckpointError(label, f"cannot infer the model configuration: {msg}. Likely cause: tensors are "
                                     "missing (a partial or interrupted file); use the complete file.") from e


def _collect(paths: list[Path], prefix: str, streaming: bool = False):
    """Open one file or a split pair: (files, readers, {"video" | "audio": (path, sources)}, label)."""
    if len(paths) not in (1, 2):
        raise CheckpointError(None, f"give one fusion model file, or two (video and audio branch); got {len(paths)}")
    files, readers = [], []
    try:
        for p in paths:
            f, r = _open(p, prefix, streaming)
            files.append(f)
            readers.append(r)
        label = paths[0] if len(paths) == 1 else " + ".join(str(p) for p in paths)
        return files, readers, _gather(files), label
    except BaseException:
        for r in readers:
            r.close()
        raise


def fusion_sources(path: str | os.PathLike | Sequence[str | os.PathLike], *, prefix: str = "",
                   streaming: bool = False):
    """For converters: (files, readers, sources keyed ``video_model.``/``audio_model.``, config, label).
    FP8 scales stay as ``<layer>.scale_weight`` sources; the caller closes the readers."""
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    files, readers, branches, label = _collect(paths, prefix, streaming)
    try:
        cfg = _config(files, branches, label)
    except BaseException:
        for r in readers:
            r.close()
        raise
    sources = {_BRANCH_PREFIX[b] + k: s for b, (_, srcs) in branches.items() for k, s in srcs.items()}
    if any(f.int8 is not None for f in files):  # converters read int8 weights as their float values
        sources = int8_dequantised(sources)
    return files, readers, sources, cfg, label


def load_fusion_model(path: str | os.PathLike | Sequence[str | os.PathLike], *, prefix: str = "",
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      config: FusionConfig | None = None, fp8_compute: str | None = None) -> FusionModel:
    """Build the fusion model on ``meta`` and fill it tensor by tensor from one file or a [video, audio] pair
    (either order). ``prefix`` selects and strips a key prefix (``weights/`` for the parity fixtures).

    FP8 files load their FP8 linear weights into ``FP8Linear`` layers (weight and float32 scale kept as
    stored); ``fp8_compute`` ("auto" | "scaled_mm" | "upcast", None = auto) picks how those layers compute."""
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if any(is_gguf(p) for p in paths):
        if len(paths) != 1:
            raise CheckpointError(paths[0], "a GGUF fusion model is one file; split video/audio pairs are read from "
                                            "safetensors only")
        from ..quant.gguf_load import load_fusion_gguf

        return load_fusion_gguf(paths[0], device=device, dtype=dtype, config=config)
    files, readers, branches, label = _collect(paths, prefix)
    fp8_linears = int8_linears = 0
    try:
        layouts = {f.fp8.name for f in files if f.fp8 is not None}
        if len(layouts) > 1:
            raise CheckpointError(label, f"the two files use different FP8 layouts ({', '.join(sorted(layouts))}); "
                                         "give a matching pair.")
        int8 = any(f.int8 is not None for f in files)
        if layouts and int8:
            raise CheckpointError(label, "one file is FP8 and the other quanto int8; give a matching pair.")
        if config is None:
            cfg = _config(files, branches, label)
        else:
            cfg = config
            for f in files:
                variant_from_metadata(f.metadata, f.path)
        with meta_device():
            model = FusionModel(cfg)
        sources = {_BRANCH_PREFIX[b] + k: s for b, (_, srcs) in branches.items() for k, s in srcs.items()}
        if layouts:
            sources, fp8_linears = prepare_fp8_model(model, sources, label)
        if int8:
            sources, int8_linears = prepare_int8_model(model, sources, label)
        expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        if len(files) == 2:  # report a problem against the file of the branch that has it
            for b, (p, _) in branches.items():
                pre = _BRANCH_PREFIX[b]
                check_keys("fusion", p, {k[len(pre):]: s for k, s in expected.items() if k.startswith(pre)},
                           {k[len(pre):]: s for k, s in sources.items() if k.startswith(pre)})
        load_into_module(model, sources, path=label, component="fusion", device=device, dtype=dtype,
                         keep_dtype=lambda name, t: (keeps_stored_dtype(name, t) or _is_int8_scale(name, sources)))
    finally:
        for r in readers:
            r.close()
    model.compute_dtype = dtype
    model.eval().requires_grad_(False)
    if fp8_linears:
        from ..quant.fp8 import set_fp8_compute

        set_fp8_compute(model, fp8_compute)
    variant = next((f.metadata[VARIANT_METADATA_KEY] for f in files if VARIANT_METADATA_KEY in f.metadata), None)
    fp8 = next((f.fp8 for f in files if f.fp8 is not None), None)
    q8 = next((f.int8 for f in files if f.int8 is not None), None)
    log.info("fusion model loaded from %s: %d layers, dim %d, %s on %s%s%s%s", label, cfg.num_layers, cfg.video.dim,
             str(dtype).replace("torch.", ""), device, f" (variant {variant})" if variant else "",
             f"; FP8: {fp8_linears} linear layers, {fp8.summary()}" if fp8 else "",
             f"; int8: {int8_linears} linear layers kept int8 ({q8.summary().split(' (')[0]})" if q8 else "")
    return model


def _is_int8_scale(name: str, sources: Mapping[str, TensorSource]) -> bool:
    """An ``Int8Linear`` scale: kept float32 whatever the compute dtype."""
    if not name.endswith(".scale"):
        return False
    w = sources.get(name[: -len("scale")] + "weight")
    return w is not None and w.dtype == torch.int8


def output_variant(paths: list[Path], files, explicit: str | None) -> str | None:
    """For converters: the variant to record, from the sources' metadata, their names, else ``explicit``."""
    from ..detect import resolve_variant

    tagged = next((v for f in files if (v := variant_from_metadata(f.metadata, f.path))), None)
    if tagged and not explicit:
        return tagged
    try:
        return resolve_variant(paths, explicit, metadata=[f.metadata for f in files]).variant.name
    except ValueError as e:
        if explicit:
            raise
        log.warning("convert: the variant is not recorded (%s); pass --variant to record it", str(e).split(":")[0])
        return None


def describe_sources(files) -> str:
    """For converters: what the sources were, e.g. ``bfloat16 (model.safetensors)``, for the header."""
    parts = []
    for f in files:
        if f.fp8 is not None:
            kind = f"fp8 {f.fp8.name}"
        elif f.int8 is not None:
            kind = "quanto qint8"
        else:
            dts = {s.dtype for s in f.sources.values() if s.dtype.is_floating_point}
            kind = "/".join(sorted(str(d).removeprefix("torch.") for d in dts)) or "?"
        parts.append(f"{kind} ({f.path.name})")
    return " + ".join(parts)
