"""torch.compile of the fused layer, opt-in (``EngineOptions.compile``, ``--compile``, the loader node's ``compile``).

What is compiled: ``ovi.fusion.model.fused_layer``, the function ``FusionModel.forward_layer`` runs on one layer's
(video block, audio block) pair. The engine puts a ``CompiledLayer`` in the model's ``layer_fn``, so every caller
of ``forward_layer`` gets it: the plain layer loop, block swap (which swaps each streamed layer's device copies
into the blocks before the call) and SLG (a skipped layer is simply not called). Embeddings, heads and the
sampler stay eager: they run once per pass, the layers 30 times.

One compiled function serves every layer and every engine of the process: dynamo inlines the blocks, so their
weights are inputs of the graph, not constants, and blocks of the same structure share one graph. It follows:

* merged LoRA weights (changed in place) and block swap's device copies (new tensors with the same shape,
  dtype, device and strides) run the same graph, with no recompile;
* LoRA side paths are forward hooks on the linear layers. Dynamo ignores hooks added after a compile unless
  hook guards are on, so every call runs with ``skip_nnmodule_hook_guards=False``: a hooked block fails the
  guard of the plain graph and gets its own (one recompile per LoRA set applied; removing it returns to the
  plain graph, compiled already);
* a new frame size, dtype or device, or I2AV's per-frame modulation, is a recompile (``dynamic=False``: every
  shape gets kernels specialised for it, and a generation runs one shape 100 times).

Recompiles are counted by the backend (not by dynamo's global counters, which every compiled function of the
process shares): the compiled function is given a backend that counts every graph it receives before passing it
to inductor. A call during which graphs were compiled is a compile; a compile while ``fused_layer`` already has
graphs in this process is a recompile (a guard of every graph failed) and is logged with its duration. Dynamo's
own reason for each recompile is printed with ``TORCH_LOGS=recompiles``.
"""

from __future__ import annotations

import importlib.util
import inspect
import threading
import time
from typing import Any, Callable

import torch

from .fusion.model import fused_layer
from .log import log

# Distinct graphs kept for fused_layer before dynamo falls back to eager for it (torch's default is 8): frame
# sizes, T2AV and I2AV, dtypes and LoRA hook sets of a long session add up, and each is one small graph.
RECOMPILE_LIMIT = 32


class _GraphCounter:
    """The backend given to dynamo: counts each graph, then compiles it with inductor."""

    def __init__(self):
        self.graphs = 0  # compiled since the process started (or the last ``reset``)
        self._inductor: Callable | None = None

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        if self._inductor is None:
            from torch._dynamo import lookup_backend

            self._inductor = lookup_backend("inductor")
        return self._inductor(gm, example_inputs)


_counter = _GraphCounter()
_compiled: Callable | None = None
_lock = threading.Lock()


def _compiled_fused_layer() -> Callable:
    """The process-wide compiled ``fused_layer`` (built on first use: importing this module compiles nothing)."""
    global _compiled
    with _lock:
        if _compiled is None:
            kw: dict[str, Any] = {"backend": _counter, "dynamic": False}
            if "recompile_limit" in inspect.signature(torch.compile).parameters:
                kw["recompile_limit"] = RECOMPILE_LIMIT
            _compiled = torch.compile(fused_layer, **kw)
        return _compiled


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot run on ``device`` here, or None: dynamo must support this Python, and inductor
    needs a C++ compiler for the CPU and Triton for a GPU."""
    import torch._dynamo

    try:
        supported = torch._dynamo.is_dynamo_supported()
    except Exception as e:  # some builds raise with the reason instead of returning False
        return f"torch.compile is not supported here ({e})"
    if not supported:
        return f"torch.compile is not supported by this Python/PyTorch build (torch {torch.__version__})"
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:
            return None  # an older torch: it finds (or misses) its compiler at the first call
        try:
            get_cpp_compiler()
        except Exception as e:
            return f"torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH: {e}"
        return None
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on a GPU needs Triton (pip install triton; triton-windows on Windows)"
    return None


def reset() -> None:
    """Drop every compiled graph (``torch._dynamo.reset``, which clears all of dynamo's caches) and start the
    process-wide graph count again: the next compile of the fused layer is a first compile."""
    import torch._dynamo

    torch._dynamo.reset()
    _counter.graphs = 0


class CompiledLayer:
    """A drop-in for ``fused_layer`` (same arguments) that runs the compiled form and counts its compiles.

    ``compiles``: calls during which dynamo compiled graphs; ``recompiles``: those of them made while the fused
    layer had graphs already (its guards failed); ``graphs``: graphs compiled; ``compile_seconds``: wall time of
    the calls that compiled. One per engine; the compiled function itself is shared, so a second engine reuses
    the first one's graphs.
    """

    def __init__(self):
        self.compiles = 0
        self.recompiles = 0
        self.graphs = 0
        self.compile_seconds = 0.0

    def __call__(self, *args):
        import torch._dynamo

        fn = _compiled_fused_layer()
        before = _counter.graphs
        t0 = time.perf_counter()
        try:
            with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
                out = fn(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", e)
            raise RuntimeError(f"torch.compile of the fused layer failed ({type(inner).__name__}: {inner}); run "
                               f"without compile") from e
        new = _counter.graphs - before
        if new:
            seconds = time.perf_counter() - t0
            self.compiles += 1
            self.graphs += new
            self.compile_seconds += seconds
            if before == 0:
                log.info("torch.compile: fused layer compiled in %.1f s (%d graph%s)", seconds, new,
                         "" if new == 1 else "s")
            else:
                self.recompiles += 1
                log.info("torch.compile: fused layer recompiled in %.1f s (recompile %d of this engine: the "
                         "guards of its %d earlier graph%s failed - new shapes, dtype, device or LoRA side paths; "
                         "TORCH_LOGS=recompiles gives the reason)", seconds, self.recompiles, before,
                         "" if before == 1 else "s")
        return out

    def __deepcopy__(self, memo) -> "CompiledLayer":
        # A model copy (a device copy of the host module) keeps the engine's counter, not a second one.
        return self

    def counts(self) -> dict[str, int | float]:
        return {"compiles": self.compiles, "recompiles": self.recompiles, "graphs": self.graphs,
                "compile_seconds": self.compile_seconds}


def use_compiled(model: torch.nn.Module, layer: CompiledLayer | None) -> None:
    """Make ``model.forward_layer`` run ``layer`` (None: the eager ``fused_layer``)."""
    model.layer_fn = layer if layer is not None else fused_layer


__all__ = ["CompiledLayer", "RECOMPILE_LIMIT", "compile_problem", "reset", "use_compiled"]
