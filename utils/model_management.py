"""The engine as a model ComfyUI's memory management knows about.

ComfyUI frees memory by walking its list of loaded models (``comfy.model_management.current_loaded_models``):
to make room for another model, on an out-of-memory error, and for "Free model and node cache" / ``POST /free``
with ``unload_models``. A ``ModelPatcher`` subclass puts the engine on that list: its size is what the engine
keeps resident on the device, and ComfyUI's ``partially_unload`` / ``detach`` calls release the engine's
components. The nodes call ``prepare()`` (``load_models_gpu``) before sampling and decoding, which registers
the engine and lets ComfyUI evict other packs' models to make room first. No ComfyUI function is patched.

The engine loads its own components when it runs, so ``partially_load`` loads nothing.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

import comfy.model_management as mm
from comfy.model_patcher import ModelPatcher

from ..ovi.detect import human_bytes
from ..ovi.log import log


class OviEngineModel(nn.Module):
    """Stands in for the engine's weights on ComfyUI's model list (which keeps a weak reference to it): it holds
    no tensors, the engine owns those. Its class name is what ComfyUI logs ("Requested to load OviEngineModel")."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def extra_repr(self) -> str:
        return self.label


class OviModelPatcher(ModelPatcher):
    """The OVI_ENGINE value the nodes pass around: ``.engine`` is the ``OviEngine``.

    ComfyUI's node-output cache is the only strong owner; ComfyUI's model list holds weak references, so when
    the cache drops the engine (a changed loader, ``/free`` with ``free_memory``) it is garbage-collected.
    """

    def __init__(self, engine, label: str):
        device = torch.device(engine.device)
        super().__init__(OviEngineModel(label), load_device=device, offload_device=torch.device("cpu"),
                         size=max(1, engine.planned_device_bytes()))
        self.engine = engine
        self.label = label
        # Logged when the last reference goes (tests watch for it); not at interpreter exit.
        weakref.finalize(engine, log.info, "%s: engine freed (garbage-collected)", label).atexit = False

    # -- sizes ComfyUI plans with ------------------------------------------------------------------------
    def model_size(self) -> int:
        return self.size

    def loaded_size(self) -> int:
        return self.engine.resident_bytes(self.load_device)

    def model_dtype(self):
        return self.engine.dtype

    def current_loaded_device(self):
        return self.load_device if self.loaded_size() else self.offload_device

    # -- ComfyUI's load / unload calls ------------------------------------------------------------------
    # Core passes more keywords in newer releases (and may add more): the overrides take and ignore them.
    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False, *args, **kwargs) -> int:
        return 0  # the engine loads each component when its phase starts

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False, *args, **kwargs) -> int:
        return self.release("ComfyUI needed device memory", keep_host=True)

    def detach(self, unpatch_all=True, *args, **kwargs):
        # unpatch_all=False is ComfyUI re-registering a model it is about to use again: weights stay.
        if unpatch_all:
            self.release("ComfyUI unloaded models")
        return self.model

    def clone(self, *args, **kwargs):
        # newer cores call clone(disable_dynamic=..., model_override=..., force_deepcopy=...); none of them
        # applies to an engine that owns its weights
        return self  # one engine, one entry on ComfyUI's list: a clone would only make ComfyUI unload it

    def __del__(self):
        pass  # the engine frees its weights when it is collected; nothing to detach from

    def release(self, reason: str, keep_host: bool = False) -> int:
        """Free the engine's weights (device copies only with ``keep_host`` where the engine keeps host copies,
        so a reload is fast); returns the device bytes freed. Logged, so users (and tests) can see it."""
        before, held = self.loaded_size(), self.engine.resident_bytes()
        if keep_host and self.load_device.type != "cpu":
            self.engine.release_device_copies()
        else:
            self.engine.unload()
        after, still = self.loaded_size(), self.engine.resident_bytes()
        log.info("%s: %s; released %s of weights (%s held before, %s still held)", self.label, reason,
                 human_bytes(max(0, held - still)), human_bytes(held), human_bytes(still))
        mm.soft_empty_cache()
        return max(0, before - after)


def prepare(patcher: OviModelPatcher) -> None:
    """Register the engine with ComfyUI (first call) and let ComfyUI make room on the device for it; set the
    engine's LoRA stack to the one this value carries (an Ovi LoRA node's output, utils/lora_engine.py; none for
    the loader's), which the engine applies when it next acquires the fusion model."""
    from .lora_engine import base_patcher, lora_stack

    base = base_patcher(patcher)
    base.engine.set_loras(lora_stack(patcher))
    mm.load_models_gpu([base], memory_required=base.engine.activation_bytes())

