"""Device choice, releasing models, and a per-phase memory record.

The device comes from ``torch.accelerator`` (CUDA, ROCm, XPU, MPS) or ``torch.cuda`` (ROCm builds answer
through it too), never from a hard-coded name. After diffusion the engine drops its big models and calls
``defragment``: without it the caching allocator keeps the freed blocks and, fragmented, cannot give the VAE
decoder one large buffer even when most of the card is free (seed 003: 1.2 GB usable of 95 GB free).

``MemoryReport`` records, at the end of each phase, what is allocated, reserved and free and the phase's peak.
On an accelerator these are the allocator's numbers; on the CPU they are host numbers: ``allocated`` is the
process's resident set, ``free`` the available RAM and ``peak`` the high-water mark of the resident set during
the phase (Linux resets it per phase through ``/proc/self/clear_refs``; elsewhere it is the lifetime peak).
"""

from __future__ import annotations

import contextlib
import gc
import re
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .log import log

GiB = 1024 ** 3


# -- devices ---------------------------------------------------------------------------------------
def _accelerator() -> torch.device | None:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        dev = acc.current_accelerator()
        try:
            index = acc.current_device_index()
        except (RuntimeError, AttributeError):  # MPS has a single device and older builds no index query
            index = None
        return torch.device(dev.type, index) if index is not None and dev.type != "mps" else torch.device(dev.type)
    if torch.cuda.is_available():  # PyTorch without torch.accelerator; torch.cuda also serves ROCm builds
        return torch.device("cuda", torch.cuda.current_device())
    return None


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a concrete ``torch.device``; None picks the accelerator when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return _accelerator() or torch.device("cpu")
    d = torch.device(device)
    if d.type == "cpu":
        return d
    acc = _accelerator()
    if acc is None or acc.type != d.type:
        have = f"this PyTorch build sees {acc.type}" if acc is not None else "this PyTorch build sees no accelerator"
        hint = " (ROCm builds also use the 'cuda' device name)" if d.type in ("rocm", "hip") else ""
        raise ValueError(f"device {str(device)!r} is not available: {have}{hint}. Use 'cpu' or leave the device unset.")
    if d.index is None:
        return acc
    return d


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        stack = f"ROCm/HIP {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        return f"{device} ({p.name}, {p.total_memory / GiB:.1f} GiB, {stack})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads, {total_ram() / GiB:.1f} GiB RAM)"
    return str(device)


_unreadable_warned: set[str] = set()


def device_free(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of the device's memory; None on the CPU (see ``available_ram``) and on an accelerator
    whose free memory this PyTorch cannot report: no ``torch.accelerator.get_memory_info`` (before 2.9), or a
    backend that refuses the query (RuntimeError; ValueError for a device it does not know). That case is logged
    as a warning once per device, naming the device and the error; the engine's auto mode then picks a safe mode.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type == "cpu":
        return None
    acc = getattr(torch, "accelerator", None)
    fn = getattr(acc, "get_memory_info", None) if acc is not None else None
    if fn is None:
        problem = f"this PyTorch ({torch.__version__}) has no torch.accelerator.get_memory_info"
    else:
        try:
            free, total = fn(device)
            return int(free), int(total)
        except (RuntimeError, ValueError) as e:  # c10 errors (unsupported backend) arrive as RuntimeError
            problem = f"torch.accelerator.get_memory_info failed: {type(e).__name__}: {e}"
    if str(device) not in _unreadable_warned:
        _unreadable_warned.add(str(device))
        log.warning("free memory of %s cannot be read (%s)", device, problem)
    return None


# -- host memory -----------------------------------------------------------------------------------
def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_ram() -> int:
    """Bytes of RAM the system can give without swapping (psutil, else /proc/meminfo; 0 if unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return _meminfo("MemAvailable") or 0


def total_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return _meminfo("MemTotal") or 0


def host_fits(nbytes: int, *, margin: float = 0.15) -> bool:
    """Whether ``nbytes`` more of RAM would leave ``margin`` of the total free (to keep the host out of swap)."""
    avail, total = available_ram(), total_ram()
    if not avail or not total:
        return False
    return nbytes + margin * total <= avail


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def process_rss() -> int:
    rss = _status_kb("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


def _reset_host_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _host_peak() -> int | None:
    peak = _status_kb("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024
    except (ImportError, OSError):
        return None


# -- releasing ---------------------------------------------------------------------------------------
def defragment(device: torch.device | None = None) -> None:
    """Collect garbage and hand the allocator's cached blocks back, so the next phase gets contiguous memory.

    On CUDA/ROCm: synchronize, ``empty_cache``, ``ipc_collect`` (blocks shared with other processes) and a
    reset of the peak statistics, so the next phase's peak is its own.
    """
    gc.collect()
    if device is None or device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
            torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "mps":
        torch.mps.empty_cache()
    elif device.type != "cpu":
        acc = getattr(torch, "accelerator", None)
        fn = getattr(acc, "empty_cache", None) if acc is not None else None
        if fn is not None:
            fn()


def release(*modules: nn.Module | None, device: torch.device | None = None) -> None:
    """Free the weights of ``modules`` and defragment.

    Each module's tensors are replaced by ``meta`` placeholders first, so the memory comes back even when
    some other object still holds the module; the module is unusable afterwards. The caller drops its own
    references (``release(self.model); self.model = None``).
    """
    for m in modules:
        if m is not None:
            m.to("meta")
    defragment(device)


# -- the per-phase record ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhaseMemory:
    phase: str
    allocated: int | None
    reserved: int | None
    free: int | None
    peak: int | None
    seconds: float
    note: str = ""


class MemoryReport:
    """Memory at each phase boundary of a generation (load, encode text, diffusion, release, decode video,
    decode audio). ``table()`` formats it; ``str(report)`` is the table."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: list[PhaseMemory] = []
        self._host = device.type == "cpu"
        self._host_peak_resettable = True
        self._open: tuple[str, float, int] | None = None

    def clear(self) -> None:
        self.rows.clear()

    def _allocated(self) -> int | None:
        if self._host:
            return process_rss()
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        if self.device.type == "mps":
            return torch.mps.current_allocated_memory()
        return None

    def start(self, phase: str) -> None:
        if self._host:
            self._host_peak_resettable = _reset_host_peak()
        elif self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._open = (phase, time.perf_counter(), self._allocated() or 0)

    def stop(self, note: str = "") -> PhaseMemory:
        if self._open is None:
            raise RuntimeError("MemoryReport.stop() without start()")
        phase, t0, at_start = self._open
        self._open = None
        allocated = self._allocated()
        reserved = free = peak = None
        if self._host:
            free = available_ram()
            peak = _host_peak()
            if not self._host_peak_resettable:
                note = (note + "; " if note else "") + "peak is the process lifetime peak"
        elif self.device.type == "cuda":
            reserved = torch.cuda.memory_reserved(self.device)
            free = torch.cuda.mem_get_info(self.device)[0]
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            info = device_free(self.device)
            free = info[0] if info else None
            peak = max(at_start, allocated or 0)
        row = PhaseMemory(phase, allocated, reserved, free, peak, time.perf_counter() - t0, note)
        self.rows.append(row)
        log.debug("memory after %s: %s", phase, self._line(row))
        return row

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record ``name`` around the block; an exception still closes the row, noted as such."""
        self.start(name)
        try:
            yield
        except BaseException as e:
            self.stop(note=f"stopped: {type(e).__name__}")
            raise
        self.stop()

    def peak(self, phase: str) -> int | None:
        return next((r.peak for r in reversed(self.rows) if r.phase == phase), None)

    @staticmethod
    def _gib(n: int | None) -> str:
        return "-" if n is None else f"{n / GiB:.2f}"

    def _line(self, r: PhaseMemory) -> str:
        return (f"allocated {self._gib(r.allocated)} GiB, reserved {self._gib(r.reserved)} GiB, "
                f"free {self._gib(r.free)} GiB, peak {self._gib(r.peak)} GiB")

    def table(self) -> str:
        what = ("host memory (GiB; allocated = process RSS, free = available RAM)" if self._host
                else f"device memory on {self.device} (GiB)")
        head = ("phase", "allocated", "reserved", "free", "peak", "seconds", "")
        body = [(r.phase, self._gib(r.allocated), self._gib(r.reserved), self._gib(r.free), self._gib(r.peak),
                 f"{r.seconds:.2f}", r.note) for r in self.rows]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        return "\n".join([what, fmt(head), *(fmt(r) for r in body)])

    def __str__(self) -> str:
        return self.table()

    def __len__(self) -> int:
        return len(self.rows)
