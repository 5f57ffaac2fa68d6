from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ovi import video_io
from ovi.video_io import VideoWriteError, frames_from_vae, probe_mp4, read_audio, read_frames, write_mp4

T, H, W, SR, FPS = 25, 64, 96, 16000, 24
N = T * SR // FPS  # 16,666 samples: 1.0416 s against 1.0417 s of video, the official ratio

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255],
                    [0, 0, 0], [128, 64, 200], [30, 200, 120], [250, 180, 20]], np.uint8)


def _blocks() -> np.ndarray:
    """Frames of eight flat 32x24 colour blocks that scroll one column per frame."""
    first = np.zeros((H, W, 3), np.uint8)
    for k, c in enumerate(COLOURS):
        first[(k // 4) * 32:(k // 4 + 1) * 32, (k % 4) * 24:(k % 4 + 1) * 24] = c
    return np.stack([np.roll(first, i, axis=1) for i in range(T)])


def _noise(n: int = N, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    frames = _blocks()
    audio = _noise()
    seen = []
    path = write_mp4(d / "clip.mp4", frames.astype(np.float32) / 255.0, audio, fps=FPS, sample_rate=SR,
                     progress=lambda i, n: seen.append((i, n)))
    return d, path, frames, audio, seen


def test_streams_counts_and_durations(clip):
    d, path, _, _, seen = clip
    info = probe_mp4(path)
    assert [(s["type"], s["codec"]) for s in info["streams"]] == [("video", "h264"), ("audio", "aac")]
    v, a = info["video"], info["audio"]
    assert (v["width"], v["height"], v["pix_fmt"], v["fps"]) == (W, H, "yuv420p", FPS)
    assert v["frames"] == T and v["start"] == 0.0
    assert v["duration"] == pytest.approx(T / FPS, abs=1e-6)
    # The edit list must hide the AAC priming and the last frame's padding: exactly N samples from t=0.
    assert a["sample_rate"] == SR and a["samples"] == N and a["start"] == 0.0
    assert a["duration"] == pytest.approx(N / SR, abs=1e-6)
    assert abs(v["duration"] - a["duration"]) < 1 / FPS
    assert info["duration"] == pytest.approx(T / FPS, abs=0.011)
    assert seen == [(i, T) for i in range(1, T + 1)]
    assert sorted(p.name for p in d.iterdir()) == ["clip.mp4"]


def test_decoded_colours_and_audio_alignment(clip):
    _, path, frames, audio, _ = clip
    got = read_frames(path)
    assert got.shape == (T, H, W, 3)
    err = np.abs(got.astype(int) - frames.astype(int))
    assert err.mean() < 6  # chroma subsampling smears the block edges; the rest is near exact
    # Inside each block (away from edges) every colour survives yuv420p + H.264 within a few levels.
    inner = err[0].reshape(2, 32, 4, 24, 3)[:, 4:28, :, 4:20]
    assert inner.max() <= 8
    wave, sr = read_audio(path)
    assert sr == SR and wave.shape == (N,)
    # A lag would mean the priming was not trimmed; AAC at this bitrate keeps the noise well correlated.
    lags = np.arange(-40, 41)
    cc = [np.dot(audio[50:-50], np.roll(wave, -k)[50:-50]) for k in lags]
    assert lags[int(np.argmax(cc))] == 0
    assert np.corrcoef(audio, wave)[0, 1] > 0.95


def test_odd_size_is_padded_and_video_only(tmp_path):
    frames = torch.rand(5, 33, 47, 3, dtype=torch.bfloat16)
    path = write_mp4(tmp_path / "odd.mp4", frames, None)
    info = probe_mp4(path)
    assert [s["type"] for s in info["streams"]] == ["video"] and info["audio"] is None
    assert (info["video"]["width"], info["video"]["height"], info["video"]["frames"]) == (48, 34, 5)
    got = read_frames(path)
    # The added column/row repeats the edge, so it matches the last real column/row.
    assert np.abs(got[:, :, 47].astype(int) - got[:, :, 46].astype(int)).mean() < 12
    assert os.listdir(tmp_path) == ["odd.mp4"]


def test_audio_through_file_where_no_pipe(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "_PIPE_AUDIO", False)
    path = write_mp4(tmp_path / "f.mp4", _blocks()[:6], _noise(4000), fps=FPS)
    assert probe_mp4(path)["audio"]["samples"] == 4000
    assert os.listdir(tmp_path) == ["f.mp4"]


def test_bad_frames_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"\[T,H,W,3\]"):
        write_mp4(tmp_path / "x.mp4", np.zeros((4, 8, 8), np.float32), _noise(100))
    with pytest.raises(ValueError, match="mono"):
        write_mp4(tmp_path / "x.mp4", np.zeros((4, 8, 8, 3), np.float32), np.zeros((2, 100), np.float32))
    assert os.listdir(tmp_path) == []


def test_unwritable_target(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="cannot write x.mp4"):
        write_mp4(blocker / "x.mp4", _blocks()[:2], None)
    if os.name == "posix" and os.geteuid() != 0:  # root ignores directory permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="cannot write"):
                write_mp4(ro / "x.mp4", _blocks()[:2], None)
            assert os.listdir(ro) == []
        finally:
            ro.chmod(0o700)
    assert os.listdir(tmp_path) == ["file"]


def test_interrupted_write_keeps_old_file(tmp_path):
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"previous")

    def stop(i, n):
        if i == 10:
            raise KeyboardInterrupt

    fds = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(KeyboardInterrupt):
        write_mp4(target, _blocks(), _noise(), progress=stop)
    assert target.read_bytes() == b"previous"
    if fds is not None:  # the audio pipe and ffmpeg's stdin/stderr are all closed again
        assert len(os.listdir("/proc/self/fd")) == len(fds)
    assert os.listdir(tmp_path) == ["keep.mp4"]


def test_ffmpeg_error_is_reported(tmp_path):
    with pytest.raises(VideoWriteError, match="invalid preset"):
        write_mp4(tmp_path / "x.mp4", _blocks()[:3], _noise(2000), preset="no-such-preset")
    assert os.listdir(tmp_path) == []
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(VideoWriteError, match="no streams"):
        probe_mp4(junk)
    with pytest.raises(FileNotFoundError):
        probe_mp4(tmp_path / "missing.mp4")


def test_frames_from_vae_matches_official_mapping():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.2, 1.2, size=(3, 5, 6, 7)).astype(np.float32)
    x[:, 0, 0, :7] = np.array([-1.0, 1.0, 0.0, -1.5, 1.5, 2 / 255 - 1, np.nextafter(np.float32(1), 0)], np.float32)
    ref = ((np.clip(x, -1, 1) + 1) / 2 * 255).astype(np.uint8).transpose(1, 2, 3, 0)
    out = frames_from_vae(torch.from_numpy(x)[None])
    assert out.dtype == np.uint8 and out.shape == (5, 6, 7, 3)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(frames_from_vae(x), ref)
    # Truncation, not rounding: 0 -> 127.5 -> 127; the ends map to 0 and 255, beyond them clip.
    assert out[0, 0, :5, 0].tolist() == [0, 255, 127, 0, 255]
    xb = torch.from_numpy(x).to(torch.bfloat16)
    refb = ((np.clip(xb.float().numpy(), -1, 1) + 1) / 2 * 255).astype(np.uint8).transpose(1, 2, 3, 0)
    np.testing.assert_array_equal(frames_from_vae(xb), refb)
    with pytest.raises(ValueError):
        frames_from_vae(torch.zeros(2, 3, 1, 4, 4))


def test_unit_float_frames_and_pcm_conversion():
    f = np.array([[[[0.0, 0.5, 1.0], [-0.2, 1.3, 0.25]]]], np.float32)  # [1,1,2,3]
    assert video_io._frame_u8(f, 0).tolist() == [[[0, 128, 255], [0, 255, 64]]]
    a = np.array([1.0, -1.0, 2.0, -3.0, 0.5, -0.5, 0.0], np.float32)
    assert video_io._audio_pcm(a[None]).tolist() == [32767, -32767, 32767, -32767, 16383, -16383, 0]
