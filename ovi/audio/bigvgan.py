"""BigVGAN (v1, AMP blocks, anti-aliased SnakeBeta) 16 kHz vocoder: log10 mel [B, 80, T] -> waveform [B, 1, 256T].

Convs are plain ``nn.Conv1d`` / ``nn.ConvTranspose1d``: the checkpoint's weight norm (``weight_g``/``weight_v``
or ``parametrizations.weight.original0/1``) is folded by the loader. The anti-aliasing filters are buffers read
from the file, since recomputing them in another precision shifts the output measurably.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from ..loading import meta_device


@dataclass(frozen=True)
class BigVGANConfig:
    num_mels: int = 80
    upsample_rates: tuple[int, ...] = (4, 4, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (8, 8, 4, 4, 4, 4)
    upsample_initial_channel: int = 1536
    resblock: str = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    activation: str = "snakebeta"
    snake_logscale: bool = True
    filter_taps: int = 12

    @property
    def hop(self) -> int:
        return math.prod(self.upsample_rates)

    @classmethod
    def from_dict(cls, d: Mapping) -> "BigVGANConfig":
        """From the vocoder yaml/fixture dict (unknown training keys are ignored)."""
        d = d.get("config", d)
        out = {}
        for k, v in d.items():
            if k not in cls.__dataclass_fields__:
                continue
            if k == "resblock_dilation_sizes":
                v = tuple(tuple(x) for x in v)
            elif isinstance(v, list):
                v = tuple(v)
            out[k] = str(v) if k == "resblock" else v
        return cls(**out)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> "BigVGANConfig":
        """Infer from {key: shape} in any weight-norm naming. Strides and dilations are not in the shapes: the
        stride is taken as kernel/2 (BigVGAN's convention) and dilations as (1, 3, 5)."""
        shapes = {_plain_name(k): v for k, v in shapes.items()}
        cout, mels, _ = _conv_shape(shapes, "conv_pre")
        n_up = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("ups."))
        kernels = tuple(_conv_shape(shapes, f"ups.{i}.0")[2] for i in range(n_up))
        n_res = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("resblocks."))
        n_k = n_res // n_up
        type1 = any(k.startswith("resblocks.0.convs1.") for k in shapes)
        conv = "convs1" if type1 else "convs"
        rk, dil = [], []
        for j in range(n_k):
            rk.append(_conv_shape(shapes, f"resblocks.{j}.{conv}.0")[2])
            n = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(f"resblocks.{j}.{conv}."))
            dil.append(tuple(range(1, 2 * n, 2)))  # (1, 3, 5) for three convs
        beta = "activation_post.act.beta" in shapes
        taps = shapes.get("activation_post.upsample.filter", (1, 1, 12))[-1]
        return cls(num_mels=mels, upsample_rates=tuple(k // 2 for k in kernels), upsample_kernel_sizes=kernels,
                   upsample_initial_channel=cout, resblock="1" if type1 else "2", resblock_kernel_sizes=tuple(rk),
                   resblock_dilation_sizes=tuple(dil), activation="snakebeta" if beta else "snake",
                   filter_taps=taps)


# How checkpoint files name the two halves of a weight-normed conv: old ``weight_norm`` and parametrizations.
WN_SUFFIXES = {
    ".weight_g": "g", ".weight_v": "v",
    ".parametrizations.weight.original0": "g", ".parametrizations.weight.original1": "v",
}


def _plain_name(key: str) -> str:
    for suffix in WN_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".weight"
    return key


def _conv_shape(shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    return tuple(shapes[name + ".weight"])


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W = v * (g / ||v||) in float32, the norm over all dims but 0 (the input channel for ConvTranspose1d).

    ``torch._weight_norm`` is the kernel PyTorch's own weight-norm removal runs; its summation order decides
    the last bit of W, which the tiny random vocoder amplifies ~100x, so it is preferred to a plain norm."""
    g, v = g.to(torch.float32), v.to(torch.float32)
    if hasattr(torch, "_weight_norm"):
        return torch._weight_norm(v, g, 0)
    return v * (g / torch.linalg.vector_norm(v, dim=list(range(1, v.ndim)), keepdim=True))


def kaiser_sinc_filter(taps: int = 12, cutoff: float = 0.25, half_width: float = 0.3) -> torch.Tensor:
    """The anti-aliasing low-pass [1, 1, taps] (float32): a Kaiser-windowed sinc normalised to sum 1. Only used
    to write files; loading takes the filter stored in the checkpoint."""
    half = taps // 2
    a = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    beta = 0.1102 * (a - 8.7) if a > 50 else (0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21) if a >= 21 else 0.0)
    window = torch.kaiser_window(taps, periodic=False, beta=beta)
    t = torch.arange(-half, half) + 0.5 if taps % 2 == 0 else torch.arange(taps) - half
    x = 2 * cutoff * t
    sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(math.pi * x) / (math.pi * x))
    f = 2 * cutoff * window * sinc
    return (f / f.sum()).view(1, 1, taps)


class Snake(nn.Module):
    """SnakeBeta ``x + 1/(b + 1e-9) * sin(a x)^2`` (Snake when b = a); a, b stored as logs if logscale."""

    def __init__(self, c: int, beta: bool, logscale: bool):
        super().__init__()
        self.logscale = logscale
        self.alpha = nn.Parameter(torch.empty(c), requires_grad=False)
        if beta:
            self.beta = nn.Parameter(torch.empty(c), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        b = getattr(self, "beta", self.alpha)[None, :, None]
        if self.logscale:
            a, b = a.exp(), b.exp()
        return x + (1.0 / (b + 1e-9)) * torch.sin(x * a).pow(2)


class _Up2(nn.Module):
    def __init__(self, taps: int):
        super().__init__()
        self.register_buffer("filter", torch.empty(1, 1, taps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.filter.shape[-1]
        pad = taps // 2 - 1
        crop_l = pad * 2 + (taps - 2) // 2
        crop_r = pad * 2 + (taps - 1) // 2
        c = x.shape[1]
        x = F.pad(x, (pad, pad), mode="replicate")
        x = 2 * F.conv_transpose1d(x, self.filter.to(x.dtype).expand(c, -1, -1), stride=2, groups=c)
        return x[..., crop_l: x.shape[-1] - crop_r]


class _LowPass(nn.Module):
    def __init__(self, taps: int):
        super().__init__()
        self.register_buffer("filter", torch.empty(1, 1, taps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.filter.shape[-1]
        c = x.shape[1]
        x = F.pad(x, (taps // 2 - (taps % 2 == 0), taps // 2), mode="replicate")
        return F.conv1d(x, self.filter.to(x.dtype).expand(c, -1, -1), stride=2, groups=c)


class _Down2(nn.Module):
    def __init__(self, taps: int):
        super().__init__()
        self.lowpass = _LowPass(taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class Activation1d(nn.Module):
    """Snake evaluated at twice the rate between a low-pass upsample and downsample (alias-free)."""

    def __init__(self, c: int, cfg: BigVGANConfig):
        super().__init__()
        self.act = Snake(c, cfg.activation == "snakebeta", cfg.snake_logscale)
        self.upsample = _Up2(cfg.filter_taps)
        self.downsample = _Down2(cfg.filter_taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


def _conv(c: int, k: int, d: int = 1) -> nn.Conv1d:
    return nn.Conv1d(c, c, k, dilation=d, padding=(k * d - d) // 2)


class AMPBlock(nn.Module):
    """Type '1': x += c2(act(c1(act(x)))) per dilation; type '2': x += c(act(x))."""

    def __init__(self, c: int, k: int, dilations: tuple[int, ...], cfg: BigVGANConfig):
        super().__init__()
        self.type1 = cfg.resblock == "1"
        if self.type1:
            self.convs1 = nn.ModuleList(_conv(c, k, d) for d in dilations)
            self.convs2 = nn.ModuleList(_conv(c, k) for _ in dilations)
            n = 2 * len(dilations)
        else:
            self.convs = nn.ModuleList(_conv(c, k, d) for d in dilations)
            n = len(dilations)
        self.activations = nn.ModuleList(Activation1d(c, cfg) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.activations
        if self.type1:
            for c1, c2, a1, a2 in zip(self.convs1, self.convs2, acts[::2], acts[1::2]):
                x = x + c2(a2(c1(a1(x))))
        else:
            for c, a in zip(self.convs, acts):
                x = x + c(a(x))
        return x


class BigVGAN(nn.Module):
    def __init__(self, cfg: BigVGANConfig = BigVGANConfig()):
        super().__init__()
        self.config = cfg
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.num_mels, ch, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ModuleList([nn.ConvTranspose1d(ch // 2 ** i, ch // 2 ** (i + 1), k, u, padding=(k - u) // 2)])
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList(
            AMPBlock(ch // 2 ** (i + 1), k, tuple(d), cfg)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        out = ch // 2 ** len(cfg.upsample_rates)
        self.activation_post = Activation1d(out, cfg)
        self.conv_post = nn.Conv1d(out, 1, 7, padding=3)
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_pre.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_pre.weight.device

    def features(self, mel: torch.Tensor) -> torch.Tensor:
        """Everything before ``conv_post``: [B, num_mels, T] -> [B, C_last, hop*T]."""
        nk = len(self.config.resblock_kernel_sizes)
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            xs = self.resblocks[i * nk](x)
            for j in range(1, nk):
                xs = xs + self.resblocks[i * nk + j](x)
            x = xs / nk
        return self.activation_post(x)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Log10 mel [B, num_mels, T] -> waveform [B, 1, hop*T] in (-1, 1)."""
        return torch.tanh(self.conv_post(self.features(mel)))


def weight_normed_convs(module: nn.Module) -> list[str]:
    """Names of the convs whose weight is weight-normed in the checkpoint (every conv of the generator)."""
    return [n for n, m in module.named_modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]


def bigvgan_file_shapes(cfg: BigVGANConfig, naming: str = "weight_g") -> dict[str, tuple[int, ...]]:
    """Expected {key: shape} of a ``best_netG.pt['generator']`` file for ``cfg``: every conv as
    ``bias``/``weight_g``/``weight_v`` (``naming='weight_g'``) or ``bias``/``parametrizations.weight.original0/1``
    (``naming='parametrizations'``); g is [dim0, 1, 1]."""
    with meta_device():
        model = BigVGAN(cfg)
    convs = set(weight_normed_convs(model))
    out: dict[str, tuple[int, ...]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if owner in convs and leaf == "weight":
            continue
        out[key] = tuple(t.shape)
        if owner in convs and leaf == "bias":
            w = tuple(getattr(model.get_submodule(owner), "weight").shape)
            g = (w[0],) + (1,) * (len(w) - 1)
            if naming == "weight_g":
                out[f"{owner}.weight_g"], out[f"{owner}.weight_v"] = g, w
            else:
                out[f"{owner}.parametrizations.weight.original0"] = g
                out[f"{owner}.parametrizations.weight.original1"] = w
    return out
