from __future__ import annotations

import json

import pytest
import torch

from ovi.loading import CheckpointError, CheckpointReader
from ovi.tools.parity import load_fixture, run_file
from ovi.tools.tiny.wan_vae import TINY_CONFIG, write_tiny
from ovi.vae.checkpoint import load_wan_vae
from ovi.vae.wan22 import LATENT_MEAN, LATENT_STD, Wan22VAE, WanVAEConfig, _blend_weights, _spans


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def vae(parity_dir):
    fx = load_fixture(parity_dir / "wan22_vae_decode.safetensors")
    return load_wan_vae(fx.weights_path, prefix="weights/", config=WanVAEConfig.from_fixture(fx.config))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny_wan_vae"), seed=7)


def _latent(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["wan22_vae_decode.safetensors", "wan22_vae_encode.safetensors",
                                  "manifests/wan22_vae_full.json", "manifests/wan22_vae_comfy_keymap.json"])
def test_parity_files_pass(parity_dir, name):
    r = run_file(parity_dir / name)
    assert r.status == "PASS", r.detail


def test_full_size_config_and_constants(parity_dir):
    manifest = json.loads((parity_dir / "manifests/wan22_vae_full.json").read_text())
    cfg = WanVAEConfig.from_shapes({k: tuple(v[0]) for k, v in manifest.items()})
    assert cfg == WanVAEConfig()
    with torch.device("meta"):
        m = Wan22VAE(cfg)
    assert sum(p.numel() for p in m.state_dict().values()) == 704_688_668
    assert (cfg.temporal_factor, cfg.spatial_factor) == (4, 16)
    fixture_cfg = load_fixture(parity_dir / "wan22_vae_decode.safetensors").config
    # The official wrapper multiplies by 1/std computed in float32 from these decimals.
    assert torch.equal(1.0 / torch.tensor(LATENT_STD, dtype=torch.float32),
                       torch.tensor(fixture_cfg["latent_inv_std_float32"], dtype=torch.float32))
    assert torch.equal(torch.tensor(LATENT_MEAN, dtype=torch.float32),
                       torch.tensor(fixture_cfg["latent_mean"], dtype=torch.float32))


def test_frame_count_rule(vae):
    for f in (1, 2, 3):
        out = vae.decode(_latent(1, 48, f, 2, 3))
        assert out.shape == (1, 3, 1 + 4 * (f - 1), 32, 48)
        assert out.abs().max() <= 1.0
    video = _latent(1, 3, 8, 32, 48).clamp(-1, 1)
    for t, f in ((1, 1), (5, 2), (6, 2), (8, 2)):
        assert vae.encode(video[:, :, :t]).shape == (1, 48, f, 2, 3)
    # Frames after the last whole group of four are dropped, not used.
    assert torch.equal(vae.encode(video[:, :, :7]), vae.encode(video[:, :, :5]))


def test_causal_stream_equals_full_sequence(vae):
    # Both are float32 evaluations of the same sums in a different order; the fixtures' own tolerances
    # (20x the float32 error of the official code) bound that difference.
    lat = _latent(1, 48, 3, 2, 3, seed=1)
    streamed = vae.decode(lat, clamp=False)
    assert _rel(streamed, vae.decode(lat, clamp=False, causal=False)) < 3e-5
    # Causality: a prefix of the latent decodes to the same leading frames.
    assert _rel(vae.decode(lat[:, :, :2], clamp=False), streamed[:, :, :5]) < 3e-5
    video = _latent(1, 3, 9, 32, 48, seed=2).clamp(-1, 1)
    enc = vae.encode(video)
    assert _rel(enc, vae.encode(video, causal=False)) < 2e-5
    assert _rel(vae.encode(video[:, :, :5]), enc[:, :, :2]) < 2e-5


def test_progress_callback(vae):
    calls = []
    vae.decode(_latent(1, 48, 2, 2, 5), tile_size=3, tile_overlap=1, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 4) for i in range(1, 5)]  # 2 tiles x 2 latent frames


def test_blend_weights_partition_of_unity():
    for n, tile, ov in ((12, 8, 4), (16, 8, 2), (61, 20, 8), (60, 32, 8)):
        spans = _spans(n, tile, ov)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(b - a == tile for a, b in spans)
        assert all(spans[i][1] - spans[i + 1][0] >= ov for i in range(len(spans) - 1))
        total = torch.zeros(n * 16, dtype=torch.float64)
        for (a, b), w in zip(spans, _blend_weights(spans, 16)):
            total[a * 16:b * 16] += w
            assert w.min() >= 0
        assert torch.allclose(total, torch.ones_like(total), atol=1e-12)


def test_tiled_single_tile_is_exact(vae):
    lat = _latent(1, 48, 2, 3, 4, seed=3)
    assert torch.equal(vae.decode(lat, tile_size=4, tile_overlap=2), vae.decode(lat))


def _up_receptive_field(cfg: WanVAEConfig) -> int:
    """Latent pixels on each side that an output pixel of the up stages depends on (3x3 convs, nearest 2x)."""
    convs = 2 * (cfg.num_res_blocks + 1)
    r = 1 + convs  # the head and the last stage, at the finest level
    for _ in range(len(cfg.dim_mult) - 1):
        r = -(-(r + 1) // 2) + convs  # the resample conv, the 2x nearest step back, then the coarser stage
    return r


def test_tiled_decode_matches_untiled(vae):
    # Tiling runs only the up stages per tile (the trunk, with its frame-wide attention, sees the whole
    # latent), so a tile's output is exact farther than R latent pixels from its cut edges and the blend
    # differs from the untiled decode only near the seams. Derived tolerances:
    #  - pixels whose every contributing tile is exact there: float32 rounding, 1e-5 of the scale;
    #  - elsewhere each pixel is a convex blend of the tiles covering it, so it lies within the spread of
    #    those tiles' values (decoded here through the whole-sequence path) plus the same rounding.
    r = _up_receptive_field(vae.config)
    assert r == 13
    h, w = 2, 40
    lat = _latent(1, 48, 2, h, w, seed=5)
    full = vae.decode(lat, clamp=False)
    tiled = vae.decode(lat, clamp=False, tile_size=30, tile_overlap=8)
    spans = _spans(w, 30, 8)
    assert spans == [(0, 30), (10, 40)]
    eps = 1e-5 * full.abs().max()
    feats = vae._trunk(vae.denormalize(lat), causal=False)
    lo, hi = torch.full_like(full, float("inf")), torch.full_like(full, -float("inf"))
    exact_cols = torch.ones(w, dtype=torch.bool)
    for (a, b), wt in zip(spans, _blend_weights(spans, 16)):
        d = vae._stream(feats[..., a:b], vae.decoder.upsample, causal=False).__next__()[1]
        cols = slice(16 * a, 16 * b)
        lo[..., cols], hi[..., cols] = torch.minimum(lo[..., cols], d), torch.maximum(hi[..., cols], d)
        used = wt.view(-1, 16).amax(1) > 0
        c = torch.arange(a, b)
        inexact = ((c < a + r) & (a > 0)) | ((c >= b - r) & (b < w))
        exact_cols[a:b] &= ~(used & inexact)
    assert exact_cols[:15].all() and exact_cols[25:].all() and not exact_cols[17:23].any()
    px = exact_cols.repeat_interleave(16)
    assert _rel(tiled[..., px], full[..., px]) < 1e-5
    assert (tiled - full).abs()[..., ~px].max() > 10 * eps  # the seams do differ: the split above matters
    assert bool(((tiled >= lo - eps) & (tiled <= hi + eps)).all())
    assert bool(((tiled - full).abs() <= torch.maximum(hi - full, full - lo) + eps).all())


def test_both_layouts_load_the_same_weights(tiny_files):
    pth, st = tiny_files
    assert pth.relative_to(pth.parents[1]).as_posix() == "Wan2.2-TI2V-5B/Wan2.2_VAE.pth"
    assert st.relative_to(st.parents[1]).as_posix() == "vae/wan2.2_vae.safetensors"
    with CheckpointReader(st) as r:
        assert {s.dtype for s in r.sources().values()} == {torch.bfloat16}
        assert len(r.keys()) == 196
    a, b = load_wan_vae(pth), load_wan_vae(st)
    assert a.config == b.config == TINY_CONFIG
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sb[k].dtype == torch.float32 for k in sa)
    out = a.decode(_latent(1, 48, 2, 2, 2, seed=6), clamp=False)
    assert out.std() > 0.05 and out.abs().max() < 20  # non-degenerate random weights
    # bf16 compute: ~4e-3 rounding per op through some 40 layers; measured about 2% (decode), 1% (encode).
    c = load_wan_vae(st, dtype=torch.bfloat16)
    assert c.dtype == torch.bfloat16
    assert _rel(c.decode(_latent(1, 48, 2, 2, 2, seed=6), clamp=False).float(), out) < 0.05
    video = _latent(1, 3, 5, 32, 32, seed=8).clamp(-1, 1)
    assert _rel(c.encode(video), a.encode(video)) < 0.05


def test_wrapper_prefix_is_stripped(tiny_files, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_files[1]))
    save_file({f"first_stage_model.{k}": v for k, v in sd.items()}, str(tmp_path / "wrapped.safetensors"))
    assert load_wan_vae(tmp_path / "wrapped.safetensors").config == TINY_CONFIG


def test_bad_files_raise_checkpoint_error(tiny_files, tmp_path):
    pth, st = tiny_files
    for src in (pth, st):
        cut = tmp_path / f"cut{src.suffix}"
        cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        with pytest.raises(CheckpointError, match="truncated|corrupt"):
            load_wan_vae(cut)
    other = tmp_path / "audio_vae.pth"
    torch.save({"decoder.learnable_gain": torch.zeros(1), "encoder.learnable_gain": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="wrong component"):
        load_wan_vae(other)
    wan21 = tmp_path / "wan21.pth"
    torch.save({"conv2.weight": torch.zeros(16, 16, 1, 1, 1),
                "decoder.middle.0.residual.0.gamma": torch.ones(384, 1, 1, 1)}, wan21)
    with pytest.raises(CheckpointError, match="Wan2.1"):
        load_wan_vae(wan21)
    partial = tmp_path / "partial.pth"
    sd = torch.load(pth, weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("decoder.head")}, partial)
    with pytest.raises(CheckpointError, match="missing"):
        load_wan_vae(partial)
