"""Parity runners for the audio path: MMAudio VAE decode/encode, BigVGAN, the end-to-end decode, the mel front-end."""

from __future__ import annotations

import torch

from ...loading import meta_device
from ...audio.bigvgan import BigVGANConfig, bigvgan_file_shapes
from ...audio.checkpoint import load_bigvgan, load_mmaudio_vae
from ...audio.decoder import AudioDecoder
from ...audio.mel import MelConfig, MelFrontend
from ...audio.mmaudio_vae import MMAudioVAE, MMAudioVAEConfig

F32 = torch.float32


def _vae(fx, cfg: dict, prefix: str = "weights/"):
    return load_mmaudio_vae(fx.weights_path, prefix=prefix, dtype=F32, config=MMAudioVAEConfig.from_dict(cfg))


def _vocoder(fx, cfg: dict, prefix: str = "weights/"):
    return load_bigvgan(fx.weights_path, prefix=prefix, dtype=F32, config=BigVGANConfig.from_dict(cfg["config"]))


def _mel_cfg(cfg: dict, data_dim: int = 80) -> MelConfig:
    return MelConfig.from_dict(cfg) if "n_fft" in cfg else MelConfig(num_mels=data_dim)


def run_vae_decode(fx) -> dict:
    vae = _vae(fx, fx.config)
    norm = vae.decoder(fx.inputs["latent"].to(F32))
    return {"mel_normalized": norm, "mel": vae.unnormalize(norm)}


def run_vae_encode(fx) -> dict:
    vae = _vae(fx, fx.config)
    mel = MelFrontend(_mel_cfg(fx.config.get("mel", {}), vae.config.data_dim))(fx.inputs["waveform"])
    return {"mel": mel, "latent_mean": vae.encode(mel)}


def run_vocode(fx) -> dict:
    return {"waveform": _vocoder(fx, fx.config)(fx.inputs["mel"].to(F32))}


def run_e2e(fx) -> dict:
    dec = AudioDecoder(_vae(fx, fx.config["vae"], "weights/vae."), _vocoder(fx, fx.config["vocoder"],
                                                                            "weights/vocoder."))
    latent = fx.inputs["latent"].to(F32)
    mel = dec.decode_mel(latent)
    return {"mel": mel, "waveform": dec.vocode(mel).unsqueeze(1)}


def run_mel(fx) -> dict:
    m = MelFrontend(MelConfig.from_dict(fx.config))
    return {"mel": m(fx.inputs["waveform"]), "mel_basis": m.mel_basis, "hann_window": m.hann_window}


def manifest_vae(expected: dict) -> dict:
    with meta_device():
        model = MMAudioVAE(MMAudioVAEConfig.from_shapes(expected))
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def manifest_bigvgan(expected: dict) -> dict:
    return bigvgan_file_shapes(BigVGANConfig.from_shapes(expected))


TENSOR_RUNNERS = {
    "mmaudio_vae_decode": run_vae_decode,
    "mmaudio_vae_encode": run_vae_encode,
    "bigvgan_vocode": run_vocode,
    "audio_decode_e2e": run_e2e,
    "mel_frontend": run_mel,
}
MANIFEST_ANCHORS = {"mmaudio_vae": "decoder.learnable_gain", "bigvgan": "conv_pre.weight_v"}
MANIFEST_RUNNERS = {"mmaudio_vae": manifest_vae, "bigvgan": manifest_bigvgan}
