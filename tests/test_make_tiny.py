"""make_tiny writes a complete checkpoint set that the real loaders read, deterministically from the seed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from ovi.audio.checkpoint import load_bigvgan, load_mmaudio_vae
from ovi.fusion.checkpoint import load_fusion_model
from ovi.loading import read_metadata
from ovi.text.checkpoint import load_tokenizer, load_umt5
from ovi.variants import variant_from_filename
from ovi.vae.checkpoint import load_wan_vae

EXPECTED = [
    "MMAudio/ext_weights/best_netG.pt", "MMAudio/ext_weights/v1-16.pth", "Ovi/model.safetensors",
    "Ovi/model_960x960.safetensors", "Ovi/model_960x960_10s.safetensors", "Wan2.2-TI2V-5B/Wan2.2_VAE.pth",
    "Wan2.2-TI2V-5B/google/umt5-xxl/spiece.model", "Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth",
    "text_encoders/umt5_xxl_fp16.safetensors", "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae/wan2.2_vae.safetensors",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    proc = subprocess.run([sys.executable, "-m", "ovi.tools.make_tiny", str(out), "--seed", "7"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def _digests(root):
    """Content digest per file. safetensors headers list metadata in hash-map order, so for those files the
    digest covers the tensors and the metadata values rather than the raw bytes."""
    from safetensors import safe_open

    out = {}
    for p in EXPECTED:
        h = hashlib.sha256()
        if p.endswith(".safetensors"):
            with safe_open(str(root / p), framework="pt") as f:
                h.update(json.dumps(f.metadata(), sort_keys=True).encode())
                for k in sorted(f.keys()):
                    t = f.get_tensor(k)
                    h.update(k.encode() + str(t.dtype).encode() + t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update((root / p).read_bytes())
        out[p] = h.hexdigest()
    return out


def test_layout_and_index(tiny):
    files = sorted(str(p.relative_to(tiny)) for p in tiny.rglob("*") if p.is_file() and p.name != "tiny_manifest.json")
    assert files == sorted(EXPECTED)
    index = json.loads((tiny / "tiny_manifest.json").read_text())
    assert index["seed"] == 7 and sorted(sum(index["files"].values(), [])) == sorted(EXPECTED)
    assert sum((tiny / p).stat().st_size for p in EXPECTED) < 80e6


def test_every_file_loads_through_the_real_loaders(tiny):
    text = load_umt5(tiny / "Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.float32)
    for name in ("model.safetensors", "model_960x960.safetensors", "model_960x960_10s.safetensors"):
        path = tiny / "Ovi" / name
        model = load_fusion_model(path, dtype=torch.float32)
        # The tiny fusion model reads what the tiny text encoder writes.
        assert model.config.video.text_dim == text.config.dim == model.config.audio.text_dim
        assert read_metadata(path)["ovi.variant"] == variant_from_filename(path).name
    for name in ("umt5_xxl_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"):
        assert load_umt5(tiny / "text_encoders" / name, dtype=torch.float32).config == text.config
    ids, mask = load_tokenizer(tiny / "Wan2.2-TI2V-5B/google/umt5-xxl")(["A man says <S>hello<E>."])
    assert ids.shape == (1, 512) and int(mask.sum()) > 2 and int(ids.max()) < text.config.vocab
    a = load_wan_vae(tiny / "Wan2.2-TI2V-5B/Wan2.2_VAE.pth")
    b = load_wan_vae(tiny / "vae/wan2.2_vae.safetensors")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k].float()) for k in a.state_dict())
    load_mmaudio_vae(tiny / "MMAudio/ext_weights/v1-16.pth")
    load_bigvgan(tiny / "MMAudio/ext_weights/best_netG.pt")


def test_deterministic_from_the_seed(tiny, tmp_path):
    from ovi.tools.make_tiny import make_tiny

    make_tiny(tmp_path / "again", seed=7)
    make_tiny(tmp_path / "other", seed=8)
    first, again, other = _digests(tiny), _digests(tmp_path / "again"), _digests(tmp_path / "other")
    assert first == again
    weights = [p for p in EXPECTED if not p.endswith("spiece.model")]
    assert all(first[p] != other[p] for p in weights)
