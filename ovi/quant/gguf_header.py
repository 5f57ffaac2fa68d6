"""A bounded, validating reader of GGUF headers: metadata and tensor layout, nothing trusted.

A GGUF file declares counts and lengths (tensors, metadata entries, string and array lengths) and tensor
dims, types and offsets. Every one is checked against the bytes the file really has *before* anything is read
or allocated, so a damaged or hostile header fails at once with one ``CheckpointError`` naming the file, what
is wrong and where, instead of spinning over a 2**60-item array or wrapping an offset around.

The file is read once, front to back, with ``struct`` over a read-only memory map: nothing is allocated in
proportion to a declared size (only to bytes that exist). Arrays are walked but only decoded for the keys a
caller asks for (``keep``), so a large tokenizer vocabulary costs a skip, not a list.

What is checked, beyond the magic and the version (2 and 3, little-endian):
- every count and length against the bytes left, nested arrays too (and their depth);
- value types; ``general.alignment`` (a power of two, uint32); duplicate keys and duplicate tensor names;
- each tensor: a known GGML type, 1..4 dims, each dim positive, the row (dim 0) a whole number of the type's
  blocks, an offset aligned to ``general.alignment``, and its bytes (what the type and dims imply) inside the
  file's data section; no two tensors' bytes overlap.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from ..loading import GGUF_MAGIC, CheckpointError

SUPPORTED_VERSIONS = (2, 3)  # version 1 used 32-bit counts and lengths; nothing current writes it
DEFAULT_ALIGNMENT = 32  # the GGUF default when general.alignment is absent
ALIGNMENT_KEY = "general.alignment"
MAX_DIMS = 4  # GGML_MAX_DIMS: ggml tensors have at most four dimensions
MAX_ARRAY_DEPTH = 4  # arrays of arrays: real files nest at most once; deeper is damage or an attack
MAX_ELEMENTS = (1 << 63) - 1  # ggml counts elements in int64
_U64_END = 1 << 64  # offsets are uint64: an end at or past this wraps around in a C reader
_SHOWN = 80  # characters of a file-supplied name quoted in a message (a damaged name can be megabytes)

# value types: code -> (name, struct format of one item); STRING and ARRAY have no fixed size
STRING, ARRAY = 8, 9
_SCALARS = {0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"), 4: ("uint32", "I"),
            5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"), 10: ("uint64", "Q"), 11: ("int64", "q"),
            12: ("float64", "d")}
INTEGER_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
UINT32 = 4
_TYPE_NAMES = {**{k: v[0] for k, v in _SCALARS.items()}, STRING: "string", ARRAY: "array"}
# the fewest bytes an item can take: a string is at least its 8-byte length, an array its type and count
_MIN_ITEM = {**{k: struct.calcsize("<" + v[1]) for k, v in _SCALARS.items()}, STRING: 8, ARRAY: 12}
_MIN_KV = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_CAUSE = ("Likely cause: the file is damaged or truncated (an interrupted download or conversion) or was not "
          "written by a GGUF writer; fetch or convert it again.")


def show(name: str) -> str:
    """A file-supplied name as it goes into a one-line message: quoted, escaped, cut to a readable length."""
    return repr(name if len(name) <= _SHOWN else name[:_SHOWN] + "...")


def type_name(code: int) -> str:
    return _TYPE_NAMES.get(code, f"unknown type {code}")


def _a(what: str) -> str:
    return ("an " if what[0] in "aeiou" else "a ") + what


@dataclass(frozen=True)
class KV:
    """One metadata entry. ``value``: a Python scalar, a str, a list for an array (nested lists for arrays of
    arrays), or None for an array that was validated and skipped (its key was not kept)."""

    type: int
    value: object
    item_type: int | None = None  # arrays: the item type
    count: int = 0                # arrays: the item count


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's validated layout: GGML type, dims in GGUF order (``dims[0]`` is the contiguous row),
    absolute file offset and byte size."""

    name: str
    qtype: Q
    dims: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The stored shape in torch / numpy order (the row last)."""
        return tuple(reversed(self.dims))

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.dims[0] // block * size

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    file_bytes: int
    alignment: int
    data_offset: int                  # where the data section starts (tensor offsets count from here)
    fields: dict[str, KV]
    tensors: dict[str, TensorInfo]    # in file order

    def value(self, key: str, default=None):
        kv = self.fields.get(key)
        return default if kv is None else kv.value

    def string(self, key: str) -> str | None:
        kv = self.fields.get(key)
        return kv.value if kv is not None and kv.type == STRING else None


class _Cursor:
    """Reads little-endian values at ``pos``, each only after checking the file has its bytes."""

    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, what: str, at: int | None = None, damage: str = "damaged") -> CheckpointError:
        at = self.pos if at is None else at
        return CheckpointError(self.path, f"{damage} GGUF header: {what} (at byte {at:,} of {self.size:,}). {_CAUSE}")

    def too_long(self, what: str, at: int | None = None) -> CheckpointError:
        """A declared size beyond the end of the file: a cut file or a damaged count, no telling which."""
        return self.fail(what, at, "truncated or damaged")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise CheckpointError(self.path, f"truncated GGUF file: it ends inside {what} (byte {self.pos:,} needs "
                                             f"{n:,} more bytes, the file has {self.size:,}). The download or "
                                             "conversion did not finish; fetch or convert the file again.")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out[0] if len(out) == 1 else out

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def count(self, n: int, item_bytes: int, what: str) -> None:
        """A declared count of items of at least ``item_bytes`` each must fit in the bytes left."""
        if n * item_bytes > self.left:
            raise self.too_long(f"{what} declares {n:,} items, but only {self.left:,} bytes are left in the file "
                            f"(at least {item_bytes} bytes an item)")

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        if n > self.left:
            raise self.too_long(f"{what} declares {n:,} bytes, but only {self.left:,} are left in the file",
                            self.pos - 8)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def text(self, what: str, strict: bool = True) -> str:
        start = self.pos
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8", "strict" if strict else "replace")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text", start) from None

    def skip_string(self, what: str) -> None:
        n = self.u64(f"the length of {what}")
        if n > self.left:
            raise self.too_long(f"{what} declares {n:,} bytes, but only {self.left:,} are left in the file",
                            self.pos - 8)
        self.pos += n


def _value(c: _Cursor, vtype: int, key: str):
    """One scalar or string value of type ``vtype`` (arrays go through ``_array``)."""
    if vtype in _SCALARS:
        return c.unpack("<" + _SCALARS[vtype][1], f"the value of {show(key)}")
    if vtype == STRING:
        return c.text(f"the string value of {show(key)}", strict=False)
    raise c.fail(f"metadata {show(key)} has unknown value type {vtype} (known: 0-12)", c.pos - 4)


def _array(c: _Cursor, key: str, keep: bool, depth: int) -> tuple[list | None, int, int]:
    if depth >= MAX_ARRAY_DEPTH:
        raise c.fail(f"metadata {show(key)} nests arrays more than {MAX_ARRAY_DEPTH} deep")
    item = c.u32(f"the item type of array {show(key)}")
    if item not in _MIN_ITEM:
        raise c.fail(f"array {show(key)} has unknown item value type {item} (known: 0-12)", c.pos - 4)
    n = c.u64(f"the length of array {show(key)}")
    c.count(n, _MIN_ITEM[item], f"array {show(key)} of {type_name(item)}")
    if item in _SCALARS:
        fmt = _SCALARS[item][1]
        size = n * _MIN_ITEM[item]
        values = list(struct.unpack_from(f"<{n}{fmt}", c.buf, c.pos)) if keep else None
        c.pos += size
        return values, item, n
    values = [] if keep else None
    for i in range(n):
        if item == STRING:
            if keep:
                values.append(c.text(f"string {i} of array {show(key)}", strict=False))
            else:
                c.skip_string(f"string {i} of array {show(key)}")
        else:
            inner = _array(c, key, keep, depth + 1)[0]
            if keep:
                values.append(inner)
    return values, item, n


def _alignment(c: _Cursor, kv: KV | None) -> int:
    if kv is None:
        return DEFAULT_ALIGNMENT
    if kv.type != UINT32:
        raise c.fail(f"{ALIGNMENT_KEY} holds {_a(type_name(kv.type))}; GGUF stores it as a uint32")
    a = kv.value
    if a <= 0 or a & (a - 1):
        raise c.fail(f"{ALIGNMENT_KEY} = {a} is not a power of two")
    return a


def _tensor_info(c: _Cursor, i: int) -> tuple[str, Q, tuple[int, ...], int, int]:
    start = c.pos
    name = c.text(f"the name of tensor {i}")
    what = f"tensor {show(name)}"
    n_dims = c.u32(f"the dimension count of {what}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise c.fail(f"{what} declares {n_dims} dimensions (ggml tensors have 1 to {MAX_DIMS})", c.pos - 4)
    dims = c.unpack(f"<{n_dims}Q", f"the dims of {what}")
    dims = (dims,) if n_dims == 1 else tuple(dims)
    code = c.u32(f"the type of {what}")
    offset = c.u64(f"the data offset of {what}")
    try:
        qtype = Q(code)
        block, size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise c.fail(f"{what} has unknown GGML type {code}", start) from None
    shape = list(reversed(dims))  # as messages show shapes: torch order
    if any(d <= 0 for d in dims):
        raise c.fail(f"{what} has shape {shape}: every dimension must be positive", start)
    numel = math.prod(dims)
    if numel > MAX_ELEMENTS:
        raise c.fail(f"{what} has shape {shape}: {numel:,} elements, too many elements for ggml's 64-bit "
                     "counts", start)
    if dims[0] % block:
        raise c.fail(f"{what} is {qtype.name} with rows of {dims[0]:,} values, not a multiple of the "
                     f"{qtype.name} block of {block}", start)
    return name, qtype, dims, offset, numel // block * size


def read_header(path: str | os.PathLike, keep: Callable[[str], bool] = lambda key: True) -> GGUFHeader:
    """Parse and validate the GGUF header of ``path``; arrays are decoded only for keys where ``keep(key)``
    (skipped arrays get ``value`` None). Raises ``CheckpointError`` for anything that does not hold up."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "file not found. Check the path.")
    size = p.stat().st_size
    with open(p, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(p, "not a GGUF file (no GGUF magic at the start). Give a .gguf file here, "
                                     "or load safetensors/torch files with the regular loader.")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(p, buf, size, keep)


def _parse(p: Path, buf, size: int, keep: Callable[[str], bool]) -> GGUFHeader:
    c = _Cursor(p, buf, size)
    c.pos = 4
    version = c.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            why = "it is a big-endian GGUF file; this loader reads little-endian ones (what llama.cpp and " \
                  "ComfyUI-GGUF write). Convert it again on a little-endian machine."
        elif version == 1:
            why = "GGUF version 1 (a 2023 format with 32-bit lengths) is no longer written by any tool. " \
                  "Convert the model again with current tools."
        else:
            why = f"this loader reads versions {' and '.join(map(str, SUPPORTED_VERSIONS))}. Likely cause: a " \
                  "damaged file, or one from a newer GGUF writer."
        raise CheckpointError(p, f"unsupported GGUF version {version}: {why}")
    n_tensors = c.u64("the tensor count")
    n_kv = c.u64("the metadata count")
    c.count(n_kv, _MIN_KV, "the metadata section")
    c.count(n_tensors, _MIN_TENSOR_INFO, "the tensor table")
    if n_kv * _MIN_KV + n_tensors * _MIN_TENSOR_INFO > c.left:
        raise c.too_long(f"the header declares {n_kv:,} metadata entries and {n_tensors:,} tensors, more than the "
                     f"{c.left:,} bytes left can hold")

    fields: dict[str, KV] = {}
    for i in range(n_kv):
        start = c.pos
        key = c.text(f"metadata key {i}")
        if key in fields:
            raise c.fail(f"duplicate key {show(key)} in the metadata", start)
        vtype = c.u32(f"the value type of {show(key)}")
        if vtype == ARRAY:
            values, item, n = _array(c, key, keep(key), 0)
            fields[key] = KV(ARRAY, values, item, n)
        else:
            fields[key] = KV(vtype, _value(c, vtype, key))
    alignment = _alignment(c, fields.get(ALIGNMENT_KEY))

    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        start = c.pos
        info = _tensor_info(c, i)
        if info[0] in names:
            raise c.fail(f"duplicate tensor name {show(info[0])}", start)
        names.add(info[0])
        infos.append(info)

    data_offset = -(-c.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, qtype, dims, offset, nbytes in infos:
        what = f"tensor {show(name)}"
        if offset % alignment:
            raise c.fail(f"{what} has data offset {offset:,}, not aligned to {alignment} bytes "
                         f"({ALIGNMENT_KEY})", data_offset)
        start = data_offset + offset
        if start + nbytes >= _U64_END:
            raise c.fail(f"{what} has data offset {offset:,}: with its {nbytes:,} bytes it wraps around past 2^64",
                         data_offset)
        if start + nbytes > size:
            raise CheckpointError(p, f"truncated or damaged GGUF file: {what} ({qtype.name} {list(reversed(dims))}, "
                                     f"{nbytes:,} bytes) ends at byte {start + nbytes:,} but the file has "
                                     f"{size:,}. Likely cause: the download or conversion did not finish, or the "
                                     "tensor offsets are damaged; fetch or convert the file again.")
        tensors[name] = TensorInfo(name, qtype, dims, start, nbytes)
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.end:
            raise c.fail(f"tensors {show(a.name)} (bytes {a.offset:,}..{a.end:,}) and {show(b.name)} (from "
                         f"{b.offset:,}) overlap in the data section", data_offset)
    return GGUFHeader(p, version, size, alignment, data_offset, fields, tensors)


def orig_shape(header: GGUFHeader, key: str, info: TensorInfo) -> tuple[int, ...] | None:
    """The logical shape recorded under metadata ``key`` for ``info`` (ComfyUI-GGUF's
    ``comfy.gguf.orig_shape.<name>``), validated against the stored shape; None when absent."""
    kv = header.fields.get(key)
    if kv is None:
        return None
    stored = list(info.shape)
    if kv.type != ARRAY or kv.item_type not in INTEGER_TYPES or not kv.count or kv.value is None:
        what = _a(type_name(kv.type) if kv.type != ARRAY else f"array of {type_name(kv.item_type)}")
        raise CheckpointError(header.path, f"metadata {show(key)} holds {what}, not a non-empty array of integers "
                                           f"(the logical shape of tensor {show(info.name)}, stored as {stored}). "
                                           f"{_CAUSE}")
    shape = tuple(int(d) for d in kv.value)
    if any(d <= 0 for d in shape) or math.prod(shape) != math.prod(info.shape):
        raise CheckpointError(header.path, f"metadata {show(key)} = {list(shape)} does not fit tensor "
                                           f"{show(info.name)}, stored as {stored} ({math.prod(info.shape):,} "
                                           f"values). {_CAUSE}")
    return shape
