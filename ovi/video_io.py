"""Writing the finished clip: frames + waveform -> one H.264/AAC mp4, and a small probe for checking it.

One ffmpeg process does everything in a single pass: raw RGB frames arrive on stdin, the 16-bit PCM
waveform on a second pipe (an extra file descriptor, fed from a thread), and the mp4 is written to a
hidden name beside the target, then fsynced and renamed over it (``atomic_write.AtomicOutput``), so an
error or an interrupt never leaves a broken file at the target path, nor the temporary one. Platforms
without ``pass_fds`` (Windows) get the PCM through a hidden file beside the target instead, removed
whatever happens.

Choices that differ from the official ``save_video`` (moviepy): the audio stays at its native rate
(moviepy resamples to 44.1 kHz), the default CRF is 18 rather than x264's 23, and the RGB -> YUV
conversion uses BT.709 and says so in the stream, where moviepy leaves the stream untagged with BT.601
numbers that players read as BT.709 at HD sizes. Odd frame sizes, which yuv420p cannot hold, are padded
to even by repeating the last row/column. ``-shortest`` is not used: the mp4 muxer's edit list hides
the AAC priming (1024 samples) and the padding of the last AAC frame, so the audio track lasts exactly
N / sample_rate and the video T / fps; the official 121-frame / 80,384-sample clip gives 5.0417 s and
5.0240 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .atomic_write import AtomicOutput, named_error, temp_path
from .log import log

DEFAULT_CRF = 18
_PIPE_AUDIO = os.name != "nt"  # pass_fds is POSIX-only
_STDERR_LINES = 20


class VideoWriteError(RuntimeError):
    """ffmpeg failed; the message carries the last lines ffmpeg printed."""


def ffmpeg_exe() -> str:
    """The ffmpeg binary shipped with imageio-ffmpeg (which honours IMAGEIO_FFMPEG_EXE), else one on PATH."""
    try:
        import imageio_ffmpeg
    except ImportError:
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise RuntimeError("writing mp4 needs ffmpeg: pip install imageio-ffmpeg") from None
        return exe
    return imageio_ffmpeg.get_ffmpeg_exe()


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype != torch.uint8 and x.dtype != torch.int16:
            x = x.float()  # bf16/fp16 have no numpy twin; the upcast is exact
        return x.cpu().numpy()
    return np.asarray(x)


def frames_from_vae(video: Any) -> np.ndarray:
    """VAE output [3,T,H,W] or [1,3,T,H,W] in [-1, 1] -> uint8 [T,H,W,3], as the official writer maps it.

    The official code clips to [-1, 1] and truncates ``(x + 1) / 2 * 255`` computed in float32; the same
    float32 operations are done here (on the tensor's device, a few frames at a time to bound memory),
    so the bytes match exactly.
    """
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"frames_from_vae takes one video, got a batch of {video.shape[0]}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"frames_from_vae expects [3,T,H,W] or [1,3,T,H,W], got {tuple(video.shape)}")
    if not isinstance(video, torch.Tensor):
        video = torch.from_numpy(np.ascontiguousarray(video))
    t = video.shape[1]
    out = np.empty((t, video.shape[2], video.shape[3], 3), dtype=np.uint8)
    dst = torch.from_numpy(out)
    step = 8
    for i in range(0, t, step):
        x = video[:, i:i + step].to(torch.float32).clamp(-1.0, 1.0)  # clamp makes a copy: in-place is safe
        x = x.add_(1.0).div_(2.0).mul_(255.0).to(torch.uint8)
        dst[i:i + step].copy_(x.permute(1, 2, 3, 0))
    return out


def _frame_u8(frames: Any, i: int) -> np.ndarray:
    """Frame i as contiguous uint8 [H,W,3]: uint8 passes through, floats in [0,1] are clamped and rounded."""
    f = _to_numpy(frames[i])
    if f.dtype != np.uint8:
        f = np.nan_to_num(f.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
        f = np.rint(np.clip(f, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(f)


def _pad_even(f: np.ndarray) -> np.ndarray:
    h, w = f.shape[:2]
    if h % 2 or w % 2:
        f = np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return f


def _audio_pcm(audio: Any) -> np.ndarray:
    """Mono waveform in [-1, 1] -> little-endian int16, ``trunc(clip(x) * 32767)`` in float32 as officially."""
    a = _to_numpy(audio)
    if a.size == 0:
        raise ValueError("audio is empty; pass audio=None for a silent video")
    if a.size != max(a.shape):
        raise ValueError(f"audio must be one mono waveform, got shape {tuple(a.shape)}")
    a = a.reshape(-1)
    if a.dtype == np.int16:
        return a.astype("<i2", copy=False)
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        log.warning("audio has non-finite samples; writing them as silence")
        a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=-1.0)
    return (np.clip(a, -1.0, 1.0) * np.float32(32767)).astype("<i2")


def _drain(stream, tail: deque) -> None:
    for line in iter(stream.readline, b""):
        tail.append(line.decode("utf-8", "replace").rstrip())
    stream.close()


def _feed(fd: int, data: np.ndarray, errors: list) -> None:
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data).cast("B"))
    except OSError as e:  # ffmpeg gone early: its own error is the one worth reporting
        errors.append(e)


def _fail(what: str, tail: deque) -> VideoWriteError:
    lines = [ln for ln in tail if ln]
    detail = "\n".join(lines[-_STDERR_LINES:]) or "(ffmpeg printed nothing)"
    return VideoWriteError(f"{what}\nffmpeg said:\n{detail}")


def _unlink(p: Path | None) -> None:
    if p is not None:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def write_mp4(
    path: str | os.PathLike,
    frames: Any,
    audio: Any | None,
    *,
    fps: float = 24,
    sample_rate: int = 16000,
    crf: int = DEFAULT_CRF,
    preset: str = "medium",
    audio_bitrate: str = "96k",
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write frames [T,H,W,3] (uint8, or float in [0, 1]) and a mono waveform to an H.264 + AAC mp4.

    ``frames`` may be a numpy array or a tensor on any device (converted a frame at a time); use
    ``frames_from_vae`` for raw VAE output in [-1, 1]. ``audio`` is a 1-D float waveform in [-1, 1] at
    ``sample_rate`` (or None for no audio track). ``progress(frames_written, total)`` runs after every
    frame; an exception from it aborts the write. Returns the final path. Nothing is left at ``path``
    (nor beside it) unless the whole file was written.
    """
    path = Path(path)
    shape = tuple(frames.shape)
    if len(shape) != 4 or shape[-1] != 3 or min(shape) < 1:
        raise ValueError(f"frames must be [T,H,W,3] with T,H,W >= 1, got {shape}")
    t, h, w = shape[:3]
    if fps <= 0 or sample_rate <= 0:
        raise ValueError(f"fps and sample_rate must be positive, got {fps} and {sample_rate}")
    pcm = None if audio is None else _audio_pcm(audio)
    if pcm is not None and abs(pcm.size / sample_rate - t / fps) > 1.0 / fps:
        log.warning(f"audio lasts {pcm.size / sample_rate:.3f} s but video {t / fps:.3f} s; writing both as they are")
    eh, ew = h + h % 2, w + w % 2
    if (eh, ew) != (h, w):
        log.info(f"{w}x{h} is odd; padding to {ew}x{eh} by repeating the edge (yuv420p needs even sizes)")

    exe = ffmpeg_exe()
    out: AtomicOutput | None = None
    pcm_file: Path | None = None
    proc = None
    read_fd = write_fd = None
    tail: deque = deque(maxlen=200)
    feed_errors: list = []
    threads: list[threading.Thread] = []
    try:
        out = AtomicOutput(path, keep_open=False)  # fails now, naming the file, on a missing or read-only folder
        tmp = out.tmp
        rate = Fraction(fps).limit_denominator(1001)
        cmd = [exe, "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{ew}x{eh}", "-framerate", str(rate), "-i", "pipe:0"]
        pass_fds: tuple = ()
        if pcm is not None:
            if _PIPE_AUDIO:
                read_fd, write_fd = os.pipe()
                src, pass_fds = f"pipe:{read_fd}", (read_fd,)
            else:
                pcm_file = temp_path(path, ".pcm")
                try:
                    pcm.tofile(pcm_file)
                except OSError as e:
                    raise named_error(e, path) from e
                src = str(pcm_file)
            cmd += ["-f", "s16le", "-ar", str(sample_rate), "-ac", "1", "-i", src]
        cmd += ["-map", "0:v:0", "-vf", "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p",
                "-c:v", "libx264", "-preset", preset, "-crf", str(crf),
                "-color_primaries", "bt709", "-color_trc", "bt709", "-colorspace", "bt709", "-color_range", "tv"]
        if pcm is not None:
            cmd += ["-map", "1:a:0", "-c:a", "aac", "-b:a", audio_bitrate]
        for k, v in (metadata or {}).items():
            cmd += ["-metadata", f"{k}={v}"]
        cmd += ["-movflags", "+faststart", "-f", "mp4", str(tmp)]
        log.debug("ffmpeg: " + " ".join(cmd))

        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, pass_fds=pass_fds)
        threads.append(threading.Thread(target=_drain, args=(proc.stderr, tail), daemon=True))
        if read_fd is not None:
            os.close(read_fd)
            read_fd = None
            threads.append(threading.Thread(target=_feed, args=(write_fd, pcm, feed_errors), daemon=True))
            write_fd = None  # the feeder owns and closes it
        for th in threads:
            th.start()

        try:
            for i in range(t):
                proc.stdin.write(memoryview(_pad_even(_frame_u8(frames, i))).cast("B"))
                if progress is not None:
                    progress(i + 1, t)
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            proc.wait()
            for th in threads:
                th.join()
            raise _fail(f"ffmpeg stopped while writing {path}", tail) from None
        rc = proc.wait()
        for th in threads:
            th.join()
        if rc != 0:
            raise _fail(f"ffmpeg failed ({rc}) writing {path}", tail)
        if feed_errors:
            raise _fail(f"ffmpeg did not read the whole audio track for {path}: {feed_errors[0]}", tail)
        out.commit()  # fsync, then the rename; a failure there removes the temporary file and names the target
    finally:
        try:
            for fd in (read_fd, write_fd):
                if fd is not None:
                    os.close(fd)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc is not None and proc.stdin and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            for th in threads:
                th.join(timeout=5)
        finally:  # even when a second interrupt lands in the cleanup above
            if out is not None:
                out.abort()  # a no-op after the commit; otherwise the unfinished file goes, whatever stopped us
            _unlink(pcm_file)
    secs = t / fps
    log.info(f"wrote {path} ({ew}x{eh}, {t} frames, {secs:.2f} s"
             + (f", audio {pcm.size / sample_rate:.2f} s" if pcm is not None else ", no audio") + ")")
    return path


# ---------------------------------------------------------------------------------------------------
# Probing and reading back, through the same ffmpeg (ffprobe is not bundled).

_STREAM = re.compile(r"Stream #\d+:(\d+)\S*: (Video|Audio|Subtitle|Data|Attachment): (\w+)(.*)")
_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")


def _run(args: list[str], what: str) -> subprocess.CompletedProcess:
    p = subprocess.run([ffmpeg_exe(), "-hide_banner", *args], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise _fail(what, deque(p.stderr.decode("utf-8", "replace").splitlines()))
    return p


def _header(path: Path) -> tuple[float | None, list[dict]]:
    """Container duration and stream list from ``ffmpeg -i`` (which exits 1 for want of an output)."""
    p = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    text = p.stderr.decode("utf-8", "replace")
    streams = []
    for m in _STREAM.finditer(text):
        kind, rest = m.group(2).lower(), m.group(4)
        s: dict[str, Any] = {"index": int(m.group(1)), "type": kind, "codec": m.group(3)}
        if kind == "video":
            if (sz := re.search(r"[ ,](\d+)x(\d+)[ ,\[]", rest)):
                s["width"], s["height"] = int(sz.group(1)), int(sz.group(2))
            if (pf := re.search(r"\), (\w+)[(,]", rest) or re.search(r", (yuv\w+|rgb\w+|gray\w*)", rest)):
                s["pix_fmt"] = pf.group(1)
            if (fr := re.search(r"([\d.]+) fps", rest)):
                s["fps"] = float(fr.group(1))
        elif kind == "audio":
            if (sr := re.search(r"(\d+) Hz", rest)):
                s["sample_rate"] = int(sr.group(1))
            if (ch := re.search(r"Hz, ([^,]+)", rest)):
                s["channels"] = ch.group(1).strip()
        streams.append(s)
    if not streams:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        raise VideoWriteError(f"ffmpeg found no streams in {path}:\n" + "\n".join(lines[-_STDERR_LINES:]))
    d = _DURATION.search(text)
    duration = int(d.group(1)) * 3600 + int(d.group(2)) * 60 + float(d.group(3)) if d else None
    return duration, streams


def _decoded_timing(path: Path) -> dict[str, dict]:
    """Decode the first video and audio streams and time what comes out (framemd5 lists every frame)."""
    base = ["-v", "error", "-i", str(path), "-map", "0:v:0?", "-map", "0:a:0?"]
    tail = ["-f", "framemd5", "-"]
    try:
        text = _run(base + ["-fps_mode", "passthrough"] + tail, f"could not decode {path}").stdout
    except VideoWriteError as e:  # ffmpeg before 5.1 knows the option as -vsync
        if "fps_mode" not in str(e):
            raise
        text = _run(base + ["-vsync", "passthrough"] + tail, f"could not decode {path}").stdout
    tb: dict[int, Fraction] = {}
    kind: dict[int, str] = {}
    first: dict[int, int] = {}
    end: dict[int, int] = {}
    count: dict[int, int] = {}
    units: dict[int, int] = {}
    for line in text.decode("utf-8", "replace").splitlines():
        if line.startswith("#"):
            if (m := re.match(r"#tb (\d+): (\d+)/(\d+)", line)):
                tb[int(m.group(1))] = Fraction(int(m.group(2)), int(m.group(3)))
            elif (m := re.match(r"#media_type (\d+): (\w+)", line)):
                kind[int(m.group(1))] = m.group(2)
            elif (m := re.match(r"#codec_id (\d+): (\w+)", line)):
                kind.setdefault(int(m.group(1)), "video" if m.group(2) == "rawvideo" else "audio")
            continue
        parts = [x.strip() for x in line.split(",")]
        if len(parts) < 5:
            continue
        s, pts, dur = int(parts[0]), int(parts[2]), int(parts[3])
        first.setdefault(s, pts)
        end[s] = max(end.get(s, pts + dur), pts + dur)
        count[s] = count.get(s, 0) + 1
        units[s] = units.get(s, 0) + dur
    out: dict[str, dict] = {}
    for s, k in kind.items():
        if s not in count or s not in tb:
            continue
        info = {"start": float(first[s] * tb[s]), "duration": float((end[s] - first[s]) * tb[s])}
        if k == "video":
            info["frames"] = count[s]
        else:
            info["samples"] = units[s] if tb[s].numerator == 1 else round(units[s] * tb[s] * tb[s].denominator)
        out[k] = info
    return out


def probe_mp4(path: str | os.PathLike) -> dict:
    """What a player gets from a media file, measured with ffmpeg.

    Returns ``{"path", "duration" (container, 10 ms resolution), "streams": [{"index", "type", "codec",
    ...}], "video": {"frames", "duration", "start", "width", "height", "fps", "codec", "pix_fmt"} | None,
    "audio": {"samples", "duration", "start", "sample_rate", "channels", "codec"} | None}``. Frame and
    sample counts and the stream durations come from decoding the first video and audio streams, so they
    include the edit lists (AAC priming trimmed), exactly as players apply them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    duration, streams = _header(path)
    timing = _decoded_timing(path)
    result: dict[str, Any] = {"path": str(path), "duration": duration, "streams": streams, "video": None, "audio": None}
    for kind in ("video", "audio"):
        first = next((s for s in streams if s["type"] == kind), None)
        if first is not None and kind in timing:
            info = {k: v for k, v in first.items() if k not in ("index", "type")}
            info.update(timing[kind])
            result[kind] = info
    return result


def read_frames(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Decode the first video stream to uint8 RGB [T,H,W,3] (ffmpeg converts with the stream's tagged matrix)."""
    path = Path(path)
    _, streams = _header(path)
    v = next((s for s in streams if s["type"] == "video" and "width" in s), None)
    if v is None:
        raise VideoWriteError(f"{path} has no video stream")
    limit = [] if max_frames is None else ["-frames:v", str(max_frames)]
    raw = _run(["-v", "error", "-i", str(path), "-map", "0:v:0", *limit, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
               f"could not decode the video of {path}").stdout
    frame = v["width"] * v["height"] * 3
    return np.frombuffer(raw, np.uint8)[: len(raw) // frame * frame].reshape(-1, v["height"], v["width"], 3)


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode the first audio stream, mixed to mono float32, at its own rate: (waveform, sample_rate)."""
    path = Path(path)
    _, streams = _header(path)
    a = next((s for s in streams if s["type"] == "audio" and "sample_rate" in s), None)
    if a is None:
        raise VideoWriteError(f"{path} has no audio stream")
    raw = _run(["-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-f", "f32le", "-"],
               f"could not decode the audio of {path}").stdout
    return np.frombuffer(raw, "<f4").copy(), a["sample_rate"]
