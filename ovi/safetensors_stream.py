"""Streaming safetensors I/O: a writer that needs only one tensor in memory at a time, and a reader that
reads tensors with plain file reads instead of a memory map.

The writer takes the names, shapes and dtypes of every tensor up front, writes the header with all the
offsets, then the tensors one at a time in that order, so peak memory is the largest tensor, not the file.
It writes through ``atomic_write.AtomicOutput`` (a hidden ``.<dst>.ovi-<pid>-<hex>.partial`` beside it, fsynced
and renamed on success, removed on any failure), so an interrupted run leaves no truncated file behind.

The reader matters for converters: pages of a memory-mapped file that were read stay in the process's
resident set until the kernel reclaims them, so walking a 23 GB checkpoint through ``safe_open`` shows up as
23 GB of RSS. Reading each tensor into a fresh buffer and dropping it keeps RSS at one tensor.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .atomic_write import AtomicOutput
from .loading import CheckpointError, TensorSource
from .safetensors_header import DTYPE_NAMES as ST_DTYPE_NAMES, read_header

_OWN_MAPPING = 1 << 20  # bytes


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= int(d)
    return n


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor without a copy (a contiguous copy only if it is not contiguous)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class StreamingWriter:
    """``with StreamingWriter(path, [(name, shape, dtype), ...], metadata) as w: w.write(name, tensor) ...``

    Tensors must be written in the declared order with the declared shape and dtype; closing checks that
    every one was written, then moves the file into place.
    """

    def __init__(self, path: str | os.PathLike, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.entries = [(str(n), tuple(int(d) for d in s), dt) for n, s, dt in entries]
        names = [n for n, _, _ in self.entries]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in a safetensors file")
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, shape, dtype in self.entries:
            if dtype not in ST_DTYPE_NAMES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": ST_DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the tensor data starts 8-byte aligned
        self.data_bytes = offset
        self._out = AtomicOutput(self.path)
        self.tmp = self._out.tmp
        self._out.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.entries):
            raise ValueError(f"{name}: more tensors written than declared")
        want, shape, dtype = self.entries[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"expected {want} {list(shape)} {dtype} next, got {name} {list(tensor.shape)} "
                             f"{tensor.dtype}")
        if tensor.numel():
            self._out.write(_raw(tensor))  # a failed write removes the file and names the destination
        self._next += 1

    def close(self) -> None:
        if self._out.done:
            return
        if self._next != len(self.entries):
            self._out.abort()
            raise ValueError(f"only {self._next} of {len(self.entries)} declared tensors were written")
        self._out.commit()

    def abort(self) -> None:
        self._out.abort()

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


@dataclass
class _ReadSource(TensorSource):
    reader: "StreamingReader"
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        return self.reader.read(self.key)


class StreamingReader:
    """Tensors of one safetensors file, each read into its own buffer on request (no memory map)."""

    def __init__(self, path: str | os.PathLike, *, prefix: str = ""):
        self.path = Path(path)
        header = read_header(self.path)  # CheckpointError for anything malformed, before any tensor exists
        self._base = header.data_start
        self.metadata: dict[str, str] = dict(header.metadata)
        self._info: dict[str, tuple[str, tuple[int, ...], torch.dtype, int, int]] = {
            key[len(prefix):]: (key, e.shape, e.dtype, e.start, e.end)
            for key, e in header.entries.items() if key.startswith(prefix)}
        try:
            self._f = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(self.path, f"cannot read the file ({e}).") from e

    def sources(self) -> dict[str, TensorSource]:
        return {k: _ReadSource(self, k, shape, dtype) for k, (_, shape, dtype, _, _) in self._info.items()}

    def read(self, key: str) -> torch.Tensor:
        _, shape, dtype, start, end = self._info[key]
        # Large buffers are anonymous mappings of their own: freeing one hands the memory straight back to the
        # system, where a heap block of malloc's may stay resident and add to the next tensor's peak.
        buf = mmap.mmap(-1, end - start) if end - start >= _OWN_MAPPING else bytearray(end - start)
        self._f.seek(self._base + start)
        if self._f.readinto(buf) != len(buf):
            raise CheckpointError(self.path, f"truncated while reading {key!r}.")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "StreamingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
