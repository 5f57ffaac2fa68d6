"""Putting matched LoRAs on a loaded fusion model, and taking them off again bit-exactly.

Two ways, both returning a ``LoraRestore`` handle:

- ``apply_merged``: ``W += strength * scale * up @ down`` (and full deltas), computed in float32 on the weight's
  device and rounded once to the weight's dtype, however many LoRAs touch it. The original of every touched
  tensor is kept on the CPU and copied back by ``restore``, so the model is bit-exact afterwards whatever its
  dtype. No cost per step; needs plain float weights (not FP8 / GGUF).
- ``apply_side_path``: every adapted linear layer (``nn.Linear``, ``FP8Linear``, ``GGUFLinear``) gets a
  forward hook adding ``strength * scale * (x @ down.T) @ up.T``; the pairs of all LoRAs on one layer are
  stacked along the rank, so one call costs two thin matmuls per layer. Quantised weights stay as they are.
  Full deltas on quantised weights run as a dense side term; tensors that are not linear weights (norm
  gains, biases, modulation tables, convolutions) are merged in place as above, being plain floats in every
  format. ``restore`` removes the hooks and copies those originals back.

A handle's tensors live on the device of the layer they belong to; the side path moves them to the input's
device and dtype when those differ (after a later ``.to()``, or under block swap). Apply and restore while no
block swapper is attached, and restore handles in the reverse order of application.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import is_compute_float
from ..log import log
from ..quant.fp8 import FP8Linear
from ..quant.gguf_load import GGUFLinear
from .errors import LoraError
from .file import LowRank
from .plan import Diff, LoraPlan

LINEAR_KINDS = (nn.Linear, FP8Linear, GGUFLinear)
_ACTIVE_ATTR = "_ovi_lora_handles"  # on the model: the handles applied and not yet restored, oldest first


@dataclass(frozen=True)
class LoraStrength:
    """Per-branch strength of one LoRA. A Wan LoRA (no branch prefix) only has a video strength."""

    video: float = 1.0
    audio: float = 1.0

    def of(self, branch: str) -> float:
        return self.video if branch == "video" else self.audio


def lora_target_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The logical shape of every parameter and buffer a LoRA may change, for ``match_lora``: a GGUF weight is
    its [out, in], not the shape of its packed bytes."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    for name, m in model.named_modules():
        if isinstance(m, GGUFLinear):
            shapes[f"{name}.weight"] = (m.out_features, m.in_features)
    return shapes


def _resolve(model: nn.Module, param: str) -> tuple[nn.Module, str, torch.Tensor]:
    owner_name, _, leaf = param.rpartition(".")
    owner = model.get_submodule(owner_name)
    t = owner._parameters.get(leaf)
    if t is None:
        t = owner._buffers.get(leaf)
    if t is None:
        raise KeyError(param)
    return owner, leaf, t


Weighted = list[tuple[float, LowRank | Diff, Path]]  # (strength, patch, the LoRA file) per patch of one tensor


def _weighted(plans: Sequence[LoraPlan], strengths: Sequence[LoraStrength] | None
              ) -> tuple[dict[str, Weighted], list[tuple[str, LoraStrength]]]:
    """{param: [(strength, patch, path), ...]} in plan order, zero strengths left out; (name, strength) per plan."""
    strengths = list(strengths) if strengths is not None else [LoraStrength()] * len(plans)
    if len(strengths) != len(plans):
        raise ValueError(f"{len(plans)} LoRAs but {len(strengths)} strengths")
    out: dict[str, Weighted] = {}
    for plan, s in zip(plans, strengths):
        if plan.plain_wan and s.audio != s.video:
            log.info("LoRA %s is a Wan LoRA for the video branch only; its audio strength %.2f is not used",
                     plan.name, s.audio)
        for p in plan.patches:
            w = s.of(p.branch)
            if w != 0.0:
                out.setdefault(p.param, []).append((w, p.patch, plan.path))
    return out, [(plan.name, s) for plan, s in zip(plans, strengths)]


class LoraRestore:
    """Undoes one ``apply_merged`` / ``apply_side_path`` call. ``restore`` is idempotent."""

    def __init__(self, model: nn.Module, mode: str, applied: list[tuple[str, LoraStrength]]):
        self.model = model
        self.mode = mode
        self.applied = tuple(applied)
        self._originals: dict[str, torch.Tensor] = {}   # param -> CPU copy of the tensor before this call
        self._hooks: list = []
        self._side_paths: list[tuple[nn.Module, str]] = []
        self.active = True

    @property
    def touched(self) -> int:
        """Tensors merged plus layers given a side path."""
        return len(self._originals) + len(self._side_paths)

    def _merge(self, param: str, items: Weighted, why: str) -> None:
        owner, leaf, t = _resolve(self.model, param)
        if t.device.type == "meta" or not is_compute_float(t.dtype) or (
                leaf == "weight" and isinstance(owner, (FP8Linear, GGUFLinear))):
            dtype = str(t.dtype).removeprefix("torch.")
            raise LoraError(items[0][2], f"cannot merge a LoRA into {param} ({dtype} on {t.device.type}): {why}")
        if param not in self._originals:
            self._originals[param] = t.detach().to("cpu", copy=True)
        total = None
        for w, patch, _ in items:
            d = patch.delta(t.device).mul_(w)
            total = d if total is None else total.add_(d)
        with torch.no_grad():
            t.copy_((t.detach().to(torch.float32) + total).to(t.dtype))

    def restore(self) -> None:
        if not self.active:
            return
        stack = getattr(self.model, _ACTIVE_ATTR, [])
        if stack and stack[-1] is not self:
            raise RuntimeError("LoRA handles must be restored in the reverse order of application")
        for h in self._hooks:
            h.remove()
        for owner, child in self._side_paths:
            delattr(owner, child)
        with torch.no_grad():
            for param, original in self._originals.items():
                _resolve(self.model, param)[2].copy_(original)
        self._hooks.clear()
        self._side_paths.clear()
        self._originals.clear()
        if stack:
            stack.pop()
        self.active = False
        log.info("LoRAs removed (%s): %s", self.mode, ", ".join(n for n, _ in self.applied))

    def _register(self) -> None:
        if not hasattr(self.model, _ACTIVE_ATTR):
            setattr(self.model, _ACTIVE_ATTR, [])
        getattr(self.model, _ACTIVE_ATTR).append(self)


def apply_merged(model: nn.Module, plans: Sequence[LoraPlan],
                 strengths: Sequence[LoraStrength] | None = None) -> LoraRestore:
    """Merge ``plans`` (in order, each at its per-branch strength) into the model's weights."""
    grouped, applied = _weighted(plans, strengths)
    handle = LoraRestore(model, "merged", applied)
    handle._register()
    try:
        for param, items in grouped.items():
            handle._merge(param, items, "merging needs plain float weights; use the side path for FP8 or GGUF "
                                        "models.")
    except BaseException:
        handle.restore()
        raise
    _log_applied(handle)
    return handle


class LoraSidePath(nn.Module):
    """The low-rank (and dense) terms one hooked linear layer adds to its output. Non-persistent buffers:
    they follow ``.to()`` but stay out of the state dict."""

    def __init__(self, down: torch.Tensor | None, up: torch.Tensor | None, dense: torch.Tensor | None):
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("dense", dense, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        if self.down is not None:
            out = F.linear(F.linear(x, self.down.to(x)), self.up.to(x))
        if self.dense is not None:
            d = F.linear(x, self.dense.to(x))
            out = d if out is None else out + d
        return out


def _add_side_path(module: nn.Module, args, output: torch.Tensor, *, child: str) -> torch.Tensor:
    return output + getattr(module, child)(args[0])


def _compute_dtype(model: nn.Module, weight: torch.Tensor) -> torch.dtype:
    """The dtype a layer's input arrives in: its weight's for a float layer, else the model's compute dtype."""
    if is_compute_float(weight.dtype):
        return weight.dtype
    return getattr(model, "compute_dtype", None) or torch.bfloat16


def apply_side_path(model: nn.Module, plans: Sequence[LoraPlan], strengths: Sequence[LoraStrength] | None = None,
                    *, dtype: torch.dtype | None = None) -> LoraRestore:
    """Add ``plans`` as side paths on the linear layers they adapt (merging what is not a linear weight).
    ``dtype``: what the side-path tensors are kept in (default: the layer's compute dtype)."""
    grouped, applied = _weighted(plans, strengths)
    handle = LoraRestore(model, "side path", applied)
    handle._register()
    try:
        for param, items in grouped.items():
            owner, leaf, t = _resolve(model, param)
            if not (leaf == "weight" and isinstance(owner, LINEAR_KINDS)):
                handle._merge(param, items, "only linear weights can take a side path, and this tensor is not a "
                                            "plain float one.")
                continue
            low = [(w, p) for w, p, _ in items if isinstance(p, LowRank)]
            dense_items = [(w, p, path) for w, p, path in items if isinstance(p, Diff)]
            if dense_items and isinstance(owner, nn.Linear) and is_compute_float(t.dtype):
                handle._merge(param, dense_items, "")  # a plain float weight takes a full delta exactly
                dense_items = []
            if not low and not dense_items:
                continue
            if t.device.type == "meta":
                raise LoraError(items[0][2], f"cannot add a side path to {param}: the layer is not loaded "
                                             "(meta device)")
            device, store = t.device, dtype or _compute_dtype(model, t)
            down = up = dense = None
            if low:
                down = torch.cat([p.down.to(device=device, dtype=torch.float32) for _, p in low]).to(store)
                up = torch.cat([p.up.to(device=device, dtype=torch.float32).flatten(1) * (w * p.scale)
                                for w, p in low], dim=1).to(store)
            if dense_items:
                dense = sum(p.delta(device) * w for w, p, _ in dense_items).to(store)
            child = f"lora_side_path_{id(handle):x}"
            owner.add_module(child, LoraSidePath(down, up, dense))
            handle._side_paths.append((owner, child))
            handle._hooks.append(owner.register_forward_hook(functools.partial(_add_side_path, child=child)))
    except BaseException:
        handle.restore()
        raise
    _log_applied(handle)
    return handle


def _log_applied(handle: LoraRestore) -> None:
    log.info("LoRAs applied (%s, %d tensors/layers): %s", handle.mode, handle.touched,
             ", ".join(f"{n} (video {s.video:g}, audio {s.audio:g})" for n, s in handle.applied))
