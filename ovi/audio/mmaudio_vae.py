"""MMAudio 16 kHz mel VAE: EDM2 magnitude-preserving 1-D encoder/decoder over 80-bin log-mels.

The file ``v1-16.pth`` stores raw (un-normalised) ``MPConv1D`` weights; the loader folds the forced weight
normalisation into them once (``fold_mp_weight``), so the modules here are plain bias-free conv1d layers.
Latents are [B, 20, L] at 31.25 frames/s; one latent frame decodes to two mel frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

# Per-bin mel statistics of the 16 kHz model (also stored in the checkpoint as data_mean / data_std).
DATA_MEAN_16K = (
    -1.6058, -1.3676, -1.252, -1.2453, -1.2078, -1.2224, -1.2419, -1.2439, -1.2922, -1.2927, -1.317, -1.3543,
    -1.3401, -1.3836, -1.3907, -1.3912, -1.4313, -1.4152, -1.4527, -1.4728, -1.4568, -1.5101, -1.5051, -1.5172,
    -1.5623, -1.5373, -1.5746, -1.5687, -1.6032, -1.6131, -1.6081, -1.6331, -1.6489, -1.6489, -1.67, -1.6738,
    -1.6953, -1.6969, -1.7048, -1.728, -1.7361, -1.7495, -1.7658, -1.7814, -1.7889, -1.8064, -1.8221, -1.8377,
    -1.8417, -1.8643, -1.8857, -1.8929, -1.9173, -1.9379, -1.9531, -1.9673, -1.9824, -2.0042, -2.0215, -2.0436,
    -2.0766, -2.1064, -2.1418, -2.1855, -2.2319, -2.2767, -2.3161, -2.3572, -2.3954, -2.4282, -2.4659, -2.5072,
    -2.5552, -2.6074, -2.6584, -2.7107, -2.7634, -2.8266, -2.8981, -2.9673)
DATA_STD_16K = (
    1.0291, 1.0411, 1.0043, 0.982, 0.9677, 0.9543, 0.945, 0.9392, 0.9343, 0.9297, 0.9276, 0.9263, 0.9242, 0.9254,
    0.9232, 0.9281, 0.9263, 0.9315, 0.9274, 0.9247, 0.9277, 0.9199, 0.9188, 0.9194, 0.916, 0.9161, 0.9146, 0.9161,
    0.91, 0.9095, 0.9145, 0.9076, 0.9066, 0.9095, 0.9032, 0.9043, 0.9038, 0.9011, 0.9019, 0.901, 0.8984, 0.8983,
    0.8986, 0.8961, 0.8962, 0.8978, 0.8962, 0.8973, 0.8993, 0.8976, 0.8995, 0.9016, 0.8982, 0.8972, 0.8974, 0.8949,
    0.894, 0.8947, 0.8936, 0.8939, 0.8951, 0.8956, 0.9017, 0.9167, 0.9436, 0.969, 1.0003, 1.0225, 1.0381, 1.0491,
    1.0545, 1.0604, 1.0761, 1.0929, 1.1089, 1.1196, 1.1176, 1.1156, 1.1117, 1.107)

_EPS = 1e-4


@dataclass(frozen=True)
class MMAudioVAEConfig:
    data_dim: int = 80
    embed_dim: int = 20
    hidden_dim: int = 384
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_layers: tuple[int, ...] = (3,)
    down_layers: tuple[int, ...] = (0,)
    kernel_size: int = 3
    clip_act: float = 256.0

    @property
    def downsample(self) -> int:
        """Mel frames per latent frame."""
        return 2 ** len(self.down_layers)

    @classmethod
    def from_dict(cls, d: Mapping) -> "MMAudioVAEConfig":
        """From a fixture config (``kwargs`` + ``fixed_inside_VAE``) or a flat dict of field names."""
        flat = {**d.get("kwargs", {}), **d.get("fixed_inside_VAE", {}), **{k: v for k, v in d.items()
                                                                          if k in cls.__dataclass_fields__}}
        out = {}
        for k, v in flat.items():
            if k in cls.__dataclass_fields__:
                out[k] = tuple(v) if isinstance(v, (list, tuple)) else v
        return cls(**out)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> "MMAudioVAEConfig":
        """Infer the configuration from a ``v1-16.pth``-style {key: shape} dict (KeyError if it is not one)."""
        if "encoder.conv_in.weight" in shapes:
            hidden, data_dim, k = shapes["encoder.conv_in.weight"]
        else:
            data_dim, hidden, k = shapes["decoder.conv_out.weight"]
        embed = shapes["decoder.conv_in.weight"][1]
        side = "encoder.down" if "encoder.conv_in.weight" in shapes else "decoder.up"
        levels = 1 + max(int(key.split(".")[2]) for key in shapes if key.startswith(side + "."))
        ch_mult = tuple(shapes[f"{side}.{i}.block.0.conv1.weight"][0] // hidden for i in range(levels))
        nblocks = 1 + max(int(key.split(".")[4]) for key in shapes if key.startswith(f"{side}.0.block."))
        if side == "encoder.down":
            down = tuple(i for i in range(levels) if f"encoder.down.{i}.downsample.conv1.weight" in shapes)
            attn = tuple(i for i in range(levels) if f"encoder.down.{i}.attn.0.qkv.weight" in shapes)
        else:  # decoder-only file: up.i holds the upsample that undoes down layer i-1
            nblocks -= 1
            down = tuple(i - 1 for i in range(levels) if f"decoder.up.{i}.upsample.conv.weight" in shapes)
            attn = tuple(i for i in range(levels) if f"decoder.up.{i}.attn.0.qkv.weight" in shapes)
        return cls(data_dim=data_dim, embed_dim=embed, hidden_dim=hidden, ch_mult=ch_mult, num_res_blocks=nblocks,
                   attn_layers=attn or (len(ch_mult),), down_layers=down, kernel_size=k)


# -- EDM2 magnitude-preserving primitives -------------------------------------------------------------

def pixnorm(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    # The norm is taken in float32 (as upstream does) so bf16 activations normalise accurately.
    n = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    n = torch.add(_EPS, n, alpha=math.sqrt(1.0 / x.shape[dim]))
    return x / n.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.3) -> torch.Tensor:
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def fold_mp_weight(w: torch.Tensor) -> torch.Tensor:
    """Forced weight norm folded into a raw MPConv weight [out, in, k], in float32 like the official loader:
    ``w / (||w_o|| + 1e-4*sqrt(in*k))`` computed as normalise-then-scale to reproduce its rounding."""
    w = w.to(torch.float32)
    fan_in = w[0].numel()
    n = torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True, dtype=torch.float32)
    n = torch.add(_EPS, n, alpha=math.sqrt(1.0 / fan_in))
    return (w / n) / math.sqrt(fan_in)


class MPConv1D(nn.Module):
    """Bias-free conv1d, 'same' padding; ``weight`` is already folded at load time."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, k), requires_grad=False)

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if gain is None else self.weight * gain
        return F.conv1d(x, w.to(x.dtype), padding=w.shape[-1] // 2)


class ResnetBlock1D(nn.Module):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv1 = MPConv1D(cin, cout, k)
        self.conv2 = MPConv1D(cout, cout, k)
        if cin != cout:
            self.nin_shortcut = MPConv1D(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pixnorm(x)
        h = self.conv2(mp_silu(self.conv1(mp_silu(x))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return mp_sum(x, h)


class AttnBlock1D(nn.Module):
    """Single-head self-attention over time; qkv channels interleaved as c*3 + {q,k,v}, each pixel-normed."""

    def __init__(self, c: int):
        super().__init__()
        self.qkv = MPConv1D(c, 3 * c, 1)
        self.proj_out = MPConv1D(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n = x.shape
        q, k, v = pixnorm(self.qkv(x).reshape(b, c, 3, n), dim=1).unbind(2)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return mp_sum(x, self.proj_out(h.transpose(1, 2)))


class Downsample1D(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = MPConv1D(c, c, 1)
        self.conv2 = MPConv1D(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.avg_pool1d(self.conv1(x), kernel_size=2, stride=2))


class Upsample1D(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = MPConv1D(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.repeat_interleave(2, dim=-1))


class _Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)

    def run(self, h: torch.Tensor, clip: float) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
            h = h.clamp(-clip, clip)
        return h


class _Mid(nn.Module):
    def __init__(self, c: int, k: int):
        super().__init__()
        self.block_1 = ResnetBlock1D(c, c, k)
        self.attn_1 = AttnBlock1D(c)
        self.block_2 = ResnetBlock1D(c, c, k)

    def forward(self, h: torch.Tensor, clip: float) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h))).clamp(-clip, clip)


class Encoder1D(nn.Module):
    def __init__(self, cfg: MMAudioVAEConfig):
        super().__init__()
        self.config = cfg
        self.learnable_gain = nn.Parameter(torch.empty(()), requires_grad=False)
        h, k = cfg.hidden_dim, cfg.kernel_size
        self.conv_in = MPConv1D(cfg.data_dim, h, k)
        self.down = nn.ModuleList()
        cin = h
        for i, m in enumerate(cfg.ch_mult):
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock1D(cin, h * m, k))
                cin = h * m
                if i in cfg.attn_layers:
                    attn.append(AttnBlock1D(cin))
            level = _Level(blocks, attn)
            if i in cfg.down_layers:
                level.downsample = Downsample1D(cin)
            self.down.append(level)
        self.mid = _Mid(cin, k)
        self.conv_out = MPConv1D(cin, 2 * cfg.embed_dim, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clip = self.config.clip_act
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h, clip)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = mp_silu(self.mid(h, clip))
        return self.conv_out(h, gain=self.learnable_gain + 1)


class Decoder1D(nn.Module):
    def __init__(self, cfg: MMAudioVAEConfig):
        super().__init__()
        self.config = cfg
        self.learnable_gain = nn.Parameter(torch.empty(()), requires_grad=False)
        h, k = cfg.hidden_dim, cfg.kernel_size
        cin = h * cfg.ch_mult[-1]
        self.conv_in = MPConv1D(cfg.embed_dim, cin, k)
        self.mid = _Mid(cin, k)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock1D(cin, h * cfg.ch_mult[i], k))
                cin = h * cfg.ch_mult[i]
                if i in cfg.attn_layers:
                    attn.append(AttnBlock1D(cin))
            level = _Level(blocks, attn)
            if i - 1 in cfg.down_layers:
                level.upsample = Upsample1D(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.conv_out = MPConv1D(cin, cfg.data_dim, k)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        clip = self.config.clip_act
        h = self.mid(self.conv_in(z), clip)
        for level in reversed(self.up):
            h = level.run(h, clip)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(mp_silu(h), gain=self.learnable_gain + 1)


class MMAudioVAE(nn.Module):
    """State-dict keys equal those of ``v1-16.pth``; ``encoder=False`` skips the encoder (decode-only use)."""

    def __init__(self, cfg: MMAudioVAEConfig = MMAudioVAEConfig(), *, encoder: bool = True):
        super().__init__()
        self.config = cfg
        self.register_buffer("data_mean", torch.empty(1, cfg.data_dim, 1))
        self.register_buffer("data_std", torch.empty(1, cfg.data_dim, 1))
        if encoder:
            self.encoder = Encoder1D(cfg)
        self.decoder = Decoder1D(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def normalize(self, mel: torch.Tensor) -> torch.Tensor:
        return (mel - self.data_mean) / self.data_std

    def unnormalize(self, mel: torch.Tensor) -> torch.Tensor:
        return mel * self.data_std + self.data_mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B, embed_dim, L] -> de-normalised log10 mel [B, data_dim, L*downsample]."""
        return self.unnormalize(self.decoder(z))

    def encode_moments(self, mel: torch.Tensor) -> torch.Tensor:
        """Log10 mel [B, data_dim, T] -> posterior moments [B, 2*embed_dim, T/downsample] (mean, logvar)."""
        if not hasattr(self, "encoder"):
            raise RuntimeError("this MMAudio VAE was loaded without its encoder (encoder=False)")
        return self.encoder(self.normalize(mel))

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """Posterior mean [B, embed_dim, T/downsample]."""
        return self.encode_moments(mel)[:, : self.config.embed_dim]
