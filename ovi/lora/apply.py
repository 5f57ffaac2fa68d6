"""Putting matched LoRAs on a loaded fusion model, and taking them off again bit-exactly.

Three ways, all returning a ``LoraRestore`` handle:

- ``apply_merged``: ``W += strength * scale * up @ down`` (and full deltas), computed in float32 on the weight's
  device and rounded once to the weight's dtype, however many LoRAs touch it. The original of every touched
  tensor is kept on the CPU and copied back by ``restore``, so the model is bit-exact afterwards whatever its
  dtype. No cost per step; needs plain float weights (not FP8 / GGUF / int8).
- ``apply_side_path``: every adapted linear layer (``nn.Linear``, ``FP8Linear``, ``GGUFLinear``, ``Int8Linear``)
  gets a forward hook adding ``strength * scale * (x @ down.T) @ up.T``; the pairs of all LoRAs on one layer are
  stacked along the rank, so one call costs two thin matmuls per layer. Quantised weights stay as they are.
  Full deltas on quantised weights run as a dense side term; tensors that are not linear weights (norm
  gains, biases, modulation tables, convolutions) are merged in place as above, being plain floats in every
  format. ``restore`` removes the hooks and copies those originals back.
- ``apply_by_format``: each tensor the way its format takes a LoRA best (what the engine uses): plain floats
  merged; FP8 linears given a side path (``fp8="side"``, the default, see ``FP8_DEFAULT``) or merged in float32
  and re-quantised (``fp8="merge"``); GGUF and int8 linears a side path on the dequantised layer, never
  re-quantised.

``keep_originals=False`` skips the CPU copies of the originals, for a model that is thrown away afterwards (a
device copy of a host copy): such a handle cannot ``restore``, only ``discard``.

A handle's tensors live on the device of the layer they belong to; the side path moves them to the input's
device and dtype when those differ (after a later ``.to()``, or under block swap). Apply and restore while no
block swapper is attached, and restore handles in the reverse order of application.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import is_compute_float
from ..log import log
from ..quant.fp8 import FP8Linear, quantise_fp8
from ..quant.int8 import Int8Linear
from .errors import LoraError
from .file import LowRank
from .plan import Diff, LoraPlan

# The GGUF layer's module needs the optional gguf package, so it is never imported here: a GGUFLinear can only
# exist once a GGUF loader has imported that module, and until then no layer is one.
_GGUF_MODULE = __name__.rsplit(".", 2)[0] + ".quant.gguf_load"


class _NoGGUF:  # stands in for GGUFLinear in isinstance checks while no GGUF model was loaded
    pass


def _gguf_linear() -> type:
    module = sys.modules.get(_GGUF_MODULE)
    return _NoGGUF if module is None else module.GGUFLinear


def quantised_kinds() -> tuple[type, ...]:
    """Linears whose weight is not a plain float tensor."""
    return (FP8Linear, _gguf_linear(), Int8Linear)


def linear_kinds() -> tuple[type, ...]:
    return (nn.Linear,) + quantised_kinds()
# How an FP8 linear takes a LoRA: "side" (a low-rank side path beside the FP8 weight) or "merge" (dequantised to
# float32, merged, re-quantised with a fresh scale of the layer's granularity). "side" is the default: its output
# carries only the FP8 rounding the layer had already (2.63 % on a full-size layer against float32 W + delta,
# the FP8 layer alone 2.65 %), where re-quantising the merged weight rounds a second time (3.73 %); its cost is
# two thin matmuls per adapted layer (rank x (in + out) against in x out multiply-adds: 8 % for a 3072 x 3072
# linear at rank 128). benchmarks/README.md "LoRA on FP8" has the figures.
FP8_MODES = ("side", "merge")
FP8_DEFAULT = "side"
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
        if isinstance(m, _gguf_linear()):
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


def weighted(plans: Sequence[LoraPlan], strengths: Sequence[LoraStrength] | None
             ) -> tuple[dict[str, Weighted], list[tuple[str, LoraStrength]]]:
    """{param: [(strength, patch, path), ...]} in plan order, zero strengths left out; (name, strength) per plan."""
    strengths = list(strengths) if strengths is not None else [LoraStrength()] * len(plans)
    if len(strengths) != len(plans):
        raise ValueError(f"{len(plans)} LoRAs but {len(strengths)} strengths")
    out: dict[str, Weighted] = {}
    for plan, s in zip(plans, strengths):
        if plan.plain_wan and s.audio not in (0.0, s.video):  # 0: the user asked for none (the FastWan preset)
            log.info("LoRA %s is a Wan LoRA for the video branch only; its audio strength %.2f is not used",
                     plan.name, s.audio)
        for p in plan.patches:
            w = s.of(p.branch)
            if w != 0.0:
                out.setdefault(p.param, []).append((w, p.patch, plan.path))
    return out, [(plan.name, s) for plan, s in zip(plans, strengths)]


def branch_of(param: str) -> str:
    return "audio" if param.startswith("audio_model.") else "video"


def summed_delta(items: Weighted, device: torch.device) -> torch.Tensor:
    """``sum(strength * delta)`` of one tensor's patches in float32 on ``device``, added in plan order."""
    total = None
    for w, patch, _ in items:
        d = patch.delta(device).mul_(w)
        total = d if total is None else total.add_(d)
    return total


@torch.no_grad()
def merge_into(t: torch.Tensor, items: Weighted) -> None:
    """``t = round(t + sum(strength * delta))``: computed in float32 on ``t``'s device, rounded once to its dtype."""
    t.copy_((t.detach().to(torch.float32) + summed_delta(items, t.device)).to(t.dtype))


@torch.no_grad()
def requantise_into(layer: FP8Linear, items: Weighted) -> None:
    """An FP8 linear's effective weight plus the patches, in float32, quantised again with a fresh scale of the
    layer's granularity (weight dtype and scale shape unchanged)."""
    w = layer.weight
    merged = layer.dequantised_weight(torch.float32).add_(summed_delta(items, w.device))
    q, scale = quantise_fp8(merged, layer.granularity, dtype=w.dtype)
    w.copy_(q)
    layer.scale_weight.copy_(scale.reshape(layer.scale_weight.shape))


def how_by_format(owner: nn.Module, leaf: str, fp8: str = FP8_DEFAULT) -> str:
    """"merge", "requantise" or "side": how ``apply_by_format`` puts a LoRA on ``owner``'s tensor ``leaf``."""
    if fp8 not in FP8_MODES:
        raise ValueError(f"the FP8 LoRA mode must be one of {FP8_MODES}, got {fp8!r}")
    if leaf == "weight" and isinstance(owner, FP8Linear):
        return "requantise" if fp8 == "merge" else "side"
    if leaf == "weight" and isinstance(owner, (_gguf_linear(), Int8Linear)):
        return "side"
    return "merge"


_HOW_WORDS = {"merge": "merged", "requantise": "re-quantised", "side": "side path"}


class LoraRestore:
    """Undoes one ``apply_merged`` / ``apply_side_path`` / ``apply_by_format`` call. ``restore`` is idempotent;
    a handle made with ``keep_originals=False`` can only be ``discard``-ed (its model is thrown away)."""

    def __init__(self, model: nn.Module, mode: str, applied: list[tuple[str, LoraStrength]],
                 keep_originals: bool = True):
        self.model = model
        self.mode = mode
        self.applied = tuple(applied)
        self.restorable = keep_originals
        self._originals: dict[str, torch.Tensor] = {}   # param -> CPU copy of the tensor before this call
        self._merged: set[str] = set()                  # params merged or re-quantised in place
        self._hooks: list = []
        self._side_paths: list[tuple[nn.Module, str]] = []
        self.counts: dict[tuple[str, str], int] = {}    # ("merged" | "re-quantised" | "side path", branch) -> n
        self.active = True

    @property
    def touched(self) -> int:
        """Tensors merged plus layers given a side path."""
        return len(self._merged) + len(self._side_paths)

    def _count(self, how: str, param: str) -> None:
        key = (_HOW_WORDS[how], branch_of(param))
        self.counts[key] = self.counts.get(key, 0) + 1

    def _keep(self, param: str, t: torch.Tensor) -> None:
        if self.restorable and param not in self._originals:
            self._originals[param] = t.detach().to("cpu", copy=True)

    def _merge(self, param: str, items: Weighted, why: str) -> None:
        owner, leaf, t = _resolve(self.model, param)
        if t.device.type == "meta" or not is_compute_float(t.dtype) or (
                leaf == "weight" and isinstance(owner, quantised_kinds())):
            dtype = str(t.dtype).removeprefix("torch.")
            raise LoraError(items[0][2], f"cannot merge a LoRA into {param} ({dtype} on {t.device.type}): {why}")
        self._keep(param, t)
        merge_into(t, items)
        if param not in self._merged:
            self._merged.add(param)
            self._count("merge", param)

    def _requantise(self, param: str, owner: FP8Linear, items: Weighted) -> None:
        if owner.weight.device.type == "meta":
            raise LoraError(items[0][2], f"cannot merge a LoRA into {param}: the layer is not loaded (meta device)")
        self._keep(param, owner.weight)
        self._keep(param.removesuffix("weight") + "scale_weight", owner.scale_weight)
        requantise_into(owner, items)
        self._merged.add(param)
        self._count("requantise", param)

    def _side(self, param: str, owner: nn.Module, t: torch.Tensor, items: Weighted, dtype: torch.dtype | None
              ) -> None:
        low = [(w, p) for w, p, _ in items if isinstance(p, LowRank)]
        dense_items = [(w, p, path) for w, p, path in items if isinstance(p, Diff)]
        if dense_items and isinstance(owner, nn.Linear) and is_compute_float(t.dtype):
            self._merge(param, dense_items, "")  # a plain float weight takes a full delta exactly
            dense_items = []
        if not low and not dense_items:
            return
        if t.device.type == "meta":
            raise LoraError(items[0][2], f"cannot add a side path to {param}: the layer is not loaded (meta device)")
        device, store = t.device, dtype or _compute_dtype(self.model, t)
        down = up = dense = None
        if low:
            down = torch.cat([p.down.to(device=device, dtype=torch.float32) for _, p in low]).to(store)
            up = torch.cat([p.up.to(device=device, dtype=torch.float32).flatten(1) * (w * p.scale)
                            for w, p in low], dim=1).to(store)
        if dense_items:
            dense = sum(p.delta(device) * w for w, p, _ in dense_items).to(store)
        child = f"lora_side_path_{id(self):x}"
        owner.add_module(child, LoraSidePath(down, up, dense))
        self._side_paths.append((owner, child))
        self._hooks.append(owner.register_forward_hook(functools.partial(_add_side_path, child=child)))
        self._count("side", param)

    def _unhook(self) -> None:
        for h in self._hooks:
            h.remove()
        for owner, child in self._side_paths:
            delattr(owner, child)
        self._hooks.clear()
        self._side_paths.clear()

    def _pop(self) -> None:
        stack = getattr(self.model, _ACTIVE_ATTR, [])
        if self in stack:
            stack.remove(self)
        self.active = False

    def restore(self) -> None:
        if not self.active:
            return
        if not self.restorable and self._merged:
            raise RuntimeError("these LoRAs were merged without keeping the original weights (the model was meant "
                               "to be thrown away); reload the model instead of restoring it")
        stack = getattr(self.model, _ACTIVE_ATTR, [])
        if stack and stack[-1] is not self:
            raise RuntimeError("LoRA handles must be restored in the reverse order of application")
        self._unhook()
        with torch.no_grad():
            for param, original in self._originals.items():
                _resolve(self.model, param)[2].copy_(original)
        self._originals.clear()
        self._merged.clear()
        self._pop()
        log.info("LoRAs removed (%s): %s", self.mode, ", ".join(n for n, _ in self.applied))

    def discard(self) -> None:
        """Forget this handle without restoring merged tensors (its model is about to be dropped); hooks and side
        paths come off."""
        if not self.active:
            return
        self._unhook()
        self._originals.clear()
        self._merged.clear()
        self._pop()

    def _register(self) -> None:
        if not hasattr(self.model, _ACTIVE_ATTR):
            setattr(self.model, _ACTIVE_ATTR, [])
        getattr(self.model, _ACTIVE_ATTR).append(self)


def _apply(model: nn.Module, plans: Sequence[LoraPlan], strengths: Sequence[LoraStrength] | None, mode: str,
           how_of: Callable[[nn.Module, str], str], why: str, *, dtype: torch.dtype | None = None,
           keep_originals: bool = True, params: Collection[str] | None = None, where: str = "") -> LoraRestore:
    grouped, applied = weighted(plans, strengths)
    handle = LoraRestore(model, mode, applied, keep_originals)
    handle._register()
    try:
        for param, items in grouped.items():
            if params is not None and param not in params:
                continue
            owner, leaf, t = _resolve(model, param)
            how = how_of(owner, leaf)
            if how == "merge":
                handle._merge(param, items, why)
            elif how == "requantise":
                handle._requantise(param, owner, items)
            else:
                handle._side(param, owner, t, items, dtype)
    except BaseException:
        if handle.restorable:
            handle.restore()
        else:
            handle.discard()
        raise
    _log_applied(handle, where)
    return handle


def apply_merged(model: nn.Module, plans: Sequence[LoraPlan],
                 strengths: Sequence[LoraStrength] | None = None, *, keep_originals: bool = True) -> LoraRestore:
    """Merge ``plans`` (in order, each at its per-branch strength) into the model's weights."""
    return _apply(model, plans, strengths, "merged", lambda owner, leaf: "merge",
                  "merging needs plain float weights; use the side path for FP8, GGUF or int8 models.",
                  keep_originals=keep_originals)


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


def _side_or_merge(owner: nn.Module, leaf: str) -> str:
    return "side" if leaf == "weight" and isinstance(owner, linear_kinds()) else "merge"


def apply_side_path(model: nn.Module, plans: Sequence[LoraPlan], strengths: Sequence[LoraStrength] | None = None,
                    *, dtype: torch.dtype | None = None) -> LoraRestore:
    """Add ``plans`` as side paths on the linear layers they adapt (merging what is not a linear weight).
    ``dtype``: what the side-path tensors are kept in (default: the layer's compute dtype)."""
    return _apply(model, plans, strengths, "side path", _side_or_merge,
                  "only linear weights can take a side path, and this tensor is not a plain float one.", dtype=dtype)


def apply_by_format(model: nn.Module, plans: Sequence[LoraPlan], strengths: Sequence[LoraStrength] | None = None,
                    *, fp8: str = FP8_DEFAULT, keep_originals: bool = True,
                    params: Collection[str] | None = None, where: str = "") -> LoraRestore:
    """Each tensor as its format takes a LoRA best (``how_by_format``): plain floats merged, FP8 linears
    re-quantised (``fp8="merge"``) or side-pathed (``fp8="side"``), GGUF / int8 linears side-pathed.
    ``params``: only these parameters (the rest of the plans is left alone); ``where``: words for the log."""
    how_by_format(nn.Module(), "", fp8)  # a bad fp8 mode fails before anything is touched
    return _apply(model, plans, strengths, "by format", lambda owner, leaf: how_by_format(owner, leaf, fp8),
                  "this tensor is stored quantised and is not a linear layer's weight, so no LoRA path takes it.",
                  keep_originals=keep_originals, params=params, where=where)


def describe_counts(counts: dict[tuple[str, str], int]) -> str:
    """``"merged: 24 video, 0 audio; side path: 8 video, 8 audio"`` (kinds present only)."""
    kinds = [k for k in _HOW_WORDS.values() if any(key[0] == k for key in counts)]
    return "; ".join(f"{k}: {counts.get((k, 'video'), 0)} video, {counts.get((k, 'audio'), 0)} audio"
                     for k in kinds) or "nothing"


def _log_applied(handle: LoraRestore, where: str = "") -> None:
    log.info("LoRAs applied (%s%s, %d tensors/layers; %s): %s", handle.mode, f", {where}" if where else "",
             handle.touched, describe_counts(handle.counts),
             ", ".join(f"{n} (video {s.video:g}, audio {s.audio:g})" for n, s in handle.applied))
