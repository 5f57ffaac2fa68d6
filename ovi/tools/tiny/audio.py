"""Tiny MMAudio VAE and BigVGAN checkpoints in the real formats: ``MMAudio/ext_weights/v1-16.pth`` (plain state
dict, raw MPConv weights) and ``MMAudio/ext_weights/best_netG.pt`` (``{"generator": ...}``, weight_g/weight_v)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...audio.bigvgan import BigVGANConfig, bigvgan_file_shapes, kaiser_sinc_filter
from ...audio.checkpoint import load_bigvgan, load_mmaudio_vae
from ...audio.mmaudio_vae import DATA_MEAN_16K, DATA_STD_16K, MMAudioVAE, MMAudioVAEConfig

TINY_VAE = MMAudioVAEConfig(hidden_dim=16)
TINY_VOCODER = BigVGANConfig(upsample_initial_channel=64)
_POST_PEAK = 1.0  # conv_post is scaled so the calibration mel peaks here before tanh: well inside (-1, 1)


def tiny_vae_state(seed: int, cfg: MMAudioVAEConfig = TINY_VAE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MMAudioVAE(cfg).state_dict(keep_vars=True).items()}
    sd = {}
    for key, shape in shapes.items():
        if key in ("data_mean", "data_std"):
            sd[key] = torch.tensor(DATA_MEAN_16K if key == "data_mean" else DATA_STD_16K).view(1, -1, 1)
        elif key.endswith("learnable_gain"):
            sd[key] = 0.1 * torch.randn((), generator=g)
        else:  # raw MPConv weights: the load-time fold normalises them, so their scale is irrelevant
            sd[key] = torch.randn(shape, generator=g)
    return sd


def tiny_vocoder_state(seed: int, cfg: BigVGANConfig = TINY_VOCODER) -> dict[str, torch.Tensor]:
    """Random generator state in the ``weight_g``/``weight_v`` file naming (conv_post not yet calibrated)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in bigvgan_file_shapes(cfg).items():
        if key.endswith(".filter"):
            sd[key] = kaiser_sinc_filter(shape[-1])
        elif key.endswith(".weight_g"):  # near-unit filter norms keep activations O(1) through the stages
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith((".alpha", ".beta")):
            sd[key] = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith(".bias"):
            sd[key] = 0.01 * torch.randn(shape, generator=g)
        else:
            sd[key] = torch.randn(shape, generator=g)
    return sd


def write_tiny(out_dir: Path, seed: int) -> list[Path]:
    folder = Path(out_dir) / "MMAudio" / "ext_weights"
    folder.mkdir(parents=True, exist_ok=True)
    vae_path, voc_path = folder / "v1-16.pth", folder / "best_netG.pt"
    torch.save(tiny_vae_state(seed), vae_path)
    voc = tiny_vocoder_state(seed + 1)
    torch.save({"generator": voc}, voc_path)
    # Scale conv_post (g and bias) so what the tiny VAE decodes from a random latent does not saturate tanh.
    vae, vocoder = load_mmaudio_vae(vae_path, encoder=False), load_bigvgan(voc_path)
    z = torch.randn(1, TINY_VAE.embed_dim, 8, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        peak = float(vocoder.conv_post(vocoder.features(vae.decode(z))).abs().max())
    voc["conv_post.weight_g"] = voc["conv_post.weight_g"] * (_POST_PEAK / peak)
    voc["conv_post.bias"] = voc["conv_post.bias"] * (_POST_PEAK / peak)
    torch.save({"generator": voc}, voc_path)
    return [vae_path, voc_path]
