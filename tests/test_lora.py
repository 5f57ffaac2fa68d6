"""LoRAs on the tiny fusion model: every key convention, merged and side-path application, stacking, per-branch
strengths, bit-exact restore, quantised layers and the strictness errors."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ovi.fusion.checkpoint import load_fusion_model
from ovi.lora import (LoraError, LoraSidePath, LoraStrength, apply_merged, apply_side_path, load_lora,
                      lora_target_shapes, match_lora, read_lora)
from ovi.quant.fp8 import FP8Linear
from ovi.quant.gguf_dequant import Q
from ovi.quant.gguf_load import GGUFLinear, GGUFWeight
from ovi.quant.gguf_quantize import quantize
from ovi.quant.int8 import Int8Linear, quantise_int8

from lora_files import A, CONVENTIONS, DIM, FFN, HEAD_OUT, V, Lora, convention, hand_merge


# -- helpers -----------------------------------------------------------------------------------------

@pytest.fixture
def model(tiny_dir):
    """A fresh float32 tiny fusion model per test (tests change its weights)."""
    return load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32)


def _inputs():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(48, 3, 4, 6, generator=g), torch.randn(9, 20, generator=g),
            torch.randn(5, 32, generator=g), torch.randn(7, 32, generator=g))


@torch.no_grad()
def _forward(m):
    v, a, cv, ca = _inputs()
    return m(v, a, torch.tensor([800]), cv, ca)


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _hand_merge(m, loras_and_strengths):
    hand_merge(dict(m.named_parameters()), loras_and_strengths)
    return m


# -- conventions -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_each_convention_merges_like_the_hand_merge(name, model, tiny_dir, tmp_path):
    L = convention(name)
    path = L.save(tmp_path / f"{name}.safetensors")
    lora = read_lora(path)
    assert CONVENTIONS[name] in lora.convention
    assert lora.naming == ("diffusers" if name == "peft_diffusers" else "wan")
    plan = match_lora(lora, lora_target_shapes(model))
    assert plan.params() == {p for p, _, _ in L.effects}
    assert plan.unmatched == ()
    assert plan.plain_wan == (name not in ("ovi", "ovi_kohya"))

    base = _forward(model)
    s = LoraStrength(video=0.7, audio=1.3)
    apply_merged(model, [plan], [s])
    got = _forward(model)
    ref = _hand_merge(load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32), [(L, s)])
    want = _forward(ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert max((w - b).abs().max() for w, b in zip(want, base)) > 1e-2  # the LoRA really changes the output


def test_full_deltas_bias_and_norm_diffs(model, tmp_path):
    L = Lora(seed=5)
    L.diff("diffusion_model.blocks.0.norm3.diff", V + "blocks.0.norm3.weight", (DIM,))
    L.diff("diffusion_model.blocks.0.self_attn.norm_q.diff", V + "blocks.0.self_attn.norm_q.weight", (DIM,))
    L.diff("diffusion_model.blocks.1.ffn.2.diff_b", V + "blocks.1.ffn.2.bias", (DIM,))
    L.diff("diffusion_model.head.head.diff", V + "head.head.weight", (HEAD_OUT, DIM))
    L.diff("diffusion_model.blocks.0.modulation.diff", V + "blocks.0.modulation.modulation", (1, 6, DIM))
    L.pair("diffusion_model.blocks.1.cross_attn.q", V + "blocks.1.cross_attn.q.weight", (DIM, DIM))
    L.diff("diffusion_model.blocks.1.cross_attn.q.diff_b", V + "blocks.1.cross_attn.q.bias", (DIM,))
    plan = load_lora(L.save(tmp_path / "diffs.safetensors"), lora_target_shapes(model))
    assert plan.params() == {p for p, _, _ in L.effects}
    before = _weights(model)
    apply_merged(model, [plan], [LoraStrength(video=0.5)])
    after = model.state_dict()
    for param, _, delta in L.effects:
        if param.endswith("cross_attn.q.weight"):
            torch.testing.assert_close(after[param], before[param] + 0.5 * delta)
        else:  # a full delta is one float32 add: exactly what the hand merge computes
            assert torch.equal(after[param], before[param] + 0.5 * delta), param
    untouched = set(before) - plan.params()
    assert all(torch.equal(after[k], before[k]) for k in untouched)


def test_conv_lora_on_the_patch_embedding(model, tiny_dir, tmp_path):
    L = Lora(seed=9).pair("diffusion_model.patch_embedding", V + "patch_embedding.weight", (DIM, 48), kernel=(1, 2, 2))
    plan = load_lora(L.save(tmp_path / "conv.safetensors"), lora_target_shapes(model))
    apply_merged(model, [plan])
    ref = _hand_merge(load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32),
                      [(L, LoraStrength())])
    for g, w in zip(_forward(model), _forward(ref)):
        torch.testing.assert_close(g, w)


def test_torch_pickle_lora_is_read(model, tmp_path):
    L = convention("comfy")
    path = tmp_path / "comfy.pt"
    torch.save(L.tensors, path)
    assert load_lora(path, lora_target_shapes(model)).params() == {p for p, _, _ in L.effects}


# -- side path, stacking, strengths ----------------------------------------------------------------------

def _mixed_lora():
    L = convention("ovi")
    L.pair("video_model.blocks.1.ffn.0", V + "blocks.1.ffn.0.weight", (FFN, DIM), alpha=8.0, rank=8)
    L.diff("video_model.blocks.0.norm3.diff", V + "blocks.0.norm3.weight", (DIM,))
    L.diff("audio_model.blocks.0.ffn.2.diff_b", A + "blocks.0.ffn.2.bias", (DIM,))
    L.diff("audio_model.blocks.1.self_attn.k.diff", A + "blocks.1.self_attn.k.weight", (DIM, DIM))
    return L


def test_side_path_equals_merged(model, tiny_dir, tmp_path):
    L = _mixed_lora()
    plan = load_lora(L.save(tmp_path / "mixed.safetensors"), lora_target_shapes(model))
    s = [LoraStrength(video=0.8, audio=1.2)]
    before = _weights(model)
    apply_side_path(model, [plan], s)
    sides = [n for n, m in model.named_modules() if isinstance(m, LoraSidePath)]
    assert len(sides) == 4  # the four low-rank linear targets; the full deltas were merged in place
    low_rank_weights = {V + "blocks.0.cross_attn.k_fusion.weight", A + "blocks.1.self_attn.q.weight",
                        A + "blocks.0.ffn.2.weight", V + "blocks.1.ffn.0.weight"}
    after = model.state_dict()
    assert list(after) == list(before)  # the side path adds nothing to the state dict
    assert all(torch.equal(after[k], before[k]) for k in low_rank_weights)
    got = _forward(model)
    merged = load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32)
    base = _forward(merged)
    apply_merged(merged, [plan], s)
    for g, w, b in zip(got, _forward(merged), base):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        assert (w - b).abs().max() > 1e-2  # far above the tolerance


@pytest.mark.parametrize("apply", [apply_merged, apply_side_path])
def test_two_loras_stack(apply, model, tiny_dir, tmp_path):
    L1, L2 = convention("kohya"), convention("peft_diffusers")  # both touch blocks.0.self_attn.q and head.head
    p1 = load_lora(L1.save(tmp_path / "a.safetensors"), lora_target_shapes(model))
    p2 = load_lora(L2.save(tmp_path / "b.safetensors"), lora_target_shapes(model))
    assert p1.params() & p2.params()
    s1, s2 = LoraStrength(video=0.5), LoraStrength(video=1.5)
    handle = apply(model, [p1, p2], [s1, s2])
    assert [n for n, _ in handle.applied] == ["a.safetensors", "b.safetensors"]
    ref = _hand_merge(load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32),
                      [(L1, s1), (L2, s2)])
    only_first = _hand_merge(load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32),
                             [(L1, s1)])
    for g, w in zip(_forward(model), _forward(ref)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert (_forward(ref)[0] - _forward(only_first)[0]).abs().max() > 1e-2  # the second LoRA counts


@pytest.mark.parametrize("branch", ["video", "audio"])
def test_per_branch_strength(branch, model, tiny_dir, tmp_path):
    L = _mixed_lora()
    plan = load_lora(L.save(tmp_path / "mixed.safetensors"), lora_target_shapes(model))
    assert plan.branches == {"video", "audio"}
    s = LoraStrength(video=1.0, audio=0.0) if branch == "video" else LoraStrength(video=0.0, audio=1.0)
    before = _weights(model)
    apply_merged(model, [plan], [s])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {p for p, b, _ in L.effects if b == branch}
    ref = _hand_merge(load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32), [(L, s)])
    for g, w in zip(_forward(model), _forward(ref)):
        torch.testing.assert_close(g, w)


def test_wan_lora_ignores_audio_strength(model, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ovi")
    plan = load_lora(convention("comfy").save(tmp_path / "wan.safetensors"), lora_target_shapes(model))
    assert plan.plain_wan and plan.branches == {"video"}
    before = _weights(model)
    apply_merged(model, [plan], [LoraStrength(video=1.0, audio=0.3)])
    assert "audio strength 0.30 is not used" in caplog.text
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(A))


# -- restore -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("apply", [apply_merged, apply_side_path])
def test_restore_is_bit_exact(apply, model, tmp_path):
    plans = [load_lora(_mixed_lora().save(tmp_path / "m.safetensors"), lora_target_shapes(model)),
             load_lora(convention("kohya").save(tmp_path / "k.safetensors"), lora_target_shapes(model))]
    base, before = _forward(model), _weights(model)
    handle = apply(model, plans, [LoraStrength(0.9, 1.1), LoraStrength(1.0)])
    assert not torch.equal(_forward(model)[0], base[0])
    handle.restore()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, LoraSidePath) for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(g, b) for g, b in zip(_forward(model), base))
    handle.restore()  # a second restore changes nothing
    assert all(torch.equal(g, b) for g, b in zip(_forward(model), base))


def test_restore_is_bit_exact_in_bf16(tiny_dir, tmp_path):
    m = load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.bfloat16)
    plan = load_lora(_mixed_lora().save(tmp_path / "m.safetensors"), lora_target_shapes(m))
    before = _weights(m)
    handle = apply_merged(m, [plan], [LoraStrength(0.37, 0.61)])
    assert m.video_model.blocks[1].ffn[0].weight.dtype == torch.bfloat16
    assert not torch.equal(m.video_model.blocks[1].ffn[0].weight, before[V + "blocks.1.ffn.0.weight"])
    handle.restore()
    after = m.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_handles_restore_in_reverse_order(model, tmp_path):
    p = load_lora(convention("kohya").save(tmp_path / "k.safetensors"), lora_target_shapes(model))
    before = _weights(model)
    first = apply_merged(model, [p])
    second = apply_side_path(model, [p])
    with pytest.raises(RuntimeError, match="reverse order"):
        first.restore()
    second.restore()
    first.restore()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


# -- quantised layers ------------------------------------------------------------------------------------

def _quantise_two_layers(m):
    """blocks.0.self_attn.q as FP8 (upcast compute) and blocks.1.ffn.0 as GGUF Q8_0, both on the video branch."""
    vb0, vb1 = m.video_model.blocks[0], m.video_model.blocks[1]
    fp8 = FP8Linear.from_linear(vb0.self_attn.q)
    fp8.mode = "upcast"
    vb0.self_attn.q = fp8
    lin = vb1.ffn[0]
    raw = quantize(lin.weight.detach(), Q.Q8_0)
    vb1.ffn[0] = GGUFLinear(raw, GGUFWeight(Q.Q8_0, tuple(lin.weight.shape)), lin.bias.detach().clone())
    return m


@torch.no_grad()
def _dequantised_copy(m):
    """The same model with the quantised layers turned back into nn.Linear holding their dequantised weights."""
    vb0, vb1 = m.video_model.blocks[0], m.video_model.blocks[1]
    for parent, name in ((vb0.self_attn, "q"), (vb1.ffn, "0")):
        q = getattr(parent, name) if name != "0" else parent[0]
        w = q.dequantised_weight(torch.float32) if isinstance(q, FP8Linear) else q.gguf.dequantize(q.weight,
                                                                                                     torch.float32)
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.weight.copy_(w)
        lin.bias.copy_(q.bias.float())
        if name == "0":
            parent[0] = lin
        else:
            setattr(parent, name, lin)
    return m


def test_side_path_on_fp8_and_gguf_layers(tiny_dir, tmp_path):
    path = tiny_dir / "Ovi" / "model.safetensors"
    quantised = _quantise_two_layers(load_fusion_model(path, dtype=torch.float32))
    shapes = lora_target_shapes(quantised)
    assert shapes[V + "blocks.1.ffn.0.weight"] == (FFN, DIM)  # logical shape, not the packed bytes
    L = Lora(seed=3)
    L.pair("diffusion_model.blocks.0.self_attn.q", V + "blocks.0.self_attn.q.weight", (DIM, DIM))
    L.pair("diffusion_model.blocks.1.ffn.0", V + "blocks.1.ffn.0.weight", (FFN, DIM))
    L.diff("diffusion_model.blocks.1.ffn.0.diff", V + "blocks.1.ffn.0.weight", (FFN, DIM))  # dense side term
    L.diff("diffusion_model.blocks.0.self_attn.q.diff_b", V + "blocks.0.self_attn.q.bias", (DIM,))
    plan = load_lora(L.save(tmp_path / "q.safetensors"), shapes)
    s = LoraStrength(video=0.9)
    with pytest.raises(LoraError, match="side path"):
        apply_merged(quantised, [plan], [s])
    assert not getattr(quantised, "_ovi_lora_handles", [])  # the failed merge left nothing applied
    raw_before = quantised.video_model.blocks[1].ffn[0].weight.clone()
    reference = _hand_merge(_dequantised_copy(_quantise_two_layers(load_fusion_model(path, dtype=torch.float32))),
                            [(L, s)])
    handle = apply_side_path(quantised, [plan], [s])
    assert torch.equal(quantised.video_model.blocks[1].ffn[0].weight, raw_before)  # still the GGUF bytes
    for g, w in zip(_forward(quantised), _forward(reference)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    handle.restore()
    assert not any(isinstance(m, LoraSidePath) for m in quantised.modules())


def test_side_path_on_int8_layers(tiny_dir, tmp_path):
    """Wan2GP's quanto int8 layers (Int8Linear) take a side path on their dequantised weight; merging is refused."""
    path = tiny_dir / "Ovi" / "model.safetensors"

    def int8_model():
        m = load_fusion_model(path, dtype=torch.float32)
        for parent, name in ((m.audio_model.blocks[0].self_attn, "v"), (m.video_model.blocks[1].cross_attn, "o")):
            lin = getattr(parent, name)
            q = Int8Linear(lin.in_features, lin.out_features)
            q.weight, q.scale = quantise_int8(lin.weight.detach())
            q.bias.data = lin.bias.detach().clone()
            setattr(parent, name, q)
        return m

    quantised = int8_model()
    L = Lora(seed=13)
    L.pair("audio_model.blocks.0.self_attn.v", A + "blocks.0.self_attn.v.weight", (DIM, DIM))
    L.pair("video_model.blocks.1.cross_attn.o", V + "blocks.1.cross_attn.o.weight", (DIM, DIM))
    L.diff("video_model.blocks.1.cross_attn.o.diff", V + "blocks.1.cross_attn.o.weight", (DIM, DIM))
    plan = load_lora(L.save(tmp_path / "int8.safetensors"), lora_target_shapes(quantised))
    s = LoraStrength(video=0.8, audio=1.1)
    with pytest.raises(LoraError, match="side path"):
        apply_merged(quantised, [plan], [s])
    data_before = quantised.audio_model.blocks[0].self_attn.v.weight.clone()
    base = _forward(quantised)
    reference = int8_model()
    with torch.no_grad():  # the same model with plain linears holding the int8 layers' dequantised weights
        for parent, name in ((reference.audio_model.blocks[0].self_attn, "v"),
                             (reference.video_model.blocks[1].cross_attn, "o")):
            q = getattr(parent, name)
            lin = nn.Linear(q.in_features, q.out_features)
            lin.weight.copy_(q.dequantised_weight(torch.float32))
            lin.bias.copy_(q.bias)
            setattr(parent, name, lin)
    _hand_merge(reference, [(L, s)])
    handle = apply_side_path(quantised, [plan], [s])
    assert torch.equal(quantised.audio_model.blocks[0].self_attn.v.weight, data_before)  # still int8 data
    assert sum(isinstance(m, LoraSidePath) for m in quantised.modules()) == 2
    for g, w, b in zip(_forward(quantised), _forward(reference), base):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        assert (w - b).abs().max() > 1e-2
    handle.restore()
    assert all(torch.equal(g, b) for g, b in zip(_forward(quantised), base))


# -- strictness ----------------------------------------------------------------------------------------

def test_error_when_no_key_matches(model, tmp_path):
    L = Lora()
    L.pair("lora_unet_down_blocks_0_attentions_0_proj_in", "x.unet", (320, 320))
    L.pair("lora_unet_mid_block_attentions_0_proj_out", "x.unet", (1280, 1280))
    path = L.save(tmp_path / "sdxl_style.safetensors")
    with pytest.raises(LoraError) as e:
        load_lora(path, lora_target_shapes(model))
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "sdxl_style.safetensors" in msg and "0 matched" in msg and "UNet" in msg
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in msg


def test_error_for_a_14b_shaped_lora(model, tmp_path):
    L = Lora()
    L.pair("diffusion_model.blocks.0.self_attn.q", "x", (5120, 5120))
    L.pair("diffusion_model.blocks.0.ffn.0", "x", (13824, 5120))
    with pytest.raises(LoraError) as e:
        load_lora(L.save(tmp_path / "wan14b.safetensors"), lora_target_shapes(model))
    msg = str(e.value)
    assert "wan14b.safetensors" in msg and "14B" in msg and "5120" in msg and "2 of the LoRA's tensors" in msg


def test_partial_match_is_logged_with_counts(model, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ovi")
    L = Lora()
    L.pair("diffusion_model.blocks.0.self_attn.q", V + "blocks.0.self_attn.q.weight", (DIM, DIM))
    L.pair("diffusion_model.blocks.0.cross_attn.k_img", "x", (DIM, DIM))  # a Wan I2V layer Ovi does not have
    L.pair("diffusion_model.blocks.7.self_attn.q", "x", (DIM, DIM))       # past the tiny model's 2 layers
    plan = load_lora(L.save(tmp_path / "partial.safetensors"), lora_target_shapes(model))
    assert plan.matched == 1 and plan.modules == 3 and len(plan.unmatched) == 2
    assert plan.params() == {V + "blocks.0.self_attn.q.weight"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("partial.safetensors" in w and "1 of 3 modules matched" in w and "k_img" in w for w in warnings)


def test_error_for_half_pairs_and_unsupported_kinds(tmp_path):
    p = tmp_path / "half.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, DIM)}, str(p))
    with pytest.raises(LoraError, match="no up matrix"):
        read_lora(p)
    p = tmp_path / "lokr.safetensors"
    save_file({"lycoris_blocks_0_self_attn_q.lokr_w1": torch.zeros(4, 4),
               "lycoris_blocks_0_self_attn_q.lokr_w2": torch.zeros(64, 64)}, str(p))
    with pytest.raises(LoraError, match="LoKr"):
        read_lora(p)
    p = tmp_path / "model.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(DIM, DIM)}, str(p))
    with pytest.raises(LoraError, match="not a LoRA"):
        read_lora(p)
