from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovi import sizes
from ovi.image import preprocess_image, resize_bicubic
from ovi.tools import parity
from ovi.tools.parity_runners import misc
from ovi.variants import (FP8_ONLY_MESSAGE, KNOWN_FILES, VARIANTS, get_variant, known_file, variant_from_filename,
                          variant_spec)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

# --- fixtures through the parity runner -------------------------------------------------------------------

def test_sizes_fixture(parity_dir):
    r = parity.run_file(parity_dir / "sizes.json")
    assert r.status == "PASS", r.detail


def test_image_preprocess_fixture(parity_dir):
    r = parity.run_file(parity_dir / "image_preprocess.safetensors")
    assert r.status == "PASS", r.detail
    assert r.max_rel < 1e-5  # float64 coordinates: far inside the 3e-4 tolerance


def test_variants_fixture_spec_and_size_cases(parity_dir):
    data = json.loads((parity_dir / "variants.json").read_text())
    cases = [c for c in data["cases"] if c["args"]["op"] != "format_prompt"]
    assert len(cases) >= 20
    for c in cases:
        ok, msg = parity.run_case(misc.run_variants_case, c)
        assert ok, (c["args"], msg)


def test_variants_fixture_whole_file(parity_dir):
    r = parity.run_file(parity_dir / "variants.json")
    assert r.status == "PASS", r.detail


# --- variants ---------------------------------------------------------------------------------------------

def test_variant_table_counts():
    five, ten = get_variant("960x960_5s"), get_variant("960x960_10s")
    assert (five.video_frames, five.audio_samples) == (121, 80_384)
    assert (ten.video_frames, ten.audio_samples) == (241, 160_768)
    assert get_variant("720x720_5s").video_frames == 121
    assert get_variant("720x720_5s").prompt_style == "audcap"
    assert {v.prompt_style for n, v in VARIANTS.items() if n.startswith("960")} == {"audio_colon"}
    assert get_variant(None).name == "960x960_5s"


def test_unknown_variant_lists_choices():
    with pytest.raises(ValueError) as e:
        get_variant("1280x720_5s")
    for name in VARIANTS:
        assert name in str(e.value)


def test_variant_spec_fp8():
    assert variant_spec("720x720_5s", fp8=True).checkpoint_relpath == "Ovi/model_fp8_e4m3fn.safetensors"
    assert variant_spec(None).checkpoint_basename == "model_960x960.safetensors"
    for name in ("960x960_5s", "960x960_10s"):
        with pytest.raises(ValueError, match="FP8 quantization is only supported for 720x720_5s"):
            variant_spec(name, fp8=True)
    assert FP8_ONLY_MESSAGE.endswith("currently.")


@pytest.mark.parametrize("path,expected", [
    ("/ckpts/Ovi/model.safetensors", "720x720_5s"),
    ("model_fp8_e4m3fn.safetensors", "720x720_5s"),
    ("model_960x960.safetensors", "960x960_5s"),
    ("model_960x960_10s.safetensors", "960x960_10s"),
    ("C:\\ComfyUI\\models\\diffusion_models\\Ovi-11B-bf16.safetensors", "720x720_5s"),
    ("Ovi-11B-fp8.safetensors", "720x720_5s"),
    ("Ovi-960x960-5s.safetensors", "960x960_5s"),
    ("diffusion_models/Ovi-960x960-10s.safetensors", "960x960_10s"),
    ("Ovi-960x960-10s-F16.gguf", "960x960_10s"),
    ("ovi-960x960-10s-q4_k.GGUF", "960x960_10s"),
    ("Wan2_2-5B-Ovi_960x960_10s_fp8_e4m3fn_scaled_KJ.safetensors", "960x960_10s"),
    ("my_Ovi_960x960_10s_Q8_0.gguf", "960x960_10s"),  # own conversion keeping the tag
    ("Ovi-960x960-5s-Q8_0.gguf", "960x960_5s"),
])
def test_variant_from_filename(path, expected):
    assert variant_from_filename(path).name == expected


@pytest.mark.parametrize("path", ["wan2.2_ti2v_5B_fp16.safetensors", "diffusion_pytorch_model.safetensors",
                                  "ovi.safetensors", "", "models/"])
def test_variant_from_unknown_filename(path):
    assert variant_from_filename(path) is None


def test_known_files_flags():
    assert known_file("Ovi-11B-fp8.safetensors").fp8
    assert not known_file("model_960x960.safetensors").best_effort
    assert known_file("Wan_2_2_Ovi_audio_model_bf16.safetensors").part == "audio"
    assert all(f.variant in VARIANTS for f in KNOWN_FILES)
    assert len({f.name.lower() for f in KNOWN_FILES}) == len(KNOWN_FILES)


# --- sizes ------------------------------------------------------------------------------------------------

def test_t2v_frame_size_reports_choice():
    assert sizes.t2v_frame_size("720x720_5s", 720, 720) == (704, 704, False)  # 22.5 rounds to 22
    assert sizes.t2v_frame_size(get_variant("720x720_5s"), 704, 1280) == (544, 960, True)
    assert sizes.t2v_frame_size(None, 704, 1280) == (704, 1280, False)


def test_t2i2v_size_can_differ_from_t2v():
    s = sizes.t2v_sizes([704, 1280], 960 * 960)
    assert s["video_hw"] == [704, 1280] and s["t2i2v_first_frame_hw"] == [704, 1312]


def test_size_errors():
    with pytest.raises(ValueError):
        sizes.snap_hw_to_multiple_of_32(0, 5, 100)
    with pytest.raises(ValueError):
        sizes.scale_hw_to_area_divisible(10, 10, 0)
    with pytest.raises(ValueError):
        sizes.parse_area("960 by 960")
    assert sizes.parse_area("960X960") == 921600


# --- first-frame preprocessing ----------------------------------------------------------------------------

def _pixels(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_resize_matches_torch_float64():
    x = torch.randn(1, 3, 23, 61, dtype=torch.float64)
    for hw in ((64, 32), (8, 200), (23, 61), (7, 61)):
        ref = F.interpolate(x, size=hw, mode="bicubic", align_corners=False)
        assert torch.allclose(resize_bicubic(x, hw), ref, atol=1e-12, rtol=0)


def test_preprocess_identity_when_size_matches():
    u = _pixels(64, 96)
    out = preprocess_image(u, 64 * 96)
    assert out.shape == (1, 3, 64, 96) and out.dtype == torch.float32
    assert torch.equal(out[0], torch.from_numpy(u).permute(2, 0, 1).float() / 255 * 2 - 1)


def test_preprocess_png_file(tmp_path):
    u = _pixels(70, 50, 1)
    p = tmp_path / "frame.png"
    Image.fromarray(u).save(p)
    out = preprocess_image(p, 48 * 64)
    assert tuple(out.shape) == (1, 3, *sizes.best_hw_for_area(70, 50, 48 * 64, 32)) != (1, 3, 70, 50)
    assert torch.equal(out, preprocess_image(u, 48 * 64))
    assert torch.equal(out, preprocess_image(str(p), "48x64"))
    assert out.min() < -1 or out.max() > 1  # no clamp after bicubic on random pixels


def test_preprocess_pil_rgba_drops_alpha():
    u = _pixels(40, 40, 2)
    alpha = np.random.default_rng(3).integers(0, 256, (40, 40, 1), dtype=np.uint8)
    rgba = Image.fromarray(np.concatenate([u, alpha], -1), "RGBA")
    assert torch.equal(preprocess_image(rgba, 32 * 32), preprocess_image(u, 32 * 32))
    assert torch.equal(preprocess_image(np.asarray(rgba), 32 * 32), preprocess_image(u, 32 * 32))


def test_preprocess_comfy_image_tensor():
    u = _pixels(48, 80, 4)
    batch = torch.from_numpy(np.stack([u, _pixels(48, 80, 5)])).float() / 255  # ComfyUI IMAGE [B, H, W, 3]
    assert torch.equal(preprocess_image(batch, 32 * 64), preprocess_image(u, 32 * 64))


def test_preprocess_exif_orientation_from_path(tmp_path):
    u = np.zeros((32, 64, 3), np.uint8)
    u[:, :32] = 255
    im = Image.fromarray(u)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    p = tmp_path / "rotated.jpg"
    im.save(p, exif=exif.tobytes(), quality=95)
    out = preprocess_image(p, 64 * 32)
    assert out.shape == (1, 3, 64, 32)
    top, bottom = out[0, :, :16].mean().item(), out[0, :, -16:].mean().item()
    assert top > 0.9 and bottom < -0.9  # white half ends on top after the 90° turn


def test_unreadable_image_names_file(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="not_an_image.png"):
        preprocess_image(bad, 1024)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        preprocess_image(tmp_path / "missing.png", 1024)


def test_preprocess_bad_inputs():
    with pytest.raises(ValueError):
        preprocess_image(np.zeros((8, 8, 2), np.uint8), 1024)
    with pytest.raises(TypeError):
        preprocess_image(12, 1024)


def test_preprocess_16bit_grey_png(tmp_path):
    a = (np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) * 31)
    p = tmp_path / "grey16.png"
    Image.fromarray(a).save(p)
    rgb = np.repeat((a >> 8).astype(np.uint8)[..., None], 3, -1)  # the high byte, as an 8-bit reader keeps it
    assert torch.equal(preprocess_image(p, 64 * 32), preprocess_image(rgb, 64 * 32))
