"""Audio path: MMAudio VAE, BigVGAN, mel front-end, the latent -> waveform decoder and their loaders."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from ovi.audio.bigvgan import BigVGAN, BigVGANConfig, bigvgan_file_shapes, kaiser_sinc_filter
from ovi.audio.checkpoint import load_bigvgan, load_mmaudio_vae
from ovi.audio.decoder import AudioDecoder
from ovi.audio.mel import MelFrontend, hz_to_mel, mel_to_hz, slaney_mel_basis
from ovi.audio.mmaudio_vae import MMAudioVAE, MMAudioVAEConfig, fold_mp_weight
from ovi.loading import CheckpointError
from ovi.tools.parity import run_file
from ovi.tools.tiny.audio import write_tiny

AUDIO_FIXTURES = ["mmaudio_vae_decode", "mmaudio_vae_encode", "bigvgan_vocode", "audio_decode_e2e", "mel_frontend"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    vae_path, voc_path = write_tiny(tmp_path_factory.mktemp("tiny_audio"), seed=7)
    return vae_path, voc_path


@pytest.fixture(scope="module")
def decoder(tiny):
    return AudioDecoder.from_files(*tiny, encoder=True)


# -- parity and manifests ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", AUDIO_FIXTURES)
def test_parity_fixture(parity_dir, name):
    r = run_file(parity_dir / f"{name}.safetensors")
    assert r.status == "PASS", (r.line(), r.detail)
    assert r.max_rel < r.tol / 10  # float32 lands ~20x inside the tolerance


@pytest.mark.parametrize("name", ["mmaudio_vae_16k_full", "bigvgan_16k_full"])
def test_manifest(parity_dir, name):
    r = run_file(parity_dir / "manifests" / f"{name}.json")
    assert r.status == "PASS", r.detail


def test_full_size_vae_on_meta(parity_dir):
    manifest = json.loads((parity_dir / "manifests" / "mmaudio_vae_16k_full.json").read_text())
    cfg = MMAudioVAEConfig.from_shapes({k: tuple(v[0]) for k, v in manifest.items()})
    assert cfg == MMAudioVAEConfig()  # hidden 384, ch_mult (1,2,4), 2 blocks, one downsample
    with torch.device("meta"):
        model = MMAudioVAE(cfg)
    sd = model.state_dict(keep_vars=True)
    assert list(sd) == list(manifest)
    assert sum(t.numel() for t in sd.values()) == 171_657_378


def test_full_size_bigvgan_file_layout(parity_dir):
    manifest = json.loads((parity_dir / "manifests" / "bigvgan_16k_full.json").read_text())
    shapes = bigvgan_file_shapes(BigVGANConfig())
    assert list(shapes) == list(manifest)
    assert all(tuple(manifest[k][0]) == s for k, s in shapes.items())
    assert sum(math.prod(s) for s in shapes.values()) == 112_233_866
    assert BigVGANConfig.from_shapes({k: tuple(v[0]) for k, v in manifest.items()}) == BigVGANConfig()


# -- loaders -------------------------------------------------------------------------------------------

def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_weight_norm_namings_load_identically(tiny, tmp_path):
    _, voc_path = tiny
    gen = torch.load(voc_path, weights_only=True)["generator"]
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0")
                .replace(".weight_v", ".parametrizations.weight.original1"): v for k, v in gen.items()}
    assert sum(".parametrizations." in k for k in renamed) == 2 * sum(k.endswith(".weight_g") for k in gen) > 0
    torch.save({"generator": renamed}, tmp_path / "param.pt")
    a, b = _state(load_bigvgan(voc_path)), _state(load_bigvgan(tmp_path / "param.pt"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.endswith(("weight_g", "weight_v", "original0")) for k in a)  # module state is folded
    # W = g * v / ||v||, with ConvTranspose1d's norm taken per input channel (dim 0 of [in, out, k]).
    g, v = gen["ups.0.0.weight_g"], gen["ups.0.0.weight_v"]
    assert torch.allclose(a["ups.0.0.weight"], g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1), rtol=1e-5, atol=1e-7)


def test_folded_weights_and_plain_dict_accepted(tiny, tmp_path):
    _, voc_path = tiny
    ref = load_bigvgan(voc_path)
    save_file(_state(ref), str(tmp_path / "folded.safetensors"))
    torch.save(torch.load(voc_path, weights_only=True)["generator"], tmp_path / "plain.pt")
    want = _state(ref)
    for other in (load_bigvgan(tmp_path / "folded.safetensors"), load_bigvgan(tmp_path / "plain.pt")):
        got = _state(other)
        assert list(got) == list(want) and all(torch.equal(want[k], got[k]) for k in want)


def test_pickled_object_refused(tiny, tmp_path):
    _, voc_path = tiny
    gen = torch.load(voc_path, weights_only=True)["generator"]
    torch.save({"generator": gen, "h": argparse.Namespace(upsample_initial_channel=64)}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_bigvgan(tmp_path / "obj.pt")


def test_wrong_component_named(tiny):
    vae_path, voc_path = tiny
    with pytest.raises(CheckpointError, match="BigVGAN vocoder") as e:
        load_mmaudio_vae(voc_path)
    assert "best_netG.pt" in str(e.value) and "wrong component" in str(e.value)
    with pytest.raises(CheckpointError, match="MMAudio audio VAE"):
        load_bigvgan(vae_path)


def test_missing_tensor_reported(tiny, tmp_path):
    vae_path, _ = tiny
    sd = torch.load(vae_path, weights_only=True)
    del sd["decoder.up.1.upsample.conv.weight"], sd["data_std"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing keys.*data_std"):
        load_mmaudio_vae(tmp_path / "partial.pth", config=MMAudioVAEConfig(hidden_dim=16))


def test_mp_weight_fold():
    w = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(0)) * 3
    want = w / (w.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-4 * math.sqrt(15))
    assert torch.allclose(fold_mp_weight(w), want, rtol=1e-6, atol=0)
    assert fold_mp_weight(w.bfloat16()).dtype == torch.float32


def test_vae_without_encoder(tiny):
    vae_path, _ = tiny
    vae = load_mmaudio_vae(vae_path, encoder=False)
    assert not any(k.startswith("encoder.") for k in vae.state_dict())
    full = load_mmaudio_vae(vae_path)
    z = torch.randn(1, 20, 5)
    assert torch.equal(vae.decode(z), full.decode(z))
    with pytest.raises(RuntimeError, match="without its encoder"):
        vae.encode(torch.zeros(1, 80, 10))


# -- decoder ----------------------------------------------------------------------------------------

def test_512_samples_per_token_both_layouts(decoder):
    assert decoder.samples_per_token == 512
    z = torch.randn(1, 9, 20, generator=torch.Generator().manual_seed(3))
    calls = []
    wav = decoder.decode(z, progress=lambda i, n: calls.append((i, n)))
    assert wav.shape == (1, 9 * 512) and wav.dtype == torch.float32
    assert torch.isfinite(wav).all() and wav.abs().max() < 1 and wav.std() > 1e-3
    assert torch.equal(decoder.decode(z.transpose(1, 2)), wav)
    assert torch.equal(decoder.decode(z[0]), wav)
    assert calls == [(1, 2), (2, 2)]
    with pytest.raises(ValueError, match="audio latent"):
        decoder.decode(torch.zeros(1, 9, 16))


def test_decode_is_vae_then_vocoder(decoder):
    z = torch.randn(2, 20, 4, generator=torch.Generator().manual_seed(4))
    mel = decoder.decode_mel(z)
    assert mel.shape == (2, 80, 8)
    assert torch.allclose(mel, decoder.vae.decoder(z) * decoder.vae.data_std + decoder.vae.data_mean)
    wav = decoder.decode(z)
    assert torch.allclose(wav[1:], decoder.decode(z[1:]), atol=1e-4)  # batch items are independent
    assert torch.equal(wav, decoder.vocoder(mel)[:, 0])


def test_encode_shape_and_layout(decoder):
    wav = 0.5 * torch.sin(torch.arange(512 * 6) * 0.05).unsqueeze(0)
    z = decoder.encode(wav)
    assert z.shape == (1, 20, 6) and torch.isfinite(z).all()
    assert torch.equal(decoder.encode(wav[0], channels_last=True), z.transpose(1, 2))


def test_bf16_decode_close_to_fp32(tiny, decoder):
    dec16 = AudioDecoder.from_files(*tiny, dtype=torch.bfloat16)
    assert dec16.vae.dtype == torch.bfloat16 and dec16.vocoder.dtype == torch.bfloat16
    z = torch.randn(1, 4, 20, generator=torch.Generator().manual_seed(5))
    a, b = decoder.decode(z), dec16.decode(z)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.1 * a.abs().max()


# -- mel front-end and filters ----------------------------------------------------------------------

def test_slaney_filterbank_matches_fixture(parity_dir):
    ref = load_file(str(parity_dir / "mel_frontend.safetensors"))
    assert torch.equal(slaney_mel_basis(16000, 1024, 80, 0.0, 8000.0), ref["outputs/mel_basis"])
    assert torch.equal(MelFrontend().hann_window, ref["outputs/hann_window"])


def test_slaney_scale():
    assert float(hz_to_mel(1000.0)) == pytest.approx(15.0)
    assert float(hz_to_mel(500.0)) == pytest.approx(7.5)
    hz = torch.linspace(0, 8000, 33).double().numpy()
    assert abs(mel_to_hz(hz_to_mel(hz)) - hz).max() < 1e-9


def test_mel_frames_and_clamp():
    m = MelFrontend()
    wav = torch.randn(2, 4096, generator=torch.Generator().manual_seed(6))
    mel = m(wav)
    assert mel.shape == (2, 80, 16)
    assert torch.equal(mel, m(wav.clamp(-1, 1)))  # input is clamped to [-1, 1] first
    assert mel.min() >= -5 - 1e-6  # log10 floor of 1e-5
    with torch.device("meta"):
        assert MelFrontend().mel_basis.device.type == "cpu"  # constructed, never loaded


def test_kaiser_filter_equals_the_files(parity_dir):
    ref = load_file(str(parity_dir / "bigvgan_vocode.safetensors"))
    filters = [v for k, v in ref.items() if k.endswith(".filter")]
    assert len(filters) == 218 and all(torch.equal(f, kaiser_sinc_filter(12)) for f in filters)
    assert kaiser_sinc_filter(12).sum().item() == pytest.approx(1.0)


def test_bigvgan_meta_build_and_hop():
    with torch.device("meta"):
        model = BigVGAN(BigVGANConfig())
    assert model.config.hop == 256
    assert sum(k.endswith(".filter") for k in model.state_dict()) == 218


def test_file_precision_kept_without_dtype(tiny, tmp_path):
    vae_path, voc_path = tiny
    gen = torch.load(voc_path, weights_only=True)["generator"]
    torch.save({"generator": {k: v.bfloat16() for k, v in gen.items()}}, tmp_path / "bf16.pt")
    torch.save({k: v.half() for k, v in torch.load(vae_path, weights_only=True).items()}, tmp_path / "fp16.pth")
    assert {v.dtype for v in load_bigvgan(tmp_path / "bf16.pt").state_dict().values()} == {torch.bfloat16}
    assert {v.dtype for v in load_mmaudio_vae(tmp_path / "fp16.pth").state_dict().values()} == {torch.float16}
