"""Wan2GP's Ovi files: split video/audio pairs (keys without the branch prefix), bf16 and optimum-quanto int8.

Tiny pairs are written here in Wan2GP's layout (``ovi.tools.tiny.wan2gp``) from the tiny fusion model of the
session's checkpoint set: read through the split-pair loader from either half, variants told by the file names,
int8 weights kept int8 (block swap streams them as stored), memory planned at stored size, generation through
the engine, and every malformed quanto file refused naming the file and the key.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ovi.block_swap import BlockSwapper, _CloneCopier
from ovi.detect import inspect_file, resolve_variant, split_pair
from ovi.engine import OviEngine
from ovi.fusion.checkpoint import fusion_sources, load_fusion_model
from ovi.loading import CheckpointError
from ovi.quant.int8 import Int8Linear
from ovi.quant.quanto_int8 import MAP_KEY
from ovi.tools.tiny.fusion import TINY_CONFIG
from ovi.tools.tiny.wan2gp import file_name, write_pair

PROMPT = "A man walks on the beach at sunset. Audio: waves crashing and seagulls calling"
GEN = dict(size=(64, 64), steps=2, seed=7, slg_layer=1, video_negative_prompt="blur", audio_negative_prompt="muffled")
BLOCK_LINEARS = 12  # self_attn q/k/v/o, cross_attn q/k/v/o/k_fusion/v_fusion, ffn.0, ffn.2: what mmgp quantises
# int8 forward vs bf16 forward, relative L2 error of each output. Per-row absmax/127 rounding leaves a uniform
# error of RMS scale/sqrt(12) per weight; for the tiny model's Gaussian rows (absmax ~3.5 sigma) that is ~0.8 % of
# the weights' RMS, and through two fused layers the outputs measured 1.16 % (video) and 1.73 % (audio), about what
# bf16 compute alone costs the same model (0.97 % / 1.06 %). 3 % leaves ~1.7x headroom and is far below what a
# wrong scale (x2: 100 %) or a transposed layout would give.
INT8_REL_ERROR = 0.03
INT8_LATENT_REL_ERROR = 0.05  # two sampling steps through the engine measured 1.6 % (video) / 1.2 % (audio)


@pytest.fixture(scope="module")
def fusion_sd(tiny_dir):
    return load_file(str(tiny_dir / "Ovi" / "model.safetensors"))  # 720x720_5s, bf16, seed 0


@pytest.fixture(scope="module")
def pairs(fusion_sd, tmp_path_factory):
    """{kind: {"video" | "audio": path}} of one folder holding the bf16 and the int8 Ovi 1.0 pair."""
    folder = tmp_path_factory.mktemp("wan2gp")
    return {kind: write_pair(fusion_sd, folder, "720x720_5s", kind) for kind in ("bf16", "quanto_bf16_int8")}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(48, 3, 4, 6, generator=g), torch.randn(9, 20, generator=g), torch.tensor([800]),
            torch.randn(5, 32, generator=g), torch.randn(7, 32, generator=g))


@torch.no_grad()
def _forward(model):
    return model(*_inputs())


def _rel(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


# -- the files as written -------------------------------------------------------------------------------
def test_tiny_files_have_the_wan2gp_layout(pairs):
    with safe_open(str(pairs["bf16"]["video"]), "pt") as f:
        keys = list(f.keys())
        assert not any(k.startswith(("video_model.", "audio_model.")) for k in keys)
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
        assert "ovi.config" not in (f.metadata() or {})  # Wan2GP's files carry no config
    with safe_open(str(pairs["quanto_bf16_int8"]["audio"]), "pt") as f:
        meta = f.metadata()
        qmap = json.loads(base64.b64decode(meta[MAP_KEY]))
        assert meta["quantization_format"] == "quanto"
        assert len(qmap) == BLOCK_LINEARS * TINY_CONFIG.num_layers
        assert qmap["blocks.0.cross_attn.k_fusion"] == {"weights": "qint8", "activations": "none"}
        data, scale = f.get_tensor("blocks.0.ffn.0.weight._data"), f.get_tensor("blocks.0.ffn.0.weight._scale")
        assert data.dtype == torch.int8 and list(data.shape) == [TINY_CONFIG.audio.ffn_dim, TINY_CONFIG.audio.dim]
        assert scale.dtype == torch.bfloat16 and list(scale.shape) == [TINY_CONFIG.audio.ffn_dim, 1]
        assert f.get_tensor("blocks.0.ffn.0.input_scale").shape == ()
        assert f.get_tensor("patch_embedding.0.weight").dtype == torch.bfloat16  # outside the map: bf16


# -- loading ----------------------------------------------------------------------------------------------
def test_bf16_pair_forward_equals_the_original_bit_exactly(tiny_dir, pairs):
    original = load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32)
    want = _forward(original)
    for half in ("video", "audio"):  # either half picked: the partner is found beside it
        paths = split_pair(pairs["bf16"][half])
        assert paths == [pairs["bf16"]["video"], pairs["bf16"]["audio"]]
        m = load_fusion_model(paths, dtype=torch.float32)
        assert m.config == TINY_CONFIG  # inferred from the shapes: the files carry no ovi.config
        for got, ref in zip(_forward(m), want):
            assert torch.equal(got, ref)


def test_int8_pair_keeps_int8_weights_and_stays_close_to_bf16(tiny_dir, pairs):
    ref = _forward(load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32))
    path = pairs["quanto_bf16_int8"]["audio"]
    m = load_fusion_model(split_pair(path), dtype=torch.float32)
    int8 = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, Int8Linear)]
    assert len(int8) == 2 * BLOCK_LINEARS * TINY_CONFIG.num_layers
    assert {n.split(".")[0] for n, _ in int8} == {"video_model", "audio_model"}
    q = m.audio_model.blocks[1].cross_attn.v_fusion
    assert isinstance(q, Int8Linear) and q.weight.dtype == torch.int8 and q.scale.dtype == torch.float32
    with safe_open(str(path), "pt") as f:  # as stored: the same int8 values, the bf16 scales widened exactly
        assert torch.equal(q.weight, f.get_tensor("blocks.1.cross_attn.v_fusion.weight._data"))
        assert torch.equal(q.scale, f.get_tensor("blocks.1.cross_attn.v_fusion.weight._scale").float())
    # layers outside the map stay float
    assert m.video_model.text_embedding[0].weight.dtype == torch.float32
    assert m.video_model.blocks[0].modulation.modulation.dtype == torch.float32
    got = _forward(m)
    errors = [_rel(g, r) for g, r in zip(got, ref)]
    assert all(0 < e < INT8_REL_ERROR for e in errors), errors
    # in bf16 compute the int8 buffers are still int8
    mb = load_fusion_model(split_pair(path))
    assert mb.video_model.blocks[0].ffn[0].weight.dtype == torch.int8
    assert mb.video_model.blocks[0].ffn[0].bias.dtype == torch.bfloat16


def test_block_swap_streams_the_int8_buffers_as_stored(pairs):
    float_model = load_fusion_model(split_pair(pairs["bf16"]["video"]), dtype=torch.float32)
    float_swapper = BlockSwapper(float_model, 1, "cpu", copier=_CloneCopier)
    float_bytes = float_swapper.streamed_bytes()
    float_swapper.detach()
    m = load_fusion_model(split_pair(pairs["quanto_bf16_int8"]["video"]), dtype=torch.float32)
    want = _forward(m)
    swapper = BlockSwapper(m, 1, "cpu", copier=_CloneCopier)
    try:
        streamed = swapper._layer_masters[1]
        assert sum(t.dtype == torch.int8 for t in streamed) == 2 * BLOCK_LINEARS  # both branches' layer 1
        assert swapper.streamed_bytes() < 0.5 * float_bytes  # moved at one byte per int8 weight
        with torch.no_grad():
            got = swapper.forward(*_inputs())
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    finally:
        swapper.detach()


def test_lonely_half_names_its_missing_partner(pairs, tmp_path):
    for kind in ("bf16", "quanto_bf16_int8"):
        for half, other in (("video", "audio"), ("audio", "video")):
            lonely = tmp_path / kind / pairs[kind][half].name
            lonely.parent.mkdir(exist_ok=True)
            lonely.write_bytes(pairs[kind][half].read_bytes())
            with pytest.raises(CheckpointError) as e:
                split_pair(lonely)
            assert e.value.path == str(lonely)
            assert f"its {other} branch must sit beside it as {file_name('720x720_5s', other, kind)}" in str(e.value)
            with pytest.raises(CheckpointError, match=f"only the {half} branch"):
                load_fusion_model(lonely)
            lonely.unlink()


def test_inspect_reports_branch_quantisation_and_stored_sizes(pairs):
    bf16, int8 = inspect_file(pairs["bf16"]["video"]), inspect_file(pairs["quanto_bf16_int8"]["video"])
    assert (bf16.component, int8.component) == ("fusion_video", "fusion_video")
    assert inspect_file(pairs["quanto_bf16_int8"]["audio"]).component == "fusion_audio"
    assert bf16.quantization is None and "qint8" in int8.quantization and "optimum-quanto" in int8.quantization
    with safe_open(str(pairs["quanto_bf16_int8"]["video"]), "pt") as f:
        assert int8.tensor_count == len(list(f.keys()))  # the file's count, activation scales included
    linears = BLOCK_LINEARS * TINY_CONFIG.num_layers
    assert sum(1 for k in int8.stored_bytes if k.endswith(".weight")) == linears
    key = "blocks.0.ffn.0.weight"
    out, inp = TINY_CONFIG.video.ffn_dim, TINY_CONFIG.video.dim
    assert int8.shapes[key] == (out, inp) and int8.stored_bytes[key] == out * inp  # one byte a weight
    assert int8.stored_bytes["blocks.0.ffn.0.scale"] == out * 4  # float32 scales
    assert "blocks.0.ffn.0.input_scale" not in int8.shapes  # unused quanto buffers: not loaded
    # the same model: the int8 file casts everything but the quantised weights (and their scales)
    quantised = sum(math.prod(int8.shapes[k]) for k in int8.stored_bytes if k.endswith(".weight"))
    assert int8.cast_numel == bf16.cast_numel - quantised


# -- variants ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["720x720_5s", "960x960_5s", "960x960_10s"])
@pytest.mark.parametrize("kind", ["bf16", "quanto_bf16_int8"])
def test_variant_from_the_wan2gp_name(variant, kind, tmp_path):
    names = [file_name(variant, b, kind) for b in ("video", "audio")]
    assert names[0].startswith({"720x720_5s": "wan2.2_ovi_video", "960x960_5s": "wan2.2_ovi1_1_video",
                                "960x960_10s": "wan2.2_ovi1_1_10s_video"}[variant])
    for name in names:
        choice = resolve_variant([tmp_path / name], metadata=[{}])
        assert choice.variant.name == variant and choice.source == "name"
        assert choice.detail == f"Wan2GP file name {name}"
    with pytest.raises(ValueError, match="Wan2GP name of the"):  # an exact published name: no contrary choice
        resolve_variant([tmp_path / names[0]], "960x960_5s" if variant != "960x960_5s" else "720x720_5s",
                        metadata=[{}])


def test_variant_from_a_wan2gp_style_name_is_a_guess(tmp_path):
    name = "wan2.2_ovi1_1_10s_video_10B_quanto_fp16_int8.safetensors"  # the spelling Wan2GP's 1.0 code mentions
    choice = resolve_variant([tmp_path / name], metadata=[{}])
    assert choice.variant.name == "960x960_10s" and "matched as a Wan2GP name" in choice.detail
    assert resolve_variant([tmp_path / "wan2.2_ovi_audio_10B_fp16.safetensors"], metadata=[{}]).variant.name == \
        "720x720_5s"
    # a guess gives way to an explicit choice
    assert resolve_variant([tmp_path / name], "960x960_5s", metadata=[{}]).source == "explicit choice"


def test_inspected_variant_records_the_wan2gp_name(pairs):
    info = inspect_file(pairs["quanto_bf16_int8"]["audio"])
    assert info.variant == "720x720_5s"
    assert info.variant_source == f"name (Wan2GP file name {pairs['quanto_bf16_int8']['audio'].name})"


# -- the engine -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_run(tiny_dir):
    e = OviEngine.from_dir(tiny_dir, fusion=tiny_dir / "Ovi" / "model.safetensors", memory_mode="all_gpu")
    return e.generate(PROMPT, **GEN)


def test_engine_generates_from_the_bf16_pair_like_the_original(tiny_dir, pairs, bf16_run):
    e = OviEngine.from_dir(tiny_dir, fusion=split_pair(pairs["bf16"]["audio"]), memory_mode="all_gpu")
    assert e.variant.name == "720x720_5s" and e.variant_choice.source == "name"
    assert "Wan2GP" in e.variant_choice.detail
    r = e.generate(PROMPT, **GEN)
    assert r.variant == "720x720_5s" and r.prompt.endswith("<ENDAUDCAP>")  # Ovi 1.0 caption style
    assert torch.equal(r.video_latent, bf16_run.video_latent) and torch.equal(r.audio_latent, bf16_run.audio_latent)


def test_engine_generates_from_the_int8_pair(tiny_dir, pairs, bf16_run):
    # one half given: the engine finds its partner beside it, as the nodes do
    e = OviEngine.from_dir(tiny_dir, fusion=pairs["quanto_bf16_int8"]["audio"], memory_mode="all_gpu")
    assert [Path(p).name for p in e.paths["fusion"]] == [pairs["quanto_bf16_int8"][b].name for b in ("video", "audio")]
    assert e.variant.name == "720x720_5s"
    e.load()
    assert e.fusion_model.audio_model.blocks[0].self_attn.q.weight.dtype == torch.int8
    r = e.generate(PROMPT, **GEN)
    for got, ref in ((r.video_latent, bf16_run.video_latent), (r.audio_latent, bf16_run.audio_latent)):
        assert got.shape == ref.shape and torch.isfinite(got).all()
        assert not torch.equal(got, ref)
        assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.99
        assert _rel(got, ref) < INT8_LATENT_REL_ERROR


def test_engine_plans_int8_weights_at_stored_size(tiny_dir, pairs):
    from ovi.residency import module_tensors

    e = OviEngine.from_dir(tiny_dir, fusion=list(pairs["quanto_bf16_int8"].values()), memory_mode="all_gpu")
    planned = e._slots["fusion"].host_bytes(e.dtype)
    e.load()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module_tensors(e.fusion_model)}
    held = sum(storages.values())
    assert abs(planned - held) <= 0.02 * held, (planned, held)
    layer, other, layers, dim, ffn = e._fusion_sizes()
    assert layer * layers + other == planned and (dim, ffn) == (TINY_CONFIG.video.dim, TINY_CONFIG.video.ffn_dim)
    bf16 = OviEngine.from_dir(tiny_dir, fusion=list(pairs["bf16"].values()), memory_mode="all_gpu")
    assert layer < 0.5 * bf16._fusion_sizes()[0]  # float32 compute here: int8 block linears are a quarter


def test_converter_reads_int8_as_its_float_values(pairs, tmp_path):
    from ovi.convert import convert_fp8

    path = pairs["quanto_bf16_int8"]["video"]
    files, readers, sources, cfg, _ = fusion_sources(split_pair(path))
    try:
        w = sources["video_model.blocks.0.self_attn.k.weight"].load()
        assert w.dtype.is_floating_point and not any(k.endswith(".scale") for k in sources)
        with safe_open(str(path), "pt") as f:
            want = (f.get_tensor("blocks.0.self_attn.k.weight._data").float()
                    * f.get_tensor("blocks.0.self_attn.k.weight._scale").float())
        assert torch.equal(w, want)
    finally:
        for r in readers:
            r.close()
    out = tmp_path / "from_int8_fp8.safetensors"
    stats = convert_fp8(split_pair(path), out)
    assert stats["variant"] == "720x720_5s"
    ref = _forward(load_fusion_model(split_pair(path), dtype=torch.float32))
    got = _forward(load_fusion_model(out, dtype=torch.float32))
    assert all(_rel(g, r) < 0.1 for g, r in zip(got, ref))


# -- malformed quanto files -------------------------------------------------------------------------------
def _damaged(pairs, tmp_path, edit) -> tuple[list[Path], Path]:
    """The int8 pair copied to tmp_path with the audio half passed through ``edit(sd, qmap, meta)``."""
    src = pairs["quanto_bf16_int8"]
    video, audio = tmp_path / src["video"].name, tmp_path / src["audio"].name
    video.write_bytes(src["video"].read_bytes())
    with safe_open(str(src["audio"]), "pt") as f:
        meta = dict(f.metadata())
    sd = load_file(str(src["audio"]))
    qmap = json.loads(base64.b64decode(meta[MAP_KEY]))
    edit(sd, qmap, meta)
    if MAP_KEY in meta and not meta[MAP_KEY].startswith("!"):
        meta[MAP_KEY] = base64.b64encode(json.dumps(qmap).encode()).decode()
    meta = {k: v.removeprefix("!") for k, v in meta.items()}
    save_file(sd, str(audio), metadata=meta)
    return [video, audio], audio


L = "blocks.1.self_attn.o"


def _set(key, value):
    return lambda sd, qmap, meta: sd.__setitem__(key, value)


def _drop(key):
    return lambda sd, qmap, meta: sd.pop(key)


def _map(layer, entry):
    return lambda sd, qmap, meta: qmap.__setitem__(layer, entry) if entry is not None else qmap.pop(layer)


def _meta(key, value):
    return lambda sd, qmap, meta: meta.__setitem__(key, "!" + value) if value is not None else meta.pop(key)


def _scale(fn):
    def edit(sd, qmap, meta):
        s = sd[L + ".weight._scale"].clone()
        fn(s)
        sd[L + ".weight._scale"] = s
    return edit


DIM = TINY_CONFIG.audio.dim
MALFORMED = {
    "data_not_int8": (_set(L + ".weight._data", torch.zeros(DIM, DIM, dtype=torch.int16)), "is int16.*int8"),
    "data_float": (_set(L + ".weight._data", torch.zeros(DIM, DIM, dtype=torch.bfloat16)), "is bfloat16.*int8"),
    "data_not_2d": (_set(L + ".weight._data", torch.zeros(DIM * DIM, dtype=torch.int8)), "only Linear weights"),
    "scale_int": (_set(L + ".weight._scale", torch.ones(DIM, 1, dtype=torch.int32)), "is int32; a weight scale"),
    "scale_shape": (_set(L + ".weight._scale", torch.ones(DIM, 2, dtype=torch.bfloat16)), "has shape \\[256, 2\\]"),
    "scale_rows": (_set(L + ".weight._scale", torch.ones(DIM // 2, 1, dtype=torch.bfloat16)), "one per output row"),
    "scale_nan": (_scale(lambda s: s.__setitem__((3, 0), math.nan)), "holds nan; a weight scale is finite"),
    "scale_inf": (_scale(lambda s: s.__setitem__((0, 0), math.inf)), "holds inf"),
    "scale_zero": (_scale(lambda s: s.__setitem__((5, 0), 0.0)), "holds 0; .* \\(zero erases"),
    "scale_negative": (_scale(lambda s: s.__setitem__((7, 0), -0.01)), "holds -0.01"),
    "data_without_scale": (_drop(L + ".weight._scale"), "no .*_scale beside it"),
    "scale_without_data": (lambda sd, qmap, meta: (sd.pop(L + ".weight._data"), qmap.pop(L)), "scale without its"),
    "map_names_a_missing_layer": (_map("blocks.7.self_attn.q", {"weights": "qint8", "activations": "none"}),
                                  "'blocks.7.self_attn.q' names a layer the file does not hold"),
    "map_none_names_a_missing_layer": (_map("blocks.0.nothing", {"weights": "none", "activations": "none"}),
                                       "names a layer the file does not hold"),
    "data_not_in_map": (_map(L, None), "is quantised, but .* is not a qint8 entry"),
    "qtype_qint4": (_map(L, {"weights": "qint4", "activations": "none"}), "'qint4'; only qint8 weights are supported"),
    "qtype_qfloat8": (_map(L, {"weights": "qfloat8", "activations": "none"}), "only qint8 weights are supported"),
    "activations_quantised": (_map(L, {"weights": "qint8", "activations": "qint8"}), "quantises activations"),
    "entry_not_an_object": (_map(L, "qint8"), "the entry for .* is \"qint8\""),
    "map_bad_base64": (_meta(MAP_KEY, "not*base64"), f"{MAP_KEY} is not valid base64"),
    "map_not_json": (_meta(MAP_KEY, base64.b64encode(b"{blocks").decode()), f"{MAP_KEY} does not decode to JSON"),
    "map_a_list": (_meta(MAP_KEY, base64.b64encode(b"[1, 2]").decode()), f"{MAP_KEY} decodes to a JSON list"),
    "map_missing": (_meta(MAP_KEY, None), "has no quantization_map_base64"),
    "format_other": (_meta("quantization_format", "bitsandbytes"), "quantization_format='bitsandbytes'"),
    "activation_scale_not_scalar": (_set(L + ".input_scale", torch.ones(3, dtype=torch.bfloat16)),
                                    "input_scale is bfloat16 \\[3\\]"),
}


# cases about the header metadata or another layer: `message` holds the metadata key / layer named
NAMED_ELSEWHERE = {"map_names_a_missing_layer", "map_none_names_a_missing_layer", "map_bad_base64", "map_not_json",
                   "map_a_list", "map_missing", "format_other"}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_quanto_file_is_refused_naming_file_and_key(pairs, tmp_path, case):
    edit, message = MALFORMED[case]
    paths, bad = _damaged(pairs, tmp_path, edit)
    header_only = not case.startswith("scale_") or case in ("scale_int", "scale_shape", "scale_rows",
                                                            "scale_without_data")
    calls = [lambda: load_fusion_model(paths), lambda: load_fusion_model(list(reversed(paths)))]
    if header_only:  # what the header shows is refused by `ovi info` / the nodes' inspection too
        calls.append(lambda: inspect_file(bad))
    for call in calls:
        with pytest.raises(CheckpointError, match=message) as e:
            call()
        assert e.value.path == str(bad)
        if case not in NAMED_ELSEWHERE:  # the damaged layer's key is named (the others name theirs in `message`)
            assert L in str(e.value)


def test_the_undamaged_copy_loads(pairs, tmp_path):
    paths, _ = _damaged(pairs, tmp_path, lambda sd, qmap, meta: None)  # the helper itself damages nothing
    assert isinstance(load_fusion_model(paths).audio_model.blocks[1].self_attn.o, Int8Linear)


def test_models_folder_finds_a_wan2gp_pair_only_when_whole(tmp_path):
    from ovi.models_dir import _find_fusion

    ovi = tmp_path / "Ovi"
    ovi.mkdir()
    video, audio = (ovi / file_name("960x960_10s", b, "quanto_bf16_int8") for b in ("video", "audio"))
    video.touch()
    found, tried = _find_fusion(tmp_path, "960x960_10s")
    assert found is None and video in tried and audio in tried
    audio.touch()
    assert _find_fusion(tmp_path, None)[0] == (video, audio)
    bf16 = tuple(ovi / file_name("960x960_10s", b, "bf16") for b in ("video", "audio"))
    for p in bf16:
        p.touch()
    assert _find_fusion(tmp_path, "960x960_10s")[0] == bf16  # the unquantised pair first
