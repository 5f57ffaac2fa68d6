"""Text area: umT5 encoder parity, checkpoint layouts, tokenizer framing, cleaning and prompt utilities."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ovi.loading import CheckpointError
from ovi.text.checkpoint import comfy_key, detect_layout, find_tokenizer_source, load_tokenizer, load_umt5, official_key
from ovi.text.clean import collapse_whitespace, whitespace_clean
from ovi.text.prompts import (AUDCAP, AUDIO_COLON, PROMPT_STYLES, clean_text, engine_t5_text, format_prompt,
                              prompt_style_for_variant, validate_and_process_user_prompt)
from ovi.text.umt5 import UMT5_XXL, UMT5Config, UMT5Encoder, relative_position_bucket
from ovi.tools.parity import run_file
from ovi.tools.tiny.text import train_spiece, write_tiny

TEXTS = ["A man says <S>hello there<E> on the beach. Audio: waves crashing, seagulls calling.",
         "", "A woman   laughs &amp; claps\nin the park", "robotic, muffled, echo, distorted"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_text")
    pth, spiece, fp16, fp8 = write_tiny(out, seed=7)
    return {"root": out, "pth": pth, "spiece": spiece, "fp16": fp16, "fp8": fp8}


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny["spiece"])


# -- parity fixtures ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["t5_encoder.safetensors", "text_clean.json", "prompt_processing.json",
                                  "manifests/umt5_xxl_enc_full.json", "manifests/umt5_xxl_comfy_keymap.json"])
def test_parity_files(parity_dir, name):
    r = run_file(parity_dir / name)
    assert r.status == "PASS", (r.line(), r.detail)


def test_full_size_config_matches_manifest(parity_dir):
    manifest = json.loads((parity_dir / "manifests/umt5_xxl_enc_full.json").read_text())
    shapes = {k: tuple(v[0]) for k, v in manifest.items()}
    assert UMT5Config.from_shapes(shapes) == UMT5_XXL
    with torch.device("meta"):
        model = UMT5Encoder(UMT5_XXL)
    assert list(model.state_dict()) == list(manifest)  # same keys in the same order
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336


def test_bucket_rule_boundaries():
    r = torch.tensor([-200, -91, -90, -64, -32, -16, -8, -7, -1, 0, 1, 7, 8, 16, 32, 64, 90, 91, 500])
    expected = [15, 15, 14, 14, 12, 10, 8, 7, 1, 0, 17, 23, 24, 26, 28, 30, 30, 31, 31]
    assert relative_position_bucket(r).tolist() == expected


def test_keymap_round_trip():
    with torch.device("meta"):
        keys = list(UMT5Encoder(UMT5_XXL).state_dict())
    comfy = [comfy_key(k) for k in keys]
    assert len(set(comfy)) == len(keys) and [official_key(c) for c in comfy] == keys
    assert comfy_key("blocks.5.ffn.gate.0.weight") == "encoder.block.5.layer.1.DenseReluDense.wi_0.weight"
    with pytest.raises(KeyError):
        official_key("encoder.embed_tokens.weight")


# -- checkpoint layouts ------------------------------------------------------------------------------------

def _outputs(model, tok):
    ids, mask = tok(TEXTS)
    with torch.no_grad():
        return model(ids, mask), ids, mask


def test_official_and_fp16_layouts_identical(tiny, tok):
    a = load_umt5(tiny["pth"], dtype=torch.float32)
    b = load_umt5(tiny["fp16"], dtype=torch.float32)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k  # the tiny weights are exact in both bf16 and fp16
    assert torch.equal(_outputs(a, tok)[0], _outputs(b, tok)[0])


def test_fp8_scaled_layout(tiny, tok):
    ref = load_umt5(tiny["pth"], dtype=torch.float32)
    q = load_umt5(tiny["fp8"], dtype=torch.float32)
    raw = load_file(str(tiny["fp8"]))
    assert raw["scaled_fp8"].dtype == torch.float8_e4m3fn
    n_fp8 = 0
    for k, v in q.state_dict().items():
        ck = comfy_key(k)
        if raw[ck].dtype != torch.float8_e4m3fn:  # embeddings and norms: stored in fp16, exact
            assert torch.equal(v, ref.state_dict()[k]), k
            continue
        n_fp8 += 1
        scale = raw[ck[: -len("weight")] + "scale_weight"]
        assert scale.dtype == torch.float32 and scale.dim() == 0
        # the loader's weight is exactly fp8 value * scale
        assert torch.equal(v, raw[ck].float() * scale), k
        # and within e4m3 rounding of the bf16 weight: 3 mantissa bits give a half-ulp of 2^-4 relative for
        # stored values in the normal range (|w/scale| >= 2^-6); below it the spacing is 2^-9, so the error is
        # at most 2^-10 * scale. The scale itself (max|w|/448) only moves the range, it adds no rounding.
        w = ref.state_dict()[k]
        normal = (w / scale).abs() >= 2.0 ** -6
        err = (v - w).abs()
        assert (err[normal] <= 2.0 ** -4 * w.abs()[normal] * (1 + 1e-6)).all(), k
        assert (err[~normal] <= 2.0 ** -10 * scale * (1 + 1e-6)).all(), k
        assert err.max() > 0, k  # the file really holds rounded weights
    assert n_fp8 == 7 * q.config.num_layers
    # The output is the official model's on those dequantised weights (float32 rounding only). No fixed bound
    # ties it to the bf16 output: the tiny model's unscaled attention logits turn 2^-4 weight rounding into
    # 10-35 % output changes depending on the seed, so the error is bounded where it can be proven (above).
    deq = load_umt5(tiny["pth"], dtype=torch.float32)
    deq.load_state_dict(q.state_dict())
    out_q = _outputs(q, tok)[0]
    out_deq = _outputs(deq, tok)[0]
    assert torch.allclose(out_q, out_deq, rtol=0, atol=1e-6 * out_deq.abs().max().item())
    assert not torch.allclose(out_q, _outputs(ref, tok)[0])


def test_layout_detected_from_keys_not_name(tiny, tmp_path, tok):
    renamed = tmp_path / "models_t5_umt5-xxl-enc-bf16.safetensors"  # ComfyUI content under the official name
    shutil.copy(tiny["fp16"], renamed)
    assert detect_layout(load_file(str(renamed)))[0] == "comfy"
    prefixed = tmp_path / "umt5_xxl_fp16.safetensors"  # official names under a prefix
    sd = torch.load(tiny["pth"], weights_only=True)
    save_file({f"text_encoder.{k}": v for k, v in sd.items()}, str(prefixed))
    a = load_umt5(renamed, dtype=torch.float32)
    b = load_umt5(prefixed, dtype=torch.float32)
    assert torch.equal(_outputs(a, tok)[0], _outputs(b, tok)[0])


def test_explicit_prefix_and_dtype(tiny, tmp_path):
    sd = torch.load(tiny["pth"], weights_only=True)
    p = tmp_path / "fixture.safetensors"
    save_file({f"weights/{k}": v for k, v in sd.items()} | {"inputs/ids": torch.zeros(1, 3, dtype=torch.int64)}, str(p))
    m = load_umt5(p, prefix="weights/")
    assert m.token_embedding.weight.dtype == torch.bfloat16 and not m.token_embedding.weight.requires_grad
    assert m.config == UMT5Config(vocab=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2)


def test_encode_trims_and_matches_full_forward(tiny, tok):
    m = load_umt5(tiny["pth"], dtype=torch.float32)
    full, ids, mask = _outputs(m, tok)
    trimmed = m.encode(ids, mask)
    assert [t.shape[0] for t in trimmed] == mask.sum(1).tolist()
    assert trimmed[1].shape[0] == 1  # the empty prompt keeps its EOS row
    for i, t in enumerate(trimmed):
        assert torch.allclose(t, full[i, : t.shape[0]], rtol=0, atol=1e-5 * full.abs().max().item())


@dataclasses.dataclass
class _NotATensor:
    x: int = 1


def test_pickled_object_refused(tiny, tmp_path):
    p = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    sd = torch.load(tiny["pth"], weights_only=True)
    torch.save({**sd, "extra": _NotATensor()}, p)
    with pytest.raises(CheckpointError, match="refused"):
        load_umt5(p)


def test_wrong_component_named(tmp_path):
    p = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file({"decoder.middle.0.residual.0.gamma": torch.ones(8, 1, 1, 1),
               "decoder.conv1.weight": torch.ones(8, 4, 3, 3, 3)}, str(p))
    with pytest.raises(CheckpointError, match="Wan2.2 video VAE") as e:
        load_umt5(p)
    assert str(p) in str(e.value)


def test_t5_v11_named(tiny, tmp_path):
    sd = load_file(str(tiny["fp16"]))
    sd.pop("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")
    p = tmp_path / "t5xxl_fp16.safetensors"
    save_file(sd, str(p))
    with pytest.raises(CheckpointError, match="T5 v1.1"):
        load_umt5(p)


def test_missing_tensor_reported(tiny, tmp_path):
    sd = load_file(str(tiny["fp16"]))
    sd.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
    p = tmp_path / "partial.safetensors"
    save_file(sd, str(p))
    with pytest.raises(CheckpointError, match="blocks.1.ffn.fc2.weight"):
        load_umt5(p)


# -- tokenizer ---------------------------------------------------------------------------------------------

def test_tokenizer_framing(tok):
    ids, mask = tok(TEXTS)
    assert ids.shape == mask.shape == (len(TEXTS), 512) and ids.dtype == mask.dtype == torch.int64
    for row in range(len(TEXTS)):
        n = int(mask[row].sum())
        assert mask[row, :n].eq(1).all() and mask[row, n:].eq(0).all()
        assert ids[row, n - 1] == 1 and ids[row, n:].eq(0).all()
        assert (ids[row, : n - 1] != 1).all()  # one EOS only: sentencepiece adds none of its own
        pieces = tok.sp.encode(whitespace_clean(TEXTS[row]))
        assert ids[row, : n - 1].tolist() == pieces
    assert ids[1, :2].tolist() == [1, 0] and int(mask[1].sum()) == 1  # empty prompt -> [EOS]


def test_tokenizer_truncation(tok):
    long = " ".join(["the quiet waves crash on the sand"] * 200)
    assert len(tok.sp.encode(long)) > 600
    ids, mask = tok([long])
    assert int(mask.sum()) == 512 and ids[0, -1] == 1
    assert ids[0, :511].tolist() == tok.sp.encode(long)[:511]
    exact = tok([" ".join(["a"] * 511)])
    assert int(exact[1].sum()) == 512 and exact[0][0, -1] == 1


def test_tokenizer_batch_independence_and_cleaning(tok):
    ids, mask = tok(TEXTS)
    for i, t in enumerate(TEXTS):
        one_ids, one_mask = tok([t])
        assert torch.equal(one_ids[0], ids[i]) and torch.equal(one_mask[0], mask[i])
    messy, clean = "A woman   laughs &amp; claps\nin the park", "A woman laughs & claps in the park"
    assert torch.equal(tok([messy])[0], tok([clean])[0])


def test_tokenizer_specials_and_tags(tok):
    ids, mask = tok(["hello</s>world"])
    n = int(mask.sum())
    seq = ids[0, :n].tolist()
    assert seq.count(1) == 2 and seq[-1] == 1  # literal </s> is the EOS token, as in the HF tokenizer
    for tag in ("<S>", "<E>", "<AUDCAP>", "<ENDAUDCAP>"):
        assert tok.sp.piece_to_id(tag) in tok(["x " + tag + " y"])[0][0].tolist()


def test_tokenizer_sources_agree(tiny, tok, tmp_path):
    from_tensor = load_tokenizer(checkpoint=tiny["fp16"])
    from_fp8 = load_tokenizer(checkpoint=tiny["fp8"])
    from_folder = load_tokenizer(tiny["root"] / "Wan2.2-TI2V-5B")
    beside_pth = load_tokenizer(checkpoint=tiny["pth"])  # official layout: google/umt5-xxl next to the .pth
    assert find_tokenizer_source(checkpoint=tiny["fp16"]).key == "spiece_model"
    assert find_tokenizer_source(checkpoint=tiny["pth"]).path == tiny["spiece"]
    ref = tok(TEXTS)[0]
    for t in (from_tensor, from_fp8, from_folder, beside_pth):
        assert torch.equal(t(TEXTS)[0], ref)


def test_tokenizer_json_only_folder(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="spiece.model is needed"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="no umT5 tokenizer"):
        load_tokenizer(tmp_path / "nowhere")


# -- tiny writer ---------------------------------------------------------------------------------------------

def test_write_tiny_deterministic(tiny, tmp_path):
    assert train_spiece() == train_spiece()
    again = write_tiny(tmp_path / "a", seed=7)
    names = ("pth", "spiece", "fp16", "fp8")
    for name, p in zip(names, again):
        assert p.relative_to(tmp_path / "a") == tiny[name].relative_to(tiny["root"])
        assert p.read_bytes() == tiny[name].read_bytes(), name
    other = write_tiny(tmp_path / "b", seed=8)
    assert other[0].read_bytes() != again[0].read_bytes() and other[1].read_bytes() == again[1].read_bytes()


# -- cleaning and prompts ------------------------------------------------------------------------------------

def test_white_space_class():
    assert collapse_whitespace(" a\u00a0\u2003\u3000\u0085b\u202f c ") == "a b c"
    assert collapse_whitespace("a\u200bb\u2060c\ufeffd") == "a\u200bb\u2060c\ufeffd"  # not White_Space
    assert collapse_whitespace("a\x1cb") == "a\x1cb"  # Python's \s would collapse this, regex's \s does not


def test_prompt_styles():
    from ovi.variants import VARIANTS

    assert {v.prompt_style for v in VARIANTS.values()} <= set(PROMPT_STYLES)
    assert prompt_style_for_variant("720x720_5s") == AUDCAP
    assert prompt_style_for_variant("960x960_10s") == AUDIO_COLON
    assert prompt_style_for_variant("720x720_5s_fp8") == AUDCAP
    assert prompt_style_for_variant(AUDIO_COLON) == AUDIO_COLON
    with pytest.raises(KeyError):
        prompt_style_for_variant("1080p")
    text = "A dog runs.\nAudio: barking,\nwind."
    assert format_prompt("720x720_5s", text) == ("A dog runs.\n<AUDCAP>barking,\nwind.<ENDAUDCAP>", True)
    assert format_prompt("960x960_5s", text) == (text, False)
    assert format_prompt("960x960_5s", "x <AUDCAP>a<ENDAUDCAP> y <AUDCAP>b<ENDAUDCAP>") == \
        ("x Audio: a y Audio: b", True)
    assert engine_t5_text("720x720_5s", text) == "A dog runs. <AUDCAP>barking, wind.<ENDAUDCAP>"
    assert clean_text(text) == "A dog runs."


def test_prompt_file(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    p = tmp_path / "prompts.csv"
    p.write_text(f"text_prompt,image_path\n\"one, two\",{img}\nNA,\n")
    assert validate_and_process_user_prompt(f"  {p} ", mode="i2v") == (["one, two", ""], [str(img), ""])
    assert validate_and_process_user_prompt(str(p), mode="t2v") == (["one, two", ""], [None, None])
    p.write_text("text_prompt,image_path\nx,/no/such/image.png\n")
    with pytest.raises(FileNotFoundError):
        validate_and_process_user_prompt(str(p), mode="i2v")
    assert validate_and_process_user_prompt("  just text ") == (["just text"], [None])
