"""Writing a long clip window by window, so no more than one window's frames is ever in memory.

The frames go to an ffmpeg process as they come (H.264 into a hidden video-only file beside the target); the
sound, a few hundred kilobytes a minute, goes as 16-bit PCM into a second hidden file. ``close`` ends the
video stream and muxes the two into the mp4 (the video copied, the sound encoded to AAC), written under a
hidden name and renamed over the target only when complete (``ovi.atomic_write``). The encoding choices are
``ovi.video_io.write_mp4``'s (BT.709, CRF 18, 96 kb/s AAC at the native rate, edit lists trimming the AAC
priming), so a one-window clip plays exactly as ``write_mp4`` writes it.

Each ``append`` runs in a thread of its own (the sound's stitching and writing, then the frames): a Ctrl-C or
a host's interrupt landing while a window is being written stops the caller, never the write, so the files
always hold whole windows. ``close`` after an interrupt waits for that window and writes every window
appended so far as a valid, shorter mp4; ``abort`` leaves nothing. Temporary files left by a killed process
are swept by the next write into the folder (``atomic_write.sweep_stale``).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from ..atomic_write import AtomicOutput, named_error, temp_path
from ..log import log
from ..video_io import DEFAULT_CRF, _audio_pcm, _drain, _fail, _frame_u8, _pad_even, _unlink, ffmpeg_exe
from .stitch import AudioSeams

AUDIO_BITRATE = "96k"  # write_mp4's: mono speech and effects at 16 kHz need no more
X264_PRESET = "medium"  # write_mp4's default


class ClipWriter:
    """An mp4 written window by window (see the module doc).

    ``append(frames, waveform, overlap_samples=k)``: ``frames`` [t, H, W, 3] (uint8, or float in [0, 1],
    rounded as ``write_mp4`` does) are the window's frames the clip keeps (``stitch.frames_to_keep``), and
    ``waveform`` [n] the window's whole sound; its first samples are crossfaded with the samples held from
    the previous window, and its last ``k`` (those it shares with the next window) are held in turn. ``close``
    flushes the held tail and returns the path. ``frames_limit`` / ``samples_limit`` cut the clip there (a
    requested duration shorter than the windows' span).
    """

    def __init__(self, path: str | os.PathLike, fps: float = 24, sample_rate: int = 16000, *,
                 frames_limit: int | None = None, samples_limit: int | None = None, crf: int = DEFAULT_CRF):
        if not fps > 0 or not sample_rate > 0:
            raise ValueError(f"fps and sample_rate must be positive, got {fps} and {sample_rate}")
        for name, limit in (("frames_limit", frames_limit), ("samples_limit", samples_limit)):
            if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
                raise ValueError(f"{name} must be a whole number >= 1 or None, got {limit!r}")
        self.path = Path(path)
        self.fps, self.sample_rate, self.crf = fps, int(sample_rate), int(crf)
        self.frames_limit, self.samples_limit = frames_limit, samples_limit
        self.windows = 0          # windows appended completely
        self.frames_written = 0   # frames given to the encoder
        self.samples_written = 0  # samples final in the sound file (the held tail not counted)
        self._seams = AudioSeams()
        self._size: tuple[int, int] | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr: deque = deque(maxlen=200)
        self._threads: list[threading.Thread] = []
        self._job: threading.Thread | None = None
        # set when the window being written is done; waited on instead of Thread.join, which an interrupt can
        # leave believing a running thread has ended (CPython 3.11's join releases the thread's own lock)
        self._job_done = threading.Event()
        self._job_error: list[BaseException] = []
        self._done = False
        self._video_tmp = temp_path(self.path, ".video")
        self._pcm_tmp = temp_path(self.path, ".pcm")
        self._out = AtomicOutput(self.path, keep_open=False)  # fails now, naming the file, on a bad folder
        try:
            self._pcm = open(self._pcm_tmp, "xb")
        except OSError as e:
            self._out.abort()
            self._done = True
            raise named_error(e, self.path) from None

    # -- appending -----------------------------------------------------------------------------------
    def append(self, frames: Any, waveform: Any, overlap_samples: int = 0) -> None:
        """Add one window (see the class doc). Returns once the window is written."""
        self._check_open()
        shape = tuple(frames.shape)
        if len(shape) != 4 or shape[-1] != 3 or min(shape[1:]) < 1:
            raise ValueError(f"frames must be [t, H, W, 3], got {list(shape)}")
        if self._size is not None and shape[1:3] != self._size:
            raise ValueError(f"every window must have the clip's frame size {self._size[1]}x{self._size[0]}, "
                             f"got {shape[2]}x{shape[1]}")
        wave = torch.as_tensor(waveform)
        if wave.ndim != 1:
            raise ValueError(f"a window's waveform must be mono [N], got {list(wave.shape)}")
        if isinstance(overlap_samples, bool) or int(overlap_samples) != overlap_samples or overlap_samples < 0:
            raise ValueError(f"overlap_samples must be a whole number >= 0, got {overlap_samples!r}")
        if self._seams.held + overlap_samples > wave.shape[0]:
            raise ValueError(f"a window of {wave.shape[0]} samples cannot share {self._seams.held} with the "
                             f"previous window and {overlap_samples} with the next")
        self._wait_job()
        if self._proc is None:
            self._start(shape[1], shape[2])
        # The window is written in a thread so an interrupt of the caller cannot tear it (see the module doc).
        self._job_done.clear()
        self._job = threading.Thread(target=self._write_window, args=(frames, wave, int(overlap_samples)),
                                     name="ovi-clip-window", daemon=True)
        self._job.start()
        self._wait_job()

    def _write_window(self, frames: Any, wave: torch.Tensor, hold: int) -> None:
        try:
            self._write_samples(self._seams.push(wave, hold))
            count = frames.shape[0]
            if self.frames_limit is not None:
                count = max(0, min(count, self.frames_limit - self.frames_written))
            stdin = self._proc.stdin
            for i in range(count):
                stdin.write(memoryview(_pad_even(_frame_u8(frames, i))).cast("B"))
                self.frames_written += 1
            self.windows += 1
        except BaseException as e:  # reported to the caller by _wait_job
            self._job_error.append(e)
        finally:
            self._job_done.set()

    def _write_samples(self, samples: torch.Tensor) -> None:
        if self.samples_limit is not None:
            samples = samples[:max(0, self.samples_limit - self.samples_written)]
        if samples.shape[0] == 0:
            return
        self._pcm.write(memoryview(_audio_pcm(samples)).cast("B"))
        self.samples_written += int(samples.shape[0])

    def wait(self) -> int:
        """Wait for the window being written, if an interrupt stopped ``append`` while it waited; returns the
        windows appended completely (what ``close`` writes). Its errors, if any, come from ``close``."""
        if self._job is not None:
            self._job_done.wait()
            self._job = None
        return self.windows

    def _wait_job(self) -> None:
        self.wait()
        if self._job_error:
            e = self._job_error.pop()
            self._job_error.clear()
            if isinstance(e, (BrokenPipeError, ConnectionResetError)):
                self._reap()
                raise _fail(f"ffmpeg stopped while writing {self.path}", self._stderr) from None
            if isinstance(e, OSError):
                raise named_error(e, self.path) from e
            raise e

    def _start(self, height: int, width: int) -> None:
        self._size = (height, width)
        eh, ew = height + height % 2, width + width % 2
        if (eh, ew) != (height, width):
            log.info("%dx%d is odd; padding to %dx%d by repeating the edge (yuv420p needs even sizes)",
                     width, height, ew, eh)
        rate = Fraction(self.fps).limit_denominator(1001)
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{ew}x{eh}", "-framerate", str(rate), "-i", "pipe:0",
               "-map", "0:v:0", "-vf", "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p",
               "-c:v", "libx264", "-preset", X264_PRESET, "-crf", str(self.crf),
               "-color_primaries", "bt709", "-color_trc", "bt709", "-colorspace", "bt709", "-color_range", "tv",
               "-f", "mp4", str(self._video_tmp)]
        log.debug("ffmpeg: %s", " ".join(cmd))
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
        th = threading.Thread(target=_drain, args=(self._proc.stderr, self._stderr), daemon=True)
        th.start()
        self._threads.append(th)

    # -- finishing -----------------------------------------------------------------------------------
    def close(self) -> Path:
        """Write the mp4 of every window appended (after an interrupt: the finished ones) and return its path."""
        self._check_open()
        try:
            self._wait_job()
            if self.windows == 0:
                raise ValueError(f"no window was appended, so there is no clip to write to {self.path}")
            self._write_samples(self._seams.flush())
            self._pcm.close()
            self._proc.stdin.close()
            rc = self._proc.wait()
            for th in self._threads:
                th.join()
            if rc != 0:
                raise _fail(f"ffmpeg failed ({rc}) encoding the frames of {self.path}", self._stderr)
            self._mux()
            self._out.commit()
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._cleanup()
        h, w = self._size
        log.info("wrote %s (%dx%d, %d frames, %.2f s, audio %.2f s, %d window%s)", self.path, w, h,
                 self.frames_written, self.frames_written / self.fps, self.samples_written / self.sample_rate,
                 self.windows, "" if self.windows == 1 else "s")
        return self.path

    def _mux(self) -> None:
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(self._video_tmp)]
        if self.samples_written:
            cmd += ["-f", "s16le", "-ar", str(self.sample_rate), "-ac", "1", "-i", str(self._pcm_tmp)]
        cmd += ["-map", "0:v:0", "-c:v", "copy"]
        if self.samples_written:
            cmd += ["-map", "1:a:0", "-c:a", "aac", "-b:a", AUDIO_BITRATE]
        cmd += ["-movflags", "+faststart", "-f", "mp4", str(self._out.tmp)]
        log.debug("ffmpeg: %s", " ".join(cmd))
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if p.returncode != 0:
            raise _fail(f"ffmpeg failed ({p.returncode}) muxing {self.path}",
                        deque(p.stderr.decode("utf-8", "replace").splitlines()))

    def abort(self) -> None:
        """Stop and remove everything: nothing is left at the path (it keeps what it held before) nor beside it."""
        if self._done:
            return
        self._done = True
        try:
            self._reap()
            if self._job is not None:
                self._job_done.wait()  # the encoder is gone, so the window's write ends at once
                self._job = None
            self._job_error.clear()
        finally:
            self._out.abort()
            self._cleanup()

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._proc is not None and self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    def _cleanup(self) -> None:
        try:
            self._pcm.close()
        except OSError:
            pass
        for th in self._threads:
            th.join(timeout=5)
        _unlink(self._pcm_tmp)
        _unlink(self._video_tmp)

    def _check_open(self) -> None:
        if self._done:
            raise ValueError(f"the clip writer of {self.path} is already closed")

    def __enter__(self) -> "ClipWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A clean exit closes; an exception closes with the windows finished (none: aborts) and goes on."""
        if self._done:
            return
        if exc_type is None:
            self.close()
            return
        if self.windows == 0 and self._job is None:
            self.abort()
            return
        try:
            self.close()
        except BaseException as e:  # the writer's own failure must not hide the one that stopped the clip
            log.warning("could not write the finished windows of %s: %s", self.path, e)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Decoded frames in [0, 1] -> uint8 by truncating x * 255, as ``OviEngine.save_mp4`` maps them."""
    return (frames * 255.0).to(torch.uint8)


__all__ = ["ClipWriter", "to_uint8"]
