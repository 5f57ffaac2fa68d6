"""Long clips through a real ComfyUI 0.3.75 server over /prompt, on the tiny checkpoint: the shipped storyboard
(sampler -> Ovi Extend -> Ovi Extend -> Ovi Save Video from the latent) as one mp4 of 3 windows, a 4-window clip
(Extend x3, about 17 s) saved and loaded as one multi-window latent, lip-sync from an uploaded audio file (its
own samples as the soundtrack) and a soundtrack for an uploaded silent video, each long enough for two windows;
Ovi Decode on a long clip's latent saying what it takes; the errors a user can make with the new inputs."""

from __future__ import annotations

import time

import numpy as np

from .harness import PromptResult, combo_options
from .nodes_helpers import (Progress, check_clip, error_text, load_workflow, log_match, output_videos, png,
                            silent_mp4, tiny_api, wav)

VARIANT = "720x720_5s"
STORYBOARD = "ovi_storyboard_3_windows_720x720_5s_api.json"
# windows of 121 frames / 157 tokens sharing 1 s (25 frames, 32 tokens): each later window adds 96 frames, 125 tokens
FRAMES_3, SAMPLES_3 = 121 + 2 * 96, (157 + 2 * 125) * 512   # 313 frames (13.04 s)
FRAMES_4, SAMPLES_4 = 121 + 3 * 96, (157 + 3 * 125) * 512   # 409 frames (17.04 s)
STORY_SEED = 7  # not the shipped workflow's seed, so no node's output is cached from the workflow test
VOICE_S = 7.0  # the uploaded voice: two 5 s windows, cut to 7 s
VIDEO_S = 6.0  # the uploaded silent video (30 fps): 144 frames at 24 fps, two windows


def _tag(kind: str) -> str:
    return f"{kind}{int(time.time() * 1000) % 10**8}"


def _storyboard(comfy_models, tag: str) -> dict:
    api = tiny_api(load_workflow(STORYBOARD), comfy_models, tag)
    api["3"]["inputs"]["seed"] = STORY_SEED
    return api


def _run_watched(server, api: dict) -> tuple[PromptResult, Progress]:
    """Run a prompt queued with a websocket listener's client id: its result, and every progress message it sent."""
    with Progress(server) as progress:
        status, body = server.queue_prompt(api, client_id=progress.client_id)
        assert status == 200, body
        pid = body["prompt_id"]
        entry = server.wait_for(pid)
        progress.wait_done(pid)
    messages = [list(m) for m in entry["status"].get("messages", [])]
    error = next((m[1] for m in messages if m[0] == "execution_error"), None)
    return PromptResult(entry["status"]["status_str"], pid, outputs=entry["outputs"], messages=messages,
                        error=error), progress


def test_storyboard_is_one_mp4_of_3_windows(comfy_server, comfy_models):
    from ovi.video_io import read_frames

    tag = _tag("sb")
    api = _storyboard(comfy_models, tag)
    # Ovi Decode on the same latent: the whole clip in memory, stitched as Save Video writes it
    api["10"] = {"class_type": "OviDecode", "inputs": {"engine": ["2", 0], "latent": ["5", 0], "tile_size": 0,
                                                        "tile_overlap": 8, "vae_precision": "auto"}}
    api["11"] = {"class_type": "OviSaveVideo", "inputs": {"images": ["10", 0], "audio": ["10", 1], "fps": ["10", 2],
                                                          "filename_prefix": f"long/{tag}_decoded", "crf": 18}}
    start = len(comfy_server.log_text())
    result, progress = _run_watched(comfy_server, api)
    assert result.ok, result.summary()
    videos = output_videos(comfy_server, result)
    info = check_clip(videos["6"], VARIANT, frames=FRAMES_3, samples=SAMPLES_3)
    assert abs(info["video"]["duration"] - 313 / 24) < 0.05
    check_clip(videos["11"], VARIANT, frames=FRAMES_3, samples=SAMPLES_3)
    assert np.array_equal(read_frames(videos["6"]), read_frames(videos["11"]))
    # the memory a whole decode takes is said before it starts
    m = log_match(comfy_server, r"decoding 3 windows \(313 frames at 96x64, 13\.02 s\) into one IMAGE batch: "
                                r"([0-9.]+) GB", start)
    assert float(m.group(1)) > 0
    # each Ovi Extend ran its own 2 denoising steps, Save Video decoded the windows one after another
    for node in ("3", "4", "5"):
        assert [v for v, _ in progress.steps(node, result.prompt_id)] == [1, 2], node
    written = progress.steps("6", result.prompt_id)
    assert written[-1][0] == written[-1][1] == 3 * 31, written


def test_four_window_clip_saved_and_loaded_as_one_latent(comfy_server, comfy_models):
    from ovi.video_io import read_frames

    tag = _tag("w4")
    api = _storyboard(comfy_models, tag)
    api["7"] = {"class_type": "OviExtend", "inputs": {
        **api["5"]["inputs"], "latent": ["5", 0],
        "prompt": "The boat ties up at the pier and the keeper waves. Audio: rope creaking, gulls, calm water."}}
    api["6"]["inputs"]["latent"] = ["7", 0]
    api["8"] = {"class_type": "OviSaveLatent", "inputs": {"latent": ["7", 0], "filename_prefix": f"latents/{tag}"}}
    result = comfy_server.run_prompt(api)
    assert result.ok, result.summary()
    clip = output_videos(comfy_server, result)["6"]
    info = check_clip(clip, VARIANT, frames=FRAMES_4, samples=SAMPLES_4)
    assert 17.0 <= info["video"]["duration"] <= 17.1 and 17.0 <= info["audio"]["duration"] <= 17.1

    # the 4-window latent file round-trips through Ovi Load Latent to the same mp4 frames
    (saved,) = result.outputs["8"]["latents"]
    name = f"latents/{saved['filename']} [output]"
    assert name in combo_options(comfy_server.object_info("OviLoadLatent")["OviLoadLatent"], "latent")
    again = {"1": api["1"], "2": api["2"], "3": {"class_type": "OviLoadLatent", "inputs": {"latent": name}},
             "6": {"class_type": "OviSaveVideo", "inputs": {**api["6"]["inputs"], "latent": ["3", 0],
                                                            "filename_prefix": f"long/{tag}_reloaded"}}}
    reloaded = comfy_server.run_prompt(again)
    assert reloaded.ok, reloaded.summary()
    copy = output_videos(comfy_server, reloaded)["6"]
    check_clip(copy, VARIANT, frames=FRAMES_4, samples=SAMPLES_4)
    assert np.array_equal(read_frames(clip), read_frames(copy))


def test_lip_sync_clip_from_an_audio_file(comfy_server, comfy_models):
    from ovi.media import load_audio
    from ovi.video_io import read_audio

    tag = _tag("ls")
    voice = comfy_server.upload_image(wav(VOICE_S), f"{tag}_voice.wav")["name"]
    image = comfy_server.upload_image(png(80, 56), f"{tag}_face.png")["name"]
    api = tiny_api(load_workflow("ovi_lipsync_720x720_5s_api.json"), comfy_models, tag, image=image, audio=voice)
    start = len(comfy_server.log_text())
    result, progress = _run_watched(comfy_server, api)
    assert result.ok, result.summary()
    (clip,) = output_videos(comfy_server, result).values()
    frames, samples = round(VOICE_S * 24), round(VOICE_S * 16000)
    check_clip(clip, VARIANT, frames=frames, samples=samples)
    log_match(comfy_server, r"lip-sync: 7\.00 s of audio -> 2 windows", start)
    # one progress bar over both windows' steps
    assert [v for v, m in progress.steps("3", result.prompt_id)] == [1, 2, 3, 4]
    # the clip's sound is the file's own samples (resampled to 16 kHz mono), not a decode of their latent
    track = load_audio(comfy_server.input_dir / voice).numpy()
    heard, rate = read_audio(clip)
    assert rate == 16000 and abs(heard.shape[0] - samples) <= 1024
    n = min(samples, heard.shape[0])
    assert np.corrcoef(heard[:n], track[:n])[0, 1] > 0.95


def test_soundtrack_clip_from_a_video(comfy_server, comfy_models, tmp_path):
    tag = _tag("st")
    mp4 = silent_mp4(tmp_path / f"{tag}_silent.mp4", VIDEO_S)
    video = comfy_server.upload_image(mp4.read_bytes(), mp4.name)["name"]
    api = tiny_api(load_workflow("ovi_soundtrack_720x720_5s_api.json"), comfy_models, tag, video=video)
    start = len(comfy_server.log_text())
    result = comfy_server.run_prompt(api)
    assert result.ok, result.summary()
    (clip,) = output_videos(comfy_server, result).values()
    frames = round(VIDEO_S * 24)
    check_clip(clip, VARIANT, frames=frames, samples=round(VIDEO_S * 16000))
    # read from its file at 24 fps and resized to the sampler's 96x64 as it was read
    log_match(comfy_server, r"frames 160x120 resized to 96x64", start)
    log_match(comfy_server, rf"soundtrack: {frames} frames at 24 fps \(96x64\) -> 2 windows", start)


def test_long_clip_errors_are_clear(comfy_server, comfy_models):
    tag = _tag("er")
    api = _storyboard(comfy_models, tag)
    voice = comfy_server.upload_image(wav(1.0), f"{tag}_voice.wav")["name"]
    base = {"1": api["1"], "2": api["2"]}
    save = api["6"]["inputs"]
    cases = [
        # Extend on a latent that is not Ovi's
        ({"7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
          "8": {"class_type": "OviExtend", "inputs": {**api["4"]["inputs"], "latent": ["7", 0]}},
          "9": {"class_type": "OviSaveVideo", "inputs": {**save, "latent": ["8", 0]}}},
         "OviExtend", "this LATENT is not an Ovi latent"),
        # Save Video given both images and a latent
        ({"7": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
          "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
          "9": {"class_type": "OviSaveVideo", "inputs": {**save, "latent": ["8", 0], "images": ["7", 0]}}},
         "OviSaveVideo", "connect either images (+ audio), or latent + engine (the clip decoded while it is written); "
                         "got images + latent + engine"),
        # the sampler given a voice and frames at once: nothing would be left to generate
        ({"7": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 8, "color": 0}},
          "8": {"class_type": "LoadAudio", "inputs": {"audio": voice}},
          "9": {"class_type": "OviSampler", "inputs": {**api["3"]["inputs"], "video_frames": ["7", 0],
                                                       "audio": ["8", 0]}},
          "10": {"class_type": "OviSaveVideo", "inputs": {**save, "latent": ["9", 0]}}},
         "OviSampler", "connect one of audio (lip-sync), video or video_frames (soundtrack), not audio and "
                       "video_frames"),
    ]
    for extra, node_type, words in cases:
        result = comfy_server.run_prompt({**base, **extra})
        assert not result.ok, result.summary()
        text = error_text(result)
        assert text.startswith(node_type) and words in text, text
