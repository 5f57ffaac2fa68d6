"""A long clip as latents (what the nodes pass along): windows made by generate_windows are generate_clip's,
extend_clip appends extend's window, write_clip / decode_clip write and stitch them with the clip's cut and a
lip-sync track; the multi-window LATENT and its latent file round-trip, one-window files stay byte for byte
as before, and a multi-window latent whose windows do not make one clip is refused naming what is wrong."""

from __future__ import annotations

import importlib
import json
import math
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from ovi.engine import OviEngine
from ovi.latent_file import LatentError, read_latent, read_latent_file, write_latent_file
from ovi.long_clip import decode_windows, extend, generate_clip, plan_clip
from ovi.long_clip.latent_windows import ClipWindows, clip_bytes, decode_clip, extend_clip, generate_windows, write_clip
from ovi.video_io import probe_mp4, read_audio, read_frames

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "720x720_5s"
FRAMES, TOKENS = 121, 157
GEN = dict(size=(32, 32), steps=2, slg_layer=1)
PROMPTS = ["A cat sits on a wall. Audio: a cat meows", "The cat jumps down. Audio: a soft thud",
           "The cat runs away. Audio: footsteps fading"]
RATE = 16000


def _latents_module(monkeypatch):
    """nodes/latents.py imported as ComfyUI imports the pack (a package); it needs no ComfyUI module."""
    pack = types.ModuleType("ovi_pack_latents_under_test")
    pack.__path__ = [str(ROOT)]
    monkeypatch.setitem(sys.modules, "ovi_pack_latents_under_test", pack)
    return importlib.import_module("ovi_pack_latents_under_test.nodes.latents")


def _track(samples: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    t = torch.arange(samples, dtype=torch.float64)
    tone = (0.3 * torch.sin(2 * math.pi * 220 * t / RATE)).float()
    return (tone + 0.05 * torch.randn(samples, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return OviEngine.from_dir(tiny_dir, variant=VARIANT)


@pytest.fixture(scope="module")
def story(engine, tmp_path_factory):
    """A 3-window storyboard made both ways: generate_clip (with its mp4) and generate_windows."""
    plan = plan_clip(VARIANT, windows=3, overlap=1.0, seed=21)
    made = generate_clip(engine, PROMPTS, tmp_path_factory.mktemp("story") / "clip.mp4", plan=plan, **GEN)
    steps = []
    windows = generate_windows(engine, PROMPTS, plan=plan, progress=lambda *a: steps.append(a), **GEN)
    return plan, made, windows, steps


def test_generate_windows_makes_generate_clips_windows(story):
    plan, made, windows, steps = story
    assert windows.count == 3 and (windows.frames, windows.samples, windows.track) == (None, None, None)
    for a, b in zip(made.results, windows.results):
        assert torch.equal(a.video_latent, b.video_latent) and torch.equal(a.audio_latent, b.audio_latent)
        assert a.settings["window"] == b.settings["window"] and a.seed == b.seed
    assert steps == [(w, 3, s, 2) for w in (1, 2, 3) for s in (1, 2)]
    assert windows.length == (plan.frames, plan.samples) == (FRAMES + 2 * 96, (2 * 125 + TOKENS) * 512)


def test_write_clip_writes_what_generate_clip_wrote(engine, story, tmp_path):
    plan, made, windows, _ = story
    seen = []
    path = write_clip(engine, windows, tmp_path / "w.mp4", progress=lambda *a: seen.append(a[:2]))
    info = probe_mp4(path)
    assert sorted(s["type"] for s in info["streams"]) == ["audio", "video"]
    assert (info["video"]["frames"], info["audio"]["samples"]) == windows.length
    assert np.array_equal(read_frames(path), read_frames(made.path))
    assert np.abs(read_audio(path)[0] - read_audio(made.path)[0]).max() < 1e-3
    assert seen[0] == (1, 3) and seen[-1] == (3, 3)


def test_extend_clip_appends_extends_window(engine, story, monkeypatch):
    _, made, windows, _ = story
    # the sampler's plain one-window result (no window metadata) becomes window 0 of a clip that checks whole
    first = windows.results[0]
    plain = replace(first, settings={k: v for k, v in first.settings.items() if k != "window"})
    latents = _latents_module(monkeypatch)
    two = latents.from_latent_windows(latents.to_latent(extend_clip(engine, ClipWindows([plain]), PROMPTS[1])))
    assert two.count == 2 and torch.equal(two.results[1].video_latent, windows.results[1].video_latent)
    assert two.results[0].settings["window"] == first.settings["window"]

    two = ClipWindows(windows.results[:2])
    three = extend_clip(engine, two, PROMPTS[2], overlap=1.0)
    direct = extend(engine, windows.results[1], PROMPTS[2], overlap=1.0,
                    previous_frames=engine.decode(windows.results[1]).frames)
    assert three.count == 3 and torch.equal(three.results[2].video_latent, direct.video_latent)
    # extend's seed is the clip's next one and the settings are the previous window's: the storyboard's window 2
    assert torch.equal(three.results[2].video_latent, made.results[2].video_latent)
    assert three.results[2].settings["window"] == made.results[2].settings["window"]


def test_lip_sync_windows_carry_the_track_and_its_cut(engine, tmp_path, monkeypatch):
    plan = plan_clip(VARIANT, duration=7.0, overlap=1.0, seed=5)
    track = _track(plan.samples)
    windows = generate_windows(engine, PROMPTS[0], plan=plan, audio_track=track, **GEN)
    made = generate_clip(engine, PROMPTS[0], tmp_path / "lips.mp4", plan=plan, audio_track=track, **GEN)
    for a, b in zip(made.results, windows.results):
        assert torch.equal(a.video_latent, b.video_latent) and torch.equal(a.audio_latent, b.audio_latent)
    assert (windows.count, windows.frames, windows.samples) == (2, 168, 112000)
    assert torch.equal(windows.track, track)
    path = write_clip(engine, windows, tmp_path / "w.mp4")
    info = probe_mp4(path)
    assert (info["video"]["frames"], info["audio"]["samples"]) == (168, 112000)
    assert np.array_equal(read_frames(path), read_frames(made.path))
    heard, _ = read_audio(path)
    assert np.corrcoef(heard[:112000], track.numpy())[0, 1] > 0.9  # the track itself, through AAC
    decoded = decode_clip(engine, windows)
    assert decoded.frames.shape[0] == 168 and torch.equal(decoded.waveform, track)
    assert torch.equal(decoded.frames, decode_windows(engine, windows.results).frames[:168])
    assert clip_bytes(windows) > decoded.frames.numel() * 4

    # the LATENT and its file hold all of it
    latents = _latents_module(monkeypatch)
    latent = latents.to_latent(windows)
    assert latent["samples"].shape == (2, 48, 31, 2, 2) and latent["ovi_audio"].shape == (2, TOKENS, 20)
    assert latent["ovi"]["clip"] == {"frames": 168, "samples": 112000} and latent["ovi_track"].shape == (1, 112000)
    file = write_latent_file(tmp_path / "lips.safetensors", latent["samples"], latent["ovi_audio"], latent["ovi"],
                             track=latent["ovi_track"])
    parts = read_latent(file)
    assert torch.equal(parts.track, latent["ovi_track"]) and parts.meta == json.loads(json.dumps(latent["ovi"]))
    back = latents.from_latent_windows({"samples": parts.video, "ovi_audio": parts.audio, "ovi": parts.meta,
                                        "ovi_track": parts.track})
    assert back.length == windows.length and torch.equal(back.track, track)
    for a, b in zip(back.results, windows.results):
        assert torch.equal(a.video_latent, b.video_latent) and a.settings == json.loads(json.dumps(b.settings))


def test_multi_window_latent_round_trips(story, tmp_path, monkeypatch):
    _, _, windows, _ = story
    latents = _latents_module(monkeypatch)
    latent = latents.to_latent(windows)
    meta = latent["ovi"]
    assert latent["samples"].shape[0] == 3 and [w["seed"] for w in meta["windows"]] == [r.seed for r in windows.results]
    assert "clip" not in meta and "ovi_track" not in latent
    path = write_latent_file(tmp_path / "story.safetensors", latent["samples"], latent["ovi_audio"], meta)
    video, audio, read_meta = read_latent_file(path)
    back = latents.from_latent_windows({"samples": video, "ovi_audio": audio, "ovi": read_meta})
    assert back.count == 3 and back.length == windows.length
    for a, b in zip(back.results, windows.results):
        assert torch.equal(a.audio_latent, b.audio_latent) and a.prompt == b.prompt and a.seed == b.seed
    with pytest.raises(ValueError, match="3 windows of a long clip"):
        latents.from_latent(latent)


def test_one_window_latent_and_file_are_as_before(story, tmp_path, monkeypatch):
    """One window: the LATENT and its file hold exactly what they held before long clips: the same header (the
    key order inside it is safetensors' own, which varies from call to call) and the same tensor bytes."""
    latents = _latents_module(monkeypatch)
    result = story[2].results[0]
    latent = latents.to_latent(result)
    old_meta = {"variant": result.variant, "seed": int(result.seed), "height": int(result.height),
                "width": int(result.width), "mode": result.mode, "prompt": result.prompt,
                "settings": dict(result.settings)}
    assert set(latent) == {"samples", "ovi_audio", "ovi"} and list(latent["ovi"].items()) == list(old_meta.items())
    assert latents.to_latent(ClipWindows([result]))["ovi"] == latent["ovi"]
    path = write_latent_file(tmp_path / "one.safetensors", latent["samples"], latent["ovi_audio"], latent["ovi"])
    before = save({"samples": result.video_latent[None].float().contiguous(),
                   "ovi_audio": result.audio_latent[None].float().contiguous()},
                  metadata={"ovi.latent": json.dumps(old_meta), "format": "pt"})
    assert _header(path.read_bytes()) == _header(before) and len(path.read_bytes()) == len(before)
    assert path.read_bytes()[-1000:] == before[-1000:]  # the tensor data, at the end of both files


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])


def _bad(latent, **meta_changes):
    meta = {**latent["ovi"], **meta_changes}
    return {**latent, "ovi": meta}


def _window(latent, k, **place):
    meta = json.loads(json.dumps(latent["ovi"]))
    meta["windows"][k]["settings"]["window"].update(place)
    return {**latent, "ovi": meta}


def test_windows_that_are_not_one_clip_are_refused(story, tmp_path, monkeypatch):
    latents = _latents_module(monkeypatch)
    latent = latents.to_latent(story[2])
    meta = latent["ovi"]
    cases = [
        (_bad(latent, windows=meta["windows"][:2]), "video latent must be [2, 48, 31, h, w]"),
        ({**latent, "ovi": {k: v for k, v in meta.items() if k != "windows"}}, "needs their metadata"),
        (_bad(latent, windows="three"), "windows must be a list"),
        (_bad(latent, windows=[meta["windows"][0], 7, meta["windows"][2]]), "window 1's metadata must be an object"),
        (_bad(latent, windows=[meta["windows"][0], {**meta["windows"][1], "seed": -4}, meta["windows"][2]]),
         "window 1 metadata's seed"),
        (_window(latent, 2, index=5), "window 2 does not continue window 1 of the clip: its index is 5"),
        (_window(latent, 1, frame_start=90), "it starts at frame 90, not at 96"),
        (_window(latent, 1, overlap_frames=24), "it shares 24 frames"),
        (_window(latent, 1, known_tokens=31), "its audio tokens start at 125 sharing 31"),
        (_window(latent, 1, known_latent_frames=6), "held as 6 latent frames"),
        (_window(latent, 1, base_seed="x"), "window 1's settings must hold its place"),
        (_bad(latent, clip={"frames": 10}), "clip must be"),
        (_bad(latent, clip={"frames": 10_000, "samples": 100}), "longer than its windows"),
        ({**_bad(latent, clip={"frames": 10, "samples": 100}), "ovi_track": torch.zeros(1, 99)}, "must be [1, 100]"),
        ({**latent, "ovi_track": torch.zeros(1, 100)}, "gives no clip length"),
        ({**_bad(latent, clip={"frames": 10, "samples": 3}), "ovi_track": torch.tensor([[0.0, float("nan"), 0.0]])},
         "ovi_track track holds 1 NaN"),
        ({**latent, "ovi_audio": latent["ovi_audio"][:2]}, "audio latent must be [3, 157, 20]"),
    ]
    for bad, words in cases:
        with pytest.raises(ValueError) as e:
            latents.from_latent_windows(bad)
        assert words in str(e.value), (words, str(e.value))
    # the same checks on a file, naming it
    bad, words = cases[5]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(save({"samples": bad["samples"], "ovi_audio": bad["ovi_audio"]},
                          metadata={"ovi.latent": json.dumps(bad["ovi"])}))
    with pytest.raises(LatentError) as e:
        read_latent_file(path)
    assert str(path) in str(e.value) and words in str(e.value)
