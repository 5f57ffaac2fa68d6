"""The harness against a real ComfyUI (0.3.75 or newer): the pack loads from a symlinked folder under either name
and with optional imports blocked, prompts run over /prompt + /history (images, mp4 with audio, flac), validation errors
come back, /free and /interrupt answer, the tiny checkpoints are where ComfyUI's loaders look, and headless
Chromium loads, runs and photographs graphs in the real frontend. Uses core nodes only."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest
from PIL import Image

from .harness import (AUDIO_MODEL_FOLDER, MIN_COMFYUI, OPTIONAL_IMPORTS, PACK_NAMES, ROOT, ComfyError, ComfyServer,
                      block_imports_shim, combo_options, required_modules, version_tuple)


def _png(width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(tone.tobytes())
    return buf.getvalue()


def _ui_workflow(extra_nodes=()) -> dict:
    """EmptyImage -> SaveImage in the frontend's own (UI) format."""
    nodes = [
        {"id": 1, "type": "EmptyImage", "pos": [60, 120], "size": [315, 130], "flags": {}, "order": 0, "mode": 0,
         "inputs": [], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1], "slot_index": 0}],
         "properties": {"Node name for S&R": "EmptyImage"}, "widgets_values": [64, 64, 1, 0xFF0000]},
        {"id": 2, "type": "SaveImage", "pos": [440, 120], "size": [315, 270], "flags": {}, "order": 1, "mode": 0,
         "inputs": [{"name": "images", "type": "IMAGE", "link": 1}], "outputs": [],
         "properties": {"Node name for S&R": "SaveImage"}, "widgets_values": ["smoke_ui/run"]},
        *extra_nodes]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": 1, "nodes": nodes,
            "links": [[1, 1, 0, 2, 0, "IMAGE"]], "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _check_screenshot(path, min_bytes=20_000, min_colors=64):
    assert path.is_file(), path
    assert path.stat().st_size > min_bytes, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as im:
        assert im.size == (1400, 900)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) >= min_colors, f"{path} has only {len(colors)} colours: a blank page?"


@pytest.mark.parametrize("pack_name", PACK_NAMES)
def test_pack_loads_from_symlinked_folder(pack_name, comfy_server, start_comfy):
    server = comfy_server if pack_name == comfy_server.pack_name else start_comfy(pack_name)
    try:
        assert server.pack_link.is_symlink() and server.pack_link.resolve() == ROOT.resolve()
        assert server.pack_import_problems() == []
        assert f" seconds: {server.pack_link}" in server.log_text()
        info = server.object_info()
        assert {"EmptyImage", "SaveImage", "CreateVideo", "SaveVideo", "SaveAudio", "LoadAudio"} <= info.keys()
        # Whatever the pack registers must not depend on its folder's name.
        assert sorted(server.pack_nodes()) == sorted(comfy_server.pack_nodes())
    finally:
        if server is not comfy_server:
            server.stop()


def test_every_core_node_module_imports(comfy_server):
    # An IMPORT FAILED line for core nodes means requirements-comfy.txt lacks something (torchaudio, kornia...).
    failed = [ln for ln in comfy_server.log_text().splitlines() if "IMPORT FAILED" in ln]
    assert failed == []
    stats = comfy_server.system_stats()
    assert version_tuple(stats["system"]["comfyui_version"]) >= MIN_COMFYUI
    assert [d["type"] for d in stats["devices"]] == ["cpu"]


def test_image_prompt_with_uploaded_input(comfy_server):
    src = _png(32, 24)
    uploaded = comfy_server.upload_image(src, "smoke_upload.png")
    assert (comfy_server.input_dir / "smoke_upload.png").read_bytes() == src
    image_name = uploaded["name"]
    assert image_name in combo_options(comfy_server.object_info("LoadImage")["LoadImage"], "image")
    api = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 24, "batch_size": 2, "color": 0x3366CC}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "smoke/empty"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "smoke/loaded"}},
    }
    result = comfy_server.run_prompt(api)
    assert result.ok, result.summary()
    empty = result.outputs["2"]["images"]
    assert len(empty) == 2
    path = comfy_server.file_path(empty[0])
    with Image.open(path) as im:
        assert im.size == (40, 24) and im.convert("RGB").getpixel((5, 5)) == (0x33, 0x66, 0xCC)
    assert comfy_server.view(empty[0]) == path.read_bytes()
    with Image.open(comfy_server.file_path(result.outputs["4"]["images"][0])) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(Image.open(io.BytesIO(src)).convert("RGB")))


def test_validation_errors_come_back_and_server_goes_on(comfy_server):
    bad = {"1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
           "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    result = comfy_server.run_prompt(bad)
    assert (result.status, result.http_status) == ("rejected", 400)
    errors = result.error["node_errors"]["1"]["errors"]
    assert errors[0]["type"] == "value_smaller_than_min" and errors[0]["details"] == "width"

    unknown = comfy_server.run_prompt({"1": {"class_type": "OviNoSuchNode", "inputs": {}}})
    assert unknown.http_status == 400 and "OviNoSuchNode" in json.dumps(unknown.error)

    bad["1"]["inputs"]["width"] = 8
    assert comfy_server.run_prompt(bad).ok


def test_video_with_audio_through_core_nodes(comfy_server):
    av = pytest.importorskip("av")
    audio_name = comfy_server.add_input(_wav(0.5), "smoke_tone.wav")
    api = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 8, "color": 0x20A040}},
        "2": {"class_type": "LoadAudio", "inputs": {"audio": audio_name}},
        "3": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 16.0, "audio": ["2", 0]}},
        "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "smoke/clip",
                                                    "format": "mp4", "codec": "h264"}},
        "5": {"class_type": "SaveAudio", "inputs": {"audio": ["2", 0], "filename_prefix": "smoke/tone"}},
    }
    result = comfy_server.run_prompt(api)
    assert result.ok, result.summary()
    (video,) = [comfy_server.file_path(e) for e in result.outputs["4"]["images"]]
    assert video.suffix == ".mp4"
    with av.open(str(video)) as box:
        assert [s.type for s in box.streams] in (["video", "audio"], ["audio", "video"])
        vstream = box.streams.video[0]
        assert (vstream.codec_context.name, vstream.width, vstream.height) == ("h264", 64, 48)
        assert sum(1 for _ in box.decode(video=0)) == 8
        assert box.duration / 1e6 == pytest.approx(0.5, abs=0.08)
    (flac,) = [comfy_server.file_path(e) for e in result.outputs["5"]["audio"]]
    assert flac.suffix == ".flac" and flac.stat().st_size > 1000


def test_free_and_interrupt_answer(comfy_server):
    comfy_server.free(unload_models=True, free_memory=True)
    comfy_server.interrupt()
    comfy_server.interrupt("not-a-running-prompt")
    queue = comfy_server.queue()
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
    ok = comfy_server.run_prompt({"1": {"class_type": "EmptyImage",
                                        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7}},
                                  "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    assert ok.ok and ok.files("images")[0]["type"] == "temp", ok.summary()


def test_tiny_checkpoints_are_where_comfy_looks(comfy_server, comfy_models):
    names = {"diffusion_models": ("UNETLoader", "unet_name"), "text_encoders": ("CLIPLoader", "clip_name"),
             "vae": ("VAELoader", "vae_name")}
    for folder, (node, field) in names.items():
        listed = combo_options(comfy_server.object_info(node)[node], field)
        assert set(comfy_models[folder]) - {"google/umt5-xxl/spiece.model"} <= set(listed), (folder, listed)
    assert {"model.safetensors", "model_960x960.safetensors", "model_960x960_10s.safetensors"} \
        <= set(comfy_models["diffusion_models"])
    assert any(n.endswith(".pth") for n in comfy_models["text_encoders"])
    assert any(n.endswith(".pth") for n in comfy_models["vae"])
    assert (comfy_server.models_dir / "text_encoders" / "google" / "umt5-xxl" / "spiece.model").is_file()
    audio = comfy_server.models_dir / AUDIO_MODEL_FOLDER
    assert sorted(p.name for p in audio.iterdir()) == sorted(comfy_models[AUDIO_MODEL_FOLDER])
    assert all((audio / n).stat().st_size > 0 for n in comfy_models[AUDIO_MODEL_FOLDER])


def test_import_blocking_shim(tmp_path):
    assert importlib.util.find_spec("gguf") is not None  # installed here: only the shim can hide it
    shim = block_imports_shim(tmp_path / "shim")
    code = ("import importlib.util, json\n"
            f"names = {OPTIONAL_IMPORTS!r}\n"
            "out = {}\n"
            "for n in names:\n"
            "    try:\n"
            "        __import__(n + '.submodule' if n == 'flash_attn' else n)\n"
            "        out[n] = 'imported'\n"
            "    except ModuleNotFoundError as e:\n"
            "        out[n] = 'blocked' if importlib.util.find_spec(n) is None else 'raised but findable'\n"
            "print(json.dumps(out))\n")
    env = dict(os.environ, PYTHONPATH=str(shim))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {n: "blocked" for n in OPTIONAL_IMPORTS}
    assert "imports blocked: flash_attn,sageattention,gguf" in proc.stderr


def test_server_starts_with_optional_imports_blocked(comfy_server, start_comfy):
    server = start_comfy(PACK_NAMES[0], block_imports=OPTIONAL_IMPORTS)
    try:
        assert "[ovi-test] imports blocked: flash_attn,sageattention,gguf" in server.log_text()
        assert server.pack_import_problems() == []
        assert sorted(server.pack_nodes()) == sorted(comfy_server.pack_nodes())
    finally:
        server.stop()


def test_browser_default_graph(comfy_server, browser, artifacts_dir):
    shot = artifacts_dir / "default_graph.png"
    summary = browser(comfy_server.url, shot)
    # the frontend served is at least the one this core asks for (each tree pins its own)
    required = comfy_server.system_stats()["system"].get("required_frontend_version")
    assert summary["ok"] and summary["frontend_version"]
    if required:
        assert version_tuple(summary["frontend_version"]) >= version_tuple(required), (summary["frontend_version"],
                                                                                       required)
    # the frontend's own default text-to-image graph: 1.32.x loads a checkpoint, 1.49.x the model, CLIP and VAE
    # files separately
    types = set(summary["node_types"])
    assert {"KSampler", "SaveImage"} <= types, types
    assert {"CheckpointLoaderSimple"} <= types or {"UNETLoader", "CLIPLoader", "VAELoader"} <= types, types
    assert summary["missing_node_types"] == []
    _check_screenshot(shot)


def test_browser_reports_missing_node_types(comfy_server, browser, artifacts_dir):
    ghost = {"id": 3, "type": "OviTestNoSuchNode", "pos": [60, 420], "size": [315, 80], "flags": {}, "order": 2,
             "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": []}
    summary = browser(comfy_server.url, artifacts_dir / "missing_node.png", workflow=_ui_workflow([ghost]))
    assert summary["workflow_format"] == "ui" and summary["node_count"] == 3
    assert summary["missing_node_types"] == ["OviTestNoSuchNode"]
    # frontend 1.32.x: a dialog "This workflow has missing nodes"; 1.40 and newer: the error overlay card
    # "Missing node: OviTestNoSuchNode" (browser.js reports both as dialogs)
    assert any("missing node" in d.lower() for d in summary["dialogs"]), summary["dialogs"]


def test_browser_queues_ui_workflow(comfy_server, browser, artifacts_dir):
    shot = artifacts_dir / "ui_run.png"
    summary = browser(comfy_server.url, shot, workflow=_ui_workflow(), run=True, fit=True)
    assert summary["missing_node_types"] == [] and summary["fit"] is True
    prompt = summary["prompt"]
    assert prompt["status"] == "success", prompt
    (image,) = prompt["outputs"]["2"]["images"]
    with Image.open(comfy_server.file_path(image)) as im:
        assert im.size == (64, 64) and im.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert prompt["ui_shows_images"] is True
    _check_screenshot(shot)


def test_start_failure_reports_exit_and_log(tmp_path):
    fake = tmp_path / "fake_comfy"
    fake.mkdir()
    (fake / "main.py").write_text("import sys\nprint('simulated crash before listening')\nsys.exit(3)\n")
    server = ComfyServer(tmp_path / "base", comfy_dir=fake, python=sys.executable)
    with pytest.raises(ComfyError, match=r"(?s)exited with code 3.*simulated crash before listening"):
        server.start()
    assert not server.alive


def test_pack_import_failure_is_detected_from_the_log(tmp_path):
    server = ComfyServer(tmp_path, pack_name="comfyui-ovi")
    link = server.pack_link
    server.log_path.write_text(f"Import times for custom nodes:\n   0.0 seconds: {link}\n")
    assert server.pack_import_problems() == []
    server.log_path.write_text(f"Traceback ...\nCannot import {link} module for custom nodes: boom\n"
                               f"Import times for custom nodes:\n   0.1 seconds (IMPORT FAILED): {link}\n")
    assert len(server.pack_import_problems()) == 2
    server.log_path.write_text("Import times for custom nodes:\n   0.0 seconds: /elsewhere/custom_nodes/other\n")
    assert "not loaded at all" in server.pack_import_problems()[0]


def test_versions_compare_as_numbers_and_newer_trees_need_their_modules(tmp_path):
    assert version_tuple("0.33.0") > version_tuple("0.3.75") >= MIN_COMFYUI
    assert version_tuple("1.49.6") > version_tuple("1.32.9") and version_tuple("v1.40.0rc2") == (1, 40, 0)
    with pytest.raises(ValueError):
        version_tuple("nightly")
    (tmp_path / "requirements.txt").write_text("torch\ncomfy-aimdo==0.4.13\nsimpleeval>=1.0.0\n#blake3\n"
                                               "filelock ; python_version >= '3.9'\n")
    assert required_modules(tmp_path)[-3:] == ("comfy_aimdo", "simpleeval", "filelock")
    assert "blake3" not in required_modules(tmp_path)  # commented out
    assert "comfy_aimdo" not in required_modules(tmp_path / "no_such_tree")
