"""Long clips on the tiny checkpoint set: stitching (equal-power crossfade, frames taken once), the window-by-window
mp4 writer (exact lengths, interrupts, atomic), generate_clip (window 0 = today's call, the known overlap of each
later window, interrupt + resume from saved window latents), lip-sync and soundtrack from the user's media,
extend / write_windows / decode_windows, and the errors a user can run into."""

from __future__ import annotations

import math
import os
import signal
import threading

import numpy as np
import pytest
import torch

from ovi.engine import Interrupted, OviEngine
from ovi.latent_file import LatentError
from ovi.long_clip import (AudioSeams, ClipWriter, decode_windows, decoded_bytes, equal_power_crossfade, extend,
                           generate_clip, plan_clip, write_windows)
from ovi.long_clip import generate as generate_module
from ovi.long_clip.window_files import window_path
from ovi.video_io import probe_mp4, read_audio, read_frames

VARIANT = "720x720_5s"  # 121 frames, 157 audio tokens a window
FRAMES, TOKENS, SAMPLES = 121, 157, 157 * 512
# 32x32 is the smallest frame the sampler takes (one fusion token per latent frame); the tiny fusion model has 2
# layers, so SLG skips layer 1.
GEN = dict(size=(32, 32), steps=2, slg_layer=1)
PROMPTS = ["A cat sits on a wall. Audio: a cat meows", "The cat jumps down. Audio: a soft thud",
           "The cat runs away. Audio: footsteps fading", "An empty wall. Audio: wind"]
RATE = 16000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tone(start: int, count: int, phase: float = 0.0, hz: float = 440.0) -> torch.Tensor:
    """A 0.5-amplitude tone on the clip's sample axis, from sample ``start``."""
    t = torch.arange(start, start + count, dtype=torch.float64)
    return (0.5 * torch.sin(2 * math.pi * hz * t / RATE + phase)).float()


def _leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".partial"))


# -- the plan ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [0.0, 0.5, 1.0])
def test_a_duration_plans_the_fewest_windows_that_hold_it(overlap):
    # a tenth-second grid, and lengths a fifth of a frame past one and two 1 s-overlap windows' spans
    for seconds in [t / 10 for t in range(10, 400, 7)] + [5.05, 9.05]:
        plan = plan_clip(VARIANT, duration=seconds, overlap=overlap)
        assert plan.frames == round(seconds * 24)
        assert plan.span_frames >= plan.frames
        if plan.count > 1:
            fewer = plan_clip(VARIANT, windows=plan.count - 1, overlap=overlap)
            assert fewer.span_frames < plan.frames


# -- stitching -----------------------------------------------------------------------------------------
def test_crossfade_of_the_same_sound_is_that_sound():
    a = _tone(0, 8192)
    assert torch.allclose(equal_power_crossfade(a, a), a, atol=1e-6)


def test_crossfade_of_unrelated_sound_uses_cos_sin_gains():
    n = RATE  # whole periods of 440 Hz: sin and cos are orthogonal, so the correlation is 0
    t = torch.arange(n, dtype=torch.float64)
    a, b = torch.sin(2 * math.pi * 440 * t / RATE), torch.cos(2 * math.pi * 440 * t / RATE)
    theta = (t + 0.5) * (math.pi / 2 / n)
    out = equal_power_crossfade(a.float(), b.float())
    assert torch.allclose(out.double(), a * torch.cos(theta) + b * torch.sin(theta), atol=1e-5)
    assert equal_power_crossfade(torch.zeros(0), torch.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="one length"):
        equal_power_crossfade(torch.zeros(4), torch.zeros(5))


def test_seams_of_a_test_tone_have_no_click():
    """Each window holds the clip's tone at its own phase (a decoder never reproduces the phase exactly): the
    stitched sound never steps further between samples than the tone itself, and keeps its level."""
    plan = plan_clip(VARIANT, windows=3, overlap=1.0)
    seams, parts, hard = AudioSeams(), [], []
    for n, w in enumerate(plan.windows):
        s0 = w.token_start * 512
        wave = _tone(s0, SAMPLES, phase=n * math.pi / 3)
        nxt = plan.windows[n + 1].known_tokens * 512 if n + 1 < plan.count else 0
        parts.append(seams.push(wave, nxt))
        hard.append(wave[w.known_tokens * 512:])  # a hard cut at the seam instead
    parts.append(seams.flush())
    out = torch.cat(parts)
    assert out.shape[0] == plan.span_tokens * 512
    own = float(_tone(0, RATE).diff().abs().max())
    assert float(out.diff().abs().max()) <= own * 1.01
    assert float(torch.cat(hard).diff().abs().max()) > 2 * own  # the test can see a click
    # equal power: the tone's level stays 0.5 through the fades (a linear fade of these would dip by 13 %)
    period = RATE // 440 + 1
    peaks = out[: out.shape[0] // period * period].reshape(-1, period).abs().max(dim=1).values
    assert float(peaks.min()) > 0.5 * 0.98 and float(peaks.max()) < 0.5 * 1.02


def test_seams_refuse_windows_too_short_for_their_overlaps():
    seams = AudioSeams()
    seams.push(torch.zeros(100), 60)
    with pytest.raises(ValueError, match="cannot share 60"):
        seams.push(torch.zeros(100), 50)
    with pytest.raises(ValueError, match="mono"):
        seams.push(torch.zeros(2, 100), 0)


# -- the writer ----------------------------------------------------------------------------------------
def _write_synthetic(path, plan, size=(32, 32)):
    """The plan's windows as synthetic frames (each window its own grey level) and tones, through ClipWriter."""
    with ClipWriter(path, 24, RATE, frames_limit=plan.frames, samples_limit=plan.samples) as writer:
        for n, w in enumerate(plan.windows):
            frames = torch.full((FRAMES, *size, 3), 40 + 50 * n, dtype=torch.uint8)
            nxt = plan.windows[n + 1].known_tokens * 512 if n + 1 < plan.count else 0
            writer.append(frames[w.known_frames:], _tone(w.token_start * 512, SAMPLES), overlap_samples=nxt)
    return writer


@pytest.mark.parametrize("overlap", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("windows", [1, 2, 3])
def test_writer_lengths_are_exact(tmp_path, windows, overlap):
    plan = plan_clip(VARIANT, windows=windows, overlap=overlap)
    path = tmp_path / "clip.mp4"
    _write_synthetic(path, plan)
    info = probe_mp4(path)
    assert info["video"]["frames"] == plan.frames == plan.span_frames
    assert info["audio"]["samples"] == plan.samples == plan.span_tokens * 512
    assert _leftovers(tmp_path) == []


def test_writer_cuts_at_a_requested_duration(tmp_path):
    plan = plan_clip(VARIANT, duration=7.3, overlap=1.0)
    assert plan.count == 2 and plan.frames == 175 < plan.span_frames
    path = tmp_path / "cut.mp4"
    _write_synthetic(path, plan)
    info = probe_mp4(path)
    assert (info["video"]["frames"], info["audio"]["samples"]) == (175, plan.samples) == (175, 116667)


def test_writer_takes_shared_frames_once_from_the_earlier_window(tmp_path):
    plan = plan_clip(VARIANT, windows=2, overlap=1.0)
    path = tmp_path / "two.mp4"
    _write_synthetic(path, plan)
    grey = read_frames(path).reshape(plan.frames, -1).astype(np.float32).mean(axis=1)
    # window 0's level (40) through its last frame 120, window 1's (90) from frame 121 on
    assert np.abs(grey[:FRAMES] - 40).max() < 3 and np.abs(grey[FRAMES:] - 90).max() < 3


class _StopNow(BaseException):
    """A host's interrupt that is no Exception (newer ComfyUI raises one)."""


class _SignalAtFrame:
    """Frames that, when the writer reaches frame ``at``, interrupt the caller with SIGUSR1."""

    def __init__(self, frames: torch.Tensor, at: int):
        self.frames, self.at, self.shape = frames, at, frames.shape
        self.reached = threading.Event()

    def __getitem__(self, i):
        if i == self.at and not self.reached.is_set():
            self.reached.set()
            os.kill(os.getpid(), signal.SIGUSR1)
        return self.frames[i]


def test_an_interrupt_while_a_window_is_written_keeps_the_window_whole(tmp_path):
    def stop(signum, frame):
        raise _StopNow()

    old = signal.signal(signal.SIGUSR1, stop)
    path = tmp_path / "stopped.mp4"
    try:
        writer = ClipWriter(path, 24, RATE)
        writer.append(torch.zeros(FRAMES, 32, 32, 3), _tone(0, SAMPLES), overlap_samples=32 * 512)
        frames = _SignalAtFrame(torch.ones(96, 32, 32, 3), at=10)
        with pytest.raises(_StopNow):
            writer.append(frames, _tone(125 * 512, SAMPLES))  # the handler raises in here, while it waits
            raise AssertionError("the append returned before the signal's handler ran")
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert frames.reached.is_set()
    writer.close()
    info = probe_mp4(path)
    assert info["video"]["frames"] == FRAMES + 96 and info["audio"]["samples"] == (125 + TOKENS) * 512
    assert _leftovers(tmp_path) == []


def test_writer_abort_and_errors_leave_nothing(tmp_path):
    path = tmp_path / "gone.mp4"
    writer = ClipWriter(path, 24, RATE)
    writer.append(torch.zeros(FRAMES, 32, 32, 3), _tone(0, SAMPLES))
    with pytest.raises(ValueError, match="frame size 32x32"):
        writer.append(torch.zeros(96, 64, 32, 3), _tone(0, SAMPLES))
    writer.abort()
    assert not path.exists() and os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="already closed"):
        writer.append(torch.zeros(FRAMES, 32, 32, 3), _tone(0, SAMPLES))
    empty = ClipWriter(path, 24, RATE)
    with pytest.raises(ValueError, match="no window was appended"):
        empty.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError, match="missing"):
        ClipWriter(tmp_path / "missing" / "x.mp4", 24, RATE)


# -- generate_clip on the tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_dir):
    return OviEngine.from_dir(tiny_dir, variant=VARIANT)


@pytest.fixture(scope="module")
def clip4(engine, tmp_path_factory):
    """An uninterrupted 4-window storyboard (overlap 1 s), and window 0 decoded once more."""
    out = tmp_path_factory.mktemp("clip4")
    plan = plan_clip(VARIANT, windows=4, overlap=1.0, seed=11)
    steps = []
    result = generate_clip(engine, PROMPTS, out / "clip.mp4", plan=plan,
                           progress=lambda *a: steps.append(a), **GEN)
    return result, steps, engine.decode(result.results[0])


def test_clip_lengths_and_progress(clip4):
    result, steps, _ = clip4
    plan = result.plan
    assert (result.windows_done, result.interrupted, len(result.results)) == (4, False, 4)
    info = probe_mp4(result.path)
    assert info["video"]["frames"] == plan.frames == 3 * 96 + FRAMES
    assert info["audio"]["samples"] == plan.samples == (3 * 125 + TOKENS) * 512
    assert steps == [(w, 4, s, 2) for w in range(1, 5) for s in (1, 2)]
    assert [t["window"] for t in result.timings] == [0, 1, 2, 3]
    assert [r.seed for r in result.results] == [w.seed for w in plan.windows]
    metas = [r.settings["window"] for r in result.results]
    assert metas[1] == dict(index=1, frame_start=96, token_start=125, known_latent_frames=7, known_tokens=32,
                            overlap_frames=25, base_seed=11)
    assert [r.prompt.startswith(p.split(".")[0]) for r, p in zip(result.results, PROMPTS)] == [True] * 4


def test_window_0_is_todays_call(engine, clip4):
    first = clip4[0].results[0]
    plain = engine.generate(PROMPTS[0], seed=11, **GEN)
    assert torch.equal(first.video_latent, plain.video_latent)
    assert torch.equal(first.audio_latent, plain.audio_latent)
    assert first.mode == plain.mode == "t2av"


def test_window_1_holds_window_0s_overlap(engine, clip4):
    result, _, decoded0 = clip4
    w0, w1 = result.results[0], result.results[1]
    # video: the re-encode of window 0's last 25 decoded frames, as window 1's first 7 latent frames (clean)
    reencoded = engine.encode_frames(decoded0.frames[-25:])
    assert reencoded.shape[1] == 7
    assert torch.equal(w1.video_latent[:, :7], reencoded)
    # audio: window 0's tokens over the same seconds (from token 125 on) as window 1's first 32 (renoise)
    assert torch.equal(w1.audio_latent[:32], w0.audio_latent[125:157])


def test_extend_continues_as_the_clip_does(engine, clip4, tmp_path):
    result, _, decoded0 = clip4
    nxt = extend(engine, result.results[0], PROMPTS[1], overlap=1.0, previous_frames=decoded0.frames, **GEN)
    assert torch.equal(nxt.video_latent, result.results[1].video_latent)
    assert torch.equal(nxt.audio_latent, result.results[1].audio_latent)
    assert nxt.settings["window"] == result.results[1].settings["window"]
    # the sampling settings carry over from the previous window unless given
    assert nxt.settings["steps"] == 2 and nxt.settings["slg_layer"] == 1


def test_write_windows_and_decode_windows_stitch_the_clip(engine, clip4, tmp_path):
    result = clip4[0]
    two = result.results[:2]
    path = write_windows(engine, two, tmp_path / "two.mp4")
    info = probe_mp4(path)
    assert (info["video"]["frames"], info["audio"]["samples"]) == (FRAMES + 96, (125 + TOKENS) * 512)
    clip = decode_windows(engine, two)
    assert clip.frames.shape == (FRAMES + 96, 32, 32, 3) and clip.waveform.shape == ((125 + TOKENS) * 512,)
    assert torch.equal(clip.frames[:FRAMES], clip4[2].frames)  # the shared frames come from window 0
    assert decoded_bytes(two) == (clip.frames.numel() + clip.waveform.numel() + FRAMES * 32 * 32 * 3 + SAMPLES) * 4
    with pytest.raises(ValueError, match="not consecutive"):
        write_windows(engine, [result.results[0], result.results[2]], tmp_path / "gap.mp4")
    assert not (tmp_path / "gap.mp4").exists()
    # the decoder's own options reach every window's decode (Ovi Decode's tile overlap and VAE precision)
    seen, decode = [], engine.decode

    def spy(r, **kw):
        seen.append({k: kw.get(k) for k in ("tile_size", "tile_overlap", "vae_dtype")})
        return decode(r, **kw)

    engine.decode = spy
    try:
        tiled = decode_windows(engine, two, tile_size=1, tile_overlap=0, vae_dtype="fp32")
    finally:
        del engine.decode
    assert seen == [{"tile_size": 1, "tile_overlap": 0, "vae_dtype": "fp32"}] * 2
    assert tiled.frames.shape == clip.frames.shape


def _stop_in_window(window: int, step: int, raise_it=None):
    """progress + should_stop that stop before step ``step + 1`` of ``window`` (1-based)."""
    state = {"stop": False}

    def progress(w, windows, s, steps):
        if (w, s) == (window, step):
            state["stop"] = True

    def should_stop():
        if state["stop"] and raise_it is not None:
            raise raise_it()
        return state["stop"]

    return progress, should_stop


def test_interrupt_in_window_3_of_4_writes_2_windows_and_resumes(engine, clip4, tmp_path):
    reference = clip4[0]
    plan = reference.plan
    folder = tmp_path / "windows"
    progress, should_stop = _stop_in_window(3, 1)
    stopped = generate_clip(engine, PROMPTS, tmp_path / "clip.mp4", plan=plan, window_latents=folder,
                            progress=progress, should_stop=should_stop, **GEN)
    assert (stopped.interrupted, stopped.windows_done, len(stopped.results)) == (True, 2, 2)
    two = plan_clip(VARIANT, windows=2, overlap=1.0)
    info = probe_mp4(stopped.path)
    assert info["video"]["frames"] == two.span_frames == FRAMES + 96
    assert info["audio"]["samples"] == two.span_tokens * 512
    assert [window_path(folder, i).is_file() for i in range(4)] == [True, True, False, False]
    assert _leftovers(tmp_path) == []

    # another request on the same folder is refused, naming the file, before anything is generated
    with pytest.raises(LatentError, match=r"window_000\.safetensors.*steps: saved 2, asked 3"):
        generate_clip(engine, PROMPTS, tmp_path / "other.mp4", plan=plan, window_latents=folder,
                      **{**GEN, "steps": 3})
    assert not (tmp_path / "other.mp4").exists()

    resumed = generate_clip(engine, PROMPTS, tmp_path / "clip.mp4", plan=plan, window_latents=folder, **GEN)
    assert (resumed.interrupted, resumed.windows_done) == (False, 4)
    assert [t["resumed"] for t in resumed.timings] == [True, True, False, False]
    for a, b in zip(resumed.results, reference.results):
        assert torch.equal(a.video_latent, b.video_latent) and torch.equal(a.audio_latent, b.audio_latent)
        assert a.settings == b.settings
    assert probe_mp4(resumed.path)["video"]["frames"] == plan.frames


def test_a_host_interrupt_writes_the_finished_window_and_propagates(engine, tmp_path):
    plan = plan_clip(VARIANT, windows=2, overlap=0.0, seed=3)
    progress, should_stop = _stop_in_window(2, 1, raise_it=_StopNow)
    with pytest.raises(_StopNow):
        generate_clip(engine, PROMPTS[:2], tmp_path / "clip.mp4", plan=plan, progress=progress,
                      should_stop=should_stop, **GEN)
    info = probe_mp4(tmp_path / "clip.mp4")
    assert (info["video"]["frames"], info["audio"]["samples"]) == (FRAMES, SAMPLES)
    assert _leftovers(tmp_path) == []


def test_a_stop_before_any_window_finishes_leaves_no_file(engine, tmp_path):
    plan = plan_clip(VARIANT, windows=2)
    with pytest.raises(Interrupted):
        generate_clip(engine, PROMPTS[0], tmp_path / "clip.mp4", plan=plan, should_stop=lambda: True, **GEN)
    assert os.listdir(tmp_path) == []


def test_overlap_half_a_second_and_a_cut_duration(engine, tmp_path):
    """Overlap 0.5 s (13 frames, 4 latent frames; the audio seams 16 and 17 tokens) and a duration cut."""
    plan = plan_clip(VARIANT, duration=9.5, overlap=0.5, seed=5)
    assert plan.count == 2 and plan.frames == 228 < plan.span_frames == 229
    result = generate_clip(engine, PROMPTS[1], tmp_path / "half.mp4", plan=plan, **GEN)
    w0, w1 = result.results
    assert w1.settings["window"]["known_latent_frames"] == 4 and w1.settings["window"]["known_tokens"] == 16
    assert torch.equal(w1.audio_latent[:16], w0.audio_latent[141:157])
    info = probe_mp4(result.path)
    assert (info["video"]["frames"], info["audio"]["samples"]) == (228, plan.samples) == (228, 152000)


# -- the user's media -------------------------------------------------------------------------------------
class _RecordingWriter(ClipWriter):
    """ClipWriter that also keeps the frames and sound it was given."""

    given: list = []

    def append(self, frames, waveform, overlap_samples=0):
        type(self).given.append((frames.clone(), torch.as_tensor(waveform).clone(), overlap_samples))
        super().append(frames, waveform, overlap_samples)


@pytest.fixture
def recording(monkeypatch):
    _RecordingWriter.given = []
    monkeypatch.setattr(generate_module, "ClipWriter", _RecordingWriter)
    return _RecordingWriter


def test_lip_sync_holds_the_track_and_writes_its_own_samples(engine, tmp_path, recording):
    plan = plan_clip(VARIANT, duration=8.0, overlap=1.0, seed=9)
    g = torch.Generator().manual_seed(0)
    track = (_tone(0, plan.samples, hz=220) * 0.6 + 0.05 * torch.randn(plan.samples, generator=g)).clamp(-1, 1)
    image = torch.rand(32, 32, 3, generator=g)
    result = generate_clip(engine, PROMPTS[0], tmp_path / "lips.mp4", plan=plan, audio_track=track, image=image,
                           **GEN)
    w0, w1 = result.results
    assert w0.mode == "i2av"
    padded = torch.cat([track, torch.zeros(plan.span_tokens * 512 - plan.samples)])
    for w, r in zip(plan.windows, result.results):  # every token of every window is the track's encoding
        s0 = w.token_start * 512
        assert torch.equal(r.audio_latent, engine.encode_waveform(padded[s0:s0 + SAMPLES]))
    written = torch.cat([wave for _, wave, _ in recording.given])
    assert all(hold == 0 for _, _, hold in recording.given)
    assert torch.equal(written[:plan.samples], track)  # the original samples, each once
    info = probe_mp4(result.path)
    assert (info["video"]["frames"], info["audio"]["samples"]) == (plan.frames, plan.samples) == (192, 128000)
    heard, rate = read_audio(result.path)
    assert rate == RATE and np.corrcoef(heard[:plan.samples], track.numpy())[0, 1] > 0.9


def test_soundtrack_holds_the_frames_and_writes_them(engine, tmp_path, recording):
    plan = plan_clip(VARIANT, windows=2, overlap=1.0, seed=4)
    t = torch.linspace(0, 1, plan.span_frames)[:, None, None, None]
    x = torch.linspace(0, 1, 32)[None, None, :, None]
    y = torch.linspace(0, 1, 32)[None, :, None, None]
    frames = torch.cat([(0.2 + 0.6 * x).expand(-1, 32, -1, -1) * (1 - t) + 0.1 * t,
                        (0.3 + 0.4 * y).expand(-1, -1, 32, -1).expand(plan.span_frames, -1, -1, -1),
                        (0.5 + 0.3 * t).expand(-1, 32, 32, -1)], dim=-1).contiguous()
    assert frames.shape == (plan.span_frames, 32, 32, 3)
    result = generate_clip(engine, PROMPTS[2], tmp_path / "sound.mp4", plan=plan, video_frames=frames,
                           steps=2, slg_layer=1)
    w0, w1 = result.results
    for w, r in zip(plan.windows, result.results):  # every latent frame of every window is the user's
        assert torch.equal(r.video_latent, engine.encode_frames(frames[w.frame_start:w.frame_start + FRAMES]))
    assert torch.equal(w1.audio_latent[:32], w0.audio_latent[125:157])  # the sound still carries over
    given = torch.cat([f for f, _, _ in recording.given])
    assert torch.equal(given, frames)  # the clip's frames are the user's, each once
    seen = read_frames(result.path).astype(np.float32) / 255
    assert seen.shape == tuple(frames.shape) and np.abs(seen - frames.numpy()).mean() < 0.02
    info = probe_mp4(result.path)
    assert info["audio"]["samples"] == plan.samples


def test_soundtrack_takes_uint8_frames_window_by_window(engine, tmp_path, recording):
    """uint8 frames (ovi.media.load_video's, a quarter of float32's memory) are converted a window at a time:
    the latents and the frames written equal those of the same frames given as float."""
    plan = plan_clip(VARIANT, windows=2, overlap=1.0, seed=4)
    g = torch.Generator().manual_seed(3)
    frames8 = torch.randint(0, 256, (plan.span_frames, 32, 32, 3), generator=g, dtype=torch.uint8)
    as_float = frames8.float() / 255
    got = generate_clip(engine, PROMPTS[2], tmp_path / "u8.mp4", plan=plan, video_frames=frames8, steps=2,
                        slg_layer=1)
    for w, r in zip(plan.windows, got.results):
        assert torch.equal(r.video_latent, engine.encode_frames(as_float[w.frame_start:w.frame_start + FRAMES]))
    assert torch.equal(torch.cat([f for f, _, _ in recording.given]), as_float)
    with pytest.raises(ValueError, match="uint8 or float"):
        generate_clip(engine, PROMPTS[2], tmp_path / "bad.mp4", plan=plan, video_frames=frames8.to(torch.int16))


# -- errors ------------------------------------------------------------------------------------------------
def test_bad_requests_are_refused_before_anything_runs(engine, tmp_path):
    plan = plan_clip(VARIANT, windows=2)
    out = tmp_path / "x.mp4"
    cases = [
        (dict(prompts=PROMPTS[:3]), "3 prompts for 2 windows"),
        (dict(prompts=["  "]), "non-empty prompt"),
        (dict(seed=4), "seed= cannot be given"),
        (dict(plan=plan_clip("960x960_5s", windows=2)), "the plan is for 960x960_5s"),
        (dict(video_mode="blurry"), "video_mode must be one of clean, renoise"),
        (dict(audio_track=torch.zeros(2, plan.samples)), r"audio_track must be a float waveform \[N\]"),
        (dict(audio_track=torch.zeros(plan.samples - 1)), "cut or pad it to the plan"),
        (dict(audio_track=torch.zeros(plan.span_tokens * 512 + 1)), "longer than the 2 windows planned"),
        (dict(audio_track=torch.full((plan.samples,), float("nan"))), "NaN"),
        (dict(video_frames=torch.zeros(plan.frames, 40, 32, 3)), "multiples of 32"),
        (dict(video_frames=torch.zeros(100, 32, 32, 3)), "needs 217 to 217"),
        (dict(video_frames=torch.full((plan.frames, 32, 32, 3), 255.0)), r"must be in \[0, 1\]"),
        (dict(video_frames=torch.zeros(plan.frames, 32, 32, 3), image=torch.zeros(32, 32, 3)), "no place"),
        (dict(video_frames=torch.zeros(plan.frames, 32, 32, 3), size=(32, 32)), "drop size"),
        (dict(video_frames=torch.zeros(plan.frames, 32, 32, 3), audio_track=torch.zeros(plan.samples)), "not both"),
    ]
    for kw, message in cases:
        kw = {"prompts": PROMPTS[:2], "plan": plan, **kw}
        with pytest.raises((ValueError, TypeError), match=message):
            generate_clip(engine, kw.pop("prompts"), out, **{**dict(steps=2, slg_layer=1), **kw})
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        (tmp_path / "afile").write_text("")
        generate_clip(engine, PROMPTS[:2], out, plan=plan, window_latents=tmp_path / "afile", **GEN)
    assert not out.exists()
