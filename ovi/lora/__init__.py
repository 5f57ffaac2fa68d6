"""LoRAs on the fused Ovi model: read a file (``read_lora``), match it against the model (``match_lora``), then
merge it into the weights (``apply_merged``), run it beside quantised layers (``apply_side_path``), or each
tensor as its format takes it best (``apply_by_format``); each apply returns a ``LoraRestore`` that takes it
off again bit-exactly. ``EngineLoras`` (``engine_loras.py``) is the engine's stack of them.

    plan = load_lora(path, lora_target_shapes(model))
    handle = apply_merged(model, [plan], [LoraStrength(video=0.8, audio=1.0)])
    ...
    handle.restore()
"""

from __future__ import annotations

import os
from typing import Mapping

from .apply import (FP8_DEFAULT, FP8_MODES, LoraRestore, LoraSidePath, LoraStrength, apply_by_format, apply_merged,
                    apply_side_path, lora_target_shapes)
from .errors import LoraError
from .file import LoraFile, LoraModule, LowRank, read_lora
from .plan import Diff, LoraPlan, PlannedPatch, match_lora

__all__ = ["FP8_DEFAULT", "FP8_MODES", "Diff", "LoraError", "LoraFile", "LoraModule", "LoraPlan", "LoraRestore",
           "LoraSidePath", "LoraStrength", "LowRank", "PlannedPatch", "apply_by_format", "apply_merged",
           "apply_side_path", "load_lora", "lora_target_shapes", "match_lora", "read_lora"]


def load_lora(path: str | os.PathLike, model_param_shapes: Mapping[str, tuple[int, ...]]) -> LoraPlan:
    """``match_lora(read_lora(path), model_param_shapes)``."""
    return match_lora(read_lora(path), model_param_shapes)
