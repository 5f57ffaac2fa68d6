"""LoRAs through the engine (``OviEngine.set_loras``) on the tiny checkpoint set: every key convention gives the
latents of an engine over a checkpoint merged by hand; FP8, GGUF and int8 models stay within their tolerances,
and their side paths are exact on the dequantised weights; removing the LoRA restores the base bit-exactly in
every memory mode; files are read once; block swap merges into the streamed device copies, never the host copy;
the strictness errors reach the caller; ``--lora`` and ``ovi info`` on the command line."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ovi.__main__ import _lora_arg, _parser, main
from ovi.block_swap import BlockSwapper, _CloneCopier
from ovi.convert import convert
from ovi.engine import OviEngine
from ovi.fusion.checkpoint import load_fusion_model
from ovi.lora import LoraError, LoraSidePath, LoraStrength
from ovi.lora import engine_loras
from ovi.quant.fp8 import FP8Linear
from ovi.quant.gguf_load import GGUFLinear
from ovi.quant.int8 import Int8Linear
from ovi.tools.tiny.wan2gp import write_pair

from lora_files import CONVENTIONS, DIM, Lora, V, A, convention, hand_merge

PROMPT = "A man walks on the beach at sunset. Audio: waves crashing and seagulls calling"
# The tiny fusion model has 2 layers, so SLG skips layer 1 (the default 11 would skip nothing).
GEN = dict(size=(64, 64), steps=2, seed=7, slg_layer=1, video_negative_prompt="blur", audio_negative_prompt="muffled")
STRENGTH = LoraStrength(video=0.7, audio=1.3)
# Tolerances of the quantised formats for the tiny model's output (tests/test_fp8.py E2E_TOL, tests/test_gguf.py):
# the LoRA'd quantised model against the float32 model with the LoRA merged by hand.
FP8_TOL, Q8_0_TOL = 0.10, 0.03
# The hand-merged checkpoint holds the merged weights bit for bit, but the reference engine reads them memory-mapped
# from a float32 file (tensors not 64-byte aligned), so the CPU kernels block and round differently: float32
# rounding carried through two sampling steps (seen up to 3e-5 absolute on latents of order 1).
F32 = dict(rtol=1e-4, atol=1e-4)


def _engine(tiny_dir: Path, fusion=None, **kw) -> OviEngine:
    kw.setdefault("memory_mode", "all_gpu")
    return OviEngine.from_dir(tiny_dir, variant="720x720_5s", fusion=fusion, **kw)


def _run(engine: OviEngine) -> tuple[torch.Tensor, torch.Tensor]:
    r = engine.generate(PROMPT, **GEN)
    return r.video_latent, r.audio_latent


def _rel(got, want) -> float:
    return max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))


def _base_file(tiny_dir: Path) -> Path:
    return tiny_dir / "Ovi" / "model.safetensors"


def _save_like(sd: dict[str, torch.Tensor], like: Path, path: Path) -> Path:
    """``sd`` (float32) as a fusion checkpoint with ``like``'s header metadata (config, variant)."""
    with safe_open(str(like), "pt") as f:
        meta = f.metadata()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return path


def _hand_merged_file(tiny_dir: Path, path: Path, loras_and_strengths, sd=None) -> Path:
    """The base checkpoint (or ``sd``) in float32 with ``W + strength * alpha / rank * up @ down`` added by hand."""
    sd = sd if sd is not None else {k: v.float() for k, v in load_file(str(_base_file(tiny_dir))).items()}
    return _save_like(hand_merge(sd, loras_and_strengths), _base_file(tiny_dir), path)


@torch.no_grad()
def _dequantised_state(fusion, keys) -> dict[str, torch.Tensor]:
    """The fusion model of ``fusion`` (FP8 / GGUF / int8) as float32 tensors under the official ``keys``: each
    quantised linear by the weight it computes with."""
    model = load_fusion_model(fusion, dtype=torch.float32)
    out = {}
    for key in keys:
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf == "weight" and isinstance(owner, (FP8Linear, Int8Linear)):
            out[key] = owner.dequantised_weight(torch.float32)
        elif leaf == "weight" and isinstance(owner, GGUFLinear):
            out[key] = owner.gguf.dequantize(owner.weight, torch.float32)
        else:
            t = owner._parameters.get(leaf)
            out[key] = (t if t is not None else owner._buffers[leaf]).float().clone()
    return out


def _mixed_lora(seed=5) -> Lora:
    """An Ovi LoRA on both branches (fusion projections too) with full deltas of norms and biases."""
    L = convention("ovi")
    L.diff("video_model.blocks.0.norm3.diff", V + "blocks.0.norm3.weight", (DIM,))
    L.diff("audio_model.blocks.1.ffn.2.diff_b", A + "blocks.1.ffn.2.bias", (DIM,))
    L.diff("video_model.blocks.1.modulation.diff", V + "blocks.1.modulation.modulation", (1, 6, DIM))
    return L


@pytest.fixture(scope="module")
def base_engine(tiny_dir):
    return _engine(tiny_dir)


@pytest.fixture(scope="module")
def base_run(base_engine):
    return _run(base_engine)


# -- every convention through the engine ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_each_convention_equals_an_engine_on_the_hand_merged_checkpoint(name, base_engine, base_run, tiny_dir,
                                                                        tmp_path):
    L = convention(name)
    path = L.save(tmp_path / f"{name}.safetensors")
    base_engine.set_loras([(path, STRENGTH)])
    try:
        got = _run(base_engine)
    finally:
        base_engine.set_loras([])
    want = _run(_engine(tiny_dir, fusion=_hand_merged_file(tiny_dir, tmp_path / "merged.safetensors",
                                                          [(L, STRENGTH)])))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F32)
    assert _rel(got, base_run) > 0.05  # the LoRA changes the result far beyond the tolerance


def test_a_stack_of_two_equals_the_hand_merge_of_both_in_order(base_engine, tiny_dir, tmp_path):
    L1, L2 = convention("kohya"), convention("peft_diffusers")  # both touch blocks.0.self_attn.q and head.head
    s1, s2 = LoraStrength(video=0.5), LoraStrength(video=1.5, audio=0.2)
    p1, p2 = L1.save(tmp_path / "a.safetensors"), L2.save(tmp_path / "b.safetensors")
    base_engine.set_loras([(p1, s1), (p2, s2)])
    try:
        assert [e.name for e in base_engine.loras] == ["a.safetensors", "b.safetensors"]
        got = _run(base_engine)
    finally:
        base_engine.set_loras([])
    want = _run(_engine(tiny_dir, fusion=_hand_merged_file(tiny_dir, tmp_path / "m.safetensors", [(L1, s1), (L2, s2)])))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F32)


# -- quantised fusion models --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantised_files(tiny_dir, tmp_path_factory):
    """The tiny 720x720_5s fusion model as FP8 (per-tensor scales), GGUF Q8_0 and a Wan2GP int8 pair."""
    d = tmp_path_factory.mktemp("lora_quantised")
    src = _base_file(tiny_dir)
    convert(src, d / "model_fp8.safetensors", to="fp8", granularity="tensor")
    convert(src, d / "model_q8_0.gguf", to="gguf-q8_0")
    pair = write_pair({k: v for k, v in load_file(str(src)).items()}, d / "wan2gp", kind="quanto_bf16_int8")
    return {"fp8": d / "model_fp8.safetensors", "gguf": d / "model_q8_0.gguf", "int8": [pair["video"], pair["audio"]]}


@pytest.fixture(scope="module")
def lora_reference(tiny_dir, tmp_path_factory):
    """A LoRA stack touching quantised block linears and plain layers, and the float32 engine's latents with it
    merged by hand."""
    d = tmp_path_factory.mktemp("lora_reference")
    mixed, kohya = _mixed_lora(), convention("kohya")  # kohya: head.head stays a plain linear in every format
    stack = [(mixed, STRENGTH), (kohya, LoraStrength(0.6))]
    files = [(mixed.save(d / "mixed.safetensors"), STRENGTH), (kohya.save(d / "kohya.safetensors"), LoraStrength(0.6))]
    want = _run(_engine(tiny_dir, fusion=_hand_merged_file(tiny_dir, d / "merged.safetensors", stack)))
    return stack, files, want


@pytest.mark.parametrize("kind,fp8_mode,tol", [("fp8", "side", FP8_TOL), ("fp8", "merge", FP8_TOL),
                                               ("gguf", None, Q8_0_TOL), ("int8", None, Q8_0_TOL)])
def test_quantised_models_take_the_lora_within_their_tolerance(kind, fp8_mode, tol, quantised_files, lora_reference,
                                                               tiny_dir, tmp_path):
    stack, files, want = lora_reference
    engine = _engine(tiny_dir, fusion=quantised_files[kind])
    base = _run(engine)
    engine.set_loras(files, fp8=fp8_mode)
    got = _run(engine)
    assert _rel(got, want) < tol
    assert _rel(got, want) < 0.5 * _rel(base, want)  # far nearer the LoRA'd reference than the model without it
    if fp8_mode == "merge":
        return  # re-quantised weights: only the tolerance holds
    # the side path adds exactly the LoRA to what the quantised layers compute
    keys = list(load_file(str(_base_file(tiny_dir))))
    sd = _dequantised_state(quantised_files[kind], keys)
    exact = _run(_engine(tiny_dir, fusion=_hand_merged_file(tiny_dir, tmp_path / "deq.safetensors", stack, sd=sd)))
    for g, w in zip(got, exact):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_quantised_layers_get_side_paths_and_keep_their_weights(quantised_files, lora_reference, tiny_dir,
                                                                caplog):
    caplog.set_level(logging.INFO, logger="ovi")
    _, files, _ = lora_reference
    engine = _engine(tiny_dir, fusion=quantised_files["gguf"], memory_mode="offload")  # CPU: the host copy persists
    engine.set_loras(files)
    _run(engine)
    host = engine._slots["fusion"].host
    sides = [n for n, m in host.named_modules() if isinstance(m, LoraSidePath)]
    assert sides and all(isinstance(host.get_submodule(n.rpartition(".")[0]), GGUFLinear) for n in sides)
    assert any("LoRAs applied" in r.getMessage() and "side path:" in r.getMessage() and "merged:" in r.getMessage()
               for r in caplog.records)  # GGUF linears by side path, the plain head and the norms merged
    raw = {n: m.weight.clone() for n, m in host.named_modules() if isinstance(m, GGUFLinear)}
    engine.set_loras([])
    _run(engine)
    assert not any(isinstance(m, LoraSidePath) for m in host.modules())
    assert all(torch.equal(m.weight, raw[n]) for n, m in host.named_modules() if isinstance(m, GGUFLinear))


# -- removal, memory modes, block swap --------------------------------------------------------------------------

class CountingCopier(_CloneCopier):
    """Block swap's copier on one device: every streamed layer is really copied (cloned) for its compute."""

    def __init__(self, device):
        super().__init__(device)
        self.layers_copied = 0

    def start(self, tensors):
        self.layers_copied += 1
        return super().start(tensors)


MODES = {
    "all_gpu": lambda: dict(memory_mode="all_gpu"),
    "offload": lambda: dict(memory_mode="offload"),  # on the CPU the host copy itself runs: restored from copies
    "block_swap_streamed": lambda: dict(memory_mode="block_swap",
                                        block_swapper=BlockSwapper(resident=1, copier=CountingCopier)),
    "block_swap_in_place": lambda: dict(memory_mode="block_swap", block_swapper=BlockSwapper(resident=1)),
}


@pytest.fixture(scope="module")
def mixed_all_gpu(tiny_dir, tmp_path_factory):
    """The mixed LoRA's file and the all_gpu latents with it (the memory modes must all give these)."""
    path = _mixed_lora().save(tmp_path_factory.mktemp("mixed") / "mixed.safetensors")
    engine = _engine(tiny_dir)
    engine.set_loras([(path, STRENGTH)])
    return path, _run(engine)


def _host_state(engine) -> dict[str, torch.Tensor] | None:
    host = engine._slots["fusion"].host
    return None if host is None else {k: v.clone() for k, v in host.state_dict().items()}


@pytest.mark.parametrize("mode", list(MODES))
def test_removing_the_lora_restores_the_base_bit_exactly(mode, mixed_all_gpu, base_run, tiny_dir):
    path, want = mixed_all_gpu
    engine = _engine(tiny_dir, **MODES[mode]())
    engine.load()
    host_before = _host_state(engine)
    assert all(torch.equal(a, b) for a, b in zip(_run(engine), base_run))
    engine.set_loras([(path, STRENGTH)])
    got = _run(engine)
    assert all(torch.equal(g, w) for g, w in zip(got, want))  # every memory mode: the same merge
    engine.set_loras([(path, LoraStrength(0.3, 0.6))])
    assert _rel(_run(engine), got) > 0.01  # a changed strength takes effect
    engine.set_loras([])
    again = _run(engine)
    assert all(torch.equal(a, b) for a, b in zip(again, base_run))
    if host_before is not None:
        after = _host_state(engine)
        assert list(after) == list(host_before) and all(torch.equal(after[k], host_before[k]) for k in after)
    assert engine._loras.files_read == 1


def test_restore_in_bf16_is_bit_exact(mixed_all_gpu, tiny_dir):
    path, _ = mixed_all_gpu
    engine = _engine(tiny_dir, memory_mode="offload", dtype="bf16")  # bf16 host copy, merged and restored
    engine.load()
    before = _host_state(engine)
    base = _run(engine)
    engine.set_loras([(path, STRENGTH)])
    changed = _run(engine)
    assert engine._slots["fusion"].host.video_model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    engine.set_loras([])
    assert all(torch.equal(a, b) for a, b in zip(_run(engine), base)) and not torch.equal(changed[0], base[0])
    after = _host_state(engine)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_block_swap_merges_each_streamed_copy_once_and_never_the_host(mixed_all_gpu, tiny_dir, monkeypatch):
    path, want = mixed_all_gpu
    merged_into: list[int] = []  # data pointers of the tensors merged into
    real_merge = engine_loras.merge_into

    def spy(t, items):
        merged_into.append(t.data_ptr())
        real_merge(t, items)

    monkeypatch.setattr(engine_loras, "merge_into", spy)
    swapper = BlockSwapper(resident=1, copier=CountingCopier)
    engine = _engine(tiny_dir, memory_mode="block_swap", block_swapper=swapper)
    engine.load()
    host = engine._slots["fusion"].host
    before = _host_state(engine)
    host_ptrs = {t.data_ptr() for t in list(host.parameters()) + list(host.buffers())}
    copies = []
    real_start = CountingCopier.start
    monkeypatch.setattr(CountingCopier, "start", lambda self, ts: copies.append(len(ts)) or real_start(self, ts))
    engine.set_loras([(path, STRENGTH)])
    got = _run(engine)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # layer 1 is streamed: copied in each step's positive pass (the negative pass skips it, SLG), 2 steps
    assert len(copies) == 2
    in_layer_1 = sum(1 for p in engine._loras._plan(path).params() if ".blocks.1." in p)
    resident = len(engine._loras._plan(path).params()) - in_layer_1
    assert len(merged_into) == resident + 2 * in_layer_1
    assert not set(merged_into) & host_ptrs  # only device copies were merged into
    after = _host_state(engine)
    assert all(torch.equal(after[k], before[k]) for k in before)


# -- files read once ------------------------------------------------------------------------------------------------

def test_changing_strength_or_order_reads_no_file_again(tiny_dir, tmp_path, monkeypatch):
    reads: list[Path] = []
    real_read = engine_loras.read_lora
    monkeypatch.setattr(engine_loras, "read_lora", lambda p: reads.append(Path(p)) or real_read(p))
    a = convention("comfy").save(tmp_path / "a.safetensors")
    b = convention("ovi").save(tmp_path / "b.safetensors")
    engine = _engine(tiny_dir, memory_mode="offload")
    engine.set_loras([(a, 0.5)])
    first = _run(engine)
    for stack in ([(a, 1.0)], [(a, 1.0), (b, 0.4)], [(b, 0.4), (a, 1.0)], [], [(a, 0.5)]):
        engine.set_loras(stack)
        last = _run(engine)
    assert all(torch.equal(x, y) for x, y in zip(last, first))
    assert sorted(p.name for p in reads) == ["a.safetensors", "b.safetensors"] and engine._loras.files_read == 2
    # a file rewritten in place (new contents, new modification time) is read again
    convention("kohya").save(a)
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    engine.set_loras([(a, 0.5)])
    assert [p.name for p in reads].count("a.safetensors") == 2
    assert not torch.equal(_run(engine)[0], first[0])


# -- strictness ----------------------------------------------------------------------------------------------------

def _unet_lora(tmp_path) -> Path:
    L = Lora()
    L.pair("lora_unet_down_blocks_0_attentions_0_proj_in", "x", (320, 320))
    L.pair("lora_unet_mid_block_attentions_0_proj_out", "x", (1280, 1280))
    return L.save(tmp_path / "sdxl_style.safetensors")


def test_a_lora_that_matches_nothing_fails_naming_the_file(tiny_dir, tmp_path):
    bad = _unet_lora(tmp_path)
    engine = _engine(tiny_dir)
    engine.set_loras([(bad, 1.0)])  # read; the model's names are not known before its first load
    with pytest.raises(LoraError) as e:
        engine.generate(PROMPT, **GEN)
    msg = str(e.value)
    assert "sdxl_style.safetensors" in msg and "0 matched" in msg and "lora_unet_down_blocks_0_attentions_0_proj_in" in msg
    assert "UNet" in msg  # the likely cause
    engine.set_loras([])
    base = _run(engine)  # the engine is usable again
    with pytest.raises(LoraError, match="0 matched"):
        engine.set_loras([(bad, 1.0)])  # the shapes are known now: the error comes at once
    assert engine.loras == ()  # a refused stack is not kept
    L = Lora()
    L.pair("diffusion_model.blocks.0.self_attn.q", "x", (5120, 5120))
    with pytest.raises(LoraError, match="14B"):
        engine.set_loras([(L.save(tmp_path / "wan14b.safetensors"), 1.0)])
    with pytest.raises(LoraError, match="file not found"):
        engine.set_loras([(tmp_path / "absent.safetensors", 1.0)])
    assert all(torch.equal(a, b) for a, b in zip(_run(engine), base))


def test_a_partial_match_is_applied_and_logged_with_counts(base_engine, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ovi")
    L = Lora()
    L.pair("diffusion_model.blocks.0.self_attn.q", V + "blocks.0.self_attn.q.weight", (DIM, DIM))
    L.pair("diffusion_model.blocks.0.cross_attn.k_img", "x", (DIM, DIM))  # a Wan I2V layer Ovi does not have
    base_engine.set_loras([(L.save(tmp_path / "partial.safetensors"), 1.0)])
    try:
        _run(base_engine)
    finally:
        base_engine.set_loras([])
    text = caplog.text
    assert "partial.safetensors: 1 of 2 modules matched" in text and "k_img" in text
    assert "merged: 1 video, 0 audio" in text


# -- the command line -------------------------------------------------------------------------------------------

def test_lora_option_parsing():
    a = _parser().parse_args(["generate", "--models", "m", "--prompt", "p", "--out", "o.mp4", "--lora", "a.safetensors",
                              "--lora", "b.safetensors:0.5", "--lora", "c.safetensors:1:0"])
    assert a.lora == [(Path("a.safetensors"), 1.0, 1.0), (Path("b.safetensors"), 0.5, 0.5),
                      (Path("c.safetensors"), 1.0, 0.0)]
    assert _parser().parse_args(["generate", "--models", "m", "--prompt", "p", "--out", "o.mp4"]).lora == []
    assert _lora_arg(r"C:\loras\x.safetensors:0.8") == (Path(r"C:\loras\x.safetensors"), 0.8, 0.8)
    assert _lora_arg("dir:with:colons/x.safetensors") == (Path("dir:with:colons/x.safetensors"), 1.0, 1.0)
    with pytest.raises(SystemExit):
        _parser().parse_args(["generate", "--models", "m", "--prompt", "p", "--out", "o.mp4", "--lora", ":1"])


def test_cli_generate_with_a_lora(tiny_dir, tmp_path, capsys):
    lora = convention("comfy").save(tmp_path / "wan_style.safetensors")
    out = tmp_path / "clip.mp4"
    args = ["generate", "--models", str(tiny_dir), "--variant", "720x720_5s", "--prompt", PROMPT, "--steps", "2",
            "--size", "64x64", "--slg-layer", "1", "--seed", "3", "--out", str(out)]
    rc = main(args + ["--lora", f"{lora}:0.8:0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert out.is_file() and "wan_style.safetensors (video 0.8, audio 0)" in err
    assert "LoRAs applied" in err and f"merged: {len(convention('comfy').effects)} video, 0 audio" in err
    rc = main(args + ["--lora", str(_unet_lora(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and "sdxl_style.safetensors" in err and "0 matched" in err


def test_info_on_a_lora_file(tmp_path, capsys):
    wan = convention("kohya").save(tmp_path / "wan_kohya.safetensors")
    ovi = _mixed_lora().save(tmp_path / "ovi_mixed.safetensors")
    assert main(["info", str(wan), str(ovi)]) == 0
    out = capsys.readouterr().out
    first, second = out.split("\n\n")
    assert "component:   lora" in first and "kohya/musubi (prefix 'lora_unet_'" in first
    assert "rank:        4" in first and "alpha:       2 (scale alpha/rank)" in first
    assert f"modules:     {len(convention('kohya').effects)} (" in first and "video branch only" in first
    assert "ComfyUI/Wan" in second and "video and audio branches" in second and "with full deltas" in second
