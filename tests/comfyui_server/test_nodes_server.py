"""The Ovi nodes inside a real ComfyUI 0.3.75 server, over its HTTP API: /object_info, every shipped API workflow
on the tiny checkpoint, latents saved and decoded again, the errors users can run into, the interrupt button,
and /free releasing the engine through ComfyUI's model management."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .harness import PromptResult, combo_options
from .nodes_helpers import (API_WORKFLOWS, NODES, Progress, check_clip, clip_length, decoding_node, error_text, graph,
                            load_workflow, log_match, output_videos, png, silent_mp4, tiny_api, variant_of, wav,
                            write_fp8_fusion, write_gguf, write_kj_split)

WORKFLOW_AUDIO_S = 3.0  # the voice the lip-sync workflow loads
WORKFLOW_VIDEO_S = 2.0  # the silent video the soundtrack workflow loads (30 fps)

# -- the node interface ------------------------------------------------------------------------------------
def test_object_info_lists_every_node_from_this_pack(comfy_server, comfy_models):
    ours = comfy_server.pack_nodes()
    assert sorted(ours) == sorted(NODES)
    for name, (required, optional, outputs) in NODES.items():
        info = ours[name]
        assert info["python_module"] == f"custom_nodes.{comfy_server.pack_name}"
        assert info["category"] == "Ovi" and info["description"], name
        assert list(info["input"]["required"]) == required, name
        assert list(info["input"].get("optional", {})) == optional, name
        assert info["output"] == outputs, name
        assert info["output_node"] == (name in ("OviSaveLatent", "OviSaveVideo", "OviConvertModel")), name

    engine = ours["OviEngineLoader"]
    fusion = combo_options(engine, "model")
    assert {"model.safetensors", "model_960x960.safetensors", "model_960x960_10s.safetensors"} <= set(fusion)
    assert combo_options(engine, "variant") == ["auto", "720x720_5s", "960x960_5s", "960x960_10s"]
    assert combo_options(engine, "memory_mode") == ["auto", "all_gpu", "offload", "block_swap"]
    assert combo_options(engine, "attention") == ["auto", "sdpa", "flash_attn", "sage"]
    comp = ours["OviComponentLoader"]
    assert set(combo_options(comp, "text_encoder")) == {"umt5_xxl_fp16.safetensors", "models_t5_umt5-xxl-enc-bf16.pth",
                                                       "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                                       "umt5-xxl-encoder-Q8_0.gguf"}
    assert combo_options(comp, "video_vae")[0] == "wan2.2_vae.safetensors"  # the Wan2.2 file is the default
    assert combo_options(comp, "audio_vae")[0] == "v1-16.pth" and combo_options(comp, "vocoder")[0] == "best_netG.pt"
    sampler = ours["OviSampler"]["input"]["required"]
    assert sampler["width"][1]["step"] == 32 and sampler["height"][1]["step"] == 32
    assert combo_options(ours["OviSampler"], "solver") == ["unipc", "euler", "dpm++"]


def test_folders_registered_without_disturbing_other_folders(comfy_server, comfy_models, tmp_path):
    probe = write_gguf(tmp_path / "ovi_probe.gguf", ("video_model.blocks.0.self_attn.q.weight",))
    placed = [comfy_server.models_dir / d / "ovi_probe.gguf" for d in ("diffusion_models", "text_encoders",
                                                                        "checkpoints", "loras")]
    try:
        for p in placed:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.symlink_to(probe)
        info = comfy_server.object_info()
        # .gguf joins the fusion-model and text-encoder lists (ours and core's) ...
        assert "ovi_probe.gguf" in combo_options(info["OviEngineLoader"], "model")
        assert "ovi_probe.gguf" in combo_options(info["UNETLoader"], "unet_name")
        assert "ovi_probe.gguf" in combo_options(info["OviComponentLoader"], "text_encoder")
        # ... and nowhere else: folder_paths shares one extension set between many folders.
        assert "ovi_probe.gguf" not in combo_options(info["CheckpointLoaderSimple"], "ckpt_name")
        assert "ovi_probe.gguf" not in combo_options(info["LoraLoader"], "lora_name")
    finally:
        for p in placed:
            p.unlink(missing_ok=True)
    audio = sorted(p.name for p in (comfy_server.models_dir / "mmaudio").iterdir())
    assert sorted(combo_options(info["OviComponentLoader"], "audio_vae")) == audio


# -- the shipped workflows ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", API_WORKFLOWS)
def test_api_workflow_runs_on_tiny_checkpoint(name, comfy_server, comfy_models, tmp_path):
    tag = f"wf{int(time.time() * 1000) % 10**8}"
    image = comfy_server.upload_image(png(80, 56), f"{tag}_first_frame.png")["name"]
    # the lip-sync and soundtrack workflows' media: short, so each makes one window
    audio = comfy_server.upload_image(wav(WORKFLOW_AUDIO_S), f"{tag}_voice.wav")["name"]
    mp4 = silent_mp4(tmp_path / f"{tag}_silent.mp4", WORKFLOW_VIDEO_S)
    video = comfy_server.upload_image(mp4.read_bytes(), mp4.name)["name"]
    api = tiny_api(load_workflow(name), comfy_models, tag, image=image, audio=audio, video=video)
    variant = variant_of(api)
    frames, samples = clip_length(api, variant, WORKFLOW_AUDIO_S, round(WORKFLOW_VIDEO_S * 24))
    with Progress(comfy_server) as progress:
        status, body = comfy_server.queue_prompt(api, client_id=progress.client_id)
        assert status == 200, body
        pid = body["prompt_id"]
        entry = comfy_server.wait_for(pid)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[:4000]
        progress.wait_done(pid)  # every progress message and preview of the prompt has arrived
    videos = output_videos(comfy_server, PromptResult("success", pid, outputs=entry["outputs"]))
    assert videos, entry["outputs"]
    for path in videos.values():
        assert tag in path.name
        check_clip(path, variant, frames=frames, samples=samples)

    # ComfyUI's progress bar moved once per denoising step, then through the decoded latent frames.
    sampler_steps = progress.steps("3", pid)
    assert [v for v, _ in sampler_steps] == [1, 2] and {m for _, m in sampler_steps} == {2}, sampler_steps
    assert progress.previews >= 2  # a latent preview image with every denoising step
    decoded = progress.steps(decoding_node(api), pid)
    assert decoded[-1][0] == decoded[-1][1] > 1, decoded

    for node_id, out in entry["outputs"].items():
        for saved in out.get("latents", []):
            with safe_open(str(comfy_server.file_path(saved)), "pt") as f:
                meta = json.loads(f.metadata()["ovi.latent"])
                assert meta["variant"] == variant and (meta["width"], meta["height"]) == (96, 64)
                assert f.get_slice("ovi_audio").get_shape()[1] == {"720x720_5s": 157}.get(variant, 314)
                assert f.get_slice("samples").get_shape()[:3] == [1, 48, 31 if variant != "960x960_10s" else 61]


def test_latent_saved_then_loaded_decodes_to_the_same_frames(comfy_server, comfy_models):
    from ovi.video_io import read_frames

    tag = f"rt{int(time.time() * 1000) % 10**8}"
    first = graph(tag)
    first["6"] = {"class_type": "OviSaveLatent", "inputs": {"latent": ["3", 0], "filename_prefix": f"latents/{tag}"}}
    result = comfy_server.run_prompt(first)
    assert result.ok, result.summary()
    (saved,) = result.outputs["6"]["latents"]
    listed = combo_options(comfy_server.object_info("OviLoadLatent")["OviLoadLatent"], "latent")
    name = f"latents/{saved['filename']} [output]"
    assert name in listed, listed

    save = {**first["5"], "inputs": {**first["5"]["inputs"], "filename_prefix": f"nodes/{tag}b"}}
    again = {"1": first["1"], "2": first["2"], "3": {"class_type": "OviLoadLatent", "inputs": {"latent": name}},
             "4": first["4"], "5": save}
    reloaded = comfy_server.run_prompt(again)
    assert reloaded.ok, reloaded.summary()
    a, b = output_videos(comfy_server, result)["5"], output_videos(comfy_server, reloaded)["5"]
    check_clip(b, "720x720_5s")
    assert (read_frames(a) == read_frames(b)).all()


# -- errors the user can run into ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wrong_files(comfy_server, comfy_models, tiny_checkpoints):
    """Files of the kinds the loaders must refuse, placed where the loaders list them."""
    models = comfy_server.models_dir
    made = {
        "fp8": write_fp8_fusion(tiny_checkpoints / "Ovi" / "model.safetensors",
                                models / "diffusion_models" / "ovi_test_fp8_e4m3fn.safetensors"),
        "wan21_vae": models / "vae" / "wan_2.1_vae.safetensors",
    }
    # Wan2.1's VAE: the same key names as Wan2.2's, a 16-channel latent
    save_file({"decoder.middle.0.residual.0.gamma": torch.ones(8, 1, 1, 1),
               "conv2.weight": torch.zeros(16, 16, 1, 1, 1)}, str(made["wan21_vae"]))
    links = {"te_as_fusion": (models / "diffusion_models" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                              tiny_checkpoints / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
             "fusion_as_vae": (models / "vae" / "ovi_fusion_in_vae.safetensors",
                               tiny_checkpoints / "Ovi" / "model.safetensors"),
             "gguf_te_as_fusion": (models / "diffusion_models" / "umt5_as_fusion-Q8_0.gguf",
                                   tiny_checkpoints / "text_encoders" / "umt5-xxl-encoder-Q8_0.gguf"),
             "gguf_fusion_as_te": (models / "text_encoders" / "ovi_fusion_in_te-Q4_K.gguf",
                                   tiny_checkpoints / "Ovi" / "Ovi-960x960-10s-Q4_K.gguf")}
    for _, (link, target) in links.items():
        link.symlink_to(target)
    yield {**{k: p.name for k, p in made.items()}, **{k: link.name for k, (link, _) in links.items()}}
    for p in [*made.values(), *(link for link, _ in links.values())]:
        p.unlink(missing_ok=True)


BAD = {
    # case: (graph changes, where it fails ("rejected" at /prompt or the failing node type), words the message has)
    "missing_model_file": (dict(model="ovi_missing.safetensors"), "rejected", ["ovi_missing.safetensors", "model"]),
    "missing_component_file": (dict(components={"video_vae": "gone_vae.safetensors"}), "rejected",
                               ["gone_vae.safetensors", "video_vae"]),
    "gguf_text_encoder_as_fusion": (dict(model="gguf_te_as_fusion"), "OviEngineLoader",
                                    ["umt5_as_fusion-Q8_0.gguf", "umT5 text encoder", "not an Ovi fusion model"]),
    "gguf_fusion_as_text_encoder": (dict(components={"text_encoder": "gguf_fusion_as_te"}), "OviComponentLoader",
                                    ["ovi_fusion_in_te-Q4_K.gguf", "umT5-XXL text encoder", "Ovi fusion model"]),
    "fp8_text_encoder_as_fusion": (dict(model="te_as_fusion"), "OviEngineLoader",
                                   ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "umT5 text encoder",
                                    "not an Ovi fusion model"]),
    "fusion_as_vae": (dict(components={"video_vae": "fusion_as_vae"}), "OviComponentLoader",
                      ["ovi_fusion_in_vae.safetensors", "Wan2.2 video VAE", "Ovi fusion model"]),
    "wan21_vae": (dict(components={"video_vae": "wan21_vae"}), "OviComponentLoader",
                  ["wan_2.1_vae.safetensors", "16-channel", "Wan2.2 VAE"]),
    "size_not_multiple_of_32": (dict(sampler={"width": 100}), "OviSampler", ["width 100", "multiples of 32"]),
    "empty_prompt": (dict(sampler={"prompt": "  \n "}), "OviSampler", ["prompt is empty"]),
    "unknown_attention_backend_choice": (dict(engine={"attention": "xformers"}), "rejected", ["xformers", "attention"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_comes_back_as_comfy_error(case, comfy_server, comfy_models, wrong_files):
    changes, where, words = BAD[case]
    changes = {k: ({kk: wrong_files.get(vv, vv) for kk, vv in v.items()} if isinstance(v, dict)
                   else wrong_files.get(v, v)) for k, v in changes.items()}
    result = comfy_server.run_prompt(graph(f"bad_{case}", decode=False, **changes))
    text = error_text(result)
    if where == "rejected":
        assert (result.status, result.http_status) == ("rejected", 400), result.summary()
    else:
        assert result.status == "error", result.summary()
        assert result.error["node_type"] == where, text
    for word in words:
        assert word in text, f"{word!r} not in: {text}"


def test_plain_fp8_fusion_file_runs(comfy_server, comfy_models, wrong_files):
    # official layout (model_fp8_e4m3fn.safetensors): e4m3fn casts, no scales; the workflows cover the scaled one
    result = comfy_server.run_prompt(graph("fp8_plain", model=wrong_files["fp8"], sampler={"seed": 31}))
    assert result.ok, result.summary()
    check_clip(output_videos(comfy_server, result)["5"], "720x720_5s")


@pytest.mark.parametrize("source, target, out, kind", [
    ("diffusion_models/model.safetensors", "gguf-q8_0", "ovi_converted_q8.gguf", "Q8_0"),
    ("diffusion_models/model.safetensors", "fp8", "", "fp8_e4m3fn, per-tensor scales"),
    ("text_encoders/umt5_xxl_fp16.safetensors", "gguf-q4_k", "umt5_converted_q4", "Q4_K"),
])
def test_convert_node_writes_a_file_the_loader_lists_and_runs(source, target, out, kind, comfy_server, comfy_models):
    from ovi.detect import inspect_file

    folder, _, name = source.partition("/")
    node = "OviConvertModel"
    assert source in combo_options(comfy_server.object_info(node)[node], "source")
    with Progress(comfy_server) as progress:
        status, body = comfy_server.queue_prompt({"1": {"class_type": node, "inputs": {
            "source": source, "target": target, "output_name": out}}}, client_id=progress.client_id)
        assert status == 200, body
        entry = comfy_server.wait_for(body["prompt_id"])
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[:4000]
        # the history entry comes before the websocket has delivered the last progress messages
        progress.wait_done(body["prompt_id"])
        steps = progress.steps("1", body["prompt_id"])
    (written,) = entry["outputs"]["1"]["text"]
    expected = out or "model_fp8_e4m3fn_scaled.safetensors"
    assert written in (expected, expected + ".gguf"), written
    path = comfy_server.models_dir / folder / written
    try:
        assert steps and steps[-1][0] == steps[-1][1] > 1, steps  # the progress bar went tensor by tensor
        info = inspect_file(path)
        # the tiny umT5's rows are shorter than a K-quant block, so its matrices fall back to Q8_0; the header
        # still records what was asked for
        assert kind in (info.quantization or "") or info.metadata.get("ovi.quantization") == kind, info
        info_src = comfy_server.object_info()
        if folder == "diffusion_models":
            assert info.is_fusion and info.variant == "720x720_5s", info
            assert written in combo_options(info_src["OviEngineLoader"], "model")
            api = graph(f"conv_{target}", model=written, decode=False, sampler={"seed": 41})
        else:
            assert info.component == "umt5", info
            assert written in combo_options(info_src["OviComponentLoader"], "text_encoder")
            api = graph(f"conv_{target}", components={"text_encoder": written}, decode=False, sampler={"seed": 41})
        result = comfy_server.run_prompt(api)
        assert result.ok, result.summary()
        assert result.outputs["5"]["latents"]
        # a second run does not overwrite the file it made
        again = comfy_server.run_prompt({"1": {"class_type": node, "inputs": {
            "source": source, "target": target, "output_name": written}}})
        assert again.status == "error" and "already exists" in error_text(again), again.summary()
    finally:
        path.unlink(missing_ok=True)


def test_split_fp8_pack_loads_and_converts_from_either_half(comfy_server, comfy_models, tiny_checkpoints):
    """Kijai's split FP8 pack (video and audio files): the loader takes either file and reads its partner from
    beside it, the convert node turns either into one GGUF model, and a lone half is refused by name."""
    from ovi.detect import inspect_file

    folder = comfy_server.models_dir / "diffusion_models"
    video, audio = write_kj_split(tiny_checkpoints / "Ovi" / "model.safetensors", folder)
    converted = folder / "ovi_split_q8.gguf"
    try:
        loaders = comfy_server.object_info()["OviEngineLoader"]
        assert {video.name, audio.name} <= set(combo_options(loaders, "model"))
        latents = []
        for half in (video, audio):
            result = comfy_server.run_prompt(graph(f"split_{half.stem}", model=half.name, decode=False,
                                                   sampler={"seed": 43}))
            assert result.ok, result.summary()
            latents.append(result.outputs["5"]["latents"])
        result = comfy_server.run_prompt({"1": {"class_type": "OviConvertModel", "inputs": {
            "source": f"diffusion_models/{audio.name}", "target": "gguf-q8_0", "output_name": converted.name}}})
        assert result.ok, result.summary()
        info = inspect_file(converted)
        assert (info.component, info.variant, info.quantization) == ("fusion", "720x720_5s", "Q8_0"), info
        video.unlink()
        result = comfy_server.run_prompt(graph("split_lonely", model=audio.name, decode=False))
        assert result.status == "error", result.summary()
        assert "video branch must sit beside it" in error_text(result) and video.name in error_text(result)
    finally:
        for p in (video, audio, converted):
            p.unlink(missing_ok=True)


def test_interrupt_stops_within_a_step(comfy_server, comfy_models):
    api = graph("interrupt", decode=False, sampler={"steps": 400, "seed": 11})
    with Progress(comfy_server) as progress:
        status, body = comfy_server.queue_prompt(api, client_id=progress.client_id)
        assert status == 200, body
        pid = body["prompt_id"]
        progress.wait_for(lambda: len(progress.steps("3", pid)) >= 2)
        comfy_server.interrupt()
        t0 = time.monotonic()
        entry = comfy_server.wait_for(pid)
        stopped_after = time.monotonic() - t0
    messages = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in messages and entry["status"]["status_str"] == "error", messages
    (info,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"]
    assert info["node_type"] == "OviSampler"
    done = progress.steps("3", pid)
    assert done[-1][0] < 400 and done[-1][1] == 400, done
    # one tiny step takes well under a second even on a loaded CI machine; the run did not go on
    assert stopped_after < 20, stopped_after


def test_server_runs_a_good_prompt_after_the_errors(comfy_server, comfy_models):
    result = comfy_server.run_prompt(graph("after_errors", sampler={"seed": 12}))
    assert result.ok, result.summary()
    check_clip(output_videos(comfy_server, result)["5"], "720x720_5s")


# -- memory: /free through ComfyUI's model management -----------------------------------------------------------
def test_free_releases_the_engine_through_model_management(comfy_server, comfy_models):
    # offload keeps host copies of the components after a run, so the engine holds weights to release
    api = graph("free", decode=False, engine={"memory_mode": "offload"}, sampler={"seed": 21})
    mark = len(comfy_server.log_text())
    assert comfy_server.run_prompt(api).ok
    log = comfy_server.log_text()[mark:]
    assert "Requested to load OviEngineModel" in log  # registered with comfy.model_management.load_models_gpu

    mark = len(comfy_server.log_text())
    comfy_server.free(unload_models=True, free_memory=False)  # returns once the server has acted on it
    m = log_match(comfy_server, r"ComfyUI unloaded models; released (\S+ \S+) of weights \((\S+ \S+) held before, "
                                r"(\S+ \S+) still held\)", mark)
    assert m.group(2) != "0 B" and m.group(1) == m.group(2) and m.group(3) == "0 B", m.group(0)

    # ComfyUI dropped it from its loaded-model list: the next run registers it again and reloads from the files
    api["3"]["inputs"]["seed"] = 22
    mark = len(comfy_server.log_text())
    assert comfy_server.run_prompt(api).ok
    log = comfy_server.log_text()[mark:]
    assert "Requested to load OviEngineModel" in log and "host copy loaded from its file" in log

    # free_memory also empties ComfyUI's node cache, the engine's only owner: once the server has handled the
    # flag (free() waits for that), the engine is gone, collected by the gc.collect() that follows the flag
    mark = len(comfy_server.log_text())
    comfy_server.free(unload_models=True, free_memory=True)
    log_match(comfy_server, r"engine freed \(garbage-collected\)", mark)
