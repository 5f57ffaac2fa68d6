"""Loaders for the MMAudio VAE (``v1-16.pth``) and the BigVGAN vocoder (``best_netG.pt``).

Both fold a weight normalisation at load time through ``DerivedSource`` so tensors still stream one at a
time into a ``meta``-built module: the VAE's forced weight norm on every MPConv1D weight, and the vocoder's
classic weight norm (either file naming) on every conv.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from ..loading import (meta_device, CheckpointError, CheckpointReader, DerivedSource, TensorSource, check_keys,
                       load_into_module)
from ..log import log
from .bigvgan import WN_SUFFIXES, BigVGAN, BigVGANConfig, bigvgan_file_shapes, fold_weight_norm
from .mmaudio_vae import MMAudioVAE, MMAudioVAEConfig, fold_mp_weight


def _meta_shapes(module_cls, cfg, **kw) -> dict[str, tuple[int, ...]]:
    with meta_device():
        m = module_cls(cfg, **kw)
    return {k: tuple(v.shape) for k, v in m.state_dict(keep_vars=True).items()}


def _file_dtype(sources: Mapping[str, TensorSource]) -> torch.dtype | None:
    # The folds produce float32; without an explicit dtype the module keeps the file's own precision.
    return next((s.dtype for s in sources.values() if s.dtype.is_floating_point), None)


def mmaudio_vae_sources(sources: Mapping[str, TensorSource]) -> dict[str, TensorSource]:
    """The file's tensors with every MPConv1D weight replaced by its folded form (shapes unchanged)."""
    out: dict[str, TensorSource] = {}
    for key, src in sources.items():
        if key.endswith(".weight") and len(src.shape) == 3:
            out[key] = DerivedSource((src,), fold_mp_weight, tuple(src.shape), torch.float32)
        else:
            out[key] = src
    return out


def load_mmaudio_vae(path: str | os.PathLike, *, prefix: str = "", device=None, dtype: torch.dtype | None = None,
                     config: MMAudioVAEConfig | None = None, encoder: bool = True) -> MMAudioVAE:
    """Build the MMAudio VAE on ``meta`` (config inferred from the file unless given) and stream ``path`` into
    it, folding the forced weight norm in float32. ``encoder=False`` skips the encoder's tensors."""
    # v1-16.pth has no "generator" entry; reading one lets the key check recognise a vocoder given here.
    with CheckpointReader(path, prefix=prefix, entry="generator") as reader:
        sources = reader.sources()
        if config is None:
            try:
                config = MMAudioVAEConfig.from_shapes(reader.shapes())
            except (KeyError, ValueError, IndexError):
                # Not a VAE layout at all: let the key check name what the file is instead.
                check_keys("mmaudio_vae", path, _meta_shapes(MMAudioVAE, MMAudioVAEConfig()), sources)
                raise CheckpointError(path, "cannot infer the MMAudio VAE configuration from this file.")
        dtype = dtype or _file_dtype(sources)
        if not encoder:
            sources = {k: v for k, v in sources.items() if not k.startswith("encoder.")}
        if not any(k.startswith("decoder.") for k in sources) and any(k.startswith("encoder.") for k in sources):
            raise CheckpointError(path, "this MMAudio VAE file holds no decoder; Ovi needs the full v1-16.pth "
                                        "(hkchengrex/MMAudio ext_weights/v1-16.pth).")
        with meta_device():
            model = MMAudioVAE(config, encoder=encoder)
        load_into_module(model, mmaudio_vae_sources(sources), path=path, component="mmaudio_vae",
                         device=device, dtype=dtype)
    log.debug("MMAudio VAE loaded from %s (hidden %d, encoder %s)", path, config.hidden_dim, encoder)
    return model.eval().requires_grad_(False)


def bigvgan_sources(sources: Mapping[str, TensorSource], path=None) -> dict[str, TensorSource]:
    """Map a generator file (``weight_g``/``weight_v``, ``parametrizations.weight.original0/1`` or already
    folded ``weight``) to the module's keys, folding g and v into ``weight`` in float32. An unpaired half
    keeps its file name so the key check reports it."""
    halves: dict[str, dict[str, tuple[str, TensorSource]]] = {}
    out: dict[str, TensorSource] = {}
    for key, src in sources.items():
        for suffix, role in WN_SUFFIXES.items():
            if key.endswith(suffix):
                halves.setdefault(key[: -len(suffix)], {})[role] = (key, src)
                break
        else:
            out[key] = src
    for owner, parts in halves.items():
        if set(parts) != {"g", "v"} or f"{owner}.weight" in out:
            for key, src in parts.values():
                out[key] = src
            continue
        g, v = parts["g"][1], parts["v"][1]
        if tuple(g.shape) != (v.shape[0],) + (1,) * (len(v.shape) - 1):
            raise CheckpointError(path, f"{parts['g'][0]} has shape {list(g.shape)}, which is not the weight-norm "
                                        f"gain of {parts['v'][0]} {list(v.shape)}; the file is not a BigVGAN "
                                        "generator in a known layout.")
        out[f"{owner}.weight"] = DerivedSource((g, v), fold_weight_norm, tuple(v.shape), torch.float32)
    return out


def load_bigvgan(path: str | os.PathLike, *, prefix: str = "", device=None, dtype: torch.dtype | None = None,
                 config: BigVGANConfig | None = None) -> BigVGAN:
    """Build BigVGAN on ``meta`` and stream ``path`` into it (a ``best_netG.pt`` dict with a ``generator``
    entry, or a plain state dict / safetensors), removing the weight norm in float32."""
    with CheckpointReader(path, prefix=prefix, entry="generator") as reader:
        sources = reader.sources()
        if config is None:
            try:
                config = BigVGANConfig.from_shapes(reader.shapes())
            except (KeyError, ValueError, IndexError):
                check_keys("bigvgan", path, bigvgan_file_shapes(BigVGANConfig()), sources)
                raise CheckpointError(path, "cannot infer the BigVGAN configuration from this file.")
        dtype = dtype or _file_dtype(sources)
        with meta_device():
            model = BigVGAN(config)
        load_into_module(model, bigvgan_sources(sources, path), path=path, component="bigvgan", device=device,
                         dtype=dtype)
    log.debug("BigVGAN loaded from %s (%d channels)", path, config.upsample_initial_channel)
    return model.eval()
