"""Joining windows into one clip: which frames and samples of each window the clip keeps.

Video: the frames two windows share are taken once, from the earlier window. Window n + 1 starts from the
re-encode of exactly those frames (its first latent frames are held clean by default), so its decode of them
is a copy of a copy; the earlier window's own frames are the originals. They are written as window n
finishes, so nothing of the picture waits for the next window (``frames_to_keep``).

Audio: the samples two windows share are crossfaded, the earlier window fading out while the later fades in,
so the seam has no click. The fade is equal-power: the gains are cos / sin of a quarter turn across the
overlap, so for unrelated sound the power stays constant. The overlaps here are mostly the *same* sound twice
(window n + 1 holds window n's audio tokens over those seconds), and cos + sin of the same signal swells by
up to 3 dB mid-fade (sqrt 2 in amplitude); the gains are therefore divided by sqrt(1 + 2 rho cos sin), rho
the overlap's correlation clamped to [0, 1], which keeps the power constant whatever the two sides share:
exactly cos / sin for unrelated sound, a fade summing to one for identical sound (which then passes
unchanged). ``AudioSeams`` holds each window's last samples until the next window comes to fade into them.
"""

from __future__ import annotations

import math

import torch


def equal_power_crossfade(tail: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """The ``n`` samples of an overlap: ``tail`` (the earlier window's last n) fading out into ``head`` (the
    later window's first n), cos / sin gains normalised by the two sides' correlation (see the module doc)."""
    if tail.ndim != 1 or head.ndim != 1 or tail.shape != head.shape:
        raise ValueError(f"the crossfade takes two mono overlaps of one length, got {list(tail.shape)} and "
                         f"{list(head.shape)}")
    n = tail.shape[0]
    if n == 0:
        return tail.clone()
    a, b = tail.double(), head.double()
    norms = float(a.norm() * b.norm())
    rho = min(1.0, max(0.0, float(a @ b) / norms)) if norms > 0 else 0.0
    # gains sampled at the middle of each sample's interval: the fade is symmetric and neither end is exactly
    # one side alone, so the first sample already differs from the tail by less than a sample step
    theta = (torch.arange(n, dtype=torch.float64) + 0.5) * (math.pi / 2 / n)
    fade_out, fade_in = torch.cos(theta), torch.sin(theta)
    norm = torch.rsqrt(1.0 + 2.0 * rho * fade_out * fade_in)
    return ((a * fade_out + b * fade_in) * norm).to(tail.dtype)


def frames_to_keep(frames_shared_with_previous: int) -> slice:
    """The frames of a window that the clip takes from it: all but those it shares with the window before,
    which the clip already has from that window."""
    return slice(frames_shared_with_previous, None)


class AudioSeams:
    """Turns window waveforms into the clip's samples, in order.

    ``push(waveform, hold)``: crossfades the samples held from the previous window into this window's first
    ones, returns every sample now final, and holds this window's last ``hold`` samples (those the next
    window shares). ``flush()`` returns what is held (the last window's tail, or a stopped clip's)."""

    def __init__(self):
        self._tail: torch.Tensor | None = None

    @property
    def held(self) -> int:
        return 0 if self._tail is None else int(self._tail.shape[0])

    def push(self, waveform: torch.Tensor, hold: int = 0) -> torch.Tensor:
        w = torch.as_tensor(waveform)
        if w.ndim != 1:
            raise ValueError(f"a window's waveform must be mono [N], got {list(w.shape)}")
        w = w.to(torch.float32)
        shared = self.held
        if isinstance(hold, bool) or int(hold) != hold or hold < 0:
            raise ValueError(f"the samples to hold must be a whole number >= 0, got {hold!r}")
        hold = int(hold)
        if shared + hold > w.shape[0]:
            raise ValueError(f"a window of {w.shape[0]} samples cannot share {shared} with the previous window "
                             f"and {hold} with the next")
        parts = []
        if shared:
            parts.append(equal_power_crossfade(self._tail, w[:shared]))
        parts.append(w[shared:w.shape[0] - hold])
        self._tail = w[w.shape[0] - hold:].clone() if hold else None
        return torch.cat(parts)

    def flush(self) -> torch.Tensor:
        tail = self._tail if self._tail is not None else torch.zeros(0)
        self._tail = None
        return tail
