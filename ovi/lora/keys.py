"""LoRA module names -> the fusion model's own parameter names.

A LoRA names each module it adapts by a *stem* (the key without ``.lora_up.weight``, ``.alpha``, ``.diff``...).
Trainers spell stems in several ways, all of which are accepted here:

- wrapper prefixes: ``diffusion_model.`` / ``model.diffusion_model.`` (ComfyUI, the original Wan trainers),
  ``transformer.`` (diffusers), ``base_model.model.`` (PEFT), none at all; and, with the module path's dots
  turned into underscores, ``lora_unet_`` (kohya, musubi-tuner, ComfyUI), ``lora_unet__`` (Wan Fun),
  ``lora_transformer_`` (OneTrainer), ``lycoris_`` (SimpleTuner);
- module names: Wan's own (``blocks.0.self_attn.q``, ``ffn.0``, ``head.head``), which Ovi's backbones share,
  or diffusers' ``WanTransformer3DModel`` names (``blocks.0.attn1.to_q``, ``ffn.net.0.proj``, ``proj_out``);
- a branch prefix: ``video_model.`` / ``audio_model.`` (an Ovi LoRA), or none (a Wan 2.2 LoRA, which adapts the
  video backbone).

Underscored names cannot be turned back into dotted ones by string replacement (``self_attn`` has an
underscore of its own), so every accepted spelling is generated from the model's real parameter names and
looked up, never parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

BRANCH_PREFIXES: dict[str, str] = {"video": "video_model.", "audio": "audio_model."}
# A LoRA without a branch prefix was trained on a plain Wan backbone, the shape of Ovi's video branch.
PLAIN_BRANCH = "video"

# Stripped before the lookup, longest first where one is the start of another.
DOTTED_WRAPPERS = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
UNDERSCORED_WRAPPERS = ("lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")

# diffusers' WanTransformer3DModel names for the modules of one block (keys: Wan/Ovi names relative to
# ``blocks.N.``). diffusers numbers the norms in call order, so Wan's cross-attention norm ``norm3`` is its
# ``norm2`` (Wan's ``norm2`` has no parameters, so the swap is unambiguous for a parameter).
DIFFUSERS_BLOCK_NAMES: dict[str, str] = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "norm3": "norm2",
    "modulation.modulation": "scale_shift_table",
}
# ... and for the modules outside the blocks.
DIFFUSERS_TOP_NAMES: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
# Name pieces only diffusers' spelling has: a file using any of them is read with the diffusers table.
_DIFFUSERS_MARKERS = ("attn1", "attn2", "ffn.net", "ffn_net", "condition_embedder", "proj_out", "scale_shift_table")

_BLOCK = re.compile(r"^(blocks\.\d+\.)(.+)$")
NAMINGS = ("wan", "diffusers")


@dataclass(frozen=True)
class ModuleTarget:
    """The parameters a LoRA module name can change: its weight (or the bare parameter it names, e.g. a
    modulation table) and its bias, as the fusion model's full parameter names (None where it has none)."""

    branch: str
    stem: str                 # backbone-relative Wan name, e.g. "blocks.0.self_attn.q"
    weight: str | None
    bias: str | None


@dataclass(frozen=True)
class KeyMatch:
    target: ModuleTarget
    plain: bool               # the LoRA's name had no branch prefix (a Wan LoRA on the video branch)


def diffusers_name(stem: str) -> str | None:
    """diffusers' spelling of a backbone-relative Wan module name, None where diffusers has none (the fusion
    layers, the audio patch embedding's inner layers)."""
    m = _BLOCK.match(stem)
    if m:
        rest = DIFFUSERS_BLOCK_NAMES.get(m.group(2))
        return m.group(1) + rest if rest else None
    return DIFFUSERS_TOP_NAMES.get(stem)


def _wan_spellings(stem: str) -> list[str]:
    out = [stem]
    if stem.endswith(".modulation.modulation"):  # Ovi nests the block table one level deeper than Wan
        out.append(stem[: -len(".modulation")])
    return out


def detect_naming(stems: Iterable[str]) -> str:
    """"diffusers" when any stem uses a name only diffusers has, else "wan"."""
    return "diffusers" if any(m in s for s in stems for m in _DIFFUSERS_MARKERS) else "wan"


def underscored(name: str) -> str:
    return name.replace(".", "_")


class KeyTable:
    """Every accepted spelling of every module of a fusion model (one naming family), from its parameter names."""

    def __init__(self, param_names: Iterable[str], naming: str = "wan"):
        if naming not in NAMINGS:
            raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
        self.naming = naming
        parts: dict[tuple[str, str], dict[str, str]] = {}
        for name in param_names:
            branch = next((b for b, p in BRANCH_PREFIXES.items() if name.startswith(p)), None)
            if branch is None:
                continue
            rel = name[len(BRANCH_PREFIXES[branch]):]
            if rel.endswith(".weight"):
                stem, role = rel[: -len(".weight")], "weight"
            elif rel.endswith(".bias"):
                stem, role = rel[: -len(".bias")], "bias"
            else:
                stem, role = rel, "weight"
            parts.setdefault((branch, stem), {})[role] = name
        self._aliases: dict[str, KeyMatch] = {}
        self._ambiguous: set[str] = set()
        for (branch, stem), roles in parts.items():
            target = ModuleTarget(branch, stem, roles.get("weight"), roles.get("bias"))
            if naming == "wan":
                spellings = _wan_spellings(stem)
            else:
                d = diffusers_name(stem)
                spellings = [d] if d else []
            for s in spellings:
                self._add(BRANCH_PREFIXES[branch] + s, KeyMatch(target, plain=False))
                if branch == PLAIN_BRANCH:
                    self._add(s, KeyMatch(target, plain=True))

    def _add(self, alias: str, match: KeyMatch) -> None:
        for a in (alias, underscored(alias)):
            if a in self._aliases and self._aliases[a].target != match.target:
                self._ambiguous.add(a)
            self._aliases.setdefault(a, match)

    def lookup(self, stem: str) -> KeyMatch | None:
        """The module a LoRA stem names (wrappers stripped), None if it names nothing in this model."""
        for candidate in unwrapped(stem):
            if candidate in self._ambiguous:
                return None
            hit = self._aliases.get(candidate)
            if hit is not None:
                return hit
        return None


def unwrapped(stem: str) -> list[str]:
    """``stem`` and what is left of it after each wrapper prefix is stripped, outermost first."""
    out = [stem]
    changed = True
    while changed:
        changed = False
        for w in DOTTED_WRAPPERS + UNDERSCORED_WRAPPERS:
            if out[-1].startswith(w):
                out.append(out[-1][len(w):])
                changed = True
                break
    return out


def wrapper_of(stems: Iterable[str]) -> str:
    """The wrapper prefix most stems carry ("" for none), for describing a file's convention."""
    counts: dict[str, int] = {}
    for s in stems:
        w = next((w for w in DOTTED_WRAPPERS + UNDERSCORED_WRAPPERS if s.startswith(w)), "")
        counts[w] = counts.get(w, 0) + 1
    return max(counts, key=counts.get) if counts else ""


def param_names_of(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    return [k for k in shapes if k.startswith(tuple(BRANCH_PREFIXES.values()))]
