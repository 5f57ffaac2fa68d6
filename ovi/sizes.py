"""Frame-size selection, reproducing the official engine's helpers number for number.

Every rounding here is Python's ``round`` (half to even): several common requests hit exact halves
(720 at a 720² area scales by exactly 1 and snaps 22.5 -> 22, so to 704), and the chosen size decides
the latent shape, so "nearly the same" rounding would silently change the video.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .log import log
from .variants import Variant, get_variant

FLUX_AREA = 1024 * 1024  # the t2i2v image model always renders at about one megapixel
AREA_TOLERANCE = (0.9, 1.1)  # the engine warns (and rescales anyway) outside this band of the variant area

_PAIR = re.compile(r"^(\d+)\s*[x*]\s*(\d+)$|^(\d+)\s+(\d+)$", re.IGNORECASE)


def snap_hw_to_multiple_of_32(h: int, w: int, area: int | None = None) -> tuple[int, int]:
    """The t2v video size: rescale (h, w) to ``area`` keeping the aspect, then to the nearest multiples of 32."""
    if h <= 0 or w <= 0:
        raise ValueError(f"frame size must be positive, got {h}x{w}")
    if area is not None and area > 0:
        s = math.sqrt(area / (h * w))
        h, w = round(h * s), round(w * s)
    return max(32, round(h / 32) * 32), max(32, round(w / 32) * 32)


def best_hw_for_area(h: int, w: int, area_target: int, multiple: int = 32) -> tuple[int, int]:
    """The i2v frame size: the multiple-of-``multiple`` size closest to ``area_target``, then to the aspect.

    Candidates are the rows p0-3..p0+3 around the ideal row count (columns following the aspect) plus the
    plain rescale; the first candidate minimising (area error, aspect error) wins. h == 0 raises
    ZeroDivisionError, as the official helper does.
    """
    if area_target <= 0:
        return h, w
    m = multiple
    r = w / h
    units = max(1, area_target // (m * m))
    p0 = max(1, round(math.sqrt(units / max(r, 1e-8))))
    cands = []
    for d in range(-3, 4):
        p = max(1, p0 + d)
        q = max(1, round(p * r))
        cands.append((p * m, q * m))
    s = math.sqrt(area_target / (h * w))
    cands.append((max(m, round(h * s / m) * m), max(m, round(w * s / m) * m)))
    return min(cands, key=lambda c: (abs(c[0] * c[1] - area_target), abs(c[1] / c[0] - r)))


def scale_hw_to_area_divisible(h: int, w: int, area: int = FLUX_AREA, n: int = 16) -> tuple[int, int]:
    """The t2i2v image size: (h, w) rescaled to ``area``, each side rounded to a multiple of ``n`` (at least n)."""
    if h <= 0 or w <= 0 or area <= 0:
        raise ValueError(f"size and area must be positive, got {h}x{w} at area {area}")
    s = math.sqrt(area / (h * w))
    return max(n, round(h * s / n) * n), max(n, round(w * s / n) * n)


def calc_dims_from_area(aspect_ratio: str, total_area: int, divisible_by: int = 32) -> tuple[int, int]:
    """(height, width) for an "h:w" aspect at ``total_area``, each side floored to a multiple of ``divisible_by``.

    The official engine never calls this; it is kept for nodes that offer aspect presets.
    """
    try:
        hr, wr = (int(v) for v in str(aspect_ratio).split(":"))
    except ValueError:
        raise ValueError(f"aspect ratio must look like 'h:w', got {aspect_ratio!r}") from None
    g = math.gcd(hr, wr)
    hr, wr = hr // g, wr // g
    k = math.sqrt(total_area / (hr * wr))
    d = divisible_by
    return max(d, math.floor(k * hr) // d * d), max(d, math.floor(k * wr) // d * d)


def parse_area(val: Any) -> int | None:
    """An area from an int/float (truncated), an (h, w) pair, "AxB" / "A*B" / "A B", a digit string, or None."""
    if val is None:
        return None
    if isinstance(val, bool):
        raise ValueError(f"not an area: {val!r}")
    if isinstance(val, int):
        return val
    if isinstance(val, float):
        return int(val)
    if isinstance(val, (tuple, list)) and len(val) == 2:
        return int(val[0]) * int(val[1])
    if isinstance(val, str):
        s = val.strip()
        if s.isdigit():
            return int(s)
        m = _PAIR.match(s)
        if m:
            a, b = (g for g in m.groups() if g is not None)
            return int(a) * int(b)
    raise ValueError(f"not an area: {val!r} (use e.g. 921600, '960x960' or (960, 960))")


def area_warning(h: int, w: int, area: int) -> bool:
    """True when a requested h*w lies outside 0.9-1.1x the variant area (the engine warns, then rescales anyway)."""
    lo, hi = AREA_TOLERANCE
    return h * w < lo * area or h * w > hi * area


def t2v_sizes(video_frame_height_width, target_area: int) -> dict:
    """The size chain of a t2v / t2i2v generation, for display and for the parity fixture.

    The t2i2v first frame comes from the FLUX image size, so it can differ from the t2v size
    (704x1280 at 960² gives t2v 704x1280 but t2i2v 704x1312).
    """
    h, w = video_frame_height_width
    video_hw = snap_hw_to_multiple_of_32(h, w, area=target_area)
    flux_hw = scale_hw_to_area_divisible(*video_hw, area=FLUX_AREA, n=16)
    first_hw = best_hw_for_area(*flux_hw, target_area, 32)
    return {
        "video_hw": list(video_hw),
        "t2v_latent_hw": [video_hw[0] // 16, video_hw[1] // 16],
        "t2i2v_flux_hw": list(flux_hw),
        "t2i2v_first_frame_hw": list(first_hw),
        "t2i2v_latent_hw": [first_hw[0] // 16, first_hw[1] // 16],
        "area_warning": area_warning(h, w, target_area),
    }


def t2v_frame_size(variant: Variant | str | None, height: int, width: int) -> tuple[int, int, bool]:
    """(h, w, warning) the engine renders a t2v request at for ``variant`` (a Variant or its name).

    The size is always rescaled to the variant's area; the caller logs the chosen size (and the warning
    when the request was far from that area) so a user never gets a different size silently.
    """
    area = get_variant(variant).target_area
    h, w = snap_hw_to_multiple_of_32(int(height), int(width), area=area)
    return h, w, area_warning(int(height), int(width), area)


# -- engine requests: an exact size, requested dims, or an aspect ratio --------------------------------
def _parse_pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, str):
        parts = value.lower().replace("*", "x").replace(":", "x").split("x")
    elif isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        raise ValueError(f"{what} must be (H, W) or 'HxW', got {value!r}")
    try:
        h, w = (int(str(p).strip()) for p in parts)
    except ValueError:
        raise ValueError(f"{what} must be (H, W) or 'HxW' with whole numbers, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{what} must be positive, got {h}x{w}")
    return h, w


def resolve_frame_size(variant: Variant | str, *, size=None, height: int | None = None, width: int | None = None,
                       aspect: str | None = None) -> tuple[int, int, str]:
    """(H, W, how it was chosen) for a text-to-video request.

    ``size``: used exactly; both sides must be multiples of 32. ``height``/``width`` or ``aspect`` ("h:w"): the
    official rule, rescaled to the variant's area and snapped to multiples of 32. Nothing: the variant's
    nominal square (720x720 -> 704x704, 960x960).
    """
    v = get_variant(variant)
    given = [n for n, x in (("size", size), ("aspect", aspect)) if x is not None]
    if height is not None or width is not None:
        given.append("height/width")
    if len(given) > 1:
        raise ValueError(f"give only one of size, height/width or aspect (got {', '.join(given)})")
    if size is not None:
        h, w = _parse_pair(size, "size")
        if h % 32 or w % 32:
            nh, nw = max(32, round(h / 32) * 32), max(32, round(w / 32) * 32)
            raise ValueError(f"size {h}x{w}: both sides must be multiples of 32 (the VAE downsamples by 16 and the "
                             f"model patches 2x2), e.g. {nh}x{nw}. Give height/width instead to let the engine pick "
                             "the nearest size at the variant's area.")
        note = "as given"
        if area_warning(h, w, v.target_area):
            note += f"; the {v.name} model was trained near {v.target_area:,} pixels, this is {h * w:,}"
        return h, w, note
    if height is not None or width is not None:
        if height is None or width is None:
            raise ValueError("give both height and width (or size=(H, W))")
        h, w, warn = t2v_frame_size(v, int(height), int(width))
        note = f"requested {height}x{width}, rescaled to the {v.name} area and snapped to multiples of 32"
        if warn:
            log.warning("requested %sx%s is far from the %s area (%s pixels); the size is rescaled to %dx%d",
                        height, width, v.name, f"{v.target_area:,}", h, w)
        return h, w, note
    if aspect is not None:
        ah, aw = _parse_pair(aspect, "aspect")
        h, w, _ = t2v_frame_size(v, ah, aw)
        return h, w, f"aspect {ah}:{aw} at the {v.name} area"
    side = int(round(math.sqrt(v.target_area)))
    h, w, _ = t2v_frame_size(v, side, side)
    return h, w, f"default square at the {v.name} area"
