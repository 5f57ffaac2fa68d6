"""Checkpoints from strangers: every malformed safetensors header, through every reader (the mmap reader, the
streaming reader, ``read_metadata``, ``python -m ovi info``), ends in one ``CheckpointError`` that names the file
and what is wrong, within 2 s and before anything the header claims is allocated; malformed .pth files too."""

from __future__ import annotations

import json
import pickle
import random
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ovi.__main__ import main
from ovi.loading import CheckpointError, CheckpointReader, read_metadata
from ovi.safetensors_header import DTYPES, MAX_HEADER_BYTES, MAX_JSON_DEPTH, MAX_RANK, read_header
from ovi.safetensors_stream import StreamingReader

BOUND_S = 2.0  # the task's bound for rejecting (or reading) any one malformed file


def _entry(dtype="F32", shape=(2,), start=0, end=None):
    end = start + 4 * _numel(shape) if end is None else end
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write(path: Path, header: bytes | str | dict, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file written by hand: the 8-byte length, the header bytes, the data."""
    raw = json.dumps(header).encode() if isinstance(header, dict) else (
        header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _deep(depth: int) -> str:
    return '{"t": ' + "[" * depth + "]" * depth + "}"


# (case id, builder(path) -> path, phrase the message must contain)
CASES = [
    ("short_file", lambda p: (p.write_bytes(b"\x05\x00\x00"), p)[1], "shorter than the 8-byte"),
    ("empty_file", lambda p: (p.write_bytes(b""), p)[1], "shorter than the 8-byte"),
    ("length_zero", lambda p: _write(p, b"", length=0), "header length 0"),
    ("length_past_file", lambda p: _write(p, b"{}", length=1000), "truncated or not safetensors"),
    ("length_above_cap", lambda p: _write(p, b"{}", length=MAX_HEADER_BYTES + 1), "above the 100,000,000-byte"),
    ("length_huge", lambda p: _write(p, b"{}", length=2**64 - 1), "above the 100,000,000-byte"),
    ("not_utf8", lambda p: _write(p, b'{"a\xff\xfe": 1}'), "not UTF-8"),
    ("not_json", lambda p: _write(p, b'{"a": {"dtype": "F32",'), "not valid JSON"),
    ("trailing_garbage", lambda p: _write(p, b'{} {}'), "not valid JSON"),
    ("unclosed_json", lambda p: _write(p, b'{"a": {"shape": [1, 2'), "not valid JSON"),
    ("int_past_digit_limit", lambda p: _write(p, '{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + "]}}"),
     "not valid JSON"),
    ("top_level_list", lambda p: _write(p, b"[1, 2]"), "not an object of tensors"),
    ("top_level_string", lambda p: _write(p, b'"x"'), "not an object of tensors"),
    ("duplicate_tensor", lambda p: _write(p, '{"a": %s, "a": %s}' % (json.dumps(_entry()), json.dumps(_entry(
        start=8))), b"\0" * 16), "duplicate key 'a'"),
    ("duplicate_field", lambda p: _write(p, '{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], '
                                            '"data_offsets": [0, 8]}}', b"\0" * 8), "duplicate key 'dtype'"),
    ("duplicate_metadata", lambda p: _write(p, '{"__metadata__": {"k": "1", "k": "2"}}'), "duplicate key 'k'"),
    ("deep_nesting", lambda p: _write(p, _deep(100_000)), "nested 100001 levels deep"),
    ("deep_unclosed", lambda p: _write(p, '{"t": ' + "[" * 100_000), "nested 100001 levels deep"),
    ("nesting_just_over", lambda p: _write(p, _deep(MAX_JSON_DEPTH)), f"nested {MAX_JSON_DEPTH + 1} levels"),
    ("entry_not_object", lambda p: _write(p, {"a": [1, 2]}), "not an object with dtype"),
    ("entry_null", lambda p: _write(p, {"a": None}), "not an object with dtype"),
    ("missing_dtype", lambda p: _write(p, {"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "no 'dtype'"),
    ("missing_shape", lambda p: _write(p, {"a": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8), "no 'shape'"),
    ("missing_offsets", lambda p: _write(p, {"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "no 'data_offsets'"),
    ("dtype_not_string", lambda p: _write(p, {"a": _entry(dtype=5)}, b"\0" * 8), "not a dtype name"),
    ("dtype_unknown", lambda p: _write(p, {"a": _entry(dtype="F128")}, b"\0" * 8), "unknown dtype 'F128'"),
    ("dtype_lowercase", lambda p: _write(p, {"a": _entry(dtype="f32")}, b"\0" * 8), "unknown dtype 'f32'"),
    ("shape_not_list", lambda p: _write(p, {"a": {**_entry(), "shape": "2"}}, b"\0" * 8), "not a list of sizes"),
    ("shape_negative", lambda p: _write(p, {"a": {**_entry(), "shape": [-2]}}, b"\0" * 8), "not a non-negative int"),
    ("shape_bool", lambda p: _write(p, {"a": {**_entry(), "shape": [True, 2]}}, b"\0" * 8), "not a non-negative int"),
    ("shape_float", lambda p: _write(p, {"a": {**_entry(), "shape": [2.0]}}, b"\0" * 8), "not a non-negative int"),
    ("shape_nan", lambda p: _write(p, b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'),
     "not a non-negative int"),
    ("shape_nested", lambda p: _write(p, {"a": {**_entry(), "shape": [[2]]}}, b"\0" * 8), "not a non-negative int"),
    ("rank_too_high", lambda p: _write(p, {"a": _entry(shape=(1,) * (MAX_RANK + 1))}, b"\0" * 4),
     f"rank {MAX_RANK + 1} is above"),
    ("numel_overflow", lambda p: _write(p, {"a": _entry(shape=(2**40, 2**40), end=8)}, b"\0" * 8),
     "element count overflow"),
    ("numel_overflow_beside_zero", lambda p: _write(p, {"a": _entry(shape=(0, 2**70), end=0)}),
     "element count overflow"),
    ("offsets_not_list", lambda p: _write(p, {"a": {**_entry(), "data_offsets": 8}}, b"\0" * 8),
     "not two non-negative integers"),
    ("offsets_one_int", lambda p: _write(p, {"a": {**_entry(), "data_offsets": [8]}}, b"\0" * 8),
     "not two non-negative integers"),
    ("offsets_negative", lambda p: _write(p, {"a": {**_entry(), "data_offsets": [-8, 0]}}, b"\0" * 8),
     "not two non-negative integers"),
    ("offsets_bool", lambda p: _write(p, {"a": {**_entry(shape=(0,)), "data_offsets": [False, False]}}),
     "not two non-negative integers"),
    ("offsets_reversed", lambda p: _write(p, {"a": {**_entry(), "data_offsets": [8, 0]}}, b"\0" * 8),
     "end before they start"),
    ("span_mismatch", lambda p: _write(p, {"a": _entry(shape=(2,), end=12)}, b"\0" * 12),
     "byte span does not match the shape"),
    ("span_past_data", lambda p: _write(p, {"a": _entry(shape=(4,))}, b"\0" * 8), "truncated: tensor 'a' ends"),
    ("huge_tensor_past_data", lambda p: _write(p, {"a": _entry(shape=(2**20, 2**20))}, b"\0" * 8),
     "truncated: tensor 'a' ends"),
    ("overlap", lambda p: _write(p, {"a": _entry(shape=(2,)), "b": _entry(shape=(2,), start=4)}, b"\0" * 12),
     "overlaps tensor"),
    ("overlap_zero_size_inside", lambda p: _write(p, {"a": _entry(shape=(2,)), "b": _entry(shape=(0,), start=4)},
                                                  b"\0" * 8), "overlaps tensor"),
    ("hole", lambda p: _write(p, {"a": _entry(shape=(1,)), "b": _entry(shape=(1,), start=8)}, b"\0" * 12),
     "leaving a hole"),
    ("bytes_after_last_tensor", lambda p: _write(p, {"a": _entry(shape=(1,))}, b"\0" * 20),
     "16 bytes after the last tensor"),
    ("metadata_not_object", lambda p: _write(p, {"__metadata__": ["x"]}), "__metadata__ is not an object of string"),
    ("metadata_int_value", lambda p: _write(p, {"__metadata__": {"k": 1}}), "__metadata__ is not an object of string"),
    ("metadata_nested_value", lambda p: _write(p, {"__metadata__": {"k": {"x": "y"}}}),
     "__metadata__ is not an object of string"),
    ("metadata_lone_surrogate", lambda p: _write(p, b'{"__metadata__": {"k": "\\ud800"}}'),
     "__metadata__ is not an object of string"),
    ("name_lone_surrogate", lambda p: _write(p, b'{"\\udc00": {"dtype": "F32", "shape": [0], '
                                                b'"data_offsets": [0, 0]}}'), "is not valid text"),
]


def _read_checkpoint(path):
    with CheckpointReader(path) as r:
        return {k: r.get(k) for k in r.keys()}


def _read_streaming(path):
    with StreamingReader(path) as r:
        return {k: s.load() for k, s in r.sources().items()}


READERS = {"checkpoint_reader": _read_checkpoint, "streaming_reader": _read_streaming, "read_metadata": read_metadata}


def _timed(fn, *args):
    t0 = time.monotonic()
    try:
        return fn(*args)
    finally:
        elapsed = time.monotonic() - t0
        assert elapsed < BOUND_S, f"took {elapsed:.2f} s"


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("case, build, phrase", CASES, ids=[c[0] for c in CASES])
def test_malformed_header_is_one_clear_error(tmp_path, reader, case, build, phrase):
    path = build(tmp_path / f"{case}.safetensors")
    with pytest.raises(CheckpointError) as e:
        _timed(READERS[reader], path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    assert phrase in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("case, build, phrase", CASES, ids=[c[0] for c in CASES])
def test_info_cli_reports_one_line(tmp_path, capsys, case, build, phrase):
    path = build(tmp_path / f"{case}.safetensors")
    rc = _timed(main, ["info", str(path)])
    err = capsys.readouterr().err
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}: "), err
    assert phrase in err and "Traceback" not in err


def test_the_cap_is_read_before_the_header(tmp_path):
    """A header just under the cap but longer than the file is 'truncated', not read: nothing is allocated for
    bytes that are not there."""
    path = _write(tmp_path / "m.safetensors", b"{}", length=MAX_HEADER_BYTES)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="truncated or not safetensors"):
            _timed(read_header, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


@pytest.mark.parametrize("shape", [(2**40, 2**40), (2**31, 2**31, 2**31), (2**62,)])
def test_huge_shape_is_refused_at_header_time(tmp_path, shape):
    # offsets that agree with the shape, so only the size itself can stop it
    path = _write(tmp_path / "huge.safetensors", {"a": _entry(shape=shape)}, b"\0" * 64)
    for reader in (_read_checkpoint, _read_streaming):
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError, match="element count overflow|truncated: tensor 'a'") as e:
                _timed(reader, path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert str(path) in str(e.value)
        assert peak < 1_000_000  # the header's claim was never materialised


def test_valid_edge_cases_still_load(tmp_path):
    """What the format allows must keep loading: zero-size tensors (sharing an offset), null metadata, every
    accepted dtype, rank 0, padding spaces after the JSON."""
    tensors = {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 7), "empty2": torch.zeros(3, 0)}
    for name, dtype in DTYPES.items():
        tensors[f"t_{name}"] = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(dtype)
    save_file(tensors, str(tmp_path / "ok.safetensors"), metadata={"k": "v"})
    for reader in (_read_checkpoint, _read_streaming):
        got = _timed(reader, tmp_path / "ok.safetensors")
        assert set(got) == set(tensors)
        for k, t in tensors.items():
            assert got[k].dtype == t.dtype and got[k].shape == t.shape
            assert torch.equal(got[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert read_metadata(tmp_path / "ok.safetensors") == {"k": "v"}
    header = {"__metadata__": None, "a": _entry(shape=(1,)), "z": _entry(shape=(0,), start=4)}
    raw = json.dumps(header).encode() + b"     "
    _write(tmp_path / "null_meta.safetensors", raw, struct.pack("<f", 1.5))
    with CheckpointReader(tmp_path / "null_meta.safetensors") as r:
        assert r.metadata == {} and r.get("a").tolist() == [1.5] and r.shapes()["z"] == (0,)
    with StreamingReader(tmp_path / "null_meta.safetensors") as r:
        assert r.metadata == {} and r.read("a").tolist() == [1.5]


# -- seeded fuzzing -----------------------------------------------------------------------------------------

FUZZ_CASES = 200


def _mutate(rng: random.Random, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n]
    kind = rng.randrange(4)
    if kind == 0:  # truncation anywhere, header included
        return data[:rng.randrange(len(data))]
    if kind == 1:  # byte flips inside the header
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            b[8 + rng.randrange(n)] = rng.randrange(256)
        return bytes(b)
    if kind == 2:  # a changed header-length field
        new = rng.choice([0, 1, n - 1, n + 1, n - rng.randint(2, 64), n + rng.randint(2, 64), len(data) - 8,
                          len(data), rng.getrandbits(32), rng.getrandbits(64)])
        return struct.pack("<Q", new) + data[8:]
    # JSON edits: valid JSON, wrong content
    obj = json.loads(header)
    names = [k for k in obj if k != "__metadata__"]
    key = rng.choice(names)
    entry = obj[key]
    edit = rng.randrange(11)
    if edit == 0:
        entry["shape"] = [d + rng.choice([-1, 1]) for d in entry["shape"]] or [1]
    elif edit == 1:
        entry["dtype"] = rng.choice(["F16", "F32", "I8", "BOOL", "F8_E4M3", "Q4", "", None])
    elif edit == 2:
        entry["data_offsets"] = entry["data_offsets"][::-1]
    elif edit == 3:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif edit == 4:
        other = obj[rng.choice(names)]
        entry["data_offsets"] = list(other["data_offsets"])
    elif edit == 5:
        entry["shape"] = [rng.choice([2**40, -1, True, "3", 1.5, None])] + entry["shape"]
    elif edit == 6:
        obj["__metadata__"] = rng.choice([[1], {"k": 3}, "text", {"k": {"n": "v"}}])
    elif edit == 7:
        obj[key] = rng.choice([[], 3, "x", None])
    elif edit == 8:
        start, end = entry["data_offsets"]
        shift = rng.choice([1, 2, 4, 1 << 30])
        entry["data_offsets"] = [start + shift, end + shift]
    elif edit == 9:
        entry["shape"] = [1] * (MAX_RANK + rng.randint(1, 10))
    else:
        entry["extra"] = json.loads("[" * 50 + "]" * 50)
    raw = json.dumps(obj).encode()
    if rng.random() < 0.3:  # a duplicated key, which a dict cannot express
        raw = raw[:-1] + b", " + json.dumps(key).encode() + b": " + json.dumps(entry).encode() + b"}"
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _loads_or_refuses(reader, path: Path, declared) -> str:
    """'ok' when every tensor loads with its declared shape, 'refused' for a CheckpointError; anything else
    propagates and fails the test."""
    t0 = time.monotonic()
    try:
        with reader(path) as r:
            for key, src in r.sources().items():
                t = src.load()
                assert tuple(t.shape) == tuple(src.shape) == declared(r, key)
        return "ok"
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: ")
        return "refused"
    finally:
        assert time.monotonic() - t0 < BOUND_S


def test_fuzzed_safetensors_load_or_refuse(tiny_dir, tmp_path):
    src = (tiny_dir / "text_encoders" / "umt5_xxl_fp16.safetensors").read_bytes()
    rng = random.Random(20240610)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(FUZZ_CASES):
        path = tmp_path / f"fuzz_{i}.safetensors"
        path.write_bytes(_mutate(rng, src))
        header_shape = None
        try:
            header_shape = read_header(path).entries
        except CheckpointError:
            pass

        def declared(r, key, h=header_shape):
            return h[key].shape

        results = {_loads_or_refuses(reader, path, declared) for reader in (CheckpointReader, StreamingReader)}
        assert len(results) == 1, (i, results)  # both readers agree on what is acceptable
        assert (header_shape is not None) == (results == {"ok"}), i
        outcomes[results.pop()] += 1
        path.unlink()
    # the mutations reach both outcomes: some flips only rename a tensor, most break the header
    assert outcomes["refused"] > FUZZ_CASES // 2 and outcomes["ok"] > 0, outcomes


# -- torch pickles --------------------------------------------------------------------------------------------


def test_fuzzed_torch_files_load_or_refuse(tiny_dir, tmp_path):
    zipped = (tiny_dir / "Wan2.2-TI2V-5B" / "models_t5_umt5-xxl-enc-bf16.pth").read_bytes()
    torch.save({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)},
               tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.pth").read_bytes()
    rng = random.Random(7)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(FUZZ_CASES):
        data = bytearray(zipped if i % 2 else legacy)
        if rng.random() < 0.4:
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path = tmp_path / f"fuzz_{i}.pth"
        path.write_bytes(bytes(data))
        outcomes[_loads_or_refuses(CheckpointReader, path, lambda r, key: r.shapes()[key])] += 1
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0, outcomes


def test_torch_files_that_are_not_plain_state_dicts(tmp_path):
    torch.save({"w": torch.ones(2), "nested": {"x": torch.ones(1)}, "step": 3, "name": "run", "hist": [1.0, 2.0],
                7: torch.zeros(3)}, tmp_path / "mixed.pth")
    with CheckpointReader(tmp_path / "mixed.pth") as r:  # non-tensor values and nested dicts are not weights
        assert sorted(r.keys()) == ["7", "w"] and r.shapes() == {"w": (2,), "7": (3,)}
        assert r.get("w").tolist() == [1.0, 1.0]
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: expected a state dict, found list"):
        CheckpointReader(tmp_path / "list.pth")
    torch.save({"s": torch.eye(3).to_sparse()}, tmp_path / "sparse.pth")
    with pytest.raises(CheckpointError, match=r"sparse\.pth: tensor 's' is a torch\.sparse_coo tensor"):
        CheckpointReader(tmp_path / "sparse.pth")
    torch.save({7: torch.ones(1), "7": torch.ones(1)}, tmp_path / "clash.pth")
    with pytest.raises(CheckpointError, match=r"clash\.pth: two entries are named '7'"):
        CheckpointReader(tmp_path / "clash.pth")


class _Runs:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_torch_malformed_files_are_one_error(tmp_path, capsys):
    torch.save({"w": torch.ones(2), "o": _Runs()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: the file contains pickled Python objects"):
        CheckpointReader(tmp_path / "evil.pth")
    assert "must never run" not in capsys.readouterr().out
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_bytes(b"\xff\xfe not a checkpoint at all")
    (tmp_path / "zip_head.pth").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with open(tmp_path / "raw_pickle.pth", "wb") as f:
        pickle.dump({"w": 1}, f)
    for name in ("empty.pth", "text.pth", "zip_head.pth", "raw_pickle.pth"):
        with pytest.raises(CheckpointError) as e:
            _timed(CheckpointReader, tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: ") and "\n" not in str(e.value)
