"""First-frame preprocessing for i2v / t2i2v: any image -> [1, 3, H', W'] in [-1, 1] at the variant's area.

The official path reads an 8-bit RGB image, maps it to [-1, 1], and resizes it with torch's bicubic
(Keys kernel A=-0.75, align_corners=False, no antialias, no clamp) to the multiple-of-32 size that
``best_hw_for_area`` picks. There is no crop, so the aspect may change slightly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .log import log
from .sizes import best_hw_for_area, parse_area

BICUBIC_A = -0.75
SIZE_MULTIPLE = 32


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Keys weights of the four taps i0-1..i0+2 for fractional offsets t, shape [m, 4]."""
    a = BICUBIC_A
    d = torch.stack((1 + t, t, 1 - t, 2 - t), dim=-1)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d <= 1, near, far)


def _resize_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Bicubic resampling of one axis, taps and weights computed in float64.

    torch's float32 bicubic computes the source coordinate in float32, an error that grows with the
    image width (about 1e-4 relative at 1472 columns); float64 coordinates keep it near 1e-7.
    """
    n = x.shape[dim]
    # Taps and weights on the CPU: some accelerators (MPS) have no float64.
    src = (torch.arange(size, dtype=torch.float64) + 0.5) * (n / size) - 0.5
    i0 = torch.floor(src)
    w = _cubic_weights(src - i0).to(device=x.device, dtype=x.dtype)  # [size, 4]
    idx = (i0.long()[:, None] + torch.arange(-1, 3)).clamp_(0, n - 1).to(x.device)  # [size, 4]
    taps = x.index_select(dim, idx.reshape(-1))
    shape = list(x.shape)
    shape[dim:dim + 1] = [size, 4]
    taps = taps.reshape(shape)
    wshape = [1] * len(shape)
    wshape[dim:dim + 2] = [size, 4]
    return (taps * w.reshape(wshape)).sum(dim + 1)


def resize_bicubic(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """torch ``interpolate(mode='bicubic', align_corners=False)`` semantics on [..., H, W], without clamping."""
    h, w = hw
    if x.shape[-1] != w:
        x = _resize_axis(x, w, x.dim() - 1)
    if x.shape[-2] != h:
        x = _resize_axis(x, h, x.dim() - 2)
    return x


def _read_file(path: Path) -> np.ndarray:
    """uint8 RGB [H, W, 3] from an image file: EXIF orientation applied, alpha dropped without compositing."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        from PIL import Image, ImageOps
    except ImportError as e:  # ComfyUI always ships Pillow; a bare engine install may not
        raise ImportError(f"reading {path} needs Pillow (pip install pillow), or pass the pixels as an array") from e
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return _pil_to_array(im)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _pil_to_array(im) -> np.ndarray:
    # 16-bit greyscale: keep the high byte, as an 8-bit reader does (PIL's own convert would clip to 255).
    if im.mode in ("I;16", "I;16L", "I;16B", "I"):
        a = (np.asarray(im, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _to_hwc_uint8(image) -> torch.Tensor:
    """Any accepted input as a uint8 RGB [H, W, 3] tensor."""
    if isinstance(image, (str, os.PathLike)):
        image = _read_file(Path(image))
    elif hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image: like the official code, no EXIF transpose
        image = _pil_to_array(image)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.array(image))  # a copy: decoded arrays may be read-only
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"unsupported image type {type(image).__name__}: give a path, a PIL image, "
                        "a uint8 [H, W, C] array or a ComfyUI IMAGE tensor [B, H, W, 3]")
    x = image
    if x.dim() == 4:
        if x.shape[0] > 1:
            log.info(f"first-frame image batch of {x.shape[0]}: using the first image")
        x = x[0]
    if x.dim() == 2:
        x = x[..., None]
    if x.dim() != 3 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be [H, W, C] with C in 1/3/4 (or [B, H, W, C]), got shape {list(image.shape)}")
    if x.is_floating_point():
        # ComfyUI IMAGE: float 0..1. Quantised to 8 bits because the official path only ever sees 8-bit
        # images (a file, or FLUX's PIL output in t2i2v); a LoadImage tensor round-trips exactly.
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise ValueError(f"integer images must be uint8, got {x.dtype}")
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    return x[..., :3]


def preprocess_image(image, area, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The official first-frame preprocessing: image -> float [1, 3, H', W'] in about [-1.24, 1.17].

    ``image``: a path, a PIL image, a uint8 [H, W, 3|4] array/tensor, or a ComfyUI IMAGE [B, H, W, 3]
    (first image used). ``area``: the variant's target area (anything ``parse_area`` accepts).
    (H', W') = best_hw_for_area(H, W, area, 32). The arithmetic runs in float32 (the engine's bf16
    would only lose precision before the VAE) and the result is cast to ``dtype``.
    """
    area = parse_area(area)
    if area is None:
        raise ValueError("preprocess_image needs a target area, e.g. the variant's target_area")
    u = _to_hwc_uint8(image)
    if device is not None:
        u = u.to(device)
    x = (u.permute(2, 0, 1).to(torch.float32) / 255.0) * 2 - 1
    h, w = x.shape[-2:]
    th, tw = best_hw_for_area(h, w, area, SIZE_MULTIPLE)
    if (th, tw) != (h, w):
        x = resize_bicubic(x, (th, tw))
    return x[None].to(dtype).contiguous()


def first_frame_size(height: int, width: int, area) -> tuple[int, int]:
    """The (H', W') ``preprocess_image`` resizes an image of this size to (for UI display)."""
    return best_hw_for_area(int(height), int(width), parse_area(area), SIZE_MULTIPLE)


__all__ = ["preprocess_image", "resize_bicubic", "first_frame_size", "BICUBIC_A"]
