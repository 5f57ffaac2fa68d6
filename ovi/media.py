"""The user's own audio and video, read and fitted to what the sampler holds as known regions.

Audio (lip-sync): any file the bundled ffmpeg reads (wav, flac, mp3, the sound of a video, ...) is decoded at
its own rate with every channel, mixed down by the mean of the channels and resampled here to 16 kHz mono
float32 (``load_audio`` / ``resample_audio``). The resampler is a polyphase windowed sinc (Kaiser window) at
the exact rational ratio of the two rates: band-limited, so a tone above the new Nyquist frequency (8 kHz) is
removed rather than folded back into the audible band.

Video (soundtrack): the first video stream is decoded to RGB at 24 fps by ffmpeg's ``fps`` filter, which
works on timestamps (variable frame rate files come out right), and each frame is resized as it arrives
(``load_video``). Frames already in memory (a ComfyUI IMAGE batch and its frame rate) take the filter's own
rule on the time axis: output frame i is the source frame on screen at (i + 1/2) / 24 s
(``resample_frames``). Sizes follow the sampler's rules (``fitted_size``): an exact size when one is given
(multiples of 32), else the variant's area with the aspect kept, snapped to multiples of 32; the frames are
stretched to it (no crop), as the first-frame image is, with an antialiased bicubic filter.

Memory: frames stay uint8 [T, H, W, 3] (3 bytes a pixel; 60 s at 960x960 is 4 GB, where float32 would be
16 GB); a consumer converts one window at a time (``frames_to_float``). ``load_video`` leaves room behind
the frames for a window's worth of held frames (reserved address space, not touched memory), so
``fit_frames_to_plan`` pads a loaded video without copying it.

Fitting to a clip plan (``ovi.long_clip.plan``): the audio track or the frames are cut or padded to the
span of the plan's windows (audio with silence, frames by holding the last frame); the mp4 is cut to the
plan's own length afterwards.
"""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import threading
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .log import log
from .long_clip.plan import DEFAULT_OVERLAP_S, ClipPlan, plan_clip
from .sizes import resolve_frame_size, t2v_frame_size
from .variants import AUDIO_SAMPLES_PER_LATENT, Variant, get_variant
from .video_io import VideoWriteError, _drain, _header, _run, ffmpeg_exe

SAMPLE_RATE = 16000  # the MMAudio VAE's rate, the same for every variant
FPS = 24             # the Wan VAE's frame rate, the same for every variant

# The resampler's kernel. Kaiser beta 8.6 gives about 86 dB of stopband attenuation (beta = 0.1102 (A - 8.7));
# 32 sinc lobes each side make the transition band about 8 % of the cutoff; the cutoff sits at 92 % of the
# lower Nyquist frequency so the whole transition band lies below it and nothing above it survives.
SINC_ZEROS = 32
KAISER_BETA = 8.6
ROLLOFF = 0.92
MAX_RATE_DENOMINATOR = 4096  # rates whose ratio to 16 kHz needs more phases are approximated (tiny drift, logged)
RESAMPLE_BLOCK = 1 << 20     # output samples computed per convolution, bounding the working memory

RESIZE_CHUNK = 8       # frames resized (and converted to float) at a time
READ_CHUNK = 8         # frames read from ffmpeg's pipe at a time
SPARE_FRAMES = 241     # room left behind loaded frames: the longest variant window, the most a plan pads
_SPARE_ATTR = "_ovi_spare_frames"  # set only on tensors load_video allocated itself
_STDERR_LINES = 20


class MediaError(ValueError):
    """A user's audio or video file that cannot be used; the message names the file."""


# ---------------------------------------------------------------------------------------------------------------
# Audio

def _as_float_tensor(waveform) -> torch.Tensor:
    if isinstance(waveform, np.ndarray):
        waveform = torch.from_numpy(np.ascontiguousarray(waveform))
    if not isinstance(waveform, torch.Tensor):
        raise TypeError(f"a waveform must be a tensor or an array, got {type(waveform).__name__}")
    if not waveform.is_floating_point():
        raise ValueError(f"a waveform must hold float samples in [-1, 1], got {waveform.dtype}")
    return waveform.detach().to("cpu")


def _kaiser(t: torch.Tensor, half: float) -> torch.Tensor:
    inside = (t / half).clamp(-1.0, 1.0)
    w = torch.special.i0(KAISER_BETA * torch.sqrt(1.0 - inside * inside)) / torch.special.i0(
        torch.tensor(KAISER_BETA, dtype=torch.float64))
    return torch.where(t.abs() <= half, w, torch.zeros_like(w))


def _polyphase_kernels(up: int, down: int) -> tuple[torch.Tensor, int]:
    """Kernels [up, K] (one per output phase) and the left padding, for output rate = input rate * up / down.

    Output sample m lies at input position m * down / up; with m = j * up + p it is
    sum_r x[j * down + r] * h(p * down / up - r), h the windowed sinc at the cutoff. Row p holds h at
    r = i - pad for i in 0..K-1, so one product with the input's rows (``down`` samples apart) computes
    every phase at once.
    """
    cutoff = ROLLOFF * min(1.0, up / down)  # in units of the input's Nyquist frequency
    half = SINC_ZEROS / cutoff               # the kernel's half-width in input samples
    pad = math.ceil(half)
    taps = down + 2 * pad + 1
    offset = torch.arange(up, dtype=torch.float64)[:, None] * down / up
    t = offset - (torch.arange(taps, dtype=torch.float64)[None, :] - pad)
    h = cutoff * torch.sinc(cutoff * t) * _kaiser(t, half)
    return h.to(torch.float32), pad


def resample_audio(waveform, rate: int, *, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A waveform [N] or [C, N] at ``rate`` Hz -> mono float32 [N'] at ``target_rate`` (16 kHz).

    Channels are mixed down by their mean. N' = ceil(N * target_rate / rate): the duration is kept.
    Non-finite samples are replaced by silence (with a warning).
    """
    x = _as_float_tensor(waveform)
    if x.dim() == 2:
        x = x.to(torch.float64).mean(0)  # mix down first: resampling is linear, so the order is free
    elif x.dim() != 1:
        raise ValueError(f"a waveform must be [N] or [channels, N], got {list(x.shape)}")
    if x.numel() == 0:
        raise ValueError("the audio is empty")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"the sample rate must be a positive number, got {rate!r}")
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        log.warning("the audio has non-finite samples; they are read as silence")
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    ratio = Fraction(int(target_rate), 1) / Fraction(rate).limit_denominator(1_000_000)
    if ratio == 1:
        return x.contiguous()
    if ratio.denominator > MAX_RATE_DENOMINATOR:
        exact = ratio
        ratio = ratio.limit_denominator(MAX_RATE_DENOMINATOR)
        log.info("resampling %s Hz -> %d Hz at the ratio %s (exact %s: a relative drift of %.1e)", rate,
                 target_rate, ratio, exact, abs(float(ratio / exact) - 1.0))
    up, down = ratio.numerator, ratio.denominator
    kernels, pad = _polyphase_kernels(up, down)
    n = x.numel()
    n_out = -(-n * up // down)
    frames = -(-n_out // up)
    taps = kernels.shape[1]
    need = (frames - 1) * down + taps
    xp = F.pad(x, (pad, max(0, need - pad - n)))
    weight = kernels.t().contiguous()  # [K, up]
    out = torch.empty(frames * up, dtype=torch.float32)
    step = max(1, RESAMPLE_BLOCK // up)
    for j0 in range(0, frames, step):
        j1 = min(frames, j0 + step)
        seg = xp[j0 * down:(j1 - 1) * down + taps].unfold(0, taps, down)  # [j1 - j0, K], rows down apart
        out[j0 * up:j1 * up] = (seg @ weight).reshape(-1)  # one matrix product computes every phase
    return out[:n_out].contiguous()


def _parse_wav(raw: bytes, path: Path) -> tuple[np.ndarray, int]:
    """A float32 WAV from ffmpeg's pipe -> ([channels, N], rate); the sizes of a piped WAV are unset, so the data
    chunk runs to the end."""
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise MediaError(f"could not decode the audio of {path}: ffmpeg returned no WAV data")
    pos, channels, rate = 12, None, None
    while pos + 8 <= len(raw):
        cid, size = raw[pos:pos + 4], struct.unpack("<I", raw[pos + 4:pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            _, channels, rate = struct.unpack("<HHI", raw[body:body + 8])
        elif cid == b"data":
            if channels is None:
                break
            data = raw[body:] if size == 0xFFFFFFFF or body + size > len(raw) else raw[body:body + size]
            count = len(data) // (4 * channels)
            pcm = np.frombuffer(data[:count * 4 * channels], "<f4").reshape(count, channels)
            return np.ascontiguousarray(pcm.T), rate
        pos = body + size + (size & 1)
    raise MediaError(f"could not decode the audio of {path}: no samples in ffmpeg's output")


def _streams(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        _, streams = _header(path)
    except VideoWriteError as e:
        # ffmpeg -i always ends by asking for an output file: only the lines before that say what is wrong
        said = [ln for ln in str(e).splitlines()[1:] if ln.strip() and "output file must be specified" not in ln]
        opened = any(ln.startswith("Input #") for ln in said)  # a container ffmpeg reads, holding no streams
        detail = " (it holds no audio or video stream)" if opened or not said else f": ffmpeg said {said[-1].strip()!r}"
        raise MediaError(f"cannot read {path} as audio or video{detail}") from None
    return streams


def _kinds(streams: list[dict]) -> str:
    return ", ".join(f"{s['type']} {s['codec']}" for s in streams) or "none"


def read_audio_channels(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """The first audio stream of a file, every channel at its own rate: (float32 [channels, N], rate)."""
    path = Path(path)
    streams = _streams(path, "audio")
    if not any(s["type"] == "audio" for s in streams):
        raise MediaError(f"{path} has no audio stream (it has: {_kinds(streams)})")
    try:
        raw = _run(["-v", "error", "-i", str(path), "-map", "0:a:0", "-vn", "-c:a", "pcm_f32le", "-f", "wav",
                    "-bitexact", "-"], f"could not decode the audio of {path}").stdout
    except VideoWriteError as e:
        raise MediaError(str(e)) from None
    pcm, rate = _parse_wav(raw, path)
    if pcm.shape[1] == 0:
        raise MediaError(f"the audio of {path} is empty (no samples)")
    return pcm, rate


def load_audio(path: str | os.PathLike) -> torch.Tensor:
    """An audio file (wav, flac, mp3, or the first audio stream of any file ffmpeg reads) -> float32 [N] at
    16 kHz mono."""
    pcm, rate = read_audio_channels(path)
    out = resample_audio(pcm, rate)
    log.info("read %s: %.2f s of %d-channel audio at %d Hz -> %d samples at 16 kHz mono", path,
             pcm.shape[1] / rate, pcm.shape[0], rate, out.numel())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Video

@dataclass(frozen=True)
class VideoInfo:
    """The first video stream of a file as a player shows it (rotation applied)."""

    width: int
    height: int
    fps: float | None       # the stream's average frame rate, None when ffmpeg reports none
    duration: float | None  # the container's duration in seconds
    rotation: int           # degrees of the display rotation ffmpeg applies while decoding


_ROTATION = re.compile(r"rotation of (-?\d+(?:\.\d+)?) degrees")
_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Size, frame rate and duration of a file's first video stream (MediaError without one)."""
    path = Path(path)
    streams = _streams(path, "video")
    v = next((s for s in streams if s["type"] == "video" and "width" in s), None)
    if v is None:
        raise MediaError(f"{path} has no video stream (it has: {_kinds(streams)})")
    text = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).stderr.decode("utf-8", "replace")
    # ffmpeg turns frames by the stream's display matrix while decoding: a quarter turn swaps the sides
    rot = _ROTATION.search(text)
    rotation = int(round(float(rot.group(1)))) % 360 if rot else 0
    w, h = v["width"], v["height"]
    if rotation in (90, 270):
        w, h = h, w
    d = _DURATION.search(text)
    duration = int(d.group(1)) * 3600 + int(d.group(2)) * 60 + float(d.group(3)) if d else None
    return VideoInfo(w, h, v.get("fps"), duration, rotation)


def fitted_size(height: int, width: int, *, size=None, variant: Variant | str | None = None) -> tuple[int, int]:
    """The frame size the sampler takes for frames of height x width: ``size`` exactly (multiples of 32, else
    ValueError), or the variant's area with the aspect kept, snapped to multiples of 32. Logged."""
    v = get_variant(variant)
    if size is not None:
        h, w, note = resolve_frame_size(v, size=size)
    else:
        h, w, _ = t2v_frame_size(v, int(height), int(width))
        note = f"the {v.name} area, aspect kept, multiples of 32"
    if (h, w) != (height, width):
        log.info("frames %dx%d resized to %dx%d (%s)", width, height, w, h, note)
    else:
        log.info("frames kept at %dx%d (%s)", w, h, note)
    return h, w


def frames_to_float(frames: torch.Tensor) -> torch.Tensor:
    """Frames [T, H, W, 3] as float32 in [0, 1] (uint8 / 255; floats pass through as float32)."""
    if frames.dtype == torch.uint8:
        return frames.to(torch.float32).div_(255.0)
    if not frames.is_floating_point():
        raise ValueError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
    return frames.to(torch.float32)


def _resize_chunk(chunk: torch.Tensor, hw: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """[t, H, W, 3] -> [t, h, w, 3] in ``dtype``: bicubic with antialiasing (downscales do not alias), clamped."""
    x = frames_to_float(chunk).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    x = x.permute(0, 2, 3, 1)
    if dtype == torch.uint8:
        return x.mul_(255.0).round_().to(torch.uint8)
    return x.to(dtype)


def _check_frames(frames) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] != 3:
        shape = list(frames.shape) if hasattr(frames, "shape") else type(frames).__name__
        raise ValueError(f"frames must be [T, H, W, 3], got {shape}")
    if frames.shape[0] == 0:
        raise ValueError("there are no frames")
    if frames.dtype != torch.uint8 and not frames.is_floating_point():
        raise ValueError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
    return frames


def fit_frames(frames, size=None, *, variant: Variant | str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Frames [T, H, W, 3] resized to the sampler's size (``fitted_size``), a few at a time, keeping their dtype
    (uint8 stays uint8). Returns (frames, (H, W)); frames already at that size are returned as they are."""
    frames = _check_frames(frames)
    hw = fitted_size(frames.shape[1], frames.shape[2], size=size, variant=variant)
    if tuple(frames.shape[1:3]) == hw:
        return frames, hw
    out = torch.empty((frames.shape[0], *hw, 3), dtype=frames.dtype)
    for i in range(0, frames.shape[0], RESIZE_CHUNK):
        out[i:i + RESIZE_CHUNK] = _resize_chunk(frames[i:i + RESIZE_CHUNK], hw, frames.dtype)
    return out, hw


def frame_indices(count: int, fps: float, target_fps: float = FPS) -> torch.Tensor:
    """Which of ``count`` frames at ``fps`` output frame i at ``target_fps`` shows: the source frame on screen at
    (i + 1/2) / target_fps s, the last that starts before then. This is ffmpeg's ``fps`` filter (each source
    frame goes to the output slot nearest its time, a slot keeps the last that lands in it, an empty slot repeats
    the one before), so frames in memory and frames from a file are converted alike. The clip keeps its
    duration: round(count * target_fps / fps) frames, at least one."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not fps > 0 or not math.isfinite(fps):
        raise ValueError(f"the frame rate must be a positive number, got {fps!r}")
    src, dst = Fraction(fps).limit_denominator(1001), Fraction(target_fps).limit_denominator(1001)
    n = max(1, math.floor(count * dst / src + Fraction(1, 2)))
    idx = [min(count - 1, math.ceil((i + Fraction(1, 2)) * src / dst) - 1) for i in range(n)]
    return torch.tensor(idx, dtype=torch.long)


def resample_frames(frames, fps: float, *, target_fps: float = FPS) -> torch.Tensor:
    """Frames [T, H, W, 3] at ``fps`` -> the frames at ``target_fps`` (24), by frame selection on the time axis
    (``frame_indices``, ffmpeg's rule); the same tensor when the rates already agree."""
    frames = _check_frames(frames)
    if Fraction(fps).limit_denominator(1001) == Fraction(target_fps).limit_denominator(1001):
        return frames
    idx = frame_indices(frames.shape[0], fps, target_fps)
    log.info("frames: %d at %.5g fps -> %d at %g fps (the frame on screen at each new frame's time)",
             frames.shape[0], fps, idx.numel(), target_fps)
    return frames.index_select(0, idx)


def load_video(path: str | os.PathLike, *, size=None, variant: Variant | str | None = None, resize: bool = False,
               max_frames: int | None = None) -> tuple[torch.Tensor, float | None]:
    """A video file's first video stream -> (uint8 frames [T, H, W, 3] at 24 fps, the source's frame rate).

    ffmpeg's ``fps`` filter converts the frame rate (by timestamps: variable-rate files come out right) and
    applies the stream's rotation. ``resize=True`` (or a ``size``) resizes each frame as it is read to the
    sampler's size (``fitted_size`` with ``size`` / ``variant``), so the source's full-size frames are never
    held together. ``max_frames`` stops reading after that many frames. Convert to float one window at a time
    with ``frames_to_float``: the whole clip as float32 takes four times the memory.
    """
    path = Path(path)
    info = video_info(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    hw = fitted_size(info.height, info.width, size=size, variant=variant) if resize or size is not None else None
    frame_hw = (info.height, info.width)
    expect = math.ceil(info.duration * FPS) + 2 if info.duration else 256
    if max_frames is not None:
        expect = min(expect, max_frames)
    out_hw = hw or frame_hw
    buf = torch.empty((expect + SPARE_FRAMES, *out_hw, 3), dtype=torch.uint8)  # untouched pages cost no memory
    limit = [] if max_frames is None else ["-frames:v", str(max_frames)]
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0",
           "-vf", f"fps={FPS}", *limit, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tail: deque = deque(maxlen=200)
    drain = threading.Thread(target=_drain, args=(proc.stderr, tail), daemon=True)
    drain.start()
    frame_bytes = frame_hw[0] * frame_hw[1] * 3
    staging = np.empty((READ_CHUNK, *frame_hw, 3), dtype=np.uint8)
    view = memoryview(staging).cast("B")
    count = 0
    try:
        while True:
            got = 0
            while got < len(view):
                n = proc.stdout.readinto(view[got:])
                if not n:
                    break
                got += n
            whole = got // frame_bytes
            if whole:
                chunk = torch.from_numpy(staging[:whole])
                if hw is not None and hw != frame_hw:
                    chunk = _resize_chunk(chunk, hw, torch.uint8)
                if count + whole > buf.shape[0] - SPARE_FRAMES:  # the container's duration was short: grow
                    grown = torch.empty((2 * (count + whole) + SPARE_FRAMES, *out_hw, 3), dtype=torch.uint8)
                    grown[:count] = buf[:count]
                    buf = grown
                buf[count:count + whole] = chunk
                count += whole
            if got < len(view):
                break
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
        drain.join()
    if rc != 0:
        lines = [ln for ln in tail if ln][-_STDERR_LINES:]
        raise MediaError(f"could not decode the video of {path}:\n" + ("\n".join(lines) or "(ffmpeg printed nothing)"))
    if count == 0:
        raise MediaError(f"the video of {path} is empty (no frames)")
    frames = buf[:count]
    setattr(frames, _SPARE_ATTR, buf.shape[0] - count)
    log.info("read %s: %d frames at 24 fps (source %s fps, %dx%d%s)", path, count,
             "unknown" if info.fps is None else f"{info.fps:g}", out_hw[1], out_hw[0],
             "" if hw is None or hw == frame_hw else f", resized from {frame_hw[1]}x{frame_hw[0]}")
    return frames, info.fps


# ---------------------------------------------------------------------------------------------------------------
# Fitting to a clip plan

def _seconds(track, rate: int, what: str) -> float:
    if isinstance(track, torch.Tensor) or isinstance(track, np.ndarray):
        n = track.shape[0]
        if n == 0:
            raise ValueError(f"the {what} is empty")
        return n / rate
    if isinstance(track, bool) or not isinstance(track, (int, float)) or not track > 0:
        raise ValueError(f"the {what}'s length must be a tensor or a number of seconds > 0, got {track!r}")
    return float(track)


def _plan(variant, seconds: float, duration, overlap: float, seed: int | None) -> ClipPlan:
    kw = {} if seed is None else {"seed": seed}
    return plan_clip(variant, duration=seconds if duration is None else duration, overlap=overlap, **kw)


def plan_for_audio(variant: Variant | str, track, *, duration: float | None = None,
                   overlap: float = DEFAULT_OVERLAP_S, seed: int | None = None) -> ClipPlan:
    """The windows of a clip as long as an audio track (a 16 kHz waveform [N], or its length in seconds), or
    of ``duration`` seconds when given (the track is then cut or padded to it)."""
    return _plan(variant, _seconds(track, SAMPLE_RATE, "audio track"), duration, overlap, seed)


def plan_for_frames(variant: Variant | str, frames, *, duration: float | None = None,
                    overlap: float = DEFAULT_OVERLAP_S, seed: int | None = None) -> ClipPlan:
    """The windows of a clip as long as frames at 24 fps (a [T, H, W, 3] tensor, or the length in seconds), or
    of ``duration`` seconds when given."""
    return _plan(variant, _seconds(frames, FPS, "video"), duration, overlap, seed)


def fit_audio_to_plan(waveform: torch.Tensor, plan: ClipPlan) -> torch.Tensor:
    """A 16 kHz mono waveform [N] cut or padded with silence to the plan's windows' span (their audio tokens x
    512 samples). A cut returns a view."""
    x = _as_float_tensor(waveform)
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"the audio track must be a mono waveform [N], got {list(x.shape)}")
    span = plan.span_tokens * AUDIO_SAMPLES_PER_LATENT
    n = x.numel()
    if n >= span:
        if n > plan.samples:
            log.info("audio track %.2f s cut to the clip's %.2f s", n / SAMPLE_RATE, plan.samples / SAMPLE_RATE)
        return x[:span]
    if n < plan.samples:
        log.info("audio track %.2f s padded with %.2f s of silence to the clip's %.2f s", n / SAMPLE_RATE,
                 (plan.samples - n) / SAMPLE_RATE, plan.samples / SAMPLE_RATE)
    log.debug("audio track padded with silence to the windows' span, %d samples", span)
    return torch.cat([x, x.new_zeros(span - n)])


def fit_frames_to_plan(frames: torch.Tensor, plan: ClipPlan) -> torch.Tensor:
    """Frames [T, H, W, 3] at 24 fps cut or padded (the last frame held) to the plan's windows' span. A cut is a
    view; frames from ``load_video`` are padded in the room it left behind them, others are copied."""
    frames = _check_frames(frames)
    span = plan.span_frames
    t = frames.shape[0]
    if t > plan.frames:
        log.info("video of %d frames cut to the clip's %d", t, plan.frames)
    if t >= span:
        return frames[:span]
    if t < plan.frames:
        log.info("video of %d frames padded to the clip's %d by holding its last frame", t, plan.frames)
    spare = getattr(frames, _SPARE_ATTR, 0)
    if spare >= span - t and frames.is_contiguous():
        out = frames.new_empty(0).set_(frames.untyped_storage(), frames.storage_offset(),
                                       (span, *frames.shape[1:]))
        setattr(frames, _SPARE_ATTR, 0)  # the room is used: a second fit must not hand it out again
    else:
        out = torch.empty((span, *frames.shape[1:]), dtype=frames.dtype)
        out[:t] = frames
    out[t:] = frames[t - 1]
    return out


__all__ = ["FPS", "SAMPLE_RATE", "MediaError", "VideoInfo", "fit_audio_to_plan", "fit_frames", "fit_frames_to_plan",
           "fitted_size", "frame_indices", "frames_to_float", "load_audio", "load_video", "plan_for_audio",
           "plan_for_frames", "read_audio_channels", "resample_audio", "resample_frames", "video_info"]
