"""The engine's LoRA stack: which files at which per-branch strengths, each read and matched once, put on the
fusion model whenever the engine acquires it and taken off again when the stack changes.

Files are cached by path and (modification time, size): a changed strength, order or removal reuses what was
read; a file rewritten on disk is read again. Where the LoRAs go follows where the weights live:

- a fusion model the engine throws away after the diffusion (the all_gpu / offload device copy of the host
  copy, or a model read from its file): everything by format (``apply_by_format``: plain floats merged on the
  model's device, FP8, GGUF and int8 linears side paths) without keeping originals; the host copy or the file
  is the original, and the next acquire starts from it;
- the host copy itself (offload on the CPU, block swap whose layers run in place): applied once and kept while
  the stack is unchanged; a changed stack first restores the touched tensors bit-exactly from their CPU copies;
- block swap that runs on device copies: nothing is merged into the host copy. The resident parts' device
  copies are merged once per attach, each streamed layer's copy every time it arrives
  (``BlockSwapper.on_layer_ready``), so a streamed layer gets the LoRA exactly once per copy and the host
  masters never. Side paths (FP8, GGUF and int8 linears) go on the host modules once; their factor buffers
  stream with the layer.
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..log import log
from .apply import (FP8_DEFAULT, FP8_MODES, LoraRestore, LoraStrength, Weighted, apply_by_format, branch_of,
                    how_by_format, lora_target_shapes, merge_into, requantise_into, weighted)
from .errors import LoraError
from .file import LoraFile, LowRank, read_lora
from .plan import Diff, LoraPlan, match_lora

Stamp = tuple[int, int]  # (st_mtime_ns, st_size): a file rewritten in place is read again


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of the stack."""

    path: Path
    strength: LoraStrength

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class _Applied:
    """What is on a model that outlives one diffusion (the host copy), or on the last device copy."""

    model: weakref.ref
    signature: tuple
    handle: LoraRestore


def as_strength(value) -> LoraStrength:
    """A ``LoraStrength``, or one number for both branches, or a (video, audio) pair."""
    if isinstance(value, LoraStrength):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return LoraStrength(float(value), float(value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return LoraStrength(float(value[0]), float(value[1]))
    raise ValueError(f"a LoRA strength is a LoraStrength, a number or a (video, audio) pair, got {value!r}")


def _stamp(path: Path) -> Stamp:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


class EngineLoras:
    """The LoRA stack of one engine (``OviEngine.set_loras``) and what of it is on which model."""

    def __init__(self, fp8: str = FP8_DEFAULT):
        if fp8 not in FP8_MODES:
            raise ValueError(f"the FP8 LoRA mode must be one of {FP8_MODES}, got {fp8!r}")
        self.fp8 = fp8
        self.entries: tuple[LoraEntry, ...] = ()
        self.files_read = 0  # reads from disk since the engine was made (a changed strength reads nothing)
        self._files: dict[Path, tuple[Stamp, LoraFile]] = {}
        self._plans: dict[tuple[Path, Stamp], LoraPlan] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None  # the fusion model's, once one has been seen
        self._applied: _Applied | None = None

    # -- the stack --------------------------------------------------------------------------------------
    def set(self, loras: Iterable, *, fp8: str | None = None) -> None:
        """Replace the stack by ``loras``: ``(path, strength)`` pairs in application order (strength: a
        ``LoraStrength``, a number for both branches, or a (video, audio) pair). Files are read now (cached),
        and matched now when the fusion model's shapes are known (else at the next generate): a missing file, a
        file that is no LoRA or one that matches nothing on Ovi is a ``LoraError`` naming it. ``fp8``: the FP8
        mode (``FP8_MODES``) from now on; None keeps it."""
        if fp8 is not None and fp8 not in FP8_MODES:
            raise ValueError(f"the FP8 LoRA mode must be one of {FP8_MODES}, got {fp8!r}")
        entries = []
        for item in loras:
            try:
                path, strength = item
            except (TypeError, ValueError):
                raise ValueError(f"a LoRA is given as (path, strength), got {item!r}") from None
            entry = LoraEntry(Path(os.fspath(path)).expanduser().resolve(), as_strength(strength))
            if not entry.path.is_file():
                raise LoraError(entry.path, "file not found.")
            self._file(entry.path)
            if self._shapes is not None:
                self._plan(entry.path)
            entries.append(entry)
        entries = tuple(entries)
        if fp8 is not None:
            self.fp8 = fp8
        if entries != self.entries:
            log.info("LoRA stack: %s", ", ".join(f"{e.name} (video {e.strength.video:g}, audio "
                                                 f"{e.strength.audio:g})" for e in entries) or "none")
        self.entries = entries

    def _file(self, path: Path) -> tuple[Stamp, LoraFile]:
        stamp = _stamp(path)
        cached = self._files.get(path)
        if cached is None or cached[0] != stamp:
            lora = read_lora(path)
            self.files_read += 1
            log.info("LoRA %s read (%d modules, %s)", path.name, len(lora.modules), lora.convention)
            self._files[path] = (stamp, lora)
            self._plans = {k: v for k, v in self._plans.items() if k[0] != path}
        return self._files[path]

    def _plan(self, path: Path) -> LoraPlan:
        stamp, lora = self._file(path)
        key = (path, stamp)
        if key not in self._plans:
            self._plans[key] = match_lora(lora, self._shapes)
        return self._plans[key]

    def _signature(self, how: str) -> tuple:
        return (how, self.fp8) + tuple((e.path, self._file(e.path)[0], e.strength) for e in self.entries)

    def _learn_shapes(self, model: nn.Module) -> None:
        if self._shapes is None:
            self._shapes = lora_target_shapes(model)

    def _plans_and_strengths(self) -> tuple[list[LoraPlan], list[LoraStrength]]:
        return [self._plan(e.path) for e in self.entries], [e.strength for e in self.entries]

    def _take_off(self, model: nn.Module, signature: tuple) -> str:
        """Take a stale stack off: "on" (``signature`` is on ``model`` already), "clean" (nothing stale is left),
        or "stuck" (``model`` carries another stack merged without originals)."""
        cur = self._applied
        if cur is None:
            return "clean"
        old = cur.model()
        if old is model and cur.signature == signature:
            return "on"
        if old is not None and cur.handle.active:
            if cur.handle.restorable:
                cur.handle.restore()
            elif old is model:
                return "stuck"
            else:
                cur.handle.discard()  # a device copy the engine has dropped already
        self._applied = None
        return "clean"

    # -- on a model the engine runs whole ---------------------------------------------------------------------
    def apply(self, model: nn.Module, *, keep_originals: bool, where: str = "") -> bool:
        """Put the stack on ``model`` (nothing when it is there already). ``keep_originals``: the model outlives
        the diffusion (the host copy), so what is merged must be restorable. Returns False when ``model`` carries
        another stack merged without originals: the caller drops it and acquires a fresh copy."""
        self._learn_shapes(model)
        state = self._take_off(model, self._signature("whole"))
        if state != "clean" or not self.entries:
            return state != "stuck"
        signature = self._signature("whole")
        plans, strengths = self._plans_and_strengths()
        where = where or ("the host copy, restorable" if keep_originals else "a copy used for this diffusion only")
        handle = apply_by_format(model, plans, strengths, fp8=self.fp8, keep_originals=keep_originals, where=where)
        self._applied = _Applied(weakref.ref(model), signature, handle)
        return True

    # -- under block swap -----------------------------------------------------------------------------------
    def before_attach(self, host: nn.Module, swapper, device: torch.device) -> None:
        """Before ``swapper.attach(host, device)``: the side paths on the host modules (once per stack), or, for
        a swapper that runs the layers in place (or cannot report its copies), the whole stack on the host."""
        if not _streams(swapper, device):
            self.apply(host, keep_originals=True, where="the host copy, restorable; block swap runs it in place")
            return
        self._learn_shapes(host)
        signature = self._signature("side paths")
        if self._take_off(host, signature) != "clean" or not self.entries:
            return
        plans, strengths = self._plans_and_strengths()
        side = {p for p in weighted(plans, strengths)[0] if self._how(host, p) == "side"}
        if side:
            handle = apply_by_format(host, plans, strengths, fp8=self.fp8, params=side,
                                     where="side paths on the host copy, streamed with their layers")
            self._applied = _Applied(weakref.ref(host), signature, handle)

    def after_attach(self, model: nn.Module, swapper, device: torch.device) -> None:
        """After ``attach``: merge into the resident device copies now and into each streamed layer's copy as it
        arrives. Nothing to do for a swapper that runs the layers in place (``before_attach`` did it all)."""
        if not self.entries or not _streams(swapper, device):
            return
        plans, strengths = self._plans_and_strengths()
        grouped = {p: items for p, items in weighted(plans, strengths)[0].items() if self._how(model, p) != "side"}
        if not grouped:
            return
        layer_of = _layer_of_params(model, swapper.streamed_layers, grouped)
        counts: dict[tuple[str, str], int] = {}
        for param, items in grouped.items():
            if param not in layer_of:
                self._merge_copy(model, param, items)
                key = ("merged into the resident device copies", branch_of(param))
                counts[key] = counts.get(key, 0) + 1
        streamed = {p: items for p, items in grouped.items() if p in layer_of}
        if streamed:
            by_layer: dict[int, list[tuple[str, Weighted]]] = {}
            for param, items in streamed.items():  # factors uploaded once per attach, not once per streamed copy
                moved = [(w, _to(patch, device), path) for w, patch, path in items]
                by_layer.setdefault(layer_of[param], []).append((param, moved))
            swapper.on_layer_ready = functools.partial(self._merge_layer, model, by_layer)  # detach drops it
            for p in streamed:
                key = ("merged into each streamed layer's copy", branch_of(p))
                counts[key] = counts.get(key, 0) + 1
        log.info("LoRAs on the block-swapped fusion model (the host copy stays as loaded): %s",
                 "; ".join(f"{k}: {counts.get((k, 'video'), 0)} video, {counts.get((k, 'audio'), 0)} audio"
                           for k in dict.fromkeys(k for k, _ in counts)))

    def _how(self, model: nn.Module, param: str) -> str:
        owner_name, _, leaf = param.rpartition(".")
        return how_by_format(model.get_submodule(owner_name), leaf, self.fp8)

    def _merge_copy(self, model: nn.Module, param: str, items: Weighted) -> None:
        owner_name, _, leaf = param.rpartition(".")
        owner = model.get_submodule(owner_name)
        if how_by_format(owner, leaf, self.fp8) == "requantise":
            requantise_into(owner, items)
            return
        t = owner._parameters.get(leaf)
        merge_into(t if t is not None else owner._buffers[leaf], items)

    def _merge_layer(self, model: nn.Module, by_layer: dict[int, list[tuple[str, Weighted]]], i: int) -> None:
        for param, items in by_layer.get(i, ()):
            self._merge_copy(model, param, items)

    # -- reporting ----------------------------------------------------------------------------------------------
    def describe(self) -> str:
        return ", ".join(f"{e.name} (video {e.strength.video:g}, audio {e.strength.audio:g})"
                         for e in self.entries) or "none"


def _streams(swapper, device) -> bool:
    """Whether ``swapper`` runs on device copies and says when a streamed copy is ready (ours does)."""
    moves = getattr(swapper, "moves_weights", None)
    return callable(moves) and hasattr(swapper, "on_layer_ready") and bool(moves(device))


def _layer_of_params(model: nn.Module, streamed: Iterable[int], params: Iterable[str]) -> dict[str, int]:
    """{param: fused layer} for the ``params`` that live in a streamed layer."""
    owners: dict[int, int] = {}
    for i in streamed:
        for block in model.layer_modules(i):
            for m in block.modules():
                owners[id(m)] = i
    out = {}
    for param in params:
        owner = model.get_submodule(param.rpartition(".")[0])
        if id(owner) in owners:
            out[param] = owners[id(owner)]
    return out


def _to(patch: LowRank | Diff, device: torch.device) -> LowRank | Diff:
    if isinstance(patch, LowRank):
        return LowRank(up=patch.up.to(device), down=patch.down.to(device), alpha=patch.alpha)
    return Diff(patch.tensor.to(device))
