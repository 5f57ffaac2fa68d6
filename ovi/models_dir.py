"""Where the components are in a models folder: the official download tree (``Ovi/``, ``Wan2.2-TI2V-5B/``,
``MMAudio/ext_weights/``) with ComfyUI-style ``text_encoders/`` and ``vae/`` copies as fallbacks.

The fusion model is the variant's known file under ``Ovi/`` (``KNOWN_FILES``): the bf16 one, else an FP8 one,
else a GGUF one; a split pack counts only when both halves are there. An explicit file (or pair) replaces
that lookup. Whatever is missing is reported at once, each with every path looked at.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .log import log
from .variants import KNOWN_FILES, VARIANTS, get_variant


class MissingComponentError(FileNotFoundError):
    """A component file the engine needs is not where it was looked for."""


DIR_LAYOUT = {
    "text_encoder": ("Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth", "text_encoders/umt5_xxl_fp16.safetensors",
                     "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "tokenizer": ("Wan2.2-TI2V-5B/google/umt5-xxl",),
    "video_vae": ("Wan2.2-TI2V-5B/Wan2.2_VAE.pth", "vae/wan2.2_vae.safetensors"),
    "audio_vae": ("MMAudio/ext_weights/v1-16.pth",),
    "vocoder": ("MMAudio/ext_weights/best_netG.pt",),
}
COMPONENT_WORDS = {"fusion": "fusion model", "text_encoder": "umT5 text encoder",
                   "tokenizer": "umT5 tokenizer", "video_vae": "Wan2.2 video VAE", "audio_vae": "MMAudio VAE",
                   "vocoder": "BigVGAN vocoder"}
_FUSION_KINDS = ("bf16", "FP8", "GGUF")  # the lookup's preference: the unquantised weights first


@dataclass(frozen=True)
class _FusionCandidate:
    paths: tuple[Path, ...]  # one file, or the video + audio halves of a split pack
    variant: str
    rank: int                # index into _FUSION_KINDS

    @property
    def label(self) -> str:
        return " + ".join(p.name for p in self.paths)


def _fusion_candidates(folder: Path, variant: str | None) -> list[_FusionCandidate]:
    """Every known fusion file (or split pair) of ``variant`` (None: all) under ``folder``, present or not, in
    preference order: bf16, FP8, GGUF, and within one kind the order of ``KNOWN_FILES``."""
    files = [f for f in KNOWN_FILES if variant is None or f.variant == variant]
    out: list[_FusionCandidate] = []
    halves: dict[tuple, dict[str, Path]] = {}
    for f in files:
        rank = 2 if f.name.lower().endswith(".gguf") else 1 if f.fp8 else 0
        if f.part == "full":
            out.append(_FusionCandidate((folder / f.name,), f.variant, rank))
            continue
        # The two halves of a pack differ only in the word video/audio (either case), so that word masked out
        # names the pair.
        stem = re.sub(f"(?i){f.part}", "*", f.name, count=1)
        pair = halves.setdefault((stem, f.variant, rank), {})
        pair[f.part] = folder / f.name
        if len(pair) == 2:
            out.append(_FusionCandidate((pair["video"], pair["audio"]), f.variant, rank))
    return sorted(out, key=lambda c: c.rank)  # stable: KNOWN_FILES order within a kind


def _find_fusion(root: Path, variant: str | None) -> tuple[tuple[Path, ...] | None, list[Path]]:
    """(the fusion file(s) for ``variant`` under root/Ovi, every path looked at).

    bf16 is preferred, then FP8, then GGUF; a split pack counts only when both halves are there. Files of
    several variants with none chosen is an error; several files of one variant is not (the preferred one is
    used and the others are named in the log)."""
    folder = root / "Ovi"
    want = get_variant(variant).name if variant is not None else None
    candidates = _fusion_candidates(folder, want)
    tried = list(dict.fromkeys(p for c in candidates for p in c.paths))
    present = [c for c in candidates if all(p.is_file() for p in c.paths)]
    if not present:
        return None, tried
    variants = list(dict.fromkeys(c.variant for c in present))
    if len(variants) > 1:
        raise ValueError(f"{folder} holds several Ovi models (" +
                         "; ".join(f"{v}: {', '.join(c.label for c in present if c.variant == v)}" for v in variants) +
                         f"); choose one with variant= (or --variant): {', '.join(VARIANTS)}; or give the file with "
                         "fusion= (--fusion)")
    chosen, others = present[0], present[1:]
    why = "" if chosen.rank == 0 else (f"; no {' or '.join(_FUSION_KINDS[:chosen.rank])} file for "
                                        f"{chosen.variant} there")
    log.info("fusion model: %s (%s%s)%s", ", ".join(str(p) for p in chosen.paths), _FUSION_KINDS[chosen.rank], why,
             f"; also present, not used: {', '.join(c.label for c in others)}" if others else "")
    return chosen.paths, tried


def _given_fusion(fusion) -> tuple[list[Path], list[str]]:
    """(the paths of an explicit ``fusion=`` argument, what is wrong with them)."""
    paths = [Path(fusion)] if isinstance(fusion, (str, os.PathLike)) else [Path(p) for p in fusion]
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"fusion= takes one file or a video + audio pair, got {len(paths)} paths")
    problems = [f"{COMPONENT_WORDS['fusion']}: {p} (given) " + ("is not a file" if p.exists() else "does not exist")
                for p in paths if not p.is_file()]
    if len(paths) == 1 and not problems:
        from .detect import split_pair

        paths = split_pair(paths[0])  # one half of a split pack: its partner comes from beside it
    return paths, problems


def locate_components(root: Path, variant: str | None,
                      fusion: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> dict:
    """{component: path} under ``root`` for ``OviEngine``: "fusion" is a list of one path or a video + audio
    pair, "tokenizer" may be None (it can ride inside a ComfyUI text-encoder file). Raises
    ``MissingComponentError`` naming every path looked at."""
    found, missing = {}, []
    if fusion is not None:
        found["fusion"], missing = _given_fusion(fusion)
    bad_given = len(missing)
    if not root.is_dir():
        raise MissingComponentError("".join(f"{m}\n" for m in missing) + (
            f"models folder {root} does not exist. Download the files with `python -m ovi download --variant "
            f"{variant or '960x960_10s'} --dest {root}`."))
    if fusion is None:
        found["fusion"], tried = _find_fusion(root, variant)
        if found["fusion"] is None:
            missing.append(f"{COMPONENT_WORDS['fusion']} (bf16, FP8 or GGUF): looked for "
                           f"{', '.join(str(p) for p in tried)}; or give the file with fusion= (--fusion)")
    for key, rels in DIR_LAYOUT.items():
        hit = next((root / r for r in rels if (root / r).exists()), None)
        if hit is None and key != "tokenizer":  # the tokenizer may ride inside a ComfyUI text-encoder file
            missing.append(f"{COMPONENT_WORDS[key]}: looked for {', '.join(str(root / r) for r in rels)}")
        found[key] = hit
    if missing:
        # A given fusion file that is absent is a wrong path, which no download fixes.
        raise MissingComponentError(
            f"missing Ovi components under {root}:\n  " + "\n  ".join(missing) + ("" if len(missing) == bad_given
            else f"\nDownload them with `python -m ovi download --variant {variant or '<variant>'} --dest {root}`."))
    found["fusion"] = list(found["fusion"])
    return found
