"""The Ovi LoRA node inside a real ComfyUI server: the FastWan preset workflow on the tiny checkpoint with a tiny
Wan-convention LoRA under the preset's file name (the mp4, the LoRA applied to the video branch only, the base
engine kept by ComfyUI's cache when only the strength changes, the file read once), and a LoRA that matches
nothing failing the prompt with a message naming it."""

from __future__ import annotations

import re
import time

from .harness import combo_options
from .nodes_helpers import (FASTWAN_LORA, check_clip, error_text, graph, load_workflow, log_match, output_videos,
                            tiny_api)

FASTWAN = "ovi_fastwan_720x720_5s_api.json"
# A tiny LoRA covers the 10 Wan linears of each of the tiny model's 2 blocks (ovi/tools/tiny/lora.py).
TINY_LORA_LAYERS = 20
ENGINE_BUILT = r"\[Ovi\] variant 720x720_5s"  # OviEngine's first log line: a new engine was made


def test_fastwan_workflow_applies_the_lora_and_a_new_strength_reuses_the_engine(comfy_server, comfy_models):
    assert FASTWAN_LORA in combo_options(comfy_server.object_info("OviLora")["OviLora"], "lora_name")
    tag = f"fw{int(time.time() * 1000) % 10**8}"
    api = tiny_api(load_workflow(FASTWAN), comfy_models, tag)
    (lora_node,) = [k for k, n in api.items() if n["class_type"] == "OviLora"]
    (sampler,) = [n for n in api.values() if n["class_type"] == "OviSampler"]
    # the preset: the LoRA on the video branch only, one model pass per step (guidance 1), shift 6
    assert api[lora_node]["inputs"] == {"engine": ["2", 0], "lora_name": FASTWAN_LORA, "strength_video": 1.0,
                                        "strength_audio": 0.0}
    assert (sampler["inputs"]["video_guidance"], sampler["inputs"]["audio_guidance"],
            sampler["inputs"]["shift"]) == (1.0, 1.0, 6.0)
    assert sampler["inputs"]["engine"] == [lora_node, 0]
    mark = len(comfy_server.log_text())
    result = comfy_server.run_prompt(api)
    assert result.ok, result.summary()
    (path,) = output_videos(comfy_server, result).values()
    assert tag in path.name
    check_clip(path, "720x720_5s")
    log_match(comfy_server, re.escape(f"LoRA stack: {FASTWAN_LORA} (video 1, audio 0)"), mark)
    applied = log_match(comfy_server, r"LoRAs applied \(by format, [^)]*\): " + re.escape(FASTWAN_LORA), mark)
    assert f"merged: {TINY_LORA_LAYERS} video, 0 audio" in applied.group(0)

    # Only the strength changes: ComfyUI re-runs the LoRA node and the sampler, keeps the loader's engine, and the
    # engine applies the new strength without reading the file again.
    again = tiny_api(load_workflow(FASTWAN), comfy_models, tag + "b")
    again[lora_node]["inputs"]["strength_video"] = 0.5
    mark2 = len(comfy_server.log_text())
    result = comfy_server.run_prompt(again)
    assert result.ok, result.summary()
    check_clip(next(iter(output_videos(comfy_server, result).values())), "720x720_5s")
    log = comfy_server.log_text()
    assert not re.search(ENGINE_BUILT, log[mark2:]), "a changed LoRA strength built a new engine"
    log_match(comfy_server, r"LoRAs applied \(by format, [^)]*\): " + re.escape(f"{FASTWAN_LORA} (video 0.5"), mark2)
    assert log[mark:].count(f"LoRA {FASTWAN_LORA} read") <= 1  # read once (or earlier, by another test's prompt)
    assert f"LoRA {FASTWAN_LORA} read" not in log[mark2:]


def test_a_lora_that_matches_nothing_fails_the_prompt_naming_it(comfy_server, comfy_models):
    import torch
    from safetensors.torch import save_file

    name = "ovi_test_sdxl_unet_lora.safetensors"
    path = comfy_server.models_dir / "loras" / name
    g = torch.Generator().manual_seed(0)
    unet = {}  # a real LoRA file, for a UNet model (kohya names of SDXL attention projections)
    for stem, width in (("lora_unet_down_blocks_0_attentions_0_proj_in", 320),
                        ("lora_unet_mid_block_attentions_0_proj_out", 1280)):
        unet[f"{stem}.lora_down.weight"] = torch.randn(4, width, generator=g)
        unet[f"{stem}.lora_up.weight"] = torch.randn(width, 4, generator=g)
        unet[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(unet, str(path))
    try:
        tag = f"lx{int(time.time() * 1000) % 10**8}"
        api = graph(tag)
        api["8"] = {"class_type": "OviLora", "inputs": {"engine": ["2", 0], "lora_name": name, "strength_video": 1.0,
                                                        "strength_audio": 1.0}}
        api["3"]["inputs"]["engine"] = ["8", 0]
        result = comfy_server.run_prompt(api)
        assert not result.ok and result.status == "error", result.summary()
        msg = error_text(result)
        assert msg.startswith("OviSampler") and name in msg and "0 matched" in msg and "UNet" in msg, msg
        # the engine is left usable: the same graph without the LoRA runs
        ok = comfy_server.run_prompt(graph(tag + "ok"))
        assert ok.ok, ok.summary()
    finally:
        path.unlink(missing_ok=True)
