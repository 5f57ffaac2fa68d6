"""The checkpoint reader and loader: formats, exact key matching, and the errors users see."""

from __future__ import annotations

import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ovi.loading import CheckpointError, CheckpointReader, load_into_module


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.n = nn.LayerNorm(3)
        self.register_buffer("table", torch.zeros(2, 2))


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in Tiny().state_dict().items()}


def _meta_tiny():
    with torch.device("meta"):
        return Tiny()


def test_safetensors_loads_into_meta_module_with_dtype(tmp_path):
    sd = _state()
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"ovi.note": "x"})
    with CheckpointReader(tmp_path / "m.safetensors") as r:
        assert r.metadata == {"ovi.note": "x"}
        m = load_into_module(_meta_tiny(), r.sources(), path=r.path, component="test", dtype=torch.bfloat16)
    for k, v in m.state_dict().items():
        assert v.device.type == "cpu" and v.dtype == torch.bfloat16
        assert torch.equal(v, sd[k].to(torch.bfloat16))
    assert not any(p.requires_grad for p in m.parameters())


def test_prefix_and_entry(tmp_path):
    sd = _state(1)
    save_file({f"weights/{k}": v for k, v in sd.items()} | {"inputs/x": torch.ones(1)}, str(tmp_path / "f.safetensors"))
    with CheckpointReader(tmp_path / "f.safetensors", prefix="weights/") as r:
        assert sorted(r.keys()) == sorted(sd)
    torch.save({"generator": sd, "step": torch.tensor(3)}, tmp_path / "g.pt")
    with CheckpointReader(tmp_path / "g.pt", entry="generator") as r:
        m = load_into_module(_meta_tiny(), r.sources(), path=r.path, component="test")
    assert torch.equal(m.a.weight, sd["a.weight"])


def test_truncated_safetensors_is_named(tmp_path):
    save_file(_state(), str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-20])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        CheckpointReader(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        CheckpointReader(tmp_path / "junk.safetensors")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_object_is_refused(tmp_path, capsys):
    torch.save({"w": torch.ones(2), "obj": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth.*pickled Python objects"):
        CheckpointReader(tmp_path / "evil.pth")
    assert "must never run" not in capsys.readouterr().out
    with open(tmp_path / "raw.pth", "wb") as f:
        pickle.dump({"w": 1}, f)
    with pytest.raises(CheckpointError, match="raw.pth"):
        CheckpointReader(tmp_path / "raw.pth")


def test_gguf_and_missing_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="GGUF"):
        CheckpointReader(tmp_path / "m.gguf")
    with pytest.raises(CheckpointError, match="not found"):
        CheckpointReader(tmp_path / "absent.safetensors")


def test_key_and_shape_errors_name_the_cause(tmp_path):
    sd = _state()
    partial = {k: v for k, v in sd.items() if k != "n.bias"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with CheckpointReader(tmp_path / "partial.safetensors") as r, pytest.raises(CheckpointError) as e:
        load_into_module(_meta_tiny(), r.sources(), path=r.path, component="test")
    assert "partial.safetensors" in str(e.value) and "n.bias" in str(e.value) and "partial" in str(e.value)

    wrong = dict(sd, **{"a.weight": torch.zeros(5, 4)})
    save_file(wrong, str(tmp_path / "shape.safetensors"))
    with CheckpointReader(tmp_path / "shape.safetensors") as r, pytest.raises(CheckpointError, match=r"a\.weight is \[5, 4\]"):
        load_into_module(_meta_tiny(), r.sources(), path=r.path, component="test")

    vae_like = {"decoder.middle.0.residual.0.gamma": torch.ones(2)}
    save_file(vae_like, str(tmp_path / "vae.safetensors"))
    with CheckpointReader(tmp_path / "vae.safetensors") as r, pytest.raises(CheckpointError, match="Wan2.2 video VAE"):
        load_into_module(_meta_tiny(), r.sources(), path=r.path, component="umt5")

    fp8 = dict(sd, **{"a.weight": sd["a.weight"].to(torch.float8_e4m3fn)}, extra=torch.ones(1))
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    with CheckpointReader(tmp_path / "fp8.safetensors") as r, pytest.raises(CheckpointError, match="FP8"):
        load_into_module(_meta_tiny(), r.sources(), path=r.path, component="test")
