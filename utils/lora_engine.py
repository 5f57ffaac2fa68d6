"""The OVI_ENGINE an Ovi LoRA node outputs: the loader's engine plus a LoRA stack, sharing that engine.

ComfyUI caches every node's output, so a LoRA node must not copy or patch the engine it gets: the loader's
output stays the one engine (one entry on ComfyUI's model list, weights loaded once), and each LoRA node returns a
small ``OviLoraEngine`` naming that engine and the stack up to it. ``prepare`` (utils/model_management.py), which
every node calls before it runs the engine, sets the engine's stack to the value's own (none for the loader's
output), so a changed strength or an added LoRA re-runs only the LoRA node, and the engine puts on the model just
what differs (files are read once: ovi/lora/engine_loras.py).
"""

from __future__ import annotations

import os


class OviLoraEngine:
    """An engine value with a LoRA stack: ``base`` is the loader's ``OviModelPatcher``, ``engine`` its
    ``OviEngine``, ``loras`` the ``(path, (video strength, audio strength))`` pairs in application order. Every
    other attribute is the base's, so nodes that take an OVI_ENGINE treat both alike."""

    def __init__(self, base, loras: tuple[tuple[str, tuple[float, float]], ...]):
        self.base = base
        self.loras = loras

    @property
    def engine(self):
        return self.base.engine

    def __getattr__(self, name: str):
        # only called for names not found on the wrapper itself
        if name in ("base", "loras"):  # not set yet (copy / unpickling): no recursion through the base
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        stack = ", ".join(f"{os.path.basename(p)} ({v:g}/{a:g})" for p, (v, a) in self.loras)
        return f"OviLoraEngine({getattr(self.base, 'label', 'Ovi')} + {stack})"


def with_lora(engine, path: str, strength_video: float, strength_audio: float) -> OviLoraEngine:
    """``engine`` (a loader's output or another LoRA node's) with one more LoRA at the end of its stack."""
    base = getattr(engine, "base", engine)
    stack = tuple(getattr(engine, "loras", ()))
    return OviLoraEngine(base, stack + ((str(path), (float(strength_video), float(strength_audio))),))


def lora_stack(engine) -> tuple:
    """The LoRA stack an engine value carries (none for the loader's output)."""
    return tuple(getattr(engine, "loras", ()))


def base_patcher(engine):
    """The loader's ``OviModelPatcher`` behind an engine value."""
    return getattr(engine, "base", engine)
