"""``python -m ovi generate`` beyond one window: a 4-window clip (--duration), lip-sync to a voice file (--audio), a
soundtrack for a silent video (--video), a storyboard's prompt count, and an interrupt that keeps the finished
windows, which a rerun with --window-latents resumes. Each run is a real subprocess on the tiny checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ovi import media
from ovi.long_clip.plan import plan_clip
from ovi.video_io import ffmpeg_exe, probe_mp4, read_audio, read_frames

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A woman says <S>hello there<E> on a busy street. Audio: traffic and footsteps"
RUN_BOUND = 900  # seconds: only ends a hung run (a 4-window tiny clip takes well under a minute on an idle machine)
FAST = ["--variant", "720x720_5s", "--steps", "2", "--slg-layer", "1", "--seed", "3"]


def ovi(tiny_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ovi", "generate", "--models", str(tiny_dir), *FAST, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_BOUND)


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args], check=True)


def check_streams(path: Path, frames: int, samples: int | None, size: tuple[int, int]) -> dict:
    """One H.264 and one AAC stream with exactly these frames and samples (None: as long as the frames)."""
    info = probe_mp4(path)
    assert [(s["type"], s["codec"]) for s in info["streams"]] == [("video", "h264"), ("audio", "aac")]
    assert info["video"]["frames"] == frames and (info["video"]["height"], info["video"]["width"]) == size
    assert info["audio"]["sample_rate"] == 16000
    if samples is not None:
        assert info["audio"]["samples"] == samples
    assert abs(info["video"]["duration"] - info["audio"]["duration"]) <= 1 / 24
    return info


def test_four_window_clip_from_a_duration(tiny_dir, tmp_path):
    out = tmp_path / "long.mp4"
    run = ovi(tiny_dir, "--prompt", PROMPT, "--size", "64x64", "--duration", "17", "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    plan = plan_clip("720x720_5s", duration=17.0)
    assert plan.count == 4 and plan.frames == 408 and plan.samples == 272000
    info = check_streams(out, 408, 272000, (64, 64))
    assert info["video"]["duration"] == pytest.approx(17.0, abs=1 / 24)
    for n in range(1, 5):  # progress names the window and the step
        assert f"[Ovi] window {n}/4 diffusion 2/2" in run.stderr
    assert "4 windows" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]  # no temporary files left


def test_storyboard_prompt_count(tiny_dir, tmp_path):
    out = tmp_path / "story.mp4"
    run = ovi(tiny_dir, "--prompt", "one", "--prompt", "two", "--prompt", "three", "--size", "64x64",
              "--duration", "17", "--out", str(out), cwd=tmp_path)
    assert run.returncode == 2 and "3 prompts for a clip of 4 windows" in run.stderr
    assert not out.exists()
    # two prompts and no duration: two windows, one prompt each
    run = ovi(tiny_dir, "--prompt", "A dog barks. Audio: barking", "--prompt", "A cat sleeps. Audio: purring",
              "--size", "64x64", "--overlap", "0", "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    plan = plan_clip("720x720_5s", windows=2, overlap=0.0)
    check_streams(out, plan.frames, plan.samples, (64, 64))
    assert "barking" in run.stderr and "purring" in run.stderr


def test_lip_sync_to_a_voice_file(tiny_dir, tmp_path):
    voice, out = tmp_path / "voice.wav", tmp_path / "talk.mp4"
    # 7 s of a 440 Hz tone, stereo at 44.1 kHz: two windows, resampled to 16 kHz mono
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=7", "-ac", "2", str(voice))
    run = ovi(tiny_dir, "--prompt", PROMPT, "--size", "64x64", "--audio", str(voice), "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    check_streams(out, 168, 112000, (64, 64))  # the clip lasts as long as the track
    assert "[Ovi] window 2/2 diffusion" in run.stderr
    # the soundtrack is the user's: the tone, at its level, through AAC
    sound, rate = read_audio(out)
    want = media.load_audio(voice)
    assert rate == 16000 and sound.shape[0] == 112000
    got = torch.from_numpy(sound)[4000:-4000].double()
    ref = want[4000:112000 - 4000].double()
    corr = float((got * ref).sum() / (got.norm() * ref.norm()))
    assert corr > 0.99, corr


def test_soundtrack_for_a_silent_video(tiny_dir, tmp_path):
    silent, out = tmp_path / "silent.mp4", tmp_path / "scored.mp4"
    # 6 s at 30 fps, 96x64 and no sound: 144 frames at 24 fps, two windows
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=30:duration=6", "-pix_fmt", "yuv420p", str(silent))
    run = ovi(tiny_dir, "--prompt", "Audio: rain on a tin roof", "--size", "64x96", "--video", str(silent),
              "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    check_streams(out, 144, 96000, (64, 96))
    assert "[Ovi] window 2/2 diffusion" in run.stderr
    # the frames are the user's (through two H.264 encodes)
    wanted, _ = media.load_video(silent, size="64x96")
    got = read_frames(out)
    assert got.shape == (144, 64, 96, 3)
    err = np.abs(got.astype(np.int16) - wanted.numpy().astype(np.int16)).mean()
    assert err < 6, err
    # the video's own aspect stays unless --size says otherwise; --aspect and --image have no place here
    run = ovi(tiny_dir, "--prompt", "x", "--aspect", "1:1", "--video", str(silent), "--out", str(out), cwd=tmp_path)
    assert run.returncode == 2 and "--video keeps its own aspect" in run.stderr
    voice = tmp_path / "voice.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=1", str(voice))
    run = ovi(tiny_dir, "--prompt", "x", "--audio", str(voice), "--video", str(silent), "--out", str(out),
              cwd=tmp_path)
    assert run.returncode == 2 and "not both" in run.stderr


def test_media_errors_name_the_file(tiny_dir, tmp_path):
    out = tmp_path / "x.mp4"
    run = ovi(tiny_dir, "--prompt", PROMPT, "--audio", str(tmp_path / "absent.wav"), "--out", str(out), cwd=tmp_path)
    assert run.returncode == 2 and "absent.wav" in run.stderr
    silent = tmp_path / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=24:duration=1", "-pix_fmt", "yuv420p", str(silent))
    run = ovi(tiny_dir, "--prompt", PROMPT, "--audio", str(silent), "--out", str(out), cwd=tmp_path)
    assert run.returncode == 2 and "silent.mp4 has no audio stream" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["silent.mp4"]


def test_interrupt_keeps_the_finished_windows_and_a_rerun_resumes(tiny_dir, tmp_path):
    out, saved = tmp_path / "long.mp4", tmp_path / "windows"
    args = ["--prompt", PROMPT, "--size", "64x64", "--duration", "9", "--window-latents", str(saved),
            "--out", str(out)]
    plan = plan_clip("720x720_5s", duration=9.0)
    assert plan.count == 2 and plan.frames == 216
    cmd = [sys.executable, "-m", "ovi", "generate", "--models", str(tiny_dir), *FAST, "--steps", "20", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        deadline = time.monotonic() + RUN_BOUND
        for line in proc.stderr:  # wait until window 2 has begun: window 1 is finished and written
            lines.append(line)
            if "[Ovi] window 2/2 diffusion" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=RUN_BOUND)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 130, text[-4000:]
    assert "kept the 1 finished window of 2" in text
    check_streams(out, 121, None, (64, 64))  # window 1 alone, a valid mp4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4", "windows"]
    # the rerun loads window 1 and makes window 2 only
    run = ovi(tiny_dir, *args[:-2], "--steps", "20", "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "window 1/2: seed 3, loaded from" in run.stderr
    assert "[Ovi] window 1/2 diffusion 1/20" not in run.stderr and "[Ovi] window 2/2 diffusion 20/20" in run.stderr
    check_streams(out, 216, 144000, (64, 64))


def test_help_lists_the_long_clip_options(capsys):
    from ovi.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--duration SECONDS", "--overlap SECONDS", "--audio FILE", "--video FILE", "--window-latents DIR",
                   "--video-mode {clean,renoise}", "--audio-mode {clean,renoise}"):
        assert option in text, option
    assert "default 1.0" in text and "Repeat it for a long clip's windows" in text
