"""The one validating parser of safetensors headers: every reader of the pack goes through ``read_header``.

Checkpoints come from strangers, so the header is treated as hostile input. Everything it claims is checked
against the file before anything it claims is allocated: the header length against the file size and a cap,
the JSON for duplicate keys and nesting depth, every entry's dtype / shape / offsets, the spans against each
other and against the data section. Each failure is a ``CheckpointError`` that names the file and, where
there is one, the tensor. Time and memory are proportional to the header, which is at most the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .loading import CheckpointError

# The safetensors names of the dtypes this pack reads and writes; the single table both readers and the
# writer use.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

METADATA_KEY = "__metadata__"
LENGTH_BYTES = 8  # the little-endian u64 header length that opens every safetensors file
# The reference implementation refuses headers above 100 MB too; a 2000-tensor model's header is ~300 kB.
MAX_HEADER_BYTES = 100_000_000
# A valid header nests 3 levels ({name: {"shape": [...]}}); the cap leaves room for extra fields but stops
# hostile nesting long before Python's recursion limit, whatever stack the caller already has.
MAX_JSON_DEPTH = 32
# The highest-rank tensor in these models is a 5-D conv kernel; a longer shape is not a weight.
MAX_RANK = 16
# Offsets and byte counts are int64 in every reader (torch, numpy, the OS); anything larger is a lie.
MAX_BYTES = 2**63 - 1
# Bracket bytes are scanned for depth in chunks so the scan's scratch memory stays small for any header.
_DEPTH_CHUNK = 1 << 22

_FIX = "the file is corrupt, truncated or not written by a safetensors writer; fetch it again from its source."
_QUOTE = ord('"')
_DEPTH_STEP = np.zeros(256, dtype=np.int8)
_DEPTH_STEP[[ord("["), ord("{")]] = 1
_DEPTH_STEP[[ord("]"), ord("}")]] = -1
_DEPTH_TOKEN = _DEPTH_STEP != 0
_DEPTH_TOKEN[_QUOTE] = True


class TensorEntry(NamedTuple):
    """One tensor of the header; ``start`` and ``end`` are byte offsets into the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    metadata: dict[str, str]
    entries: dict[str, TensorEntry]  # in header order
    data_start: int                  # file offset of the data section (8 + header length)
    file_size: int


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def json_depth(raw: bytes) -> int:
    """Deepest bracket nesting of JSON text, counting only brackets outside strings: a few vectorised linear
    passes, so a hostile header is measured before the recursive JSON parser ever sees it."""
    # Inside a string every backslash starts an escape, so dropping escaped backslashes, then escaped quotes,
    # left to right leaves exactly the quotes that open and close strings. (A backslash outside a string is
    # invalid JSON; the parser stops there, and nothing after it matters.)
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    quotes = depth = peak = 0
    for i in range(0, len(text), _DEPTH_CHUNK):
        chunk = np.frombuffer(text, np.uint8, min(_DEPTH_CHUNK, len(text) - i), i)
        tokens = chunk[_DEPTH_TOKEN[chunk]]  # quotes and brackets only: a small share of a real header
        if not len(tokens):
            continue
        seen = np.cumsum(tokens == _QUOTE, dtype=np.int64) + quotes  # quotes so far: odd means inside a string
        running = np.cumsum(np.where(seen & 1, 0, _DEPTH_STEP[tokens]), dtype=np.int64) + depth
        quotes, depth, peak = int(seen[-1]), int(running[-1]), max(peak, int(running.max()))
    return peak


def _is_int(x: object) -> bool:
    return type(x) is int  # JSON true/false arrive as bool, a subclass of int, and are not sizes


def _is_text(s: str) -> bool:
    try:  # JSON escapes can spell lone surrogates, which no file name, log line or terminal accepts
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(x: object, limit: int = 80) -> str:
    s = json.dumps(x) if not isinstance(x, str) else repr(x)
    return s if len(s) <= limit else s[:limit] + "..."


def _entry(path: Path, key: str, info: object, data_bytes: int) -> TensorEntry:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(path, f"tensor {_short(key)}: {what} ({_FIX})")

    if not isinstance(info, dict):
        raise bad(f"its header entry is {type(info).__name__}, not an object with dtype, shape and data_offsets")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise bad(f"its header entry has no {field!r}")
    name = info["dtype"]
    if not isinstance(name, str):
        raise bad(f"dtype is {_short(name)}, not a dtype name")
    if name not in DTYPES:
        raise bad(f"unknown dtype {_short(name)}; this loader reads {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    shape = info["shape"]
    if not isinstance(shape, list):
        raise bad(f"shape is {_short(shape)}, not a list of sizes")
    if len(shape) > MAX_RANK:
        raise bad(f"rank {len(shape)} is above the limit of {MAX_RANK} dimensions")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape {_short(shape)} has an entry that is not a non-negative integer")
    span = dtype.itemsize  # zero sizes count as one here, so a 0 cannot hide an absurd size beside it
    for d in shape:
        span *= max(d, 1)
        if span > MAX_BYTES:
            raise bad(f"shape {_short(shape)} holds more elements than any file can (element count overflow)")
    numel = 1
    for d in shape:
        numel *= d
    offsets = info["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and 0 <= o <= MAX_BYTES
                                                                    for o in offsets)):
        raise bad(f"data_offsets {_short(offsets)} are not two non-negative integers")
    start, end = offsets
    if start > end:
        raise bad(f"data_offsets {offsets} end before they start")
    if end - start != numel * dtype.itemsize:
        raise bad(f"data_offsets span {end - start:,} bytes, but shape {list(shape)} of {name} needs "
                  f"{numel * dtype.itemsize:,} bytes (byte span does not match the shape)")
    if end > data_bytes:
        raise CheckpointError(path, f"truncated: tensor {_short(key)} ends at byte {end:,} of the data section, "
                                    f"which has {data_bytes:,}. The download or copy did not finish; fetch the "
                                    "file again.")
    return TensorEntry(dtype, tuple(shape), start, end)


def parse_header(path: str | os.PathLike, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Validate the header bytes ``raw`` of a ``file_size``-byte file (the bytes after the length field)."""
    path = Path(path)
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(path, f"the header JSON is nested {depth} levels deep (a safetensors header "
                                    f"nests 3; the limit is {MAX_JSON_DEPTH}): {_FIX}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"the header is not UTF-8 text (bad byte at offset {e.start}): {_FIX}") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_object)
    except _DuplicateKey as e:
        raise CheckpointError(path, f"duplicate key {_short(e.key)} in the header: two entries claim one name, "
                                    f"so a reader could pick either ({_FIX})") from None
    except RecursionError:
        raise CheckpointError(path, f"the header JSON is nested too deep to parse: {_FIX}") from None
    except ValueError as e:  # json.JSONDecodeError, and ints past Python's digit limit
        raise CheckpointError(path, f"the header is not valid JSON ({str(e).splitlines()[0][:200]}): "
                                    f"{_FIX}") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, f"the header JSON is {type(header).__name__}, not an object of tensors: {_FIX}")

    metadata = header.pop(METADATA_KEY, {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) and _is_text(k) and _is_text(v)
                                                 for k, v in metadata.items()):
        raise CheckpointError(path, f"{METADATA_KEY} is not an object of string -> string ({_FIX})")

    data_start = LENGTH_BYTES + len(raw)
    data_bytes = file_size - data_start
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        if not _is_text(key):
            raise CheckpointError(path, f"tensor name {_short(key)} is not valid text ({_FIX})")
        entries[key] = _entry(path, key, info, data_bytes)

    # Spans must tile the data section, as the reference reader demands: no overlap (two tensors sharing
    # bytes), no hole and no tail (room for a second payload hidden in a file that still loads).
    at, prev = 0, None
    for key, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start < at:
            p = entries[prev]
            raise CheckpointError(path, f"tensor {_short(key)} (bytes {e.start:,}-{e.end:,}) overlaps tensor "
                                        f"{_short(prev)} (bytes {p.start:,}-{p.end:,}) in the data section ({_FIX})")
        if e.start > at:
            raise CheckpointError(path, f"tensor {_short(key)} starts at byte {e.start:,} of the data section, "
                                        f"leaving a hole after byte {at:,} ({_FIX})")
        if e.end > at:
            at, prev = e.end, key
    if at != data_bytes:
        raise CheckpointError(path, f"{data_bytes - at:,} bytes after the last tensor: the header describes "
                                    f"{data_start + at:,} bytes but the file has {file_size:,} ({_FIX})")
    return SafetensorsHeader(path, metadata, entries, data_start, file_size)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``; reads the header bytes only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found. Check the path, or download the file "
                                    "(python -m ovi download --variant ...).")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < LENGTH_BYTES:
                raise CheckpointError(path, f"not a safetensors file: {size} bytes, shorter than the "
                                            f"{LENGTH_BYTES}-byte header length ({_FIX})")
            n = int.from_bytes(f.read(LENGTH_BYTES), "little")
            if n == 0:
                raise CheckpointError(path, f"not a valid safetensors file: header length 0 ({_FIX})")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(path, f"header length {n:,} is above the {MAX_HEADER_BYTES:,}-byte limit "
                                            f"for safetensors headers ({_FIX})")
            if n > size - LENGTH_BYTES:
                raise CheckpointError(path, f"truncated or not safetensors: header length {n:,} in a "
                                            f"{size:,}-byte file. Fetch the file again.")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(path, f"cannot read the file ({e}).") from e
    if len(raw) != n:  # the file shrank while we read it
        raise CheckpointError(path, f"truncated while reading the header ({_FIX})")
    return parse_header(path, raw, size)
