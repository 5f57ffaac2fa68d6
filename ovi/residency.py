"""Where a component's weights live: an optional host copy (pinned when a GPU is present) and the module in use.

The engine keeps one ``ComponentSlot`` per component. A slot loads from the file through the component's own
loader, keeps a host copy only when the memory mode wants one, and makes device copies tensor by tensor so no
host tensor is ever duplicated in RAM.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from torch import nn

from .loading import is_compute_float
from .log import log


def module_tensors(module: nn.Module):
    seen = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def _pin(module: nn.Module) -> bool:
    """Move a host module's tensors to page-locked memory (one tensor at a time) for fast async copies."""
    if not torch.cuda.is_available():
        return False
    try:
        for t in module_tensors(module):
            if not t.is_pinned():
                t.data = t.data.pin_memory()
    except RuntimeError as e:
        log.info("could not pin host memory (%s); copies to the device will be synchronous", e)
        return False
    return True


def _clone_to(host: nn.Module, device: torch.device, dtype: torch.dtype | None, share=()) -> nn.Module:
    """A copy of ``host`` with its tensors on ``device`` (floating ones cast to ``dtype``), sharing no storage
    with it. The module structure is deep-copied with every tensor pre-seeded in the memo, so no host tensor
    is ever duplicated in RAM."""
    memo: dict[int, Any] = {id(o): o for o in share if o is not None}
    for t in module_tensors(host):
        d = t.detach().to(device=device, dtype=dtype if (dtype is not None and is_compute_float(t.dtype)) else None,
                          non_blocking=True, copy=True)
        memo[id(t)] = nn.Parameter(d, requires_grad=False) if isinstance(t, nn.Parameter) else d
    return copy.deepcopy(host, memo)


class ComponentSlot:
    """One component: how to load it from its file, an optional host copy, and the module in use (``live``)."""

    def __init__(self, name: str, loader: Callable[[torch.device, torch.dtype | None], nn.Module], numel: int,
                 host_dtype: torch.dtype | None = None, stored_bytes: int = 0):
        # numel: values cast to the compute (or host) dtype at load; stored_bytes: FP8 / GGUF weights kept as stored
        self.name, self.loader, self.numel, self.host_dtype = name, loader, numel, host_dtype
        self.stored_bytes = stored_bytes
        self.host: nn.Module | None = None
        self.host_pinned = False
        self.live: nn.Module | None = None
        self.live_dtype: torch.dtype | None = None

    def host_bytes(self, dtype: torch.dtype | None) -> int:
        it = torch.empty((), dtype=self.host_dtype or dtype or torch.float32).element_size()
        return self.numel * it + self.stored_bytes

    def ensure_host(self, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
        if self.host is None:
            t0 = time.perf_counter()
            self.host = self.loader(torch.device("cpu"), self.host_dtype or dtype)
            self.host_pinned = device.type != "cpu" and _pin(self.host)
            log.info("%s: host copy loaded from its file in %.1f s%s", self.name, time.perf_counter() - t0,
                     " (pinned)" if self.host_pinned else "")
        return self.host

    def acquire(self, device: torch.device, dtype: torch.dtype | None, keep_host: bool, share=()) -> nn.Module:
        if self.live is not None and self.live_dtype == dtype:
            return self.live
        self.drop()
        t0 = time.perf_counter()
        if keep_host:
            self.ensure_host(device, dtype)
        if self.host is not None:
            same = device.type == "cpu" and (dtype is None or dtype == (self.host_dtype or dtype))
            self.live = self.host if same else _clone_to(self.host, device, dtype, share)
            src = "host copy (shared)" if same else ("pinned host copy" if self.host_pinned else "host copy")
        else:
            self.live = self.loader(device, dtype)
            src = "file (memory-mapped)"
        self.live_dtype = dtype
        log.info("%s on %s from the %s in %.2f s", self.name, device, src, time.perf_counter() - t0)
        return self.live

    def drop(self) -> bool:
        """Forget the device module, freeing its weights unless it is the host copy itself."""
        live, self.live, self.live_dtype = self.live, None, None
        if live is None:
            return False
        if live is not self.host:
            live.to("meta")  # frees the weights even if something outside the engine kept the module
        del live
        return True

    def forget(self) -> None:
        self.drop()
        self.host = None
