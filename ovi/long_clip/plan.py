"""Where each window of a long clip sits on the clip's shared time axis.

A long clip is a run of windows of the variant's length (121 frames / 157 audio tokens for the 5 s variants,
241 / 314 for 10 s). Window n + 1 starts where the last ``overlap_frames`` pixel frames of window n start: those
frames, re-encoded by the Wan VAE, become its first latent frames, and window n's audio tokens over the same
seconds become its first audio tokens.

Rounding, and why:

* The overlap is a whole number of VAE frame groups, ``1 + 4 m`` pixel frames (the causal VAE encodes frame 0
  alone and then groups of 4, so exactly ``1 + m`` latent frames stand for them): ``m = round(overlap * fps /
  4)``. The default 1 s is 25 frames (24 frame intervals = exactly 1 s); 0 s is 1 frame, the last frame only.
* Video frame i is at i / 24 s; audio token j covers 512 samples from j * 512 / 16000 s: 31.25 tokens a
  second against 24 frames, 125 tokens per 96 frames. A window's first token is its first frame's time in
  tokens, rounded to the nearest token (halves up), on the clip's axis, never accumulated window to window:
  audio and video stay within half a token (16 ms) of each other however many windows there are. The tokens
  shared with the previous window are those that window still covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..variants import AUDIO_SAMPLES_PER_LATENT, VAE_TIME_STRIDE, Variant, get_variant

DEFAULT_OVERLAP_S = 1.0  # one second of shared picture and sound: enough context for motion and a voice to carry on
SEED_STRIDE = 1_000_003  # window n's seed is base + n * stride (mod 2**63): a prime, so nearby base seeds differ
SEED_LIMIT = 2 ** 63     # the engine's seeded generators take signed 64-bit seeds


@dataclass(frozen=True)
class Window:
    """One window on the clip's axis. ``known_*`` count what it shares with the window before (0 for window 0)."""

    index: int
    seed: int
    frame_start: int          # first pixel frame, on the clip's axis
    token_start: int          # first audio latent token, on the clip's axis
    known_frames: int         # pixel frames shared with the previous window (1 + 4 m), 0 for the first
    known_latent_frames: int  # latent frames they encode to (1 + m), held clean at the window's start
    known_tokens: int         # audio latent tokens shared with the previous window, held at its start


def window_seed(base_seed: int, index: int) -> int:
    return (int(base_seed) + index * SEED_STRIDE) % SEED_LIMIT


def overlap_frames_for(variant: Variant | str, overlap_s: float) -> int:
    """Pixel frames shared at each seam for an overlap of ``overlap_s`` seconds (``1 + 4 m``, see the module doc)."""
    v = get_variant(variant)
    if isinstance(overlap_s, bool) or not isinstance(overlap_s, (int, float)) or not math.isfinite(overlap_s) \
            or overlap_s < 0:
        raise ValueError(f"overlap must be a number of seconds >= 0, got {overlap_s!r}")
    groups = math.floor(overlap_s * v.fps / VAE_TIME_STRIDE + 0.5)
    frames = 1 + VAE_TIME_STRIDE * groups
    longest = v.video_frames - VAE_TIME_STRIDE  # each window must add at least one latent frame of its own
    if frames > longest:
        raise ValueError(f"an overlap of {overlap_s} s ({frames} frames) leaves {v.name} windows "
                         f"({v.video_frames} frames) nothing new; the most is {(longest - 1) / v.fps:.2f} s")
    return frames


def token_at_frame(variant: Variant | str, frame: int) -> int:
    """The audio latent token that starts nearest the time of pixel frame ``frame`` (halves round up)."""
    v = get_variant(variant)
    num, den = frame * v.sample_rate, v.fps * AUDIO_SAMPLES_PER_LATENT
    return (2 * num + den) // (2 * den)


def make_window(variant: Variant | str, index: int, overlap_frames: int, base_seed: int) -> Window:
    """Window ``index`` of a clip whose seams share ``overlap_frames`` pixel frames."""
    v = get_variant(variant)
    if index < 0:
        raise ValueError(f"window index must be >= 0, got {index}")
    if (overlap_frames - 1) % VAE_TIME_STRIDE or not 1 <= overlap_frames <= v.video_frames - VAE_TIME_STRIDE:
        raise ValueError(f"overlap_frames must be 1 + {VAE_TIME_STRIDE} m and below {v.video_frames}, "
                         f"got {overlap_frames}")
    advance = v.video_frames - overlap_frames
    start = index * advance
    token = token_at_frame(v, start)
    if index == 0:
        return Window(0, window_seed(base_seed, 0), 0, 0, 0, 0, 0)
    previous_token = token_at_frame(v, start - advance)
    return Window(index, window_seed(base_seed, index), start, token, overlap_frames,
                  1 + (overlap_frames - 1) // VAE_TIME_STRIDE, previous_token + v.audio_latent_length - token)


@dataclass(frozen=True)
class ClipPlan:
    """The windows of one clip. ``frames`` / ``samples``: the clip's length as written (the windows' span, or
    the requested duration when one was given)."""

    variant: Variant
    overlap_frames: int
    windows: tuple[Window, ...]
    frames: int
    samples: int

    @property
    def count(self) -> int:
        return len(self.windows)

    @property
    def span_frames(self) -> int:
        """Pixel frames the windows cover together."""
        return self.windows[-1].frame_start + self.variant.video_frames

    @property
    def span_tokens(self) -> int:
        return self.windows[-1].token_start + self.variant.audio_latent_length

    @property
    def seconds(self) -> float:
        return self.frames / self.variant.fps


def windows_for(variant: Variant | str, seconds: float, overlap_frames: int) -> int:
    """The fewest windows whose frames cover ``seconds`` (as ``plan_clip`` cuts it: the nearest whole frame)."""
    v = get_variant(variant)
    need = max(1, math.floor(seconds * v.fps + 0.5))
    if need <= v.video_frames:
        return 1
    return 1 + math.ceil((need - v.video_frames) / (v.video_frames - overlap_frames))


def plan_clip(variant: Variant | str, *, windows: int | None = None, duration: float | None = None,
              overlap: float = DEFAULT_OVERLAP_S, seed: int = 100) -> ClipPlan:
    """A clip of ``windows`` windows, or of the fewest windows that last ``duration`` seconds (then cut to
    exactly ``round(duration * fps)`` frames and the audio samples of the same time). Neither: one window."""
    v = get_variant(variant)
    overlap_frames = overlap_frames_for(v, overlap)
    if duration is not None:
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) \
                or duration <= 0:
            raise ValueError(f"duration must be a number of seconds > 0, got {duration!r}")
        if windows is not None:
            raise ValueError("give the clip's length as windows or as a duration, not both")
        windows = windows_for(v, duration, overlap_frames)
    count = 1 if windows is None else windows
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"windows must be a whole number >= 1, got {windows!r}")
    ws = tuple(make_window(v, n, overlap_frames, seed) for n in range(count))
    span_frames = ws[-1].frame_start + v.video_frames
    span_samples = (ws[-1].token_start + v.audio_latent_length) * AUDIO_SAMPLES_PER_LATENT
    if duration is None:
        frames, samples = span_frames, span_samples
    else:
        frames = min(span_frames, max(1, math.floor(duration * v.fps + 0.5)))
        samples = min(span_samples, (frames * v.sample_rate + v.fps // 2) // v.fps)
    return ClipPlan(v, overlap_frames, ws, frames, samples)
