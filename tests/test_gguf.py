"""GGUF: our quantisers and torch dequantisers against gguf-py, the writer/loader round trip, block swap, errors."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from ovi.block_swap import BlockSwapper, _CloneCopier
from ovi.fusion.checkpoint import load_fusion_model
from ovi.fusion.config import FusionConfig
from ovi.loading import CheckpointError
from ovi.quant.gguf_dequant import READABLE, block_sizes, dequantize
from ovi.quant.gguf_load import (GGUFEmbedding, GGUFLinear, llama_t5_name, load_fusion_gguf, load_umt5_gguf)
from ovi.quant.gguf_quantize import quantize, quantize_rtn
from ovi.quant.gguf_write import convert_gguf
from ovi.text.checkpoint import load_umt5
from ovi.tools.tiny import fusion as tiny_fusion
from ovi.tools.tiny import text as tiny_text

ONE_LAYER = FusionConfig(replace(tiny_fusion.TINY_CONFIG.video, num_layers=1),
                         replace(tiny_fusion.TINY_CONFIG.audio, num_layers=1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- quantisers and dequantisers -------------------------------------------------------------------------

def test_q8_0_bytes_identical_to_gguf_py():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(64, 256, generator=g) * 0.05,
                   torch.randn(8, 256, generator=g) * 1e4,
                   torch.arange(256.0).repeat(2, 1) * 0.5 - 64,  # exact .5 ties after scaling
                   torch.zeros(1, 256)])
    x[3, :32] = 0.0
    ours = quantize(x, Q.Q8_0).numpy()
    ref = gguf.quantize(x.numpy(), Q.Q8_0)
    assert ours.dtype == np.uint8 and np.array_equal(ours, ref)


def _blocks_for(qtype: Q, rows: int, seed: int) -> np.ndarray:
    """Valid raw blocks: gguf-py's quantiser where it has one, ours for Q4_K-Q6_K, else random bytes with
    finite fp16 scales."""
    rng = np.random.default_rng(seed)
    block, size = block_sizes(qtype)
    cols = 1024
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype in (Q.Q6_K, Q.Q5_K, Q.Q4_K):
        return quantize(torch.from_numpy(x), qtype).numpy()
    if qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1):
        return np.ascontiguousarray(gguf.quantize(x, qtype)).view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    halves = {Q.Q2_K: (80, 82), Q.Q3_K: (108,)}[qtype]
    for off in halves:
        raw[:, off:off + 2] = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(READABLE), ids=lambda q: q.name)
def test_torch_dequant_equals_gguf_py(qtype):
    raw = _blocks_for(qtype, 16, seed=int(qtype))
    ref = gguf.quants.dequantize(raw if qtype not in (Q.F32, Q.F16) else
                                 raw.view(np.float32 if qtype == Q.F32 else np.float16), qtype)
    ours = dequantize(torch.from_numpy(raw), qtype, (16, 1024))
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).reshape(16, 1024))


def _gguf_py_values(raw: np.ndarray, qtype: Q, shape) -> torch.Tensor:
    ref = gguf.quants.dequantize(raw if qtype not in (Q.F32, Q.F16) else
                                 raw.view(np.float32 if qtype == Q.F32 else np.float16), qtype)
    return torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).reshape(shape)


@pytest.mark.parametrize("qtype", list(READABLE), ids=lambda q: q.name)
def test_dequant_chunks_outputs_and_offsets(qtype):
    """Chunk edges (a last partial chunk), bf16 results, a reused ``out`` buffer and raw bytes that start at
    an odd address all give exactly gguf-py's values (bf16: those values rounded once)."""
    raw = _blocks_for(qtype, 24, seed=100 + int(qtype))
    ref = _gguf_py_values(raw, qtype, (24, 1024))
    block, _ = block_sizes(qtype)
    t = torch.from_numpy(raw)
    for chunk in (block, 5 * block, 7 * 1024 + 3):  # one block; a few blocks; not a multiple of anything
        assert torch.equal(dequantize(t, qtype, (24, 1024), chunk_values=chunk), ref)
        got = dequantize(t, qtype, (24, 1024), torch.bfloat16, chunk_values=chunk)
        assert got.dtype == torch.bfloat16 and torch.equal(got, ref.to(torch.bfloat16))
    out = torch.full((24, 1024), float("nan"))
    assert dequantize(t, qtype, (24, 1024), out=out) is out and torch.equal(out, ref)
    odd = torch.empty(raw.size + 1, dtype=torch.uint8)
    odd[1:] = t.reshape(-1)
    assert torch.equal(dequantize(odd[1:], qtype, (24, 1024)), ref)


def test_interleave_units_agree():
    """The CPU stacks 16-byte units, other devices 8-byte ones: both give the same bytes in value order."""
    from ovi.quant.gguf_dequant import _interleave

    planes = torch.randint(0, 256, (4, 5, 2, 32), dtype=torch.uint8)
    want = planes.permute(1, 2, 0, 3).contiguous()
    for unit in (torch.complex128, torch.int64):
        assert torch.equal(_interleave(planes, 2, unit), want)


def test_dequant_rejects_mismatched_sizes():
    raw = torch.from_numpy(_blocks_for(Q.Q4_K, 4, seed=3))
    with pytest.raises(ValueError, match="blocks hold"):
        dequantize(raw, Q.Q4_K, (4, 1000))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize(raw, Q.Q4_K, (4, 1024), out=torch.empty(1024, 4).t())


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q5_K, Q.Q4_K], ids=lambda q: q.name)
def test_kquant_search_beats_round_to_nearest(qtype):
    g = torch.Generator().manual_seed(1)
    for x in (torch.randn(64, 3072, generator=g) * 0.02,
              torch.distributions.StudentT(3.0).sample((64, 3072)) * 0.02):  # heavy tails, as real weights have
        ours = torch.from_numpy(gguf.quants.dequantize(quantize(x, qtype).numpy(), qtype))
        rtn = torch.from_numpy(gguf.quants.dequantize(quantize_rtn(x, qtype).numpy(), qtype))
        e_ours, e_rtn = _rel(ours, x), _rel(rtn, x)
        assert e_ours < 0.97 * e_rtn, (qtype.name, e_ours, e_rtn)


# -- fusion files ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    src = tiny_fusion.write_tiny(d, seed=5)[0]
    out = {"src": src, "dir": d}
    for q in ("q8_0", "q4_k", "f16"):
        out[q] = convert_gguf(src, d / f"tiny_{q}.gguf", q)
    # one layer is enough to cover the other types' files
    from safetensors.torch import save_file

    one = d / "one_layer.safetensors"
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_fusion.random_state_dict(ONE_LAYER, 9).items()}
    save_file(sd, str(one), metadata={"ovi.config": json.dumps(ONE_LAYER.to_dict()), "ovi.variant": "960x960_10s"})
    for q in ("q6_k", "q5_k", "bf16"):
        out[q] = convert_gguf(one, d / f"one_{q}.gguf", q)
    return out


def _inputs(text_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 48, 3, 4, 4, generator=g), torch.randn(1, 6, 20, generator=g), torch.tensor([700.0]),
            torch.randn(1, 7, text_dim, generator=g), torch.randn(1, 5, text_dim, generator=g))


def _logical(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a loaded model as float32 values, GGUF weights dequantised."""
    out = {}
    for name, mod in model.named_modules():
        for leaf, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None:
                continue
            key = f"{name}.{leaf}" if name else leaf
            if isinstance(mod, (GGUFLinear, GGUFEmbedding)) and leaf == "weight":
                out[key] = mod.gguf.dequantize(t)
            else:
                out[key] = t.float()
    return out


@pytest.mark.parametrize("q", ["q8_0", "q4_k", "f16", "q6_k", "q5_k", "bf16"])
def test_file_reads_back_with_gguf_py_exactly(tiny, q):
    reader = gguf.GGUFReader(str(tiny[q]))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]) == b"ovi"
    loaded = _logical(load_fusion_gguf(tiny[q], dtype=torch.float32))
    types = set()
    for t in reader.tensors:
        types.add(t.tensor_type)
        ref = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        got = loaded.pop(t.name)
        assert torch.equal(ref.reshape(got.shape), got), t.name
    assert not loaded
    want = {"q8_0": Q.Q8_0, "q4_k": Q.Q4_K, "q6_k": Q.Q6_K, "q5_k": Q.Q5_K, "f16": Q.F16, "bf16": Q.BF16}[q]
    assert want in types
    # the 5-D video patch embedding is stored 2-D with its shape in ComfyUI-GGUF's metadata key
    f = reader.fields["comfy.gguf.orig_shape.video_model.patch_embedding.weight"]
    assert [int(f.parts[i][0]) for i in f.data] == [256, 48, 1, 2, 2]


def test_what_gets_quantised(tiny):
    reader = gguf.GGUFReader(str(tiny["q4_k"]))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["video_model.blocks.0.self_attn.q.weight"] == Q.Q4_K
    assert types["audio_model.blocks.1.cross_attn.k_fusion.weight"] == Q.Q4_K
    assert types["video_model.blocks.0.ffn.2.weight"] == Q.Q8_0  # 288-wide rows: not a whole K block
    assert types["video_model.blocks.0.self_attn.q.bias"] == Q.F32
    assert types["video_model.blocks.0.norm3.weight"] == Q.F32
    assert types["video_model.blocks.0.modulation.modulation"] == Q.F32
    assert types["audio_model.patch_embedding.2.w1.weight"] == Q.BF16  # convolutions keep the source precision
    assert tiny["q4_k"].stat().st_size < 0.75 * tiny["f16"].stat().st_size
    meta = reader.fields["ovi.variant"]
    assert bytes(meta.parts[meta.data[0]]).decode() == "720x720_5s"


def test_quantised_weights_stay_quantised_and_forward_is_the_dequantised_model(tiny):
    model = load_fusion_gguf(tiny["q4_k"], dtype=torch.float32)
    vb = model.video_model.blocks[0]
    assert isinstance(vb.self_attn.q, GGUFLinear) and vb.self_attn.q.weight.dtype == torch.uint8
    assert vb.self_attn.q.weight.numel() == 256 * 256 // 256 * 144
    dense = load_fusion_model(tiny["src"], dtype=torch.float32)
    dense.load_state_dict(_logical(model))
    inp = _inputs(32)
    with torch.no_grad():
        for a, b in zip(model(*inp), dense(*inp)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# Tolerances: the tiny model has width 256 and unit-gain random weights, so every weight error reaches the
# output; per-weight relative RMS error is ~0.5 % (Q8_0) and ~7 % (Q4_K) and compounds over two fused
# layers, embeddings and head: measured ~1.3 % and ~18 %, bounded here at about 2x that. F16 holds the bf16
# source values exactly, so only summation order differs.
@pytest.mark.parametrize("q,tol", [("q8_0", 0.03), ("q4_k", 0.35), ("f16", 1e-5)])
def test_tiny_forward_close_to_source(tiny, q, tol):
    ref = load_fusion_model(tiny["src"], dtype=torch.float32)
    model = load_fusion_gguf(tiny[q], dtype=torch.float32)
    inp = _inputs(32)
    with torch.no_grad():
        errs = [_rel(a, b) for a, b in zip(model(*inp), ref(*inp))]
    assert max(errs) < tol, errs
    if q != "f16":
        assert max(errs) > 1e-4  # really quantised


def test_block_swap_same_output(tiny):
    model = load_fusion_gguf(tiny["q4_k"], dtype=torch.float32)
    inp = _inputs(32, seed=3)
    with torch.no_grad():
        want = model(*inp)
    swapper = BlockSwapper(model, 1, "cpu", copier=_CloneCopier)
    assert swapper.streamed_bytes() > 0
    got = swapper.forward(*inp)
    swapper.detach()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert isinstance(model.video_model.blocks[1].self_attn.q, GGUFLinear)


# -- umT5 ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_t5")
    paths = tiny_text.write_tiny(d, seed=2)
    return {"pth": paths[0], "fp16": paths[2], "dir": d}


def _t5_ids(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_umt5_q8_0_llama_names(tiny_t5):
    ref = load_umt5(tiny_t5["pth"], dtype=torch.float32)
    path = convert_gguf(tiny_t5["fp16"], tiny_t5["dir"] / "umt5-q8_0.gguf", "q8_0")
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "enc.blk.0.attn_q.weight", "enc.blk.1.ffn_gate.weight", "enc.output_norm.weight",
            "enc.blk.0.attn_rel_b.weight"} <= names
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]) == b"t5encoder"
    model = load_umt5_gguf(path, dtype=torch.float32)
    assert isinstance(model.token_embedding, GGUFEmbedding)
    assert isinstance(model.blocks[0].ffn.gate[0], GGUFLinear)
    ids, mask = _t5_ids(ref.config.vocab)
    with torch.no_grad():
        err = _rel(model(ids, mask), ref(ids, mask))
    assert 1e-5 < err < 0.03, err  # Q8_0 of width-32 weights, two layers


def test_umt5_official_names_gguf(tiny_t5):
    """A GGUF keeping our (official) key names, plain F32: loads to exactly the source model."""
    ref = load_umt5(tiny_t5["pth"], dtype=torch.float32)
    path = tiny_t5["dir"] / "umt5-official.gguf"
    w = gguf.GGUFWriter(str(path), "t5encoder")
    for k, v in ref.state_dict().items():
        w.add_tensor(k, v.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = load_umt5_gguf(path, dtype=torch.float32)
    ids, mask = _t5_ids(ref.config.vocab)
    with torch.no_grad():
        assert torch.equal(model(ids, mask), ref(ids, mask))
    assert llama_t5_name("blocks.4.ffn.fc2.weight") == "enc.blk.4.ffn_down.weight"


# -- errors ----------------------------------------------------------------------------------------------

def test_wrong_architecture(tiny, tiny_t5):
    with pytest.raises(CheckpointError, match="T5"):
        load_fusion_gguf(convert_gguf(tiny_t5["fp16"], tiny_t5["dir"] / "t5.gguf", "f16"))
    with pytest.raises(CheckpointError, match="Ovi fusion"):
        load_umt5_gguf(tiny["f16"])
    other = tiny["dir"] / "llama.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="'llama'"):
        load_fusion_gguf(other)


@pytest.mark.parametrize("cut", [64, 2000, "half", "last byte"])
def test_truncated(tiny, cut):
    data = tiny["f16"].read_bytes()
    n = {"half": len(data) // 2, "last byte": len(data) - 1}.get(cut, cut)
    bad = tiny["dir"] / f"cut_{n}.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=bad.name):
        load_fusion_gguf(bad)


def test_not_gguf(tiny):
    with pytest.raises(CheckpointError, match="not a GGUF"):
        load_fusion_gguf(tiny["src"])
    copy = tiny["dir"] / "zeros.gguf"
    shutil.copy(tiny["f16"], copy)
    with open(copy, "r+b") as f:  # a damaged header: the tensor count says far more than the file holds
        f.seek(8)
        f.write((1 << 40).to_bytes(8, "little"))
    with pytest.raises(CheckpointError, match="zeros.gguf"):
        load_fusion_gguf(copy)


# -- split pairs and FP8 sources -------------------------------------------------------------------------

def _read_safetensors(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _save(sd, path, meta):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return path


def _split_kj(src, d, stem, meta_on="video", variant=False):
    """``src`` as ComfyUI-WanVideoWrapper's split pair: the video file with unprefixed keys, its
    ``blocks.N.modulation`` spelling and scales shaped [1], no ``scaled_fp8`` marker; the audio file under
    ``audio_model.``. The config goes into the header of one file only (``meta_on``), the variant too if asked."""
    sd, meta = _read_safetensors(src)
    meta = {k: v for k, v in meta.items() if k == "ovi.config" or (variant and k == "ovi.variant")}
    video, audio = {}, {}
    for k, v in sd.items():
        if k.endswith(".scale_weight"):
            v = v.reshape(1)
        if k.startswith("video_model."):
            video[k.removeprefix("video_model.").replace("modulation.modulation", "modulation")] = v
        elif k.startswith("audio_model."):
            audio[k] = v
    return (_save(audio, d / f"{stem}_audio.safetensors", meta if meta_on == "audio" else None),
            _save(video, d / f"{stem}_video.safetensors", meta if meta_on == "video" else None))


def _gguf_tensors(path) -> dict[str, tuple[Q, bytes]]:
    return {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def _gguf_string(path, key: str) -> str:
    f = gguf.GGUFReader(str(path)).fields[key]
    return bytes(f.parts[f.data[0]]).decode()


def test_split_pair_converts_like_the_single_file(tiny):
    d = tiny["dir"]
    audio, video = _split_kj(tiny["src"], d, "pair", meta_on="audio", variant=True)
    out = convert_gguf([audio, video], d / "pair_q8_0.gguf", "q8_0")
    # Q8_0 is deterministic: the same values give the same blocks, whatever file they came from
    assert _gguf_tensors(out) == _gguf_tensors(tiny["q8_0"])
    assert _gguf_string(out, "ovi.variant") == "720x720_5s"
    assert json.loads(_gguf_string(out, "ovi.config")) == tiny_fusion.TINY_CONFIG.to_dict()


@pytest.fixture(scope="module")
def fp8_sources(tiny):
    """FP8 files made from the tiny source: ours (per-tensor scales, ``scaled_fp8`` marker) and the official
    plain casts (no scales; the config in the header as in our tiny files, the shapes cannot give the heads)."""
    from ovi.convert import convert_fp8
    from ovi.quant.fp8 import E4M3
    from ovi.quant.fp8_checkpoint import is_quantised_key

    d = tiny["dir"]
    scaled = d / "fp8_tensor.safetensors"
    convert_fp8(tiny["src"], scaled, granularity="tensor", fp8_format="scaled_fp8")
    sd, meta = _read_safetensors(tiny["src"])
    plain = _save({k: v.to(E4M3) if is_quantised_key(k) else v for k, v in sd.items()},
                  d / "model_fp8_e4m3fn.safetensors", meta)
    return {"scaled": scaled, "plain": plain}


def _fp8_effective(path) -> dict[str, torch.Tensor]:
    """Every weight of an FP8 file as float32, FP8 ones times their scale (1 without one)."""
    from ovi.quant.fp8 import dequantise_fp8

    sd, _ = _read_safetensors(path)
    return {k: dequantise_fp8(v, sd.get(k[: -len(".weight")] + ".scale_weight")) for k, v in sd.items()
            if not k.endswith(".scale_weight") and k != "scaled_fp8"}


# Q8_0 keeps 8 bits per 32 values: measured 0.54-0.56 % relative error per tensor over both layouts and three
# seeds; 1 % still catches a lost or doubled scale (errors of 100 % and more).
@pytest.mark.parametrize("layout", ["scaled", "plain"])
def test_fp8_source_to_q8_0(tiny, fp8_sources, layout, caplog):
    from ovi.loading import FP8_DTYPES

    caplog.set_level(logging.INFO, logger="ovi")
    out = convert_gguf(fp8_sources[layout], tiny["dir"] / f"from_fp8_{layout}.gguf", "q8_0")
    assert any("FP8 rounding error" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    names = set(_gguf_tensors(out))
    assert not [n for n in names if "scale_weight" in n or "scaled_fp8" in n]
    ref = _fp8_effective(fp8_sources[layout])
    got = _logical(load_fusion_gguf(out, dtype=torch.float32))
    assert set(got) == set(ref) == names
    fp8_keys = {k for k, v in _read_safetensors(fp8_sources[layout])[0].items() if v.dtype in FP8_DTYPES and v.numel()}
    assert len(fp8_keys) == 48
    errs = {k: _rel(got[k], ref[k]) for k in ref}
    assert max(errs.values()) < 0.01, max(errs.items(), key=lambda kv: kv[1])
    assert max(errs[k] for k in fp8_keys) > 1e-4  # really quantised again


def test_fp8_source_to_f16_keeps_the_fp8_values(tiny, fp8_sources, caplog):
    caplog.set_level(logging.INFO, logger="ovi")
    out = convert_gguf(fp8_sources["scaled"], tiny["dir"] / "from_fp8_f16.gguf", "f16")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    ref = _fp8_effective(fp8_sources["scaled"])
    got = _logical(load_fusion_gguf(out, dtype=torch.float32))
    assert set(got) == set(ref)
    for k in ref:  # only the float16 rounding of each value: measured at most 2.5e-4
        assert _rel(got[k], ref[k]) < 1e-3, k


def test_cli_split_fp8_pair_to_gguf(tiny, fp8_sources):
    """The KJ split layout of an FP8 file, named video first on the command line, with ``--variant``: the same
    tensors as converting the single FP8 file, and the variant recorded."""
    from ovi.convert import main_convert

    d = tiny["dir"]
    audio, video = _split_kj(fp8_sources["scaled"], d, "kj_fp8")
    single = convert_gguf(fp8_sources["scaled"], d / "fp8_single_q8_0.gguf", "q8_0")
    out = d / "kj_pair_q8_0.gguf"
    assert main_convert(["--to", "gguf-q8_0", "--variant", "960x960_10s", str(video), str(audio), str(out)]) == 0
    assert _gguf_tensors(out) == _gguf_tensors(single)
    assert _gguf_string(out, "ovi.variant") == "960x960_10s"
    assert "kj-scaled" in _gguf_string(out, "ovi.quant.source")


def test_convert_errors_name_what_gguf_takes(tiny, tmp_path):
    sd, meta = _read_safetensors(tiny["src"])
    half = _save({k: v for k, v in sd.items() if k.startswith("audio_model.")}, tmp_path / "half.safetensors", meta)
    with pytest.raises(CheckpointError, match="only the audio branch.*GGUF conversion takes"):
        convert_gguf(half, tmp_path / "x.gguf", "q8_0")
    with pytest.raises(CheckpointError, match="both files hold the audio branch"):
        convert_gguf([half, half], tmp_path / "x.gguf", "q8_0")
    with pytest.raises(ValueError, match="differ"):
        convert_gguf(tiny["src"], tiny["src"], "q8_0")
    with pytest.raises(CheckpointError, match="missing.safetensors: file not found"):
        convert_gguf([tiny["src"], tmp_path / "missing.safetensors"], tmp_path / "x.gguf", "q8_0")
    assert not list(tmp_path.glob("*.gguf*"))
