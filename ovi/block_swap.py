"""Block swap: run the fusion model with only N fused layers resident on the device, streaming the rest.

The model's own tensors stay where they are (host memory, pinned once when the device is CUDA/ROCm) and are
the masters: a device copy is swapped into each module's ``_parameters`` / ``_buffers`` for as long as it is
needed and the master put back afterwards, so nothing is re-pinned or re-read per step and any tensor type
(bf16, FP8, GGUF-packed) moves the same way. Streamed layers are copied on a side stream one layer ahead of
the compute, so at most N resident + 2 streamed layers occupy the device.

The order of fetches, computes and evictions comes from ``plan`` (pure, tested on the CPU); ``BlockSwapper``
only carries it out. The engine uses ``attach`` / ``run`` / ``detach``; ``forward`` is the one-call form.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from .log import log

Op = tuple[str, int]  # ("fetch" | "compute" | "evict", layer)


def plan(num_layers: int, resident: int, skip: int | None = None) -> list[Op]:
    """The schedule of one forward over the fused layers.

    Layers >= ``resident`` are streamed: each is fetched before the compute of the previous streamed layer
    (the first one before any compute, so it overlaps the resident layers), and evicted right after its own
    compute. ``skip`` (the SLG layer) is neither fetched nor computed.
    """
    layers = [i for i in range(num_layers) if i != skip]
    streamed = iter([i for i in layers if i >= resident])
    ops: list[Op] = []
    nxt = next(streamed, None)
    if nxt is not None:
        ops.append(("fetch", nxt))
    for i in layers:
        if i >= resident:
            nxt = next(streamed, None)
            if nxt is not None:
                ops.append(("fetch", nxt))
        ops.append(("compute", i))
        if i >= resident:
            ops.append(("evict", i))
    return ops


def _slots(modules: Iterator[nn.Module]) -> list[tuple[dict, str]]:
    """(module._parameters or module._buffers, name) of every tensor the modules own directly."""
    out = []
    for m in modules:
        for table in (m._parameters, m._buffers):
            out.extend((table, k) for k, v in table.items() if v is not None)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Copier:
    """Host -> device copies on a side stream. ``start`` returns the copies and an event; ``wait`` makes the
    compute stream wait for them and tells the allocator they are used there (so their memory is not reused
    by a later copy while the compute still reads them)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def start(self, tensors: list[torch.Tensor]):
        with torch.cuda.stream(self.stream):
            copies = [t.to(self.device, non_blocking=True) for t in tensors]
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def wait(self, copies: list[torch.Tensor], event) -> None:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for c in copies:
            c.record_stream(compute)

    def drain(self) -> None:
        """Wait for every copy issued on the side stream, so none still reads a master once it is dropped."""
        self.stream.synchronize()


class _CloneCopier:
    """A same-device stand-in for ``_Copier`` (tests): the copies are clones, ready at once."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self, tensors):
        return [t.clone() for t in tensors], None

    def wait(self, copies, event) -> None:
        pass

    def drain(self) -> None:
        pass


def _as_like(master: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    return nn.Parameter(copy, requires_grad=False) if isinstance(master, nn.Parameter) else copy


class BlockSwapper:
    """Keeps the first ``resident_layers`` fused layers (and every non-block module) on ``device`` and streams
    the others from host memory, one layer ahead of the compute.

    ``BlockSwapper(model, N, device)`` attaches at once; ``BlockSwapper(resident=N)`` waits for
    ``attach(model, device)``. ``trace`` (a list, or None) records every ("fetch" | "compute" | "evict", i)
    as it is issued. On a CPU device nothing moves and the layers run in place.
    """

    def __init__(self, model: nn.Module | None = None, resident_layers: int | None = None, device=None, *,
                 resident: int | None = None, pin: bool = True, copier: Callable | None = None):
        n = resident_layers if resident_layers is not None else (resident if resident is not None else 0)
        if isinstance(n, bool) or int(n) != n or n < 0:
            raise ValueError(f"resident_layers must be a layer count >= 0, got {n!r}")
        self.resident = int(n)
        self.pin = pin
        self._copier_factory = copier
        self.trace: list[Op] | None = None
        # Called with the layer index once a streamed layer's device copies are in place (before its compute), so
        # a caller can change the copies, never the host masters (LoRA merges go in this way). Set after
        # ``attach``; ``detach`` clears it.
        self.on_layer_ready: Callable[[int], None] | None = None
        self.model: nn.Module | None = None
        self.device: torch.device | None = None
        self._masters: list[tuple[dict, str, torch.Tensor]] = []  # swapped slots of resident parts
        self._layer_slots: dict[int, list[tuple[dict, str]]] = {}  # streamed layer -> its slots
        self._layer_masters: dict[int, list[torch.Tensor]] = {}  # streamed layer -> its host tensors
        self._inflight: dict[int, tuple[list[torch.Tensor], object]] = {}
        self._active: dict[int, list[torch.Tensor]] = {}
        self._copier = None
        self._device_bytes = 0
        self._streamed_bytes = 0
        if model is not None:
            self.attach(model, device if device is not None else torch.device("cpu"))

    # -- setup ---------------------------------------------------------------------------------------
    @property
    def streamed_layers(self) -> list[int]:
        n = self.model.num_layers if self.model is not None else 0
        return list(range(min(self.resident, n), n))

    def _moves(self) -> bool:
        return self._copier is not None

    def moves_weights(self, device) -> bool:
        """Whether ``attach(model, device)`` runs on device copies (streamed and resident), leaving the host
        masters untouched; False on a CPU device without a copier, where the layers run in place."""
        device = torch.device(device)
        return self._copier_factory is not None or (device.type == "cuda" and torch.cuda.is_available())

    def attach(self, model: nn.Module, device) -> nn.Module:
        """Put the non-block modules and the resident layers on ``device``; returns ``model`` (ready to run).
        An attach stopped part-way (out of memory, an interrupt) is undone: the masters are back, no copies."""
        if self.model is not None:
            self.detach()
        try:
            return self._attach(model, torch.device(device))
        except BaseException:
            self.detach()
            raise

    def _attach(self, model: nn.Module, device: torch.device) -> nn.Module:
        self.model, self.device = model, device
        layers = model.num_layers
        resident = min(self.resident, layers)
        block_ids = {id(m) for i in range(layers) for b in model.layer_modules(i) for m in b.modules()}
        fixed = [m for m in model.modules() if id(m) not in block_ids]
        fixed += [m for i in range(resident) for b in model.layer_modules(i) for m in b.modules()]
        if self._copier_factory is not None:
            self._copier = self._copier_factory(device)
        elif self.moves_weights(device):
            self._copier = _Copier(device)
        else:
            self._copier = None
        for i in range(resident, layers):
            slots = _slots(m for b in model.layer_modules(i) for m in b.modules())
            self._layer_slots[i] = slots
            self._streamed_bytes += sum(_nbytes(t[k]) for t, k in slots)
            if self.pin and device.type == "cuda" and torch.cuda.is_available():
                self._pin(slots)
            self._layer_masters[i] = [t[k] for t, k in slots]
        if self._moves():
            with torch.no_grad():
                for table, k in _slots(fixed):
                    master = table[k]
                    self._masters.append((table, k, master))
                    if self._copier_factory is not None:
                        table[k] = _as_like(master, master.clone())
                    else:
                        table[k] = _as_like(master, master.to(device))
        self._device_bytes = sum(_nbytes(t[k]) for t, k in _slots(fixed)) if self._moves() else 0
        gb = 1024 ** 3
        log.info("block swap: %d of %d fused layers resident on %s (%.2f GB with embeddings and heads), %d streamed "
                 "(%.2f GB%s)%s", resident, layers, device, self._device_bytes / gb, layers - resident,
                 self._streamed_bytes / gb, ", pinned" if self.pin and device.type == "cuda" else "",
                 "" if self._moves() else "; on this device the layers run in place")
        return model

    @staticmethod
    def _pin(slots) -> None:
        # Once per attach, never per step: the pinned tensor becomes the master (same values).
        for table, k in slots:
            t = table[k]
            if t.device.type == "cpu" and not t.is_pinned():
                if isinstance(t, nn.Parameter):
                    t.data = t.data.pin_memory()
                else:
                    table[k] = t.pin_memory()

    def detach(self) -> None:
        """Put every master back and drop all device copies (and the side stream)."""
        for i in list(self._active):
            self._evict(i)
        if self._inflight and self._copier is not None and hasattr(self._copier, "drain"):
            self._copier.drain()
        self._inflight.clear()
        for table, k, master in self._masters:
            table[k] = master
        self._masters.clear()
        self._layer_slots.clear()
        self._layer_masters.clear()
        self._copier = None
        self.model = None
        self.on_layer_ready = None
        self._device_bytes = self._streamed_bytes = 0

    def to_device_bytes(self) -> int:
        """Bytes kept on the device between layers (non-block modules + resident layers)."""
        return self._device_bytes

    def streamed_bytes(self) -> int:
        """Bytes of the streamed layers (host memory); at most two of them are on the device at once."""
        return self._streamed_bytes

    # -- one layer's copy ----------------------------------------------------------------------------
    def _fetch(self, i: int) -> None:
        if i in self._inflight or i in self._active:
            return
        if self.trace is not None:
            self.trace.append(("fetch", i))
        if self._moves():
            self._inflight[i] = self._copier.start(self._layer_masters[i])

    def _activate(self, i: int) -> None:
        if i not in self._inflight:  # not prefetched (e.g. a run called without forward's early fetch)
            self._fetch(i)
        copies, event = self._inflight.pop(i)
        self._copier.wait(copies, event)
        for (table, k), master, c in zip(self._layer_slots[i], self._layer_masters[i], copies):
            table[k] = _as_like(master, c)
        self._active[i] = copies
        if self.on_layer_ready is not None:
            self.on_layer_ready(i)

    def _evict(self, i: int) -> None:
        if self.trace is not None:
            self.trace.append(("evict", i))
        copies = self._active.pop(i, None)
        if copies is None:
            return
        for (table, k), master in zip(self._layer_slots[i], self._layer_masters[i]):
            table[k] = master

    # -- running -------------------------------------------------------------------------------------
    def run(self, model: nn.Module, state, skip: int | None = None) -> None:
        """Every fused layer except ``skip`` on ``state``, in order, through ``model.forward_layer``."""
        if model is not self.model:
            raise RuntimeError("BlockSwapper.run: the model is not the attached one (call attach first)")
        try:
            for op, i in plan(model.num_layers, min(self.resident, model.num_layers), skip):
                if op == "fetch":
                    self._fetch(i)
                elif op == "compute":
                    if self.trace is not None:
                        self.trace.append(("compute", i))
                    if self._moves() and i in self._layer_slots:
                        self._activate(i)
                    model.forward_layer(i, state)
                else:
                    self._evict(i)
        finally:  # also on a BaseException (a host's interrupt): no layer stays swapped in or in flight
            for i in list(self._active):
                self._evict(i)
            if self._inflight and hasattr(self._copier, "drain"):
                self._copier.drain()
            self._inflight.clear()

    @torch.no_grad()
    def forward(self, video, audio, t, video_ctx, audio_ctx, first_frame_is_clean: bool = False,
                slg_layer: int = 0):
        """Same result as ``FusionModel.forward`` (same inputs and output forms)."""
        model = self.model
        if model is None:
            raise RuntimeError("BlockSwapper.forward: no model attached")
        skip = slg_layer if 0 < slg_layer < model.num_layers else None
        first = next((op for op in plan(model.num_layers, min(self.resident, model.num_layers), skip)
                      if op[0] == "fetch"), None)
        if first is not None:  # the first streamed layer's copy overlaps the embeddings
            self._fetch(first[1])
        state = model.prepare(video, audio, t, video_ctx, audio_ctx, first_frame_is_clean=first_frame_is_clean)
        self.run(model, state, skip)
        return model.finish(state, as_list=not torch.is_tensor(video))

    __call__ = forward
