"""Reading a LoRA file: its tensors grouped per module into low-rank pairs and full deltas.

Tensor roles by key suffix (after the module's stem):
- ``.lora_down.weight`` / ``.lora_up.weight`` (kohya, musubi-tuner, ComfyUI, the original Wan trainers) or
  ``.lora_A.weight`` / ``.lora_B.weight`` (PEFT, diffusers; also with PEFT's ``.default`` adapter name): the pair
  ``down`` [rank, in] and ``up`` [out, rank], ``delta = up @ down`` (convolutions: ``down`` [rank, in, *kernel],
  ``up`` [out, rank, 1, ...]);
- ``.alpha``: the pair's scale is ``alpha / rank``; without one it is 1 (PEFT and diffusers files fold it in);
- ``.diff`` (and LyCORIS' ``.w_norm``): a full delta of the weight, or of the bare parameter the stem names (norm
  gains, modulation tables); ``.diff_b`` (``.b_norm``, diffusers' ``.lora_B.bias``): a full delta of the bias.
Other adapter kinds (LoHa, LoKr, DoRA, Tucker mid factors, weight replacement) are refused with their name
rather than half-applied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..loading import CheckpointReader
from .errors import LoraError
from .keys import detect_naming, wrapper_of

# suffix -> role, longest first so ".lora_B.bias" is not read as a bare ".bias"
_ROLES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_B.bias", "diff_b"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"), (".w_norm", "diff"), (".b_norm", "diff_b"),
)
# key pieces of adapter kinds this package does not apply -> what they are, for the error
_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (".hada_", "LoHa (LyCORIS Hadamard product)"), (".lokr_", "LoKr (LyCORIS Kronecker product)"),
    (".dora_scale", "DoRA (weight-decomposed LoRA)"), (".lora_mid.", "LoCon with Tucker decomposition"),
    (".set_weight", "weight replacement"),
)


@dataclass(frozen=True)
class LowRank:
    """One low-rank pair: ``delta = scale * up @ down`` with ``scale = alpha / rank`` (1 without an alpha)."""

    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), int(self.down.shape[1]), *(int(d) for d in self.down.shape[2:]))

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``scale * up @ down`` in float32 on ``device``, in the weight's shape (convolution kernels included)."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down).mul_(self.scale).reshape(self.delta_shape)


@dataclass(frozen=True)
class LoraModule:
    """Everything a file holds for one module name (stem)."""

    stem: str
    low_rank: LowRank | None = None
    diff: torch.Tensor | None = None      # delta of the weight, or of the bare parameter the stem names
    diff_b: torch.Tensor | None = None    # delta of the bias


@dataclass(frozen=True)
class LoraFile:
    path: Path
    modules: dict[str, LoraModule]
    convention: str                          # e.g. "kohya/musubi (lora_unet_, lora_down/lora_up), wan names"
    naming: str                              # "wan" | "diffusers"
    unrecognised: tuple[str, ...] = ()       # keys with no role this package knows
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({m.low_rank.rank for m in self.modules.values() if m.low_rank is not None}))


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _ROLES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def _describe(stems: list[str], pair_names: set[str], has_diffs: bool, naming: str) -> str:
    wrapper = wrapper_of(stems)
    if wrapper.startswith("lora_unet") or wrapper == "lycoris_" or wrapper == "lora_transformer_":
        kind = "kohya/musubi"
    elif "lora_A/lora_B" in pair_names:
        kind = "PEFT"
    elif "lora_down/lora_up" in pair_names:
        kind = "ComfyUI/Wan"
    else:
        kind = "full deltas"
    pieces = [f"prefix {wrapper!r}" if wrapper else "no prefix"]
    if pair_names:
        pieces.append("/".join(sorted(pair_names)))
    if has_diffs and pair_names:
        pieces.append("with full deltas")
    return f"{kind} ({', '.join(pieces)}), {naming} names"


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file (safetensors, or a plain torch state dict) through the validated checkpoint reader.

    Raises ``CheckpointError`` for an unreadable file and ``LoraError`` for one that is not a usable LoRA
    (no LoRA tensors, a pair missing its other half, mismatched ranks, an adapter kind not supported)."""
    path = Path(path)
    with CheckpointReader(path) as reader:
        tensors = {k: reader.get(k) for k in reader.keys()}
        metadata = dict(reader.metadata)
    for piece, what in _UNSUPPORTED:
        hit = next((k for k in tensors if piece in k), None)
        if hit is not None:
            raise LoraError(path, f"this LoRA uses {what} ({hit}), which is not supported; only plain low-rank "
                                  "pairs (lora_down/lora_up, lora_A/lora_B) and full deltas (.diff, .diff_b) are. "
                                  "Convert it to a plain LoRA, or use one saved in that form.")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unrecognised: list[str] = []
    pair_names: set[str] = set()
    for key, t in tensors.items():
        split = _split(key)
        if split is None:
            unrecognised.append(key)
            continue
        stem, role = split
        grouped.setdefault(stem, {})[role] = t
        if role in ("up", "down"):
            pair_names.add("lora_A/lora_B" if ".lora_A" in key or ".lora_B" in key else "lora_down/lora_up")
    if not any(set(g) - {"alpha"} for g in grouped.values()):
        first = ", ".join(list(tensors)[:3]) or "no tensors"
        raise LoraError(path, f"not a LoRA: no low-rank pairs or deltas among its {len(tensors)} tensors (first: "
                              f"{first}). Likely cause: a full model or another kind of file was given as a LoRA.")
    modules: dict[str, LoraModule] = {}
    for stem, roles in grouped.items():
        if ("up" in roles) != ("down" in roles):
            have, lack = ("up", "down") if "up" in roles else ("down", "up")
            raise LoraError(path, f"{stem} has a {have} matrix but no {lack} matrix: the file is incomplete or "
                                  "damaged. Fetch or save it again.")
        if set(roles) == {"alpha"}:
            unrecognised.append(f"{stem}.alpha")
            continue
        low_rank = None
        if "up" in roles:
            up, down = roles["up"], roles["down"]
            if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0] or any(d != 1 for d in up.shape[2:]):
                raise LoraError(path, f"{stem}: up {list(up.shape)} and down {list(down.shape)} do not form a "
                                      "low-rank pair (rank mismatch); the file is damaged or not a LoRA.")
            alpha = float(roles["alpha"].float().item()) if "alpha" in roles else None
            low_rank = LowRank(up=up, down=down, alpha=alpha)
        modules[stem] = LoraModule(stem, low_rank, roles.get("diff"), roles.get("diff_b"))
    stems = list(modules)
    naming = detect_naming(stems)
    has_diffs = any(m.diff is not None or m.diff_b is not None for m in modules.values())
    return LoraFile(path=path, modules=modules, convention=_describe(stems, pair_names, has_diffs, naming),
                    naming=naming, unrecognised=tuple(unrecognised), metadata=metadata)
