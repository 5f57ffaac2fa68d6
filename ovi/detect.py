"""What a checkpoint file is, judged from its contents: component, layout, format, dtype / quantisation, variant.

The 720x720 and 960x960 fusion checkpoints have identical shapes, so the variant is resolved in a fixed order:
the ``ovi.variant`` header metadata of files we write, then the file name (official names, the names other
Ovi packs rename them to, a resolution tag in a user's own name), then the caller's explicit choice. A choice
that contradicts the metadata or an exact known name is an error; nothing falls back to a default silently.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .loading import (CONFIG_METADATA_KEY, FP8_DTYPES, GGUF_MAGIC, KNOWN_COMPONENTS, VARIANT_METADATA_KEY,
                      CheckpointError, CheckpointReader)
from .log import log
from .variants import VARIANTS, Variant, get_variant, known_file

DESCRIPTIONS = {**{k: v[0] for k, v in KNOWN_COMPONENTS.items()},
                "fusion_video": "the video branch of an Ovi fusion model (split checkpoint)",
                "fusion_audio": "the audio branch of an Ovi fusion model (split checkpoint)",
                "tokenizer": "a sentencepiece tokenizer model (umT5 spiece.model)",
                "lora": "a LoRA (low-rank adapter) for the fusion model",
                "unknown": "not a component Ovi uses"}

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
for _d in FP8_DTYPES:
    _DTYPE_NAMES[_d] = str(_d).removeprefix("torch.").replace("float8", "fp8")


@dataclass(frozen=True)
class FileInfo:
    path: Path
    component: str            # a KNOWN_COMPONENTS key, "fusion_audio", "tokenizer" or "unknown"
    layout: str
    format: str               # "safetensors", "torch", "gguf" or "sentencepiece"
    dtype: str                # dominant floating dtype, e.g. "bf16" or "bf16 (+ fp32 3%)"
    quantization: str | None  # "fp8_e4m3fn scaled", "Q4_K", ... or None
    tensor_count: int
    file_bytes: int
    tensor_bytes: int
    numel: int = 0
    metadata: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict, repr=False)  # {key: shape}, for size estimates
    # {key: bytes} of the tensors our loaders keep in their stored format (FP8 fusion weights, quantised GGUF
    # blocks); every other tensor is cast to the compute dtype at load
    stored_bytes: dict = field(default_factory=dict, repr=False)
    variant: str | None = None
    variant_source: str | None = None

    @property
    def description(self) -> str:
        return DESCRIPTIONS.get(self.component, self.component)

    @property
    def cast_numel(self) -> int:
        """Values a load casts to the compute dtype (everything not kept in ``stored_bytes``)."""
        return sum(_prod(s) for k, s in self.shapes.items() if k not in self.stored_bytes)

    @property
    def is_fusion(self) -> bool:
        return self.component.startswith("fusion")


@dataclass(frozen=True)
class VariantChoice:
    variant: Variant
    source: str   # "metadata", "name" or "explicit choice"
    detail: str   # where exactly: the metadata key, the kind of name, the file


def _dtype_summary(nbytes: dict[torch.dtype, int]) -> str:
    floats = {d: n for d, n in nbytes.items() if d.is_floating_point}
    if not floats:
        return "-" if not nbytes else "/".join(sorted(str(d).removeprefix("torch.") for d in nbytes))
    total = sum(floats.values())
    ranked = sorted(floats.items(), key=lambda kv: -kv[1])
    main = _DTYPE_NAMES.get(ranked[0][0], str(ranked[0][0]).removeprefix("torch."))
    rest = [f"{_DTYPE_NAMES.get(d, str(d).removeprefix('torch.'))} {100 * n / total:.0f}%" for d, n in ranked[1:]
            if n / total >= 0.01]
    return main + (f" (+ {', '.join(rest)})" if rest else "")


def _strip_to_anchor(keys: Sequence[str]) -> list[str]:
    """Keys with a shared wrapper prefix (``model.diffusion_model.``) removed, so the anchors match."""
    anchors = [a for _, (_, group) in KNOWN_COMPONENTS.items() for a in group]
    keyset = set(keys)
    if any(a in keyset for a in anchors):
        return list(keys)
    for k in keys:
        for a in anchors:
            if k.endswith("." + a):
                p = k[: -len(a)]
                if all(x.startswith(p) for x in keys):
                    return [x[len(p):] for x in keys]
    return list(keys)


def _component(keys: list[str], shapes: dict[str, tuple[int, ...]]) -> tuple[str, str]:
    """(component, layout) from key names and shapes."""
    if any(k.endswith(_LORA_SUFFIXES) for k in keys):  # first: an Ovi LoRA's keys carry the fusion prefixes too
        return "lora", "LoRA pairs and deltas by module name"
    stripped = _strip_to_anchor(keys)
    keyset = set(stripped)
    prefixed = len(stripped) and stripped[0] != keys[0]
    wrap = " inside a wrapper prefix" if prefixed else ""
    if any(k.startswith("video_model.") for k in keyset) and any(k.startswith("audio_model.") for k in keyset):
        return "fusion", "single file, both branches (official layout)" + wrap
    for branch in ("video", "audio"):  # one branch under its official prefix: a split half (Kijai's audio file)
        if f"{branch}_model.blocks.0.cross_attn.k_fusion.weight" in keyset and all(
                k.startswith(f"{branch}_model.") for k in keyset):
            return f"fusion_{branch}", f"split checkpoint, {branch} branch ({branch}_model. keys)" + wrap
    if "blocks.0.cross_attn.k_fusion.weight" in keyset and any(k.startswith("audio_model.") for k in keyset):
        return "fusion", "single file, video keys unprefixed + audio_model. keys (ComfyUI-WanVideoWrapper layout)"
    if "blocks.0.cross_attn.k_fusion.weight" in keyset:
        by_key = dict(zip(stripped, keys))
        rank = len(shapes.get(by_key.get("patch_embedding.weight", ""), ()))
        if rank == 5:
            return "fusion_video", "split checkpoint, video branch (keys without video_model.)" + wrap
        return "fusion_audio", "split checkpoint, audio branch (keys without audio_model.)" + wrap
    if "token_embedding.weight" in keyset:
        return "umt5", "official (models_t5_umt5-xxl-enc-bf16.pth names)" + wrap
    if "encoder.final_layer_norm.weight" in keyset or "shared.weight" in keyset:
        scaled = ", scaled fp8" if "scaled_fp8" in keyset else ""
        return "umt5", f"ComfyUI / transformers names{scaled}" + (", tokenizer embedded" if "spiece_model" in keyset
                                                                   else "") + wrap
    found = None
    for name, (_, anchors) in KNOWN_COMPONENTS.items():
        if any(a in keyset for a in anchors):
            found = name
            break
    if found == "wan22_vae":
        z = shapes.get(dict(zip(stripped, keys)).get("conv2.weight", ""), (0,))[0]
        return found, f"official / Comfy-Org names, {z}-channel latent" + wrap
    if found == "bigvgan":
        wn = "weight norm unfolded" if any(k.endswith(("weight_g", "original0")) for k in keyset) else "folded"
        return found, f"generator state dict ({wn})" + wrap
    if found is not None:
        return found, "official names" + wrap
    return "unknown", "unrecognised key layout"


# Key endings only adapter files have (ovi/lora/file.py reads them): low-rank pairs and full deltas.
_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight",
                  ".lora_A.default.weight", ".lora_B.default.weight", ".diff", ".diff_b")


def _gguf_info(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]], dict[torch.dtype, int], str | None, dict,
                                    int, dict[str, int]]:
    # the bounded, validating header reader: a damaged or hostile header fails at once with a CheckpointError
    from .quant.gguf_header import orig_shape, read_header
    from .quant.gguf_load import ORIG_SHAPE_KEY

    header = read_header(path, keep=lambda key: key.startswith(ORIG_SHAPE_KEY))
    keys, shapes, kinds, nbytes, stored = [], {}, {}, {}, {}
    plain = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for t in header.tensors.values():
        keys.append(t.name)
        shapes[t.name] = orig_shape(header, ORIG_SHAPE_KEY + t.name, t) or t.shape
        kind = t.qtype.name
        kinds[kind] = kinds.get(kind, 0) + t.nbytes
        if kind in plain:
            nbytes[plain[kind]] = nbytes.get(plain[kind], 0) + t.nbytes
        else:
            stored[t.name] = t.nbytes
    quant = sorted((k for k in kinds if k not in plain), key=lambda k: -kinds[k])
    meta = {k: header.string(k) for k in header.fields
            if k.startswith(("general.", "ovi.")) and header.string(k) is not None}
    return keys, shapes, nbytes, (", ".join(quant) if quant else None), meta, sum(kinds.values()), stored


def inspect_file(path: str | os.PathLike) -> FileInfo:
    """Read a checkpoint's header (tensors are not loaded) and say what it is. Raises ``CheckpointError`` for a
    missing, truncated or unreadable file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "file not found.")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
    if p.name == "spiece.model" or p.suffix == ".model":
        return _inspect_spiece(p, size)
    if head[:4] == GGUF_MAGIC:
        keys, shapes, dtype_bytes, quant, meta, data_bytes, stored = _gguf_info(p)
        numel = sum(_prod(s) for s in shapes.values())
        fmt = "gguf"
        fp8_layout = None
    else:
        with CheckpointReader(p, entry=("generator", "module")) as r:
            sources = r.sources()
            meta = dict(r.metadata)
        fmt = _container(p, head)
        keys = list(sources)
        shapes = {k: tuple(s.shape) for k, s in sources.items()}
        dtype_bytes: dict[torch.dtype, int] = {}
        numel = 0
        for s in sources.values():
            n = _prod(s.shape)
            numel += n
            dtype_bytes[s.dtype] = dtype_bytes.get(s.dtype, 0) + n * torch.empty((), dtype=s.dtype).element_size()
        quant = fp8_layout = None
        stored = {k: _prod(s.shape) for k, s in sources.items() if s.dtype in FP8_DTYPES}
        fp8 = [d for d in dtype_bytes if d in FP8_DTYPES]
        from .quant.comfy_quant import has_comfy_quant

        if fp8 or "scaled_fp8" in keys or has_comfy_quant(keys, meta):  # ComfyUI's per-layer quantization metadata
            from .quant.fp8_checkpoint import detect_fp8_layout

            layout = detect_fp8_layout(sources, meta, p)  # CheckpointError for an unknown FP8 layout
            if layout is not None:
                scaled = layout.granularity != "none"
                quant = (_DTYPE_NAMES.get(layout.weight_dtype, str(layout.weight_dtype).removeprefix("torch."))
                         + (" scaled" if scaled else " (plain casts, no scales)"))
                fp8_layout = layout
        data_bytes = sum(dtype_bytes.values())
        file_tensors = len(keys)
        from .quant.quanto_int8 import inspect_header

        quanto = inspect_header(sources, meta, p)  # CheckpointError for a malformed quanto int8 file (Wan2GP)
        if quanto is not None:  # keyed as the model loads it; int8 weights and their scales count at stored size
            shapes, stored, quant = quanto.shapes, quanto.stored, quanto.layout.summary()
            keys = list(shapes)
    if not keys:
        raise CheckpointError(p, "the file holds no tensors.")
    if fmt == "gguf" and any(k.startswith("enc.blk.") for k in keys):  # llama.cpp's T5 tensor names
        from .quant.gguf_load import official_t5_names

        renamed = official_t5_names(p, keys)  # CheckpointError naming a tensor outside llama.cpp's T5 names
        shapes = {renamed[k]: v for k, v in shapes.items()}
        stored = {renamed[k]: v for k, v in stored.items()}
        keys = list(shapes)
    component, layout = _component(keys, shapes)
    if fmt != "gguf" and fp8_layout is not None and component.startswith("fusion"):
        quant = fp8_layout.summary()
    if fmt != "gguf" and not component.startswith("fusion"):
        stored = {}  # FP8 text encoders are dequantised at load
    if component.startswith("fusion"):  # our ovi.config / ovi.variant, checked (against the shapes in one file)
        from .fusion.metadata import check_fusion_metadata

        check_fusion_metadata(meta, p, shapes if component == "fusion" and fmt != "gguf" else None)
    if CONFIG_METADATA_KEY in meta and component.startswith("fusion"):
        layout += "; config in header metadata (converted by this package)"
    info = FileInfo(path=p, component=component, layout=layout, format=fmt, dtype=_dtype_summary(dtype_bytes),
                    quantization=quant, tensor_count=file_tensors if fmt != "gguf" else len(keys), file_bytes=size,
                    tensor_bytes=data_bytes, numel=numel, metadata=meta, shapes=shapes, stored_bytes=stored)
    if info.is_fusion:
        try:
            choice = resolve_variant([p], metadata=[meta])
            info = replace(info, variant=choice.variant.name, variant_source=f"{choice.source} ({choice.detail})")
        except ValueError:
            info = replace(info, variant=None, variant_source="unknown: neither header metadata nor file name "
                                                               "says; give the variant explicitly")
    return info


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _container(p: Path, head: bytes) -> str:
    # The same test CheckpointReader uses to pick its reader.
    torch_suffix = p.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt")
    if p.suffix.lower() == ".safetensors" or (len(head) == 8 and not torch_suffix and not zipfile.is_zipfile(p)):
        return "safetensors"
    return "torch"


def _inspect_spiece(p: Path, size: int) -> FileInfo:
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(p.read_bytes())
        pieces = sp.get_piece_size()
    except Exception as e:
        raise CheckpointError(p, f"not a sentencepiece model ({type(e).__name__}: {e}).") from e
    return FileInfo(path=p, component="tokenizer", layout=f"sentencepiece, {pieces} pieces", format="sentencepiece",
                    dtype="-", quantization=None, tensor_count=0, file_bytes=size, tensor_bytes=0)


def _read_meta(path: Path) -> dict[str, str]:
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    from .safetensors_header import read_header

    try:  # the validating reader: a malformed header says nothing about the variant
        return dict(read_header(path).metadata)
    except CheckpointError:
        return {}


def split_pair(path: str | os.PathLike, info: FileInfo | None = None) -> list[Path]:
    """``path`` plus, when it is one branch of a split fusion checkpoint, the other branch beside it, in
    (video, audio) order. Split packs name their halves alike but for the word video / audio (e.g. Kijai's
    ``Wan2_2_Ovi_Video_fp8_e4m3fn_scaled_KJ`` / ``..._Audio_...``), so that word is swapped, keeping its case.
    Raises ``CheckpointError`` for a branch whose partner is not there. Other files come back alone.
    ``info``: ``path``'s ``inspect_file`` result when the caller has it already."""
    p = Path(path)
    info = info or inspect_file(p)
    if info.component not in ("fusion_video", "fusion_audio"):
        return [p]
    mine, other = ("video", "audio") if info.component == "fusion_video" else ("audio", "video")
    tried = []
    for m in re.finditer(mine, p.name, re.IGNORECASE):
        word = m.group(0)
        swap = other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
        candidate = p.with_name(p.name[:m.start()] + swap + p.name[m.end():])
        tried.append(candidate.name)
        if candidate.is_file() and inspect_file(candidate).component == f"fusion_{other}":
            return [p, candidate] if mine == "video" else [candidate, p]
    raise CheckpointError(p, f"this is {DESCRIPTIONS[info.component]}; its {other} branch must sit beside it"
                             + (f" as {' or '.join(tried)}" if tried else " (a file named like it with "
                                f"'{other}' for '{mine}')") + ". Both halves load together.")


def resolve_variant(paths: Iterable[str | os.PathLike], explicit: str | None = None, *,
                    metadata: Sequence[dict] | None = None) -> VariantChoice:
    """The variant of a fusion checkpoint (one file or a split pair): metadata, then file name, then ``explicit``.

    Raises ValueError when ``explicit`` is not a variant, when it contradicts the header metadata or an exact
    known file name, or when nothing identifies the variant (the message lists the choices).
    """
    paths = [Path(p) for p in paths]
    metas = list(metadata) if metadata is not None else [_read_meta(p) for p in paths]
    choices = ", ".join(VARIANTS)
    want = get_variant(explicit) if explicit else None  # ValueError listing the choices for a bad name

    tagged = {(p, m[VARIANT_METADATA_KEY]) for p, m in zip(paths, metas) if m.get(VARIANT_METADATA_KEY)}
    names = {v for _, v in tagged}
    if len(names) > 1:
        raise ValueError("the fusion files disagree about their variant (" +
                         ", ".join(f"{p.name}: {v}" for p, v in sorted(tagged)) + "); give matching files")
    if names:
        path, name = next(iter(tagged))
        try:
            v = get_variant(name)
        except ValueError:
            raise CheckpointError(path, f"header metadata {VARIANT_METADATA_KEY}={name!r} is not a known variant "
                                        f"({choices}).") from None
        if want is not None and want.name != v.name:
            raise ValueError(f"variant {want.name!r} was asked for, but {path.name} says it holds {v.name!r} (header "
                             f"metadata {VARIANT_METADATA_KEY}, written when the file was made). Drop the variant "
                             f"choice or choose {v.name!r}.")
        return VariantChoice(v, "metadata", f"header {VARIANT_METADATA_KEY} of {path.name}")

    known = [(p, k) for p in paths if (k := known_file(p)) is not None]
    by_name = {k.variant for _, k in known}
    if len(by_name) > 1:
        raise ValueError("the fusion file names point at different variants (" +
                         ", ".join(f"{p.name}: {k.variant}" for p, k in known) + "); give matching files")
    if known:
        path, k = known[0]
        exact = not k.best_effort
        how = "by its resolution tag" if k.source == "name pattern" else f"as a {k.source} name"
        detail = f"{k.source} file name {path.name}" if exact else f"{path.name}, matched {how}"
        if want is not None and want.name != k.variant:
            if exact:
                raise ValueError(f"variant {want.name!r} was asked for, but {path.name} is the {k.source} name of "
                                 f"the {k.variant} checkpoint. If the file was renamed, give it a neutral name; "
                                 f"otherwise choose {k.variant!r}.")
            log.warning("variant %s chosen explicitly; the file name %s suggested %s", want.name, path.name, k.variant)
            return VariantChoice(want, "explicit choice", f"overrides the name guess {k.variant}")
        return VariantChoice(VARIANTS[k.variant], "name", detail)

    if want is not None:
        return VariantChoice(want, "explicit choice", "the file name and metadata do not say")
    shown = " + ".join(p.name for p in paths)
    raise ValueError(f"cannot tell which Ovi variant {shown} is: the 720x720 and 960x960 checkpoints have identical "
                     f"shapes, and neither header metadata nor a known file name identifies it. Choose the variant "
                     f"explicitly: one of {choices}.")


def describe_variant(choice: VariantChoice, dtype: str, nbytes: int) -> str:
    """The one-line summary the engine logs, e.g. ``variant 960x960_10s (10 s, 960x960 area, 61 video latent
    frames, 314 audio tokens), bf16, 23.3 GB, from name``."""
    v = choice.variant
    side = int(round(v.target_area ** 0.5))
    area = f"{side}x{side}" if side * side == v.target_area else f"{v.target_area} px"
    return (f"variant {v.name} ({v.duration_s} s, {area} area, {v.video_latent_length} video latent frames, "
            f"{v.audio_latent_length} audio tokens), {dtype}, {nbytes / 1e9:.1f} GB, from {choice.source}")


def _shown(key: str, value: str) -> str:
    """A metadata value for ``ovi info``; base64 blobs (mmgp's quantization map: kilobytes) by their size only."""
    return f"<{len(value)} characters of base64>" if key.endswith("_base64") else value


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_info(info: FileInfo) -> str:
    """Human-readable lines for ``python -m ovi info``."""
    rows = [("file", str(info.path)), ("component", f"{info.component}: {info.description}"),
            ("layout", info.layout)]
    if info.is_fusion:
        rows.append(("variant", f"{info.variant}, from {info.variant_source}" if info.variant
                     else f"? ({info.variant_source})"))
    rows += [("format", info.format), ("dtype", info.dtype)]
    if info.quantization:
        rows.append(("quantization", info.quantization))
    if info.component == "lora":
        from .lora.describe import lora_info_rows, summarize_lora

        rows += lora_info_rows(summarize_lora(info.path))
    rows += [("size", f"{human_bytes(info.file_bytes)} ({info.file_bytes:,} bytes; tensor data {info.tensor_bytes:,})"),
             ("tensors", str(info.tensor_count))]
    # ComfyUI's layer list (kilobytes of JSON) is summed up on the quantization row
    extra = sorted(k for k in info.metadata if k not in (CONFIG_METADATA_KEY, "format", "_quantization_metadata"))
    if extra:
        rows.append(("metadata", ", ".join(f"{k}={_shown(k, info.metadata[k])}" for k in extra)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows)
