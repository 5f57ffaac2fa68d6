"""The user's audio and video (``ovi.media``): resampling to 16 kHz mono, reading files through the bundled ffmpeg,
24 fps frame selection, sizes, fitting to a clip plan, and the errors that name the file."""

from __future__ import annotations

import math
import subprocess
import wave

import numpy as np
import pytest
import torch

from ovi import media
from ovi.long_clip.plan import plan_clip
from ovi.video_io import ffmpeg_exe


def tone(freq: float, rate: int, seconds: float = 2.0, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    return (amp * torch.sin(2 * math.pi * freq * t)).float()


def fit_tone(y: torch.Tensor, freq: float, rate: int = 16000, edge: int = 2000) -> tuple[float, float]:
    """(amplitude, largest residual) of a least-squares sine at ``freq``, away from the zero-padded ends."""
    t = torch.arange(y.numel(), dtype=torch.float64)[edge:-edge] / rate
    basis = torch.stack([torch.sin(2 * math.pi * freq * t), torch.cos(2 * math.pi * freq * t)], 1)
    mid = y[edge:-edge].double()
    coef = torch.linalg.lstsq(basis, mid[:, None]).solution[:, 0]
    return coef.norm().item(), (mid - basis @ coef).abs().max().item()


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args], input=stdin, check=True)


def write_index_video(path, count: int, fps: float, w: int = 32, h: int = 32) -> None:
    """A lossless video whose frame k is the grey level k (so the frames chosen can be read back exactly)."""
    frames = np.repeat((np.arange(count) % 256).astype(np.uint8), h * w * 3).reshape(count, h, w, 3)
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "ffv1",
           str(path), stdin=frames.tobytes())


# -- resampling ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [44100, 48000, 8000, 22050])
def test_resampling_keeps_a_tone(rate):
    y = media.resample_audio(tone(1000, rate), rate)
    assert y.dtype == torch.float32 and y.numel() == math.ceil(2.0 * rate * 16000 / rate) == 32000
    amp, residual = fit_tone(y, 1000)
    assert abs(amp - 0.5) < 1e-4  # the amplitude is kept
    assert residual < 1e-4  # and nothing but a 1 kHz sine is left: the frequency is kept
    spectrum = torch.fft.rfft(y.double()).abs()
    assert int(spectrum.argmax()) == 2000  # 1 kHz = bin 2000 of a 2 s, 16 kHz transform


@pytest.mark.parametrize("rate,freq", [(44100, 10000), (48000, 9000), (48000, 12000), (44100, 8500)])
def test_resampling_removes_tones_above_8khz(rate, freq):
    x = tone(freq, rate)
    y = media.resample_audio(x, rate)
    assert rms(y[2000:-2000]) < 1e-3 * rms(x)  # -60 dB at least: nothing folds back below 8 kHz
    if rate == 48000:  # what plain decimation would leave: the tone aliased at full strength
        assert rms(x[::3]) > 0.5 * rms(x)


def test_stereo_is_mixed_down_by_the_mean():
    left, right = tone(440, 16000), tone(1000, 16000, amp=0.25)
    stereo = torch.stack([left, right])
    assert torch.equal(media.resample_audio(stereo, 16000), (left + right) / 2)
    at_48k = torch.stack([tone(440, 48000), tone(1000, 48000, amp=0.25)])
    mixed = media.resample_audio(at_48k, 48000)
    torch.testing.assert_close(mixed, media.resample_audio(at_48k.mean(0), 48000), atol=1e-6, rtol=0)
    amp, _ = fit_tone(mixed - media.resample_audio(at_48k[0] / 2, 48000), 1000)
    assert abs(amp - 0.125) < 1e-4


def test_resampling_refuses_bad_input():
    with pytest.raises(ValueError, match="empty"):
        media.resample_audio(torch.zeros(0), 44100)
    with pytest.raises(ValueError, match=r"\[N\] or \[channels, N\]"):
        media.resample_audio(torch.zeros(1, 2, 10), 44100)
    with pytest.raises(ValueError, match="float samples"):
        media.resample_audio(torch.zeros(10, dtype=torch.int16), 44100)
    with pytest.raises(ValueError, match="sample rate"):
        media.resample_audio(torch.zeros(10), 0)
    noisy = tone(1000, 16000)
    noisy[5] = float("nan")
    assert torch.isfinite(media.resample_audio(noisy, 16000)).all()


# -- audio files -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stereo_44k(tmp_path_factory):
    """3 s of stereo at 44.1 kHz (1 kHz left, 440 Hz right) as raw float32, and the files made from it."""
    d = tmp_path_factory.mktemp("audio")
    x = torch.stack([tone(1000, 44100, 3.0, 0.5), tone(440, 44100, 3.0, 0.3)])
    raw = x.t().contiguous().numpy().astype("<f4").tobytes()
    src = ["-f", "f32le", "-ar", "44100", "-ac", "2", "-i", "-"]
    files = {}
    for ext, codec in (("wav", ["-c:a", "pcm_f32le"]), ("flac", []), ("mp3", ["-b:a", "192k"])):
        files[ext] = d / f"voice.{ext}"
        ffmpeg(*src, *codec, str(files[ext]), stdin=raw)
    return x, files


def test_wav_and_flac_round_trip(stereo_44k):
    x, files = stereo_44k
    want = media.resample_audio(x, 44100)
    got = media.load_audio(files["wav"])
    assert torch.equal(got, want)  # float32 wav: the very samples
    flac = media.load_audio(files["flac"])
    assert flac.shape == want.shape and (flac - want).abs().max() < 1e-4  # 16-bit flac: quantisation only


def test_mp3_round_trip(stereo_44k):
    x, files = stereo_44k
    y = media.load_audio(files["mp3"])
    assert abs(y.numel() / 16000 - 3.0) < 0.06  # the encoder's padding at most
    a1, _ = fit_tone(y, 1000, edge=4000)
    a2, _ = fit_tone(y, 440, edge=4000)
    assert abs(a1 - 0.25) < 0.01 and abs(a2 - 0.15) < 0.01  # each channel's tone at half strength after the mean


def test_audio_file_errors(tmp_path, stereo_44k):
    with pytest.raises(FileNotFoundError, match="absent.wav"):
        media.load_audio(tmp_path / "absent.wav")
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n" * 50)
    with pytest.raises(media.MediaError, match=r"cannot read .*notes\.wav as audio or video"):
        media.load_audio(text)
    silent_video = tmp_path / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=24:duration=0.5", "-pix_fmt", "yuv420p", str(silent_video))
    with pytest.raises(media.MediaError, match=r"silent\.mp4 has no audio stream \(it has: video h264\)"):
        media.load_audio(silent_video)
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    with pytest.raises(media.MediaError, match=r"audio of .*empty\.wav is empty"):
        media.load_audio(empty)


# -- video files and frames --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count,fps", [(60, 30), (50, 25), (90, 60), (24, 12), (48, 24), (150, 29.97), (37, 30)])
def test_frame_rate_conversion(tmp_path, count, fps):
    path = tmp_path / "index.mkv"
    write_index_video(path, count, fps)
    frames, source_fps = media.load_video(path)
    assert source_fps == pytest.approx(fps)
    assert frames.dtype == torch.uint8 and frames.shape[1:] == (32, 32, 3)
    assert frames.shape[0] == max(1, math.floor(count * 24 / fps + 0.5))  # the duration is kept
    chosen = frames[:, 0, 0, 0].long()
    assert chosen.tolist() == media.frame_indices(count, fps).tolist()  # ffmpeg's fps filter = our rule
    native = torch.from_numpy(np.repeat((np.arange(count) % 256).astype(np.uint8), 32 * 32 * 3)
                              .reshape(count, 32, 32, 3))
    assert torch.equal(media.resample_frames(native, fps), frames)  # in-memory frames convert alike


def test_thirty_fps_two_seconds_is_48_frames():
    assert media.frame_indices(60, 30).numel() == 48
    assert media.frame_indices(60, 30)[:8].tolist() == [0, 1, 3, 4, 5, 6, 8, 9]  # one frame in five dropped
    assert media.frame_indices(24, 12)[:6].tolist() == [0, 0, 1, 1, 2, 2]  # held, never shown before its time
    frames = torch.rand(48, 4, 4, 3)
    assert media.resample_frames(frames, 24) is frames


def test_rotated_video_comes_out_upright(tmp_path):
    plain, rotated = tmp_path / "plain.mp4", tmp_path / "rotated.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=24:duration=0.5", "-pix_fmt", "yuv420p", str(plain))
    ffmpeg("-display_rotation", "90", "-i", str(plain), "-c", "copy", str(rotated))
    info = media.video_info(rotated)
    assert (info.width, info.height, info.rotation) == (64, 96, 90)
    frames, _ = media.load_video(rotated)
    assert frames.shape == (12, 96, 64, 3)


def test_frame_sizes_follow_the_sampler_rules():
    assert media.fitted_size(64, 96, size="64x96") == (64, 96)
    assert media.fitted_size(480, 640, variant="720x720_5s") == (640, 832)  # the 720² area, about 3:4
    assert media.fitted_size(1080, 1920, variant="960x960_5s") == (704, 1280)
    with pytest.raises(ValueError, match="multiples of 32"):
        media.fitted_size(64, 96, size="60x90")
    grey = torch.full((5, 50, 70, 3), 77, dtype=torch.uint8)
    out, hw = media.fit_frames(grey, "64x96")
    assert hw == (64, 96) and out.shape == (5, 64, 96, 3) and out.dtype == torch.uint8
    assert (out == 77).all()  # a flat picture stays flat (the filter's weights sum to one)
    floats = torch.rand(3, 64, 96, 3)
    same, _ = media.fit_frames(floats, "64x96")
    assert same is floats
    half, _ = media.fit_frames(floats, "32x64")
    assert half.dtype == torch.float32 and half.shape == (3, 32, 64, 3) and 0 <= half.min() and half.max() <= 1


def test_load_video_resizes_as_it_reads(tmp_path):
    path = tmp_path / "clip.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x96:rate=30:duration=1", "-pix_fmt", "yuv420p", str(path))
    full, _ = media.load_video(path)
    small, _ = media.load_video(path, size="64x96")
    assert small.shape == (24, 64, 96, 3)
    assert torch.equal(small, media.fit_frames(full, "64x96")[0])  # the same filter, frame by frame
    area, _ = media.load_video(path, resize=True, variant="720x720_5s", max_frames=5)
    assert area.shape == (5, 544, 928, 3)
    with pytest.raises(ValueError, match="max_frames"):
        media.load_video(path, max_frames=0)


def test_video_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.mp4"):
        media.load_video(tmp_path / "absent.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x01" * 4000)
    with pytest.raises(media.MediaError, match=r"cannot read .*junk\.mp4"):
        media.load_video(junk)
    voice = tmp_path / "voice.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=500:sample_rate=16000:duration=0.5", str(voice))
    with pytest.raises(media.MediaError, match=r"voice\.wav has no video stream \(it has: audio pcm_s16le\)"):
        media.load_video(voice)
    whole, cut = tmp_path / "whole.mp4", tmp_path / "cut.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=24:duration=1", "-pix_fmt", "yuv420p",
           "-movflags", "+faststart", str(whole))
    data = whole.read_bytes()
    cut.write_bytes(data[:data.find(b"mdat") + 4])  # the header says there is video; the frames are gone
    with pytest.raises(media.MediaError, match=r"could not decode the video of .*cut\.mp4"):
        media.load_video(cut)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        media.fit_frames(torch.zeros(4, 4, 3))


# -- fitting to a clip plan ------------------------------------------------------------------------------------------
def test_audio_plans_follow_the_track():
    plan = media.plan_for_audio("720x720_5s", torch.zeros(12 * 16000))
    assert plan.count == 3 and plan.frames == 288 and plan.samples == 12 * 16000
    assert media.plan_for_audio("720x720_5s", 3.0).count == 1
    assert media.plan_for_audio("720x720_5s", torch.zeros(16000), duration=12.0).frames == 288
    assert media.plan_for_audio("960x960_10s", 12.0, overlap=0.0).count == 2
    with pytest.raises(ValueError, match="empty"):
        media.plan_for_audio("720x720_5s", torch.zeros(0))


def test_audio_cut_or_padded_to_the_plan():
    plan = plan_clip("720x720_5s", duration=12.0)
    span = plan.span_tokens * 512
    short = tone(1000, 16000, 7.0)
    padded = media.fit_audio_to_plan(short, plan)
    assert padded.shape == (span,) and torch.equal(padded[:short.numel()], short)
    assert (padded[short.numel():] == 0).all()
    long = tone(1000, 16000, 20.0)
    cut = media.fit_audio_to_plan(long, plan)
    assert cut.shape == (span,) and cut.data_ptr() == long.data_ptr()  # a view, no copy


def test_frames_cut_or_padded_to_the_plan(tmp_path):
    plan = plan_clip("720x720_5s", duration=6.0)  # two windows: 217 frames span, 144 written
    frames = torch.arange(100, dtype=torch.uint8)[:, None, None, None].expand(100, 2, 2, 3).contiguous()
    padded = media.fit_frames_to_plan(frames, plan)
    assert padded.shape[0] == plan.span_frames == 217
    assert torch.equal(padded[:100], frames) and (padded[100:] == 99).all()  # the last frame held
    assert media.fit_frames_to_plan(padded, plan).data_ptr() == padded.data_ptr()
    longer = torch.zeros(300, 2, 2, 3, dtype=torch.uint8)
    assert media.fit_frames_to_plan(longer, plan).shape[0] == 217
    # a slice of someone's batch is copied: what lies behind it is not ours to overwrite
    batch = torch.zeros(400, 2, 2, 3, dtype=torch.uint8)
    head = batch[:100]
    media.fit_frames_to_plan(head, plan)
    assert (batch[100:] == 0).all()
    # frames from load_video are padded where they lie
    path = tmp_path / "index.mkv"
    write_index_video(path, 100, 24)
    loaded, _ = media.load_video(path)
    fitted = media.fit_frames_to_plan(loaded, plan)
    assert fitted.data_ptr() == loaded.data_ptr() and fitted.shape[0] == 217
    assert torch.equal(fitted[:100, 0, 0, 0], torch.arange(100, dtype=torch.uint8)) and (fitted[100:] == 99).all()
    assert media.plan_for_frames("720x720_5s", loaded).frames == 100


def test_frames_to_float():
    u = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(1, 1, 1, 3)
    assert media.frames_to_float(u).flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])
    with pytest.raises(ValueError, match="uint8 or float"):
        media.frames_to_float(torch.zeros(1, 1, 1, 3, dtype=torch.int32))


# -- ComfyUI's AUDIO / IMAGE / VIDEO (utils/media.py) ------------------------------------------------------------------
def _pack_module(name: str):
    """A pack submodule imported with the pack as its package (relative imports need one), the pack's own
    __init__ (ComfyUI registration) left unrun."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pkg = "ovi_pack_media_test"
    if pkg not in sys.modules:
        spec = importlib.util.spec_from_file_location(pkg, root / "__init__.py", submodule_search_locations=[str(root)])
        sys.modules[pkg] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{pkg}.{name}")


def test_comfy_audio_to_track():
    convert = _pack_module("utils.media")
    stereo = torch.stack([tone(1000, 44100, 1.0), tone(1000, 44100, 1.0, amp=0.3)])
    track = convert.audio_to_track({"waveform": stereo[None], "sample_rate": 44100})
    assert torch.equal(track, media.resample_audio(stereo, 44100)) and track.shape == (16000,)
    amp, _ = fit_tone(track, 1000, edge=1000)
    assert abs(amp - 0.4) < 1e-4
    batch = torch.stack([stereo, torch.zeros_like(stereo)])
    assert torch.equal(convert.audio_to_track({"waveform": batch, "sample_rate": 44100}), track)  # the first item
    assert convert.audio_to_track({"waveform": tone(500, 16000), "sample_rate": 16000}).shape == (32000,)
    with pytest.raises(TypeError, match="AUDIO must be a dict"):
        convert.audio_to_track(stereo)
    with pytest.raises(ValueError, match=r"\[B, C, N\]"):
        convert.audio_to_track({"waveform": torch.zeros(1, 2, 0), "sample_rate": 44100})


def test_comfy_image_to_frames():
    convert = _pack_module("utils.media")
    images = torch.arange(60, dtype=torch.float32)[:, None, None, None].expand(60, 8, 8, 3) / 255
    frames = convert.image_to_frames(images, 30)
    assert frames.shape == (48, 8, 8, 3) and frames.dtype == torch.float32
    assert torch.equal((frames[:, 0, 0, 0] * 255).round().long(), media.frame_indices(60, 30))
    assert convert.image_to_frames(images, 24) is images
    assert convert.image_to_frames(torch.rand(4, 8, 8, 4), 24).shape == (4, 8, 8, 3)
    with pytest.raises(ValueError, match=r"IMAGE must be \[B, H, W, 3\]"):
        convert.image_to_frames(torch.rand(8, 8, 3), 24)


_VIDEO_IN_COMFY = r"""
import importlib, importlib.util, json, sys
from fractions import Fraction
comfy_dir, root = sys.argv[1:3]
sys.path.insert(0, comfy_dir)
import torch
from comfy_api.input_impl import VideoFromComponents
from comfy_api.util import VideoComponents
spec = importlib.util.spec_from_file_location("ComfyUI-Ovi", root + "/__init__.py", submodule_search_locations=[root])
sys.modules[spec.name] = importlib.util.module_from_spec(spec)
convert = importlib.import_module("ComfyUI-Ovi.utils.media")
images = torch.arange(60, dtype=torch.float32)[:, None, None, None].expand(60, 8, 8, 3).contiguous() / 255
t = torch.arange(44100, dtype=torch.float64) / 44100
audio = {"waveform": (0.5 * torch.sin(2 * torch.pi * 1000 * t)).float().reshape(1, 1, -1), "sample_rate": 44100}
out = {}
for name, sound in (("with_audio", audio), ("silent", None)):
    video = VideoFromComponents(VideoComponents(images=images, audio=sound, frame_rate=Fraction(30)))
    frames, fps = convert.video_to_frames(video)
    track = convert.video_to_track(video)
    out[name] = {"shape": list(frames.shape), "fps": fps, "levels": (frames[:, 0, 0, 0] * 255).round().long().tolist(),
                 "track": None if track is None else [track.numel(), float(track.abs().max())]}
print("OVI-VIDEO " + json.dumps(out))
"""


def test_comfy_video_to_frames_and_track(tmp_path):
    from comfyui_server.harness import COMFY_DIR, COMFY_PYTHON, ROOT, WAIT_BOUND, required, setup_problem

    problem = setup_problem()
    if problem:
        if required():
            pytest.fail(f"{problem} (COMFY_REQUIRED is set, so this is a failure, not a skip)", pytrace=False)
        pytest.skip(problem)
    script = tmp_path / "video_in_comfy.py"
    script.write_text(_VIDEO_IN_COMFY)
    proc = subprocess.run([COMFY_PYTHON, str(script), str(COMFY_DIR), str(ROOT)], capture_output=True, text=True,
                          timeout=WAIT_BOUND, cwd=str(tmp_path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("OVI-VIDEO ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    import json

    got = json.loads(lines[-1].removeprefix("OVI-VIDEO "))
    want_levels = media.frame_indices(60, 30).tolist()
    assert got["with_audio"]["shape"] == [48, 8, 8, 3] and got["with_audio"]["fps"] == 30.0
    assert got["with_audio"]["levels"] == want_levels
    assert got["with_audio"]["track"][0] == 16000 and abs(got["with_audio"]["track"][1] - 0.5) < 0.01
    assert got["silent"]["track"] is None and got["silent"]["levels"] == want_levels


def test_comfy_video_must_be_a_video_input():
    convert = _pack_module("utils.media")
    with pytest.raises(TypeError, match="get_components"):
        convert.video_to_frames(torch.zeros(2, 8, 8, 3))
