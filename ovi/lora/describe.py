"""What a LoRA file is, without a model: its key convention, ranks and alphas, module count, the branch it targets
and the backbone width it was trained for (``python -m ovi info``)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .file import read_lora
from .keys import BRANCH_PREFIXES, PLAIN_BRANCH, underscored, unwrapped
from .plan import KNOWN_WIDTHS

OVI_WIDTH = 3072  # Ovi's two backbones are Wan 2.2 TI2V-5B-sized


@dataclass(frozen=True)
class LoraSummary:
    path: Path
    convention: str
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]     # the distinct alphas stored (empty: none, the scale is 1)
    modules: int
    low_rank_modules: int
    delta_modules: int            # modules with full deltas (.diff / .diff_b)
    branches: tuple[str, ...]     # "video" / "audio" named by prefix, or (PLAIN_BRANCH,) for a Wan LoRA
    plain_wan: bool               # no branch prefix: a Wan LoRA, on the video branch only
    width: int | None             # the input width most pairs have: the backbone width trained for
    unrecognised: int

    @property
    def targets(self) -> str:
        if self.plain_wan:
            return (f"{PLAIN_BRANCH} branch only (a Wan LoRA: no video_model./audio_model. prefix; its audio strength "
                    "is not used)")
        return " and ".join(self.branches) + " branch" + ("es" if len(self.branches) > 1 else "") + \
            " (an Ovi LoRA: keys under " + ", ".join(BRANCH_PREFIXES[b] for b in self.branches) + ")"

    @property
    def fits(self) -> str:
        if self.width is None:
            return "unknown (no low-rank pairs)"
        family = KNOWN_WIDTHS.get(self.width, "an unknown model")
        verdict = "fits Ovi's backbones" if self.width == OVI_WIDTH else f"does not fit Ovi (width {OVI_WIDTH})"
        return f"width {self.width}, {family}: {verdict}"


def _branch(stem: str) -> str | None:
    for candidate in unwrapped(stem):
        for branch, prefix in BRANCH_PREFIXES.items():
            if candidate.startswith((prefix, underscored(prefix))):
                return branch
    return None


def summarize_lora(path: str | os.PathLike) -> LoraSummary:
    """Read ``path`` (``read_lora``: a ``LoraError`` for a file that is no usable LoRA) and summarise it."""
    lora = read_lora(path)
    named = {b for b in (_branch(s) for s in lora.modules) if b is not None}
    pairs = [m.low_rank for m in lora.modules.values() if m.low_rank is not None]
    widths = Counter(int(p.down.shape[1]) for p in pairs)
    return LoraSummary(
        path=lora.path, convention=lora.convention, ranks=lora.ranks,
        alphas=tuple(sorted({p.alpha for p in pairs if p.alpha is not None})), modules=len(lora.modules),
        low_rank_modules=len(pairs),
        delta_modules=sum(1 for m in lora.modules.values() if m.diff is not None or m.diff_b is not None),
        branches=tuple(b for b in BRANCH_PREFIXES if b in named) or (PLAIN_BRANCH,), plain_wan=not named,
        width=widths.most_common(1)[0][0] if widths else None, unrecognised=len(lora.unrecognised))


def lora_info_rows(summary: LoraSummary) -> list[tuple[str, str]]:
    """(label, value) rows for ``ovi info``."""
    s = summary
    rows = [("convention", s.convention), ("rank", "/".join(map(str, s.ranks)) or "-"),
            ("alpha", "/".join(f"{a:g}" for a in s.alphas) + (" (scale alpha/rank)" if s.alphas else "")
             if s.alphas else "none stored (scale 1)"),
            ("modules", f"{s.modules} ({s.low_rank_modules} low-rank pairs, {s.delta_modules} with full deltas"
                        + (f"; {s.unrecognised} keys not understood" if s.unrecognised else "") + ")"),
            ("targets", s.targets), ("trained for", s.fits)]
    return rows
