"""Matching a read LoRA against a fusion model: which parameter each of its tensors changes, checked for shape.

The result (``LoraPlan``) is keyed by the fusion model's own parameter names, so applying it needs no more
name handling. Strict by design: a LoRA none of whose modules exist on Ovi, or whose shapes do not fit (a
Wan 14B LoRA, width 5120, on Ovi's 5B-sized backbones, width 3072), is a ``LoraError``; a LoRA of which only
part matches is applied and the rest is logged with counts, never dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..log import log
from .errors import LoraError
from .file import LoraFile, LowRank
from .keys import BRANCH_PREFIXES, PLAIN_BRANCH, KeyTable, param_names_of

# Backbone widths of the Wan family, to name the model a LoRA that does not fit was trained for.
KNOWN_WIDTHS = {1536: "Wan 2.1 1.3B", 3072: "Wan 2.2 TI2V-5B / Ovi", 5120: "Wan 2.1 / 2.2 14B"}
# Key pieces of other model families, for the likely cause of a LoRA that matches nothing.
_FOREIGN: tuple[tuple[tuple[str, ...], str], ...] = (
    (("down_blocks", "up_blocks", "input_blocks", "output_blocks", "mid_block"),
     "a UNet LoRA (Stable Diffusion 1.x/2.x/SDXL)"),
    (("double_blocks", "single_blocks", "transformer_blocks", "single_transformer_blocks"),
     "a LoRA for another DiT family (Flux, HunyuanVideo, Qwen-Image, LTX-Video...)"),
    (("lora_te", "text_encoder", "text_model", "encoder.block"), "a text-encoder LoRA"),
    (("k_img", "v_img", "img_emb"), "a Wan image-to-video (I2V 14B) LoRA, for layers Ovi does not have"),
)
_BLOCK_INDEX = re.compile(r"blocks[._](\d+)[._]")


@dataclass(frozen=True)
class Diff:
    """A full delta of one parameter."""

    tensor: torch.Tensor

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """A float32 copy on ``device`` (always a copy: callers scale it in place)."""
        return self.tensor.to(device=device, dtype=torch.float32, copy=True)


Patch = LowRank | Diff


@dataclass(frozen=True)
class PlannedPatch:
    param: str       # the fusion model's parameter name, e.g. "video_model.blocks.0.self_attn.q.weight"
    branch: str      # "video" | "audio"
    patch: Patch
    source: str      # the LoRA stem it came from


@dataclass(frozen=True)
class LoraPlan:
    path: Path
    convention: str
    patches: tuple[PlannedPatch, ...]
    modules: int                     # modules in the file
    matched: int                     # of them, how many matched the model
    unmatched: tuple[str, ...]       # stems (and unrecognised keys) that matched nothing
    plain_wan: bool                  # no branch prefix anywhere: a Wan 2.2 LoRA, on the video branch only

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def branches(self) -> frozenset[str]:
        return frozenset(p.branch for p in self.patches)

    def params(self) -> set[str]:
        return {p.param for p in self.patches}


def _width_hint(shapes: list[tuple[int, ...]]) -> str:
    for shape in shapes:
        for d in shape:
            if d in KNOWN_WIDTHS and d != 3072:
                return (f"a LoRA for {KNOWN_WIDTHS[d]} (width {d}); Ovi's backbones are Wan 2.2 TI2V-5B-sized "
                        "(width 3072), so only Wan 2.2 5B or Ovi LoRAs fit.")
    return "a LoRA trained for a different model size or architecture than this Ovi model."


def _no_match_hint(stems: list[str], num_layers: int | None) -> str:
    for pieces, what in _FOREIGN:
        if any(p in s for s in stems for p in pieces):
            return f"this looks like {what}, not a Wan 2.2 5B or Ovi LoRA."
    if num_layers is not None:
        deep = [int(m.group(1)) for s in stems for m in [_BLOCK_INDEX.search(s)] if m]
        if deep and min(deep) >= num_layers:
            return f"its blocks start at {min(deep)}, past this model's {num_layers} layers: a deeper model's LoRA."
    return "a LoRA for a different model architecture, or a naming convention this loader does not know."


def _num_layers(names: list[str]) -> int | None:
    idx = [int(m.group(1)) for n in names for m in [re.match(r"video_model\.blocks\.(\d+)\.", n)] if m]
    return max(idx) + 1 if idx else None


def match_lora(lora: LoraFile, model_param_shapes: Mapping[str, tuple[int, ...]]) -> LoraPlan:
    """Map every module of ``lora`` onto the fusion model whose (logical) parameter shapes are given
    (``lora_target_shapes(model)``, or ``{k: v.shape for k, v in model.state_dict().items()}`` for a plain
    model). Raises ``LoraError`` when nothing matches or any matched tensor does not fit its parameter."""
    names = param_names_of(model_param_shapes)
    table = KeyTable(names, lora.naming)
    patches: list[PlannedPatch] = []
    unmatched: list[str] = []
    misfits: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = []
    matched = 0
    any_prefixed = False

    def plan(param: str | None, branch: str, patch: Patch, stem: str, want: str) -> bool:
        if param is None:
            unmatched.append(f"{stem} ({want}: the module has none)")
            return False
        got = patch.delta_shape if isinstance(patch, LowRank) else tuple(patch.tensor.shape)
        have = tuple(int(d) for d in model_param_shapes[param])
        if got != have:
            misfits.append((stem, param, got, have))
            return False
        patches.append(PlannedPatch(param, branch, patch, stem))
        return True

    for stem, module in lora.modules.items():
        hit = table.lookup(stem)
        if hit is None:
            unmatched.append(stem)
            continue
        t = hit.target
        any_prefixed |= not hit.plain
        ok = False
        if module.low_rank is not None:
            ok |= plan(t.weight, t.branch, module.low_rank, stem, "weight")
        if module.diff is not None:
            ok |= plan(t.weight, t.branch, Diff(module.diff), stem, "weight")
        if module.diff_b is not None:
            ok |= plan(t.bias, t.branch, Diff(module.diff_b), stem, "bias")
        matched += ok
    unmatched.extend(lora.unrecognised)
    total = len(lora.modules)
    if misfits:
        stem, param, got, have = misfits[0]
        raise LoraError(lora.path, f"{len(misfits)} of the LoRA's tensors do not fit the model (first: {stem} "
                                   f"changes a {list(got)} tensor, the model's {param} is {list(have)}). Likely "
                                   f"cause: {_width_hint([got])}")
    if not patches:
        stems = list(lora.modules) + list(lora.unrecognised)
        raise LoraError(lora.path, f"none of the LoRA's {total} modules matches a parameter of the Ovi fusion model "
                                   f"(0 matched; first keys: {', '.join(stems[:3])}). Likely cause: "
                                   f"{_no_match_hint(stems, _num_layers(names))}")
    if unmatched:
        log.warning("LoRA %s: %d of %d modules matched the fusion model, %d entries did not and are not applied "
                    "(first: %s)", lora.name, matched, total, len(unmatched), ", ".join(unmatched[:3]))
    plain = not any_prefixed
    counts = {b: sum(1 for p in patches if p.branch == b) for b in BRANCH_PREFIXES}
    log.info("LoRA %s: %s, rank %s; %d video and %d audio parameters%s", lora.name, lora.convention,
             "/".join(map(str, lora.ranks)) or "-", counts["video"], counts["audio"],
             f" (a Wan LoRA without branch prefix: {PLAIN_BRANCH} branch only)" if plain else "")
    return LoraPlan(path=lora.path, convention=lora.convention, patches=tuple(patches), modules=total,
                    matched=matched, unmatched=tuple(unmatched), plain_wan=plain)
