"""Fusion DiT: parity with the official forward, the full-size layout, the loader's layouts and errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ovi.fusion.checkpoint import load_fusion_model
from ovi.fusion.config import OVI_FUSION_CONFIG, FusionConfig
from ovi.fusion.model import FusionModel
from ovi.fusion.rope import apply_rope, audio_rope, split_head_dim, video_rope
from ovi.loading import CheckpointError
from ovi.tools.parity import load_fixture, run_file
from ovi.tools.parity_runners.fusion import build_fusion_from_fixture
from ovi.tools.tiny.fusion import TINY_CONFIG, VARIANT_FILES, write_tiny

CPU = torch.device("cpu")


# -- parity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fusion_forward_t2v", "fusion_forward_i2v", "fusion_forward_slg"])
def test_forward_fixture_passes(parity_dir, name):
    r = run_file(parity_dir / f"{name}.safetensors")
    assert r.status == "PASS", r.detail
    assert r.max_rel < r.tol / 5


def test_full_size_manifest(parity_dir):
    path = parity_dir / "manifests" / "fusion_full.json"
    r = run_file(path)
    assert r.status == "PASS", r.detail
    manifest = json.loads(path.read_text())
    with torch.device("meta"):
        sd = FusionModel(OVI_FUSION_CONFIG).state_dict()
    assert list(sd) == list(manifest)  # same keys in the same order
    assert sum(v.numel() for v in sd.values()) == 11_660_753_108
    assert FusionConfig.from_shapes({k: v[0] for k, v in manifest.items()}) == OVI_FUSION_CONFIG


def test_fixture_config_round_trip(parity_dir):
    fx = load_fixture(parity_dir / "fusion_forward_t2v.safetensors")
    cfg = FusionConfig.from_dict(fx.config)
    assert cfg.video.text_len == 32 and cfg.audio.temporal_rope_scaling_factor == pytest.approx(0.19676)
    assert cfg.video.patch_size == (1, 2, 2) and cfg.audio.audio_mlp_dim == 768
    assert FusionConfig.from_dict(cfg.to_dict()) == cfg


# -- behaviour -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_model(parity_dir):
    return build_fusion_from_fixture(load_fixture(parity_dir / "fusion_forward_t2v.safetensors"))


def _inputs(seed=0, b=None, frames=3):
    g = torch.Generator().manual_seed(seed)
    lead = () if b is None else (b,)
    return (torch.randn(*lead, 48, frames, 4, 6, generator=g), torch.randn(*lead, 9, 20, generator=g),
            torch.randn(*lead, 5, 32, generator=g), torch.randn(*lead, 7, 32, generator=g))


def test_audio_rope_rotates_only_temporal_dims():
    assert split_head_dim(128) == (44, 42, 42)
    x = torch.randn(1, 20, 2, 128)
    out = apply_rope(x, audio_rope(20, 128, 0.19676, CPU))
    assert torch.equal(out[..., 44:], x[..., 44:])
    assert torch.equal(out[:, 0], x[:, 0])  # position 0: no rotation
    assert (out[:, 1:, :, :44] - x[:, 1:, :, :44]).abs().max() > 1e-3
    # Rotations preserve each pair's norm, and scores depend on relative positions only.
    pairs = lambda t: t[..., :44].unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(out), pairs(x))
    q = torch.randn(128, dtype=torch.float64).expand(1, 20, 1, 128)
    r = apply_rope(q, audio_rope(20, 128, 0.19676, CPU))[0, :, 0]
    torch.testing.assert_close(r[3] @ r[1], r[12] @ r[10])


def test_video_rope_axes():
    x = torch.randn(1, 2 * 3 * 4, 1, 128, dtype=torch.float64)
    out = apply_rope(x, video_rope((2, 3, 4), 128, CPU)).reshape(2, 3, 4, 128)
    x = x.reshape(2, 3, 4, 128)
    # Moving along the column only rotates the last 42 dims; along the frame only the first 44.
    assert torch.equal(out[0, 0, 1, :86], x[0, 0, 1, :86]) and not torch.equal(out[0, 0, 1, 86:], x[0, 0, 1, 86:])
    assert torch.equal(out[1, 0, 0, 44:], x[1, 0, 0, 44:]) and not torch.equal(out[1, 0, 0, :44], x[1, 0, 0, :44])


@torch.no_grad()
def test_slg_out_of_range_skips_nothing(fixture_model):
    v, a, cv, ca = _inputs()
    t = torch.tensor([700])
    ref = fixture_model(v, a, t, cv, ca)
    n = fixture_model.num_layers
    for s in (0, -1, n, n + 3):
        out = fixture_model(v, a, t, cv, ca, slg_layer=s)
        assert all(torch.equal(x, y) for x, y in zip(out, ref)), s
    skipped = fixture_model(v, a, t, cv, ca, slg_layer=1)
    assert not torch.allclose(skipped[0], ref[0])


@torch.no_grad()
def test_batch_and_list_match_single_samples(fixture_model):
    v, a, cv, ca = _inputs(1, b=2)
    t = torch.tensor([900, 300])
    bv, ba = fixture_model(v, a, t, cv, ca, first_frame_is_clean=True)
    lv, la = fixture_model(list(v), list(a), t, list(cv), list(ca), first_frame_is_clean=True)
    assert isinstance(lv, list) and len(lv) == 2
    for i in range(2):
        sv, sa = fixture_model(v[i], a[i], t[i:i + 1], cv[i], ca[i], first_frame_is_clean=True)
        torch.testing.assert_close(bv[i], sv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ba[i], sa, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lv[i], sv, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_timestep_forms_and_text_padding(fixture_model):
    v, a, cv, ca = _inputs(2)
    ref = fixture_model(v, a, torch.tensor([982]), cv, ca)
    out = fixture_model(v, a, torch.tensor([982.0]), cv, ca)
    assert all(torch.equal(x, y) for x, y in zip(out, ref))
    # An explicitly zero-padded context is the same input: padding rows are attended, unmasked.
    padded = torch.cat([cv, torch.zeros(32 - cv.shape[0], 32)])
    out = fixture_model(v, a, torch.tensor([982]), padded, ca)
    assert all(torch.equal(x, y) for x, y in zip(out, ref))
    # ...and they matter: trimming the padding rows would change the result.
    assert not torch.allclose(fixture_model(v, a, torch.tensor([982]), cv[:3], ca)[0], ref[0])
    with pytest.raises(ValueError, match="text_len"):
        fixture_model(v, a, torch.tensor([982]), torch.randn(33, 32), ca)


@torch.no_grad()
def test_first_frame_clean_at_t0_equals_t2v(fixture_model):
    v, a, cv, ca = _inputs(3)
    t0 = torch.tensor([0])
    x = fixture_model(v, a, t0, cv, ca, first_frame_is_clean=True)
    y = fixture_model(v, a, t0, cv, ca)
    for p, q in zip(x, y):  # per-frame modulation groups vs one group: equal up to float32 rounding
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    z = fixture_model(v, a, torch.tensor([500]), cv, ca, first_frame_is_clean=True)
    w = fixture_model(v, a, torch.tensor([500]), cv, ca)
    assert not torch.allclose(z[0], w[0])


# -- tiny checkpoints and the loader -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def tiny_sd(tiny):
    return load_file(str(tiny[0]))


def _same_weights(model, sd):
    got = model.state_dict()
    assert list(got) == list(sd) or set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k].float(), v.float()), k


def test_tiny_files(tiny):
    assert [p.name for p in tiny] == list(VARIANT_FILES.values())
    assert all(p.parent.name == "Ovi" for p in tiny)
    from safetensors import safe_open
    metas, firsts = [], []
    for p in tiny:
        with safe_open(str(p), "pt") as f:
            metas.append(f.metadata())
            firsts.append(f.get_tensor("video_model.blocks.0.self_attn.q.weight"))
            assert f.get_tensor("audio_model.head.head.weight").dtype == torch.bfloat16
    assert [m["ovi.variant"] for m in metas] == list(VARIANT_FILES)
    assert FusionConfig.from_dict(json.loads(metas[0]["ovi.config"])) == TINY_CONFIG
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])


@torch.no_grad()
def test_load_single_file_and_forward(tiny, tiny_sd):
    m = load_fusion_model(tiny[0], dtype=torch.float32)
    assert m.config == TINY_CONFIG and m.compute_dtype == torch.float32
    _same_weights(m, tiny_sd)
    v, a, cv, ca = _inputs(4)
    vp, ap = m(v, a, torch.tensor([800]), cv, ca)
    assert vp.shape == v.shape and ap.shape == a.shape
    assert 0.2 < vp.std() < 5 and 0.2 < ap.std() < 5  # random weights still give well-conditioned outputs
    mb = load_fusion_model(tiny[0])  # production dtype
    assert mb.video_model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    bv, ba = mb(v, a, torch.tensor([800]), cv, ca)
    assert bv.dtype == torch.bfloat16
    assert (bv.float() - vp).abs().max() < 0.1 * vp.abs().max()


def test_config_inferred_without_metadata(tiny_sd, tmp_path):
    p = tmp_path / "model.safetensors"
    save_file(tiny_sd, str(p))
    m = load_fusion_model(p, dtype=torch.float32)
    assert m.config == TINY_CONFIG  # head_dim 128 and text_len 512 are the defaults inferred
    _same_weights(m, tiny_sd)


def _split(sd, tmp_path, prefix_branch=False):
    paths = {}
    for b in ("video", "audio"):
        p = f"{b}_model."
        half = {(k if prefix_branch else k[len(p):]): v for k, v in sd.items() if k.startswith(p)}
        paths[b] = tmp_path / f"ovi_{b}_branch.safetensors"
        save_file(half, str(paths[b]))
    return paths


def test_split_two_file_layout(tiny, tiny_sd, tmp_path):
    paths = _split(tiny_sd, tmp_path)
    for order in (["video", "audio"], ["audio", "video"]):
        m = load_fusion_model([paths[b] for b in order], dtype=torch.float32)
        assert m.config == TINY_CONFIG
        _same_weights(m, tiny_sd)


@pytest.mark.parametrize("container", ["plain", "module", "app"])
def test_pt_containers(tiny_sd, tmp_path, container):
    obj = {"plain": tiny_sd, "module": {"module": tiny_sd, "step": torch.tensor(3)},
           "app": {"app": {"model": tiny_sd}}}[container]
    p = tmp_path / "model.pt"
    torch.save(obj, p)
    m = load_fusion_model(p, dtype=torch.float32)
    assert m.config == TINY_CONFIG
    _same_weights(m, tiny_sd)


def test_fixture_prefix_loading(parity_dir):
    m = load_fusion_model(parity_dir / "fusion_tiny_weights.safetensors", prefix="weights/", dtype=torch.float32)
    assert m.config.num_layers == 2 and m.config.video.num_heads == 2
    assert m.config.video.text_len == 512  # not in the shapes: the fixture runner passes its config instead


# -- errors ----------------------------------------------------------------------------------
def test_error_missing_keys(tiny_sd, tmp_path):
    sd = {k: v for k, v in tiny_sd.items() if k != "audio_model.blocks.1.cross_attn.k_fusion.weight"}
    p = tmp_path / "partial.safetensors"
    save_file(sd, str(p))
    with pytest.raises(CheckpointError, match="1 missing keys.*k_fusion") as e:
        load_fusion_model(p)
    assert str(p) in str(e.value)


def test_error_split_half_alone(tiny_sd, tmp_path):
    paths = _split(tiny_sd, tmp_path)
    for b, other in (("video", "audio"), ("audio", "video")):
        with pytest.raises(CheckpointError, match=f"only the {b} branch.*split checkpoint.*both files") as e:
            load_fusion_model(paths[b])
        assert other in str(e.value)
    with pytest.raises(CheckpointError, match="both files hold the video branch"):
        load_fusion_model([paths["video"], paths["video"]])
    (tmp_path / "prefixed").mkdir()
    prefixed = _split(tiny_sd, tmp_path / "prefixed", prefix_branch=True)
    with pytest.raises(CheckpointError, match="only the audio branch"):
        load_fusion_model(prefixed["audio"])


def test_split_pair_finds_the_other_half_beside_either(tiny_sd, tmp_path):
    from ovi.detect import split_pair

    paths = _split(tiny_sd, tmp_path)
    for half in ("video", "audio"):
        assert split_pair(paths[half]) == [paths["video"], paths["audio"]]
    full = tmp_path / "model.safetensors"
    save_file(tiny_sd, str(full))
    assert split_pair(full) == [full]
    # the word's case is kept (Kijai's names are capitalised), and the partner must really be the other branch
    video = paths["video"].rename(tmp_path / "Pack_Video_KJ.safetensors")
    paths["audio"].rename(tmp_path / "Pack_Audio_KJ.safetensors")
    assert split_pair(video) == [video, tmp_path / "Pack_Audio_KJ.safetensors"]
    (tmp_path / "Pack_Audio_KJ.safetensors").unlink()
    (tmp_path / "Pack_Audio_KJ.safetensors").symlink_to(video)  # a second copy of the video branch is no partner
    with pytest.raises(CheckpointError, match="audio branch must sit beside it as Pack_Audio_KJ.safetensors") as e:
        split_pair(video)
    assert e.value.path == str(video)


def test_error_split_missing_key_names_the_right_file(tiny_sd, tmp_path):
    paths = _split(tiny_sd, tmp_path)
    half = load_file(str(paths["audio"]))
    del half["blocks.0.ffn.2.bias"]
    save_file(half, str(paths["audio"]))
    with pytest.raises(CheckpointError, match="missing keys.*blocks.0.ffn.2.bias") as e:
        load_fusion_model([paths["video"], paths["audio"]])
    assert e.value.path == str(paths["audio"])


def test_error_wrong_component(tmp_path):
    p = tmp_path / "wan2.2_vae.safetensors"
    save_file({"decoder.middle.0.residual.0.gamma": torch.ones(4, 1, 1, 1), "conv1.weight": torch.ones(2, 2, 1, 1, 1)},
              str(p))
    with pytest.raises(CheckpointError, match="Wan2.2 video VAE, not an Ovi fusion model"):
        load_fusion_model(p)


def test_error_plain_wan_dit(tiny_sd, tmp_path):
    wan = {k[len("video_model."):]: v for k, v in tiny_sd.items()
           if k.startswith("video_model.") and "fusion" not in k}
    p = tmp_path / "wan2.2_ti2v_5B.safetensors"
    save_file(wan, str(p))
    with pytest.raises(CheckpointError, match="without Ovi's fusion layers"):
        load_fusion_model(p)


def test_wrapper_prefix_is_stripped(tiny_sd, tmp_path):
    p = tmp_path / "wrapped.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in tiny_sd.items()}, str(p))
    _same_weights(load_fusion_model(p, dtype=torch.float32), tiny_sd)


def test_error_shape_mismatch(tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    sd["video_model.blocks.1.ffn.0.bias"] = torch.zeros(300, dtype=torch.bfloat16)
    p = tmp_path / "bad.safetensors"
    save_file(sd, str(p))
    with pytest.raises(CheckpointError, match="wrong shape.*blocks.1.ffn.0.bias is \\[300\\]"):
        load_fusion_model(p)
    # A config that does not belong to the file is reported the same way.
    cfg = FusionConfig.from_dict({**TINY_CONFIG.to_dict(),
                                  "video": {**TINY_CONFIG.video.to_dict(), "ffn_dim": 320}})
    good = tmp_path / "good.safetensors"
    save_file(tiny_sd, str(good))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_fusion_model(good, config=cfg)


def test_error_unknown_fp8_layout(tiny_sd, tmp_path):
    # A scale that is neither per tensor nor per output row is no FP8 layout we know.
    sd = dict(tiny_sd)
    sd["video_model.blocks.0.ffn.0.weight"] = sd["video_model.blocks.0.ffn.0.weight"].to(torch.float8_e4m3fn)
    sd["video_model.blocks.0.ffn.0.scale_weight"] = torch.ones(3, 3)
    p = tmp_path / "model_fp8_e4m3fn.safetensors"
    save_file(sd, str(p))
    with pytest.raises(CheckpointError, match="unknown FP8 layout"):
        load_fusion_model(p)
