"""The speed options on the user surfaces: the step cache (``--cache``, the sampler node's ``cache_threshold``) and
torch.compile (``--compile``, the engine loader node's ``compile``), on the tiny checkpoint.

The nodes are imported as ComfyUI imports the pack (a package) with stand-ins for the few ComfyUI modules they
call (``folder_paths``, ``comfy.model_management``, the pack's model-management and progress bridges); the
engine behind them is the real one.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

from ovi import compile as ovi_compile
from ovi.__main__ import main
from ovi.engine import OviEngine

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A chef chops onions in a busy kitchen. Audio: knife on wood, sizzling pans"
# Six steps: 0 and 1 always run (the rate needs two full steps) and so does the last; a threshold far above any
# estimate takes steps 2, 3 and 4 from the cache.
STEPS = 6
HUGE_THRESHOLD = 100.0
CACHED = [2, 3, 4]


# -- command line ----------------------------------------------------------------------------------------
def _generate(tiny_dir, out, *extra):
    return main(["generate", "--models", str(tiny_dir), "--variant", "720x720_5s", "--prompt", PROMPT,
                 "--steps", str(STEPS), "--size", "64x64", "--slg-layer", "1", "--seed", "2", "--out", str(out),
                 *extra])


def test_cli_cache_reports_passes(tiny_dir, tmp_path, capsys):
    assert _generate(tiny_dir, tmp_path / "cached.mp4", "--cache", str(HUGE_THRESHOLD)) == 0
    err = capsys.readouterr().err
    full = STEPS - len(CACHED)
    assert (f"diffusion: {2 * full} model passes run, {2 * len(CACHED)} skipped ({len(CACHED)} steps from the "
            f"step cache)") in err
    assert f"reused {CACHED}" in err  # the sampling loop's own line names the steps
    assert (tmp_path / "cached.mp4").stat().st_size > 0

    assert _generate(tiny_dir, tmp_path / "x.mp4", "--cache", "-1") == 2
    assert "cache threshold must be a finite number >= 0" in capsys.readouterr().err


def test_cli_compile(tiny_dir, tmp_path, capsys):
    ovi_compile.reset()
    assert _generate(tiny_dir, tmp_path / "compiled.mp4", "--compile", "--steps", "2") == 0
    err = capsys.readouterr().err
    assert "torch.compile of the fused layer: on" in err
    # no cache: every pass runs; every layer and pass shares one compiled graph
    assert "diffusion: 4 model passes run, 0 skipped; torch.compile: 1 compile(s), 0 recompile(s)" in err
    assert (tmp_path / "compiled.mp4").stat().st_size > 0


def test_cli_compile_that_cannot_run_is_an_error(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ovi.engine.compile_problem", lambda device: "no C++ compiler (test)")
    assert _generate(tiny_dir, tmp_path / "never.mp4", "--compile") == 1
    err = capsys.readouterr().err
    assert "compile was asked for, but no C++ compiler (test); run without compile" in err
    assert not (tmp_path / "never.mp4").exists()


# -- nodes ----------------------------------------------------------------------------------------------
class _Patcher:
    """Stands in for OviModelPatcher: the OVI_ENGINE value, ``.engine`` the real engine."""

    def __init__(self, engine, label):
        self.engine, self.label = engine, label


@pytest.fixture
def pack(tiny_dir, monkeypatch):
    """The pack's nodes package with ComfyUI's modules stood in for."""
    name = "ovi_pack_under_test"
    pack = types.ModuleType(name)
    pack.__path__ = [str(ROOT)]
    monkeypatch.setitem(sys.modules, name, pack)
    utils = types.ModuleType(f"{name}.utils")
    utils.__path__ = [str(ROOT / "utils")]
    monkeypatch.setitem(sys.modules, f"{name}.utils", utils)

    mm = types.ModuleType(f"{name}.utils.model_management")
    mm.prepare = lambda engine: None
    mm.OviModelPatcher = _Patcher
    monkeypatch.setitem(sys.modules, mm.__name__, mm)
    progress = types.ModuleType(f"{name}.utils.progress")
    progress.interruptible = contextlib.nullcontext
    progress.latent_preview = lambda total: None
    progress.progress_bar = lambda total: (lambda done, total_now: None)
    progress.should_stop = lambda: False
    monkeypatch.setitem(sys.modules, progress.__name__, progress)

    folders = {"diffusion_models": ([str(tiny_dir / "Ovi")], {".safetensors"})}
    fp = types.ModuleType("folder_paths")
    fp.folder_names_and_paths = folders
    fp.get_full_path = lambda key, n: str(Path(folders[key][0][0]) / n) if key in folders else None
    fp.get_filename_list = lambda key: sorted(p.name for p in Path(folders[key][0][0]).iterdir()) if key in folders \
        else []
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    comfy_mm = types.ModuleType("comfy.model_management")
    comfy_mm.get_torch_device = lambda: torch.device("cpu")
    comfy.model_management = comfy_mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy_mm)
    for sub in ("nodes.sampler", "nodes.loaders"):
        monkeypatch.delitem(sys.modules, f"{name}.{sub}", raising=False)
    return types.SimpleNamespace(sampler=importlib.import_module(f"{name}.nodes.sampler"),
                                 loaders=importlib.import_module(f"{name}.nodes.loaders"))


def _components(tiny_dir) -> dict:
    return {"text_encoder": str(tiny_dir / "text_encoders" / "umt5_xxl_fp16.safetensors"),
            "video_vae": str(tiny_dir / "vae" / "wan2.2_vae.safetensors"),
            "audio_vae": str(tiny_dir / "MMAudio" / "ext_weights" / "v1-16.pth"),
            "vocoder": str(tiny_dir / "MMAudio" / "ext_weights" / "best_netG.pt")}


SAMPLER_ARGS = dict(prompt=PROMPT, video_negative_prompt="blur", audio_negative_prompt="muffled", width=64,
                    height=64, seed=2, steps=STEPS, solver="unipc", shift=5.0, video_guidance=4.0,
                    audio_guidance=3.0, slg_layer=1)


def test_sampler_node_cache_threshold(pack, tiny_dir):
    node = pack.sampler.OviSampler
    optional = node.INPUT_TYPES()["optional"]
    assert optional["cache_threshold"][0] == "FLOAT" and optional["cache_threshold"][1]["default"] == 0.0
    assert "cache_threshold" not in node.INPUT_TYPES()["required"]  # workflows saved before it still validate

    engine = OviEngine.from_dir(tiny_dir, variant="720x720_5s")
    value = _Patcher(engine, "tiny")
    (plain,) = node().sample(value, **SAMPLER_ARGS)  # the input left out: off
    (zero,) = node().sample(value, **SAMPLER_ARGS, cache_threshold=0.0)
    (cached,) = node().sample(value, **SAMPLER_ARGS, cache_threshold=HUGE_THRESHOLD)
    want = engine.generate(PROMPT, size=(64, 64), seed=2, steps=STEPS, slg_layer=1, video_negative_prompt="blur",
                           audio_negative_prompt="muffled", cache_threshold=HUGE_THRESHOLD)
    assert want.timings["cached_steps"] == len(CACHED)
    assert torch.equal(plain["samples"], zero["samples"])  # 0 is bit-identical to no cache
    assert torch.equal(cached["samples"][0], want.video_latent) and torch.equal(cached["ovi_audio"][0],
                                                                                 want.audio_latent)
    assert not torch.equal(cached["samples"], plain["samples"])
    assert cached["ovi"]["settings"]["cache_threshold"] == HUGE_THRESHOLD


def test_engine_loader_node_compile(pack, tiny_dir):
    node = pack.loaders.OviEngineLoader
    optional = node.INPUT_TYPES()["optional"]
    assert optional["compile"] == ("BOOLEAN", optional["compile"][1]) and optional["compile"][1]["default"] is False
    args = dict(model="model.safetensors", components=_components(tiny_dir), variant="720x720_5s", precision="auto",
                memory_mode="auto", block_swap_layers=0, attention="auto")
    (plain,) = node().load(**args)
    (compiled,) = node().load(**args, compile=True)
    assert plain.engine.options.compile is False and compiled.engine.options.compile is True
    ovi_compile.reset()
    gen = dict(size=(64, 64), seed=2, steps=2, slg_layer=1)
    got = compiled.engine.generate(PROMPT, **gen)
    want = plain.engine.generate(PROMPT, **gen)
    assert got.timings["layer_compiles"] == 1 and "layer_compiles" not in want.timings
    err = float((got.video_latent - want.video_latent).abs().max()) / float(want.video_latent.abs().max())
    assert err <= 1e-5, err
