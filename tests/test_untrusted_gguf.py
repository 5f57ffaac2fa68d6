"""Untrusted GGUF files: every damaged or hostile header gives one CheckpointError naming the file and the
fault, fast; nothing is trusted before it is checked against the bytes the file has.

The malformed files are built here byte by byte (``_gguf``: the GGUF layout written with ``struct``, checked
against gguf-py's reader) or cut from a real tiny model written by our converter."""

from __future__ import annotations

import json
import random
import struct
import time
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

from ovi.__main__ import main
from ovi.detect import inspect_file
from ovi.fusion.config import FusionConfig
from ovi.loading import CheckpointError
from ovi.quant.gguf_header import read_header
from ovi.quant.gguf_load import GGUFFile, llama_t5_name, load_fusion_gguf, load_umt5_gguf
from ovi.quant.gguf_write import convert_gguf
from ovi.tools.tiny import fusion as tiny_fusion
from ovi.tools.tiny import text as tiny_text

BOUND_S = 2.0  # the task's bound on any rejection (generous: the checks take milliseconds)
INFO_BOUND_S = 1.0  # `ovi info` on a file declaring a 2**60-item array
HUGE = 1 << 60


# -- a GGUF file, byte by byte ---------------------------------------------------------------------------

def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_string(key: str, value: str) -> bytes:
    return _str(key) + struct.pack("<I", V.STRING) + _str(value)


def kv_u32(key: str, value: int) -> bytes:
    return _str(key) + struct.pack("<II", V.UINT32, value)


def kv_array(key: str, item: V, values: list, fmt: str) -> bytes:
    return _str(key) + struct.pack("<IIQ", V.ARRAY, item, len(values)) + struct.pack(f"<{len(values)}{fmt}", *values)


def tensor_info(name: str, shape: tuple[int, ...], qtype: int, offset: int) -> bytes:
    """``shape`` in torch order; GGUF stores the dims row first."""
    return (_str(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *reversed(shape))
            + struct.pack("<IQ", qtype, offset))


def _nbytes(shape, qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[Q(qtype)]
    return int(np.prod(shape)) // block * size


def _gguf(kvs: list[bytes], tensors: list[tuple], *, version: int = 3, n_tensors: int | None = None,
          n_kv: int | None = None, alignment: int = 32, offsets: dict[str, int] | None = None,
          raw_infos: tuple[bytes, ...] = (), tail: int = 0) -> bytes:
    """A GGUF file: ``tensors`` are (name, shape, qtype) laid out one after another at aligned offsets
    (``offsets`` overrides some), their data a deterministic pattern; ``raw_infos`` are tensor infos given as
    bytes (after the others), ``tail`` extra zero bytes at the end. The data section covers every tensor that
    ends within its first 64 kB (a tensor placed further out is outside the file)."""
    offsets = offsets or {}
    infos, at, end = [], 0, 0
    for name, shape, qtype in tensors:
        n = _nbytes(shape, qtype)
        off = offsets.get(name, at)
        if name not in offsets:
            at = -(-(off + n) // alignment) * alignment
        infos.append(tensor_info(name, shape, qtype, off))
        if off + n <= 1 << 16:
            end = max(end, -(-(off + n) // alignment) * alignment)
    infos += list(raw_infos)
    data = bytes((i * 7) % 61 for i in range(end)) + b"\0" * tail  # small bytes: fp16/f32 values stay finite
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % alignment) + data


ARCH = kv_string("general.architecture", "ovi")
TENSORS = [("a.weight", (4, 8), Q.F32), ("b.weight", (2, 64), Q.Q8_0), ("c.bias", (6,), Q.F16)]


def _write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _rejects(fn, path: Path, phrase: str) -> str:
    """``fn(path)`` raises CheckpointError naming ``path`` and saying ``phrase``, within the bound."""
    t = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        fn(path)
    elapsed = time.monotonic() - t
    msg = str(e.value)
    assert elapsed < BOUND_S, (elapsed, msg)
    assert str(path) in msg, msg
    assert phrase in msg, msg
    assert "\n" not in msg
    return msg


def _both_reject(path: Path, phrase: str) -> str:
    """The loader and ``inspect_file`` (``ovi info``) both reject ``path`` the same way."""
    _rejects(GGUFFile, path, phrase)
    return _rejects(inspect_file, path, phrase)


def test_builder_writes_valid_gguf(tmp_path):
    """The byte-by-byte builder is right: gguf-py reads its file as we do, and the values come back."""
    p = _write(tmp_path, _gguf([ARCH, kv_u32("general.alignment", 64)], TENSORS, alignment=64), "ok.gguf")
    ref = gguf.GGUFReader(str(p))
    f = GGUFFile(p)
    assert f.architecture == "ovi" and f.header.alignment == 64
    assert [t.name for t in ref.tensors] == list(f.sources)
    for t in ref.tensors:
        src = f.sources[t.name]
        assert src.qtype == t.tensor_type and src.info.offset == t.data_offset and src.info.nbytes == t.n_bytes
        assert src.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert torch.equal(src.load(), torch.from_numpy(np.array(want, dtype=np.float32)).reshape(src.shape))


# -- the file and its counts -----------------------------------------------------------------------------

def test_bad_magic(tmp_path):
    p = _write(tmp_path, b"GGUX" + _gguf([ARCH], TENSORS)[4:])
    _rejects(GGUFFile, p, "not a GGUF file")
    _rejects(read_header, p, "not a GGUF file")


@pytest.mark.parametrize("version,phrase", [(1, "version 1"), (4, "reads versions 2 and 3"),
                                            (3 << 24, "big-endian"), (0xFFFFFFFF, "unsupported GGUF version")])
def test_unsupported_version(tmp_path, version, phrase):
    p = _write(tmp_path, _gguf([ARCH], TENSORS, version=version))
    assert "unsupported GGUF version" in _both_reject(p, phrase)


def test_truncated_at_every_header_byte(tmp_path):
    data = _gguf([ARCH, kv_array("ovi.list", V.INT32, [1, 2, 3], "i")], TENSORS)
    end = max(t.end for t in read_header(_write(tmp_path, data, "whole.gguf")).tensors.values())
    for n in range(4, end):  # every cut from just past the magic to the last tensor byte (then padding follows)
        _rejects(GGUFFile, _write(tmp_path, data[:n], f"cut_{n}.gguf"), "truncated")


@pytest.mark.parametrize("field,phrase", [("tensors", "the tensor table declares"),
                                          ("kv", "the metadata section declares")])
def test_huge_counts(tmp_path, field, phrase):
    big = {"tensors": dict(n_tensors=HUGE), "kv": dict(n_kv=HUGE)}[field]
    p = _write(tmp_path, _gguf([ARCH], TENSORS, **big))
    assert "1,152,921,504,606,846,976" in _both_reject(p, phrase)


def test_huge_string_lengths(tmp_path):
    key = struct.pack("<Q", HUGE) + b"general.name"
    p = _write(tmp_path, _gguf([key], TENSORS))
    _both_reject(p, "metadata key 0 declares 1,152,921,504,606,846,976 bytes")
    value = _str("general.name") + struct.pack("<IQ", V.STRING, HUGE)
    p = _write(tmp_path, _gguf([value], TENSORS))
    _both_reject(p, "the string value of 'general.name' declares")
    p = _write(tmp_path, _gguf([ARCH], [], raw_infos=(struct.pack("<Q", HUGE) + b"a.weight",), tail=64))
    _both_reject(p, "the name of tensor 0 declares")


@pytest.mark.parametrize("item", [V.UINT8, V.FLOAT64, V.STRING, V.ARRAY], ids=lambda v: v.name)
def test_huge_array_length_fails_at_once(tmp_path, item):
    arr = _str("tokenizer.ggml.tokens") + struct.pack("<IIQ", V.ARRAY, item, HUGE)
    p = _write(tmp_path, _gguf([ARCH, arr], TENSORS))
    _both_reject(p, "array 'tokenizer.ggml.tokens' of")
    _both_reject(p, "declares 1,152,921,504,606,846,976 items")


def test_nested_arrays_bounded(tmp_path):
    # an array of arrays whose inner array declares far more than the file holds
    inner = struct.pack("<IQ", V.UINT32, HUGE)
    nested = _str("ovi.nested") + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 1) + inner
    p = _write(tmp_path, _gguf([ARCH, nested], TENSORS))
    _both_reject(p, "declares 1,152,921,504,606,846,976 items")
    # arrays nested deeper than any real file: each level holds one array
    deep = _str("ovi.deep") + struct.pack("<I", V.ARRAY) + struct.pack("<IQ", V.ARRAY, 1) * 6 \
        + struct.pack("<IQ", V.UINT8, 0)
    p = _write(tmp_path, _gguf([ARCH, deep], TENSORS))
    _both_reject(p, "nests arrays more than")
    # a valid nested array (two levels) is read
    ok = _str("ovi.pairs") + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 2) + struct.pack("<IQ2i", V.INT32, 2, 1, 2) \
        + struct.pack("<IQ1i", V.INT32, 1, 3)
    f = GGUFFile(_write(tmp_path, _gguf([ARCH, ok], TENSORS), "nested_ok.gguf"))
    assert f.metadata["ovi.pairs"] == [[1, 2], [3]]


def test_unknown_value_types(tmp_path):
    p = _write(tmp_path, _gguf([ARCH, _str("ovi.x") + struct.pack("<IQ", 13, 0)], TENSORS))
    _both_reject(p, "'ovi.x' has unknown value type 13")
    p = _write(tmp_path, _gguf([ARCH, _str("ovi.x") + struct.pack("<IIQ", V.ARRAY, 99, 0)], TENSORS))
    _both_reject(p, "array 'ovi.x' has unknown item value type 99")


def test_duplicate_metadata_key(tmp_path):
    p = _write(tmp_path, _gguf([ARCH, kv_string("general.name", "a"), kv_string("general.name", "b")], TENSORS))
    _both_reject(p, "duplicate key 'general.name'")


@pytest.mark.parametrize("kv,phrase", [(kv_u32("general.alignment", 0), "= 0 is not a power of two"),
                                       (kv_u32("general.alignment", 48), "= 48 is not a power of two"),
                                       (kv_string("general.alignment", "32"), "general.alignment holds a string")])
def test_alignment_value_validated(tmp_path, kv, phrase):
    p = _write(tmp_path, _gguf([ARCH, kv], TENSORS))
    _both_reject(p, phrase)


# -- tensor infos ----------------------------------------------------------------------------------------

def test_unknown_tensor_type(tmp_path):
    p = _write(tmp_path, _gguf([ARCH], TENSORS, raw_infos=(tensor_info("d.weight", (4, 8), 77, 0),), tail=256))
    _both_reject(p, "tensor 'd.weight' has unknown GGML type 77")


def test_known_type_the_loader_cannot_read(tmp_path):
    p = _write(tmp_path, _gguf([ARCH], [("a.weight", (2, 256), Q.IQ2_XXS)]))
    _rejects(GGUFFile, p, "stored as IQ2_XXS, which this loader does not read")
    assert inspect_file(p).quantization == "IQ2_XXS"  # `ovi info` still describes the file


@pytest.mark.parametrize("n_dims", [0, 5, 1 << 31])
def test_dimension_count(tmp_path, n_dims):
    info = _str("a.weight") + struct.pack("<I", n_dims) + struct.pack("<4Q", 8, 4, 1, 1) + struct.pack("<IQ", 0, 0)
    p = _write(tmp_path, _gguf([ARCH], [], raw_infos=(info,), tail=256))
    _both_reject(p, f"declares {n_dims} dimensions")


@pytest.mark.parametrize("shape,phrase", [((0, 8), "every dimension must be positive"),
                                          ((4, 0, 8), "has shape [4, 0, 8]: every dimension must be positive"),
                                          ((1 << 40, 1 << 40), "too many elements"),
                                          ((1 << 63, 1 << 63, 1 << 63, 32), "too many elements")])
def test_dims_positive_and_bounded(tmp_path, shape, phrase):
    p = _write(tmp_path, _gguf([ARCH], [], raw_infos=(tensor_info("a.weight", shape, Q.F32, 0),), tail=2048))
    _both_reject(p, phrase)


def test_row_not_whole_blocks(tmp_path):
    # 48 values a row: 1.5 Q8_0 blocks (the element count, 96, is a whole number of blocks; the rows are not)
    data = _gguf([ARCH], [("a.weight", (2, 64), Q.Q8_0)])
    data = data.replace(struct.pack("<2Q", 64, 2), struct.pack("<2Q", 48, 2))
    _both_reject(_write(tmp_path, data), "rows of 48 values, not a multiple of the Q8_0 block of 32")


def test_offset_not_aligned(tmp_path):
    p = _write(tmp_path, _gguf([ARCH], TENSORS, offsets={"b.weight": 130}))
    _both_reject(p, "tensor 'b.weight' has data offset 130, not aligned to 32 bytes")
    p = _write(tmp_path, _gguf([ARCH, kv_u32("general.alignment", 256)], TENSORS, alignment=256,
                               offsets={"b.weight": 128}))
    _both_reject(p, "not aligned to 256 bytes")


def test_offset_outside_the_file_or_wrapping(tmp_path):
    p = _write(tmp_path, _gguf([ARCH], TENSORS, offsets={"c.bias": 1 << 20}))
    _both_reject(p, "tensor 'c.bias' (F16 [6], 12 bytes) ends at byte 1,048,")
    # an offset that, plus the data section start and the size, passes 2**64: a C reader would wrap to the start
    p = _write(tmp_path, _gguf([ARCH], TENSORS, offsets={"c.bias": (1 << 64) - 32}))
    _both_reject(p, "wraps around past 2^64")


def test_overlapping_tensors(tmp_path):
    p = _write(tmp_path, _gguf([ARCH], TENSORS, offsets={"b.weight": 96}))
    _both_reject(p, "tensors 'a.weight' (bytes")
    _both_reject(p, "and 'b.weight' (from")
    _both_reject(p, "overlap")
    same = [("a.weight", (4, 8), Q.F32), ("x.weight", (4, 8), Q.F32)]
    p = _write(tmp_path, _gguf([ARCH], same, offsets={"x.weight": 0}), "same.gguf")
    _both_reject(p, "overlap")


def test_duplicate_tensor_names(tmp_path):
    p = _write(tmp_path, _gguf([ARCH], TENSORS + [("a.weight", (4, 8), Q.F32)]))
    _both_reject(p, "duplicate tensor name 'a.weight'")


# -- names and logical shapes ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_names(tmp_path_factory):
    """A tiny umT5 encoder in llama.cpp's T5 names, as F32 tensors: {name: array}."""
    sd = tiny_text.tiny_state_dict(tiny_text.tiny_config(64), seed=1)
    return {llama_t5_name(k): v.float().numpy() for k, v in sd.items()}


def _write_gguf_py(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in tensors.items():
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("bad", ["enc.blk.0.attn_qq.weight", "enc.blk.x.attn_q.weight", "enc.output_norm"])
def test_umt5_name_that_does_not_map(tmp_path, t5_names, bad):
    ok = _write_gguf_py(tmp_path / "ok.gguf", "t5encoder", t5_names)
    assert inspect_file(ok).component == "umt5" and load_umt5_gguf(ok, dtype=torch.float32) is not None
    names = dict(t5_names)
    names[bad] = names.pop("enc.blk.0.attn_q.weight")
    p = _write_gguf_py(tmp_path / "bad_names.gguf", "t5encoder", names)
    for fn in (load_umt5_gguf, inspect_file):
        _rejects(fn, p, f"tensor {bad!r} is not a umT5 encoder tensor in llama.cpp's T5 names")


@pytest.mark.parametrize("kv,phrase", [
    (kv_string("comfy.gguf.orig_shape.a.weight", "[8, 4]"), "holds a string, not a non-empty array of integers"),
    (kv_array("comfy.gguf.orig_shape.a.weight", V.FLOAT32, [8.0, 4.0], "f"), "holds an array of float32, not"),
    (kv_array("comfy.gguf.orig_shape.a.weight", V.INT32, [], "i"), "not a non-empty array of integers"),
    (kv_array("comfy.gguf.orig_shape.a.weight", V.INT32, [8, 5], "i"), "= [8, 5] does not fit tensor 'a.weight'"),
    (kv_array("comfy.gguf.orig_shape.a.weight", V.INT64, [-4, -8], "q"), "= [-4, -8] does not fit"),
])
def test_malformed_orig_shape(tmp_path, kv, phrase):
    p = _write(tmp_path, _gguf([ARCH, kv], TENSORS))
    _both_reject(p, phrase)
    good = kv_array("comfy.gguf.orig_shape.a.weight", V.INT32, [2, 2, 8], "i")
    f = GGUFFile(_write(tmp_path, _gguf([ARCH, good], TENSORS), "good.gguf"))
    assert f.sources["a.weight"].shape == (2, 2, 8) and f.sources["a.weight"].load().shape == (2, 2, 8)


# -- a real tiny model -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A one-layer tiny fusion model as Q8_0 GGUF, written by our converter (about 11.5 MB)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("untrusted_gguf")
    cfg = FusionConfig(replace(tiny_fusion.TINY_CONFIG.video, num_layers=1),
                       replace(tiny_fusion.TINY_CONFIG.audio, num_layers=1))
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_fusion.random_state_dict(cfg, 9).items()}
    src = d / "one.safetensors"
    save_file(sd, str(src), metadata={"ovi.config": json.dumps(cfg.to_dict()), "ovi.variant": "960x960_10s"})
    return convert_gguf(src, d / "one_q8_0.gguf", "q8_0")


def test_real_file_layout_agrees_with_gguf_py(real):
    header = read_header(real)
    ref = gguf.GGUFReader(str(real))
    assert len(header.tensors) == len(ref.tensors) > 50
    for t in ref.tensors:
        ours = header.tensors[t.name]
        assert (ours.qtype, ours.offset, ours.nbytes) == (t.tensor_type, t.data_offset, t.n_bytes), t.name
        assert ours.dims == tuple(int(d) for d in t.shape.tolist())
    assert header.string("ovi.variant") == "960x960_10s"


def test_ovi_info_on_a_huge_array_returns_at_once(real, tmp_path, capsys):
    """A 13 MB file whose first metadata entry declares a 2**60-item array: one error line, in under 1 s."""
    data = real.read_bytes()
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    arr = _str("tokenizer.ggml.scores") + struct.pack("<IIQ", V.ARRAY, V.FLOAT32, HUGE)
    bad = data[:8] + struct.pack("<QQ", n_tensors, n_kv + 1) + arr + data[24:]
    bad += b"\0" * (13_000_000 - len(bad))
    p = _write(tmp_path, bad, "huge_array.gguf")
    assert p.stat().st_size == 13_000_000
    assert main(["info", str(real)]) == 0  # the intact file; also loads the CLI's modules before the timing
    assert "fusion" in capsys.readouterr().out
    t = time.monotonic()
    rc = main(["info", str(p)])
    elapsed = time.monotonic() - t
    out = capsys.readouterr()
    assert rc != 0 and elapsed < INFO_BOUND_S, (rc, elapsed)
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith(f"error: {p}: ") and "1,152,921,504,606,846,976 items" in lines[0]
    assert out.out == ""


def _mutations(data: bytes, header_end: int, count: int, seed: int):
    """Seeded damage to a real file: bit flips in the header, truncations, count fields and 8-byte words
    of the header overwritten."""
    rng = random.Random(seed)
    for i in range(count):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(4, header_end)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b = b[:rng.randrange(4, header_end if i % 8 == 1 else len(b))]
        elif kind == 2:
            at = rng.choice([8, 16])
            value = rng.choice([0, 1, 2, 1 << 63, (1 << 64) - 1, rng.randrange(1 << 64), rng.randrange(1, 300)])
            b[at:at + 8] = value.to_bytes(8, "little")
        else:
            at = rng.randrange(24, header_end - 8)
            b[at:at + 8] = rng.randrange(1 << 64).to_bytes(8, "little")
        yield i, bytes(b)


def test_fuzzed_real_file_loads_or_fails_cleanly(real, tmp_path):
    data = real.read_bytes()
    header_end = read_header(real).data_offset
    outcomes = {"loaded": 0, "rejected": 0}
    for i, b in _mutations(data, header_end, 200, seed=0):
        p = _write(tmp_path, b, f"fuzz_{i}.gguf")
        for fn in (inspect_file, lambda q: load_fusion_gguf(q, dtype=torch.float32)):
            t = time.monotonic()
            try:
                fn(p)
                outcomes["loaded"] += 1
            except CheckpointError as e:
                assert str(p) in str(e), (i, str(e))
                outcomes["rejected"] += 1
            assert time.monotonic() - t < BOUND_S, i
        p.unlink()
    assert outcomes["rejected"] > 100, outcomes


def test_real_file_truncated_through_the_header(real, tmp_path):
    data = real.read_bytes()
    header_end = read_header(real).data_offset
    for n in range(4, header_end, 89):
        p = _write(tmp_path, data[:n], f"cut_{n}.gguf")
        _rejects(GGUFFile, p, "truncated")
        p.unlink()
