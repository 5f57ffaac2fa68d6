"""torch.compile of the fused layer (ovi/compile.py): inductor on the CPU (gcc) against eager, on the plain layer
loop, with SLG, under block swap, with merged LoRA weights and with LoRA side-path hooks, and through the engine.

Float32 tolerance: inductor fuses and reorders the elementwise work, so the compiled layer rounds differently
from eager; on the tiny model the outputs agree to ~1e-6 of their largest value.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from ovi.block_swap import BlockSwapper, _CloneCopier
from ovi import compile as ovi_compile
from ovi.compile import CompiledLayer, compile_problem, use_compiled
from ovi.engine import EngineOptions, OviEngine
from ovi.fusion.checkpoint import load_fusion_model
from ovi.lora import LoraStrength, apply_merged, apply_side_path, load_lora, lora_target_shapes

TOL = 1e-5  # max |compiled - eager| <= TOL * max |eager|
PROMPT = "A drummer plays on a rooftop. Audio: drums and city noise"
GEN = dict(size=(64, 64), steps=2, seed=4, slg_layer=1, video_negative_prompt="blur",
           audio_negative_prompt="muffled")


def _close(got, want) -> None:
    for g, w in zip(got, want):
        assert g.shape == w.shape
        err = float((g - w).abs().max()) / float(w.abs().max())
        assert err <= TOL, err


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts from an empty dynamo cache, whatever ran before in this process (inductor's on-disk
    cache keeps the recompiles quick)."""
    ovi_compile.reset()
    yield
    ovi_compile.reset()


@pytest.fixture
def model(tiny_dir):
    return load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(48, 3, 4, 6, generator=g), torch.randn(9, 20, generator=g), torch.tensor([700]),
            torch.randn(5, 32, generator=g), torch.randn(7, 32, generator=g))


@torch.no_grad()
def _forward(m, slg_layer=0):
    return m(*_inputs(), slg_layer=slg_layer)


def _lora_file(path, num_layers: int):
    """An Ovi LoRA (branch-prefixed Wan names, kohya up/down + alpha) on every layer's video cross-attention
    output and audio FFN input."""
    g = torch.Generator().manual_seed(9)
    t = {}
    for i in range(num_layers):
        for stem, (out, inp) in ((f"video_model.blocks.{i}.cross_attn.o", (256, 256)),
                                 (f"audio_model.blocks.{i}.ffn.0", (288, 256))):
            t[f"{stem}.lora_down.weight"] = 0.3 * torch.randn(4, inp, generator=g)
            t[f"{stem}.lora_up.weight"] = 0.3 * torch.randn(out, 4, generator=g)
            t[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(t, str(path))
    return path


def test_the_compiler_runs_here():
    # CI has gcc: a missing compiler must fail this test, never skip the others.
    assert compile_problem(torch.device("cpu")) is None


def test_compiled_layer_equals_eager_and_compiles_once_for_every_layer(model, caplog):
    want, want_slg = _forward(model), _forward(model, slg_layer=1)
    layer = CompiledLayer()
    use_compiled(model, layer)
    with caplog.at_level(logging.INFO, logger="ovi"):
        got = _forward(model)
    # both fused layers ran the compiled function, and share its one graph
    assert (layer.compiles, layer.recompiles) == (1, 0) and layer.graphs >= 1 and layer.compile_seconds > 0
    assert "torch.compile: fused layer compiled" in caplog.text
    _close(got, want)
    _close(_forward(model, slg_layer=1), want_slg)  # SLG: a skipped layer is simply not called
    _close(_forward(model), want)
    assert layer.compiles == 1  # same shapes again: no recompile
    use_compiled(model, None)
    assert torch.equal(_forward(model)[0], want[0])  # eager again


@pytest.mark.parametrize("resident", [0, 1])
def test_compiled_layer_under_block_swap(model, resident):
    want = _forward(model)
    layer = CompiledLayer()
    use_compiled(model, layer)
    _forward(model)
    compiles = layer.compiles
    swapper = BlockSwapper(model, resident, torch.device("cpu"), copier=_CloneCopier)  # streamed layers: copies
    trace = swapper.trace = []
    try:
        with torch.no_grad():
            got = swapper.forward(*_inputs())
    finally:
        swapper.detach()
    assert {i for op, i in trace if op == "fetch"} == set(range(resident, model.num_layers))
    _close(got, want)
    assert layer.compiles == compiles  # swapped-in copies have the masters' shapes, dtypes and strides


def test_compiled_layer_with_merged_lora_and_side_path(model, tmp_path, caplog):
    base = _forward(model)
    plan = load_lora(_lora_file(tmp_path / "ovi_lora.safetensors", model.num_layers), lora_target_shapes(model))
    strengths = [LoraStrength(video=0.7, audio=1.2)]
    layer = CompiledLayer()

    handle = apply_merged(model, [plan], strengths)
    want_merged = _forward(model)
    use_compiled(model, layer)
    got = _forward(model)
    first = layer.compiles
    assert (first, layer.recompiles) == (1, 0)
    _close(got, want_merged)
    handle.restore()
    _close(_forward(model), base)  # merged weights are graph inputs: the restored ones run the same graph
    assert layer.compiles == first

    handle = apply_side_path(model, [plan], strengths)
    use_compiled(model, None)
    want_side = _forward(model)
    use_compiled(model, layer)
    with caplog.at_level(logging.INFO, logger="ovi"):
        got = _forward(model)
    # the hooks fail the plain graph's guards: one recompile, logged, and the side path is in the output
    assert layer.compiles == first + 1 and layer.recompiles == 1
    assert "torch.compile: fused layer recompiled" in caplog.text
    _close(got, want_side)
    assert float((got[0] - base[0]).abs().max()) > 100 * TOL * float(base[0].abs().max())
    handle.restore()
    _close(_forward(model), base)  # hooks gone: back to the plain graph, compiled already
    assert layer.compiles == first + 1


@pytest.mark.parametrize("mode", ["all_gpu", "block_swap"])
def test_engine_compile_option(tiny_dir, mode):
    kw = dict(variant="720x720_5s", memory_mode=mode)
    if mode == "block_swap":
        kw["block_swapper"] = BlockSwapper(resident=1, copier=_CloneCopier)
    eager = OviEngine.from_dir(tiny_dir, **kw).generate(PROMPT, **GEN)
    if mode == "block_swap":
        kw["block_swapper"] = BlockSwapper(resident=1, copier=_CloneCopier)
    engine = OviEngine.from_dir(tiny_dir, compile=True, **kw)
    first = engine.generate(PROMPT, **GEN)
    _close((first.video_latent, first.audio_latent), (eager.video_latent, eager.audio_latent))
    assert (first.timings["layer_compiles"], first.timings["layer_recompiles"]) == (1, 0)
    second = engine.generate(PROMPT, **GEN)  # the model is released and reloaded between generations
    assert second.timings["layer_compiles"] == 0 and second.timings["layer_recompiles"] == 0
    _close((second.video_latent, second.audio_latent), (eager.video_latent, eager.audio_latent))
    assert "layer_compiles" not in eager.timings


def test_compile_option_is_checked():
    with pytest.raises(ValueError, match="compile must be True or False"):
        EngineOptions(compile="yes")


@pytest.mark.parametrize("mode", ["all_gpu", "block_swap"])
def test_engine_compile_with_a_lora(tiny_dir, tmp_path, mode):
    """The engine's LoRA stack (merged on the device copy; under block swap into each streamed layer's copy as it
    arrives) runs through the compiled layer with no recompile and gives the eager engine's latents."""
    lora = _lora_file(tmp_path / "ovi_lora.safetensors", 2)

    def engine(**kw):
        if mode == "block_swap":
            kw["block_swapper"] = BlockSwapper(resident=1, copier=_CloneCopier)
        e = OviEngine.from_dir(tiny_dir, variant="720x720_5s", memory_mode=mode, **kw)
        e.set_loras([(lora, (0.7, 1.2))])
        return e

    plain = OviEngine.from_dir(tiny_dir, variant="720x720_5s").generate(PROMPT, **GEN)
    eager = engine().generate(PROMPT, **GEN)
    got = engine(compile=True).generate(PROMPT, **GEN)
    assert (got.timings["layer_compiles"], got.timings["layer_recompiles"]) == (1, 0)
    _close((got.video_latent, got.audio_latent), (eager.video_latent, eager.audio_latent))
    assert float((eager.video_latent - plain.video_latent).abs().max()) > 1e-3  # the LoRA does act
