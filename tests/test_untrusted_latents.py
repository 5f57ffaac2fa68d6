"""Latent files are untrusted input: every malformation is an error naming the file, raised by Ovi Load Latent at
load time (before anything decodes), within 2 s; in-memory latents get the same checks in ``from_latent``."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ovi.latent_file import LatentError, read_latent_file, write_latent_file
from ovi.loading import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 2.0  # the task's bound on reporting a bad file


def _meta(**changes):
    meta = {"variant": "720x720_5s", "seed": 3, "height": 64, "width": 64, "mode": "t2av", "prompt": "p",
            "settings": {"steps": 2}}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not _DROP}


_DROP = object()


def _tensors(video=None, audio=None):
    g = torch.Generator().manual_seed(0)
    return {"samples": torch.randn(1, 48, 31, 4, 4, generator=g) if video is None else video,
            "ovi_audio": torch.randn(1, 157, 20, generator=g) if audio is None else audio}


def _save(path: Path, tensors=None, meta=None, raw_meta: str | None = None, extra: dict | None = None) -> Path:
    header = {} if raw_meta is None and meta is None else {"ovi.latent": raw_meta if raw_meta is not None
                                                           else json.dumps(meta)}
    save_file(tensors if tensors is not None else _tensors(), str(path), metadata={**header, **(extra or {})})
    return path


def _good(path: Path) -> Path:
    return _save(path, meta=_meta())


def _bytes(data: bytes):
    return lambda p: (p.write_bytes(data), p)[1]


def _truncated(p: Path) -> Path:
    data = _good(p).read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _garbage_header(p: Path) -> Path:
    head = b"{this is not json at all}"
    p.write_bytes(len(head).to_bytes(8, "little") + head + b"\0" * 64)
    return p


def _huge_header_length(p: Path) -> Path:
    p.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    return p


def _without(key: str):
    def make(p: Path) -> Path:
        t = _tensors()
        del t[key]
        return _save(p, tensors=t, meta=_meta())
    return make


def _meta_case(**changes):
    return lambda p: _save(p, meta=_meta(**changes))


def _raw_meta(text: str):
    return lambda p: _save(p, raw_meta=text)


def _tensor_case(video=None, audio=None):
    return lambda p: _save(p, tensors=_tensors(video, audio), meta=_meta())


def _nan(what: str, value: float):
    def make(p: Path) -> Path:
        t = _tensors()
        t[what].view(-1)[7] = value
        return _save(p, tensors=t, meta=_meta())
    return make


# (id, how the file is made, words the message must carry besides the file name)
CASES = [
    ("text-file", _bytes(b"hello, this is a text file\n" * 10), "safetensors"),
    ("empty-file", _bytes(b""), "safetensors"),
    ("gguf-file", _bytes(b"GGUF" + b"\0" * 60), "GGUF"),
    ("truncated", _truncated, "truncated"),
    ("garbage-header", _garbage_header, "header"),
    ("header-length-past-the-end", _huge_header_length, "header length"),
    ("no-latent-metadata", lambda p: _save(p), "ovi.latent"),
    ("metadata-not-json", _raw_meta("{variant: 720x720_5s"), "not valid JSON"),
    ("metadata-nan-literal", _raw_meta('{"variant": "720x720_5s", "seed": NaN}'), "not valid JSON"),
    ("metadata-a-list", _raw_meta('["720x720_5s"]'), "JSON object"),
    ("metadata-a-string", _raw_meta('"720x720_5s"'), "JSON object"),
    ("metadata-null", _raw_meta("null"), "JSON object"),
    ("no-variant", _meta_case(variant=_DROP), "no variant"),
    ("unknown-variant", _meta_case(variant="1080p_60s"), "unknown Ovi variant '1080p_60s'"),
    ("variant-not-a-name", _meta_case(variant=720), "variant must be a name"),
    ("seed-a-string", _meta_case(seed="3"), "seed"),
    ("seed-a-float", _meta_case(seed=3.5), "seed"),
    ("seed-a-bool", _meta_case(seed=True), "seed"),
    ("seed-negative", _meta_case(seed=-1), "seed"),
    ("seed-too-large", _meta_case(seed=2 ** 63), "seed"),
    ("height-a-string", _meta_case(height="64"), "height"),
    ("height-a-float", _meta_case(height=64.0), "height"),
    ("width-zero", _meta_case(width=0), "width"),
    ("width-null", _meta_case(width=None), "width"),
    ("mode-unknown", _meta_case(mode="v2v"), "mode"),
    ("prompt-not-text", _meta_case(prompt=["a"]), "prompt"),
    ("settings-not-an-object", _meta_case(settings="steps=2"), "settings"),
    ("no-video-tensor", _without("samples"), "samples tensor is missing"),
    ("no-audio-tensor", _without("ovi_audio"), "ovi_audio tensor is missing"),
    ("no-tensors", lambda p: _save(p, tensors={"other": torch.zeros(1)}, meta=_meta()), "tensors are missing"),
    ("video-rank-4", _tensor_case(video=torch.zeros(48, 31, 4, 4)), "video latent must be [1, 48, 31, h, w]"),
    ("video-batch-2", _tensor_case(video=torch.zeros(2, 48, 31, 4, 4)), "video latent must be"),
    ("video-16-channels", _tensor_case(video=torch.zeros(1, 16, 31, 4, 4)), "video latent must be"),
    ("video-frames-of-another-variant", _tensor_case(video=torch.zeros(1, 48, 61, 4, 4)), "video latent must be"),
    ("video-zero-width", _tensor_case(video=torch.zeros(1, 48, 31, 4, 0)), "video latent must be"),
    ("audio-rank-2", _tensor_case(audio=torch.zeros(157, 20)), "audio latent must be [1, 157, 20]"),
    ("audio-length-of-another-variant", _tensor_case(audio=torch.zeros(1, 314, 20)), "audio latent must be"),
    ("audio-channels", _tensor_case(audio=torch.zeros(1, 157, 16)), "audio latent must be"),
    ("video-integer-dtype", _tensor_case(video=torch.zeros(1, 48, 31, 4, 4, dtype=torch.int32)), "floating point"),
    ("audio-bool-dtype", _tensor_case(audio=torch.zeros(1, 157, 20, dtype=torch.bool)), "floating point"),
    ("height-disagrees-with-latent", _meta_case(height=128), "height is 128 pixels"),
    ("width-disagrees-with-latent", _meta_case(width=48), "width is 48 pixels"),
    ("video-nan", _nan("samples", float("nan")), "NaN or infinite"),
    ("audio-inf", _nan("ovi_audio", float("inf")), "NaN or infinite"),
]


def _nodes_latents(monkeypatch, folder: Path):
    """nodes/latents.py imported as ComfyUI imports the pack (a package), with a minimal ``folder_paths``."""
    pack = types.ModuleType("ovi_pack_under_test")
    pack.__path__ = [str(ROOT)]
    monkeypatch.setitem(sys.modules, "ovi_pack_under_test", pack)
    fp = types.ModuleType("folder_paths")
    fp.get_annotated_filepath = lambda name: os.path.join(folder, name)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return importlib.import_module("ovi_pack_under_test.nodes.latents")


@pytest.mark.parametrize("make,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_latent_file_is_refused_by_name(tmp_path, monkeypatch, make, words):
    path = make(tmp_path / "bad_latent.safetensors")
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        read_latent_file(path)
    assert time.perf_counter() - t0 < BOUND_S
    assert isinstance(e.value, LatentError) and isinstance(e.value, ValueError)
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)

    latents = _nodes_latents(monkeypatch, tmp_path)  # the node raises the same error when it runs (load time)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        latents.OviLoadLatent().load(path.name)
    assert time.perf_counter() - t0 < BOUND_S
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)


def test_a_good_file_loads(tmp_path, monkeypatch):
    path = _good(tmp_path / "good.safetensors")
    video, audio, meta = read_latent_file(path)
    ref = _tensors()
    assert torch.equal(video, ref["samples"]) and torch.equal(audio, ref["ovi_audio"]) and meta == _meta()
    (latent,) = _nodes_latents(monkeypatch, tmp_path).OviLoadLatent().load(path.name)
    assert torch.equal(latent["samples"], ref["samples"]) and latent["ovi"] == _meta()


def test_other_variants_and_missing_optional_metadata_are_accepted(tmp_path):
    """What the checks must not refuse: the 10 s variant's lengths, bf16 latents, metadata without frame size."""
    t = _tensors(torch.zeros(1, 48, 61, 6, 4, dtype=torch.bfloat16), torch.zeros(1, 314, 20, dtype=torch.bfloat16))
    path = _save(tmp_path / "ten.safetensors", tensors=t, meta={"variant": "960x960_10s", "height": 96})
    video, audio, meta = read_latent_file(path)
    assert video.shape == (1, 48, 61, 6, 4) and audio.dtype == torch.bfloat16 and meta["height"] == 96


def test_in_memory_latents_get_the_same_checks(monkeypatch, tmp_path):
    """A LATENT from another node: from_latent (OviDecode, OviSaveLatent) refuses it before anything runs."""
    latents = _nodes_latents(monkeypatch, tmp_path)
    good = {"samples": _tensors()["samples"], "ovi_audio": _tensors()["ovi_audio"], "ovi": _meta()}
    assert latents.from_latent(good).video_latent.shape == (48, 31, 4, 4)
    bad = [({**good, "samples": torch.zeros(1, 48, 30, 4, 4)}, "video latent must be"),
           ({**good, "samples": [[0.0]]}, "must be a tensor"),
           ({**good, "ovi": {**_meta(), "variant": "nope"}}, "unknown Ovi variant"),
           ({**good, "ovi": "720x720_5s"}, "JSON object"),
           ({**good, "ovi_audio": torch.full((1, 157, 20), float("nan"))}, "NaN or infinite")]
    for latent, words in bad:
        with pytest.raises(ValueError) as e:
            latents.from_latent(latent)
        assert words in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="not an Ovi latent"):
        latents.from_latent({"samples": good["samples"]})


def test_write_latent_file_refuses_what_it_could_not_read_back(tmp_path):
    with pytest.raises(LatentError, match="NaN or infinite"):
        write_latent_file(tmp_path / "x.safetensors", torch.full((1, 48, 31, 4, 4), float("inf")),
                          _tensors()["ovi_audio"], _meta())
    assert os.listdir(tmp_path) == []
    path = write_latent_file(tmp_path / "x.safetensors", _tensors()["samples"], _tensors()["ovi_audio"], _meta())
    assert read_latent_file(path)[2] == _meta() and os.listdir(tmp_path) == ["x.safetensors"]
