"""ComfyUI's mixed-precision quantized format for the fusion model: `python -m ovi convert --to fp8` writes it by
default (``_quantization_metadata`` naming exactly the quantized layers, ``<layer>.weight_scale``), the loader
and ``ovi info`` read it (header or per-layer ``.comfy_quant`` entries; float8_e4m3fn, float8_e5m2,
int8_tensorwise; static ``input_scale`` used by ``_scaled_mm``), the older scaled_fp8 marker format stays
readable and writable on request, and every malformed file is a CheckpointError naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ovi.__main__ import main
from ovi.detect import inspect_file
from ovi.fusion.checkpoint import load_fusion_model
from ovi.loading import CheckpointError
from ovi.quant import fp8 as fp8mod
from ovi.quant.fp8 import E4M3, FP8Linear, cpu_scaled_mm_available, dequantise_fp8, quantise_fp8, set_fp8_compute
from ovi.quant.fp8_checkpoint import is_quantised_key
from ovi.tools.tiny.fusion import TINY_CONFIG, random_state_dict

# The FP8 end-to-end tolerance of tests/test_fp8.py (E2E_TOL: e4m3 rounding of ~6 linears in series per layer).
E2E_TOL = 0.10
# The twelve linears the converter keeps in bf16 (embeddings, time projection, heads), per branch.
KEPT_LINEARS = [f"{b}_model.{m}" for b in ("video", "audio") for m in (
    "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1", "head.head")]
QUANT_KEY = "_quantization_metadata"


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _save(sd, path: Path, meta: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta or None)
    return path


def _layers(meta: dict[str, str]) -> dict[str, dict]:
    return json.loads(meta[QUANT_KEY])["layers"]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 48, 2, 4, 4, generator=g), torch.randn(1, 6, 20, generator=g),
            torch.randn(1, 7, 32, generator=g))


@torch.no_grad()
def _run(model):
    v, a, ctx = _inputs()
    return model(v, a, 500.0, ctx, ctx)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def converted(tiny_dir, tmp_path_factory):
    """The tiny 960x960_10s model converted three ways: the default, the old format asked for, per channel."""
    src = tiny_dir / "Ovi" / "model_960x960_10s.safetensors"
    d = tmp_path_factory.mktemp("comfy_quant")
    out = {"src": src, "default": d / "default.safetensors", "scaled_fp8": d / "marker.safetensors",
           "channel": d / "channel.safetensors"}
    assert main(["convert", "--to", "fp8", str(src), str(out["default"])]) == 0
    assert main(["convert", "--to", "fp8", "--fp8-format", "scaled_fp8", str(src), str(out["scaled_fp8"])]) == 0
    assert main(["convert", "--to", "fp8", "--granularity", "channel", str(src), str(out["channel"])]) == 0
    return out


# -- writing -------------------------------------------------------------------------------------------------

def test_default_output_lists_exactly_the_quantized_layers(converted):
    sd, meta = _read(converted["default"])
    layers = _layers(meta)
    assert json.loads(meta[QUANT_KEY])["format_version"] == "1.0"
    fp8_layers = {k[: -len(".weight")] for k, v in sd.items() if v.dtype == E4M3}
    assert set(layers) == fp8_layers and len(layers) == 2 * TINY_CONFIG.num_layers * 12
    assert all(entry == {"format": "float8_e4m3fn"} for entry in layers.values())
    assert all(is_quantised_key(name + ".weight") for name in layers)
    for name in layers:
        scale = sd[name + ".weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == () and float(scale) > 0
    for name in KEPT_LINEARS:  # the bf16 linears are plain tensors, not listed
        assert name not in layers and sd[name + ".weight"].dtype == torch.bfloat16
    assert "scaled_fp8" not in sd and not [k for k in sd if k.endswith((".scale_weight", ".input_scale"))]
    # our own header metadata, as for the marker format
    assert meta["ovi.quant.format"] == "fp8_e4m3fn_scaled" and meta["ovi.quant.granularity"] == "tensor"
    assert meta["ovi.variant"] == "960x960_10s" and "model_960x960_10s.safetensors" in meta["ovi.quant.source"]


def test_old_marker_format_is_written_when_asked_and_for_per_channel_scales(converted, tmp_path, capsys):
    for name, shape in (("scaled_fp8", ()), ("channel", None)):
        sd, meta = _read(converted[name])
        assert QUANT_KEY not in meta and sd["scaled_fp8"].dtype == E4M3
        scales = {k: v for k, v in sd.items() if k.endswith(".scale_weight")}
        assert len(scales) == 48 and not [k for k in sd if k.endswith(".weight_scale")]
        assert all(v.shape == (shape if shape is not None else (sd[k[:-13] + ".weight"].shape[0], 1))
                   for k, v in scales.items())
    # ComfyUI's float8 format has no per-channel scales: asking for both is refused, nothing written
    dst = tmp_path / "refused.safetensors"
    assert main(["convert", "--to", "fp8", "--fp8-format", "comfy_quant", "--granularity", "channel",
                 str(converted["src"]), str(dst)]) == 1
    assert "per-tensor scales only" in capsys.readouterr().err and not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(["convert", "--to", "gguf-q8_0", "--fp8-format", "scaled_fp8", str(converted["src"]), str(dst)])


# -- reading -------------------------------------------------------------------------------------------------

def test_default_output_computes_like_the_marker_format(converted):
    ref = _run(load_fusion_model(converted["src"], dtype=torch.float32))
    marker = load_fusion_model(converted["scaled_fp8"], dtype=torch.float32)
    comfy = load_fusion_model(converted["default"], dtype=torch.float32)
    lin = [m for m in comfy.modules() if isinstance(m, FP8Linear)]
    assert len(lin) == 48 and all(m.weight.dtype == E4M3 and m.input_scale is None for m in lin)
    assert comfy.video_model.text_embedding[0].weight.dtype == torch.float32
    a, b = dict(marker.state_dict()), dict(comfy.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same weights and scales
    got, want = _run(comfy), _run(marker)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for out, r in zip(got, ref):
        assert 1e-3 < _rel(out, r) < E2E_TOL


def test_per_layer_comfy_quant_tensors_read_like_the_header(converted, tmp_path):
    """What ComfyUI writes when it saves: no header entry, a uint8 JSON tensor per quantized layer."""
    sd, meta = _read(converted["default"])
    layers = _layers(meta)
    meta.pop(QUANT_KEY)
    for name, entry in layers.items():
        sd[name + ".comfy_quant"] = torch.tensor(list(json.dumps(entry).encode()), dtype=torch.uint8)
    p = _save(sd, tmp_path / "tensors.safetensors", meta)
    got = _run(load_fusion_model(p, dtype=torch.float32))
    want = _run(load_fusion_model(converted["default"], dtype=torch.float32))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    info = inspect_file(p)
    assert "ComfyUI mixed-precision (per-layer .comfy_quant tensors)" in info.quantization
    assert "48 layers float8_e4m3fn" in info.quantization


def test_ovi_info_names_the_format(converted, capsys):
    assert main(["info", str(converted["default"])]) == 0
    out = capsys.readouterr().out
    assert ("quantization: fp8_e4m3fn, per-tensor scales, ComfyUI mixed-precision (_quantization_metadata), "
            "written by `python -m ovi convert`: 48 layers float8_e4m3fn") in out
    assert "variant:      960x960_10s, from metadata" in out
    assert '"layers"' not in out  # the layer list is summed up, not dumped
    assert main(["info", str(converted["scaled_fp8"])]) == 0
    assert "ComfyUI scaled-fp8 convention, written by `python -m ovi convert`" in capsys.readouterr().out


def _comfy_sd(seed=3, formats=None):
    """A ComfyUI-style file's tensors and header (layers as stored, no ovi metadata) from a random tiny model,
    and the float32 state dict of its effective weights. ``formats``: {layer: format} overrides (default
    float8_e4m3fn per tensor for every block linear)."""
    sd32 = random_state_dict(TINY_CONFIG, seed)
    sd, ref, layers = {}, {}, {}
    for k, v in sd32.items():
        name = k[: -len(".weight")]
        if not is_quantised_key(k):
            sd[k] = v.to(torch.bfloat16)
            ref[k] = sd[k].float()
            continue
        fmt = (formats or {}).get(name, "float8_e4m3fn")
        if fmt == "int8_tensorwise" or fmt == "int8_rows":
            rows = fmt == "int8_rows"
            scale = (v.abs().amax(dim=1, keepdim=True) if rows else v.abs().amax()) / 127
            q = torch.round(v / scale).clamp(-127, 127).to(torch.int8)
            sd[k], sd[name + ".weight_scale"] = q, scale.float()
            ref[k] = q.float() * scale.float()
            fmt = "int8_tensorwise"
        else:
            dtype = torch.float8_e5m2 if fmt == "float8_e5m2" else E4M3
            q, scale = quantise_fp8(v, "tensor", dtype=dtype)
            sd[k], sd[name + ".weight_scale"] = q, scale
            ref[k] = dequantise_fp8(q, scale)
        layers[name] = {"format": fmt}
    meta = {QUANT_KEY: json.dumps({"format_version": "1.0", "layers": layers}),
            "ovi.config": json.dumps(TINY_CONFIG.to_dict())}
    return sd, meta, ref


@pytest.mark.parametrize("kind", ["float8_e5m2", "int8_tensorwise"])
def test_other_formats_load_at_their_effective_weights(kind, tmp_path):
    """float8_e5m2 layers stay FP8 (FP8Linear); int8_tensorwise layers (per-tensor and per-row scales, mixed with
    e4m3 ones) are dequantised at load. Upcast computes the stored weight times its scale, as the reference
    weights are, so the outputs agree up to summation order."""
    names = [k[: -len(".weight")] for k in random_state_dict(TINY_CONFIG, 3) if is_quantised_key(k)]
    if kind == "float8_e5m2":
        formats = {n: "float8_e5m2" for n in names}
    else:
        formats = {n: ("int8_tensorwise", "int8_rows", "float8_e4m3fn")[i % 3] for i, n in enumerate(names)}
    sd, meta, ref_sd = _comfy_sd(formats=formats)
    p = _save(sd, tmp_path / "comfy.safetensors", meta)
    ref = _run(load_fusion_model(_save(ref_sd, tmp_path / "ref.safetensors", {"ovi.config": meta["ovi.config"]}),
                                 dtype=torch.float32))
    m = load_fusion_model(p, dtype=torch.float32)
    lin = [x for x in m.modules() if isinstance(x, FP8Linear)]
    modules = dict(m.named_modules())
    if kind == "float8_e5m2":
        assert len(lin) == 48 and all(x.weight.dtype == torch.float8_e5m2 for x in lin)
    else:
        assert len(lin) == 16
        for n, f in formats.items():  # int8 layers are plain linears at the load dtype
            assert isinstance(modules[n], FP8Linear) == (f == "float8_e4m3fn"), n
            assert f == "float8_e4m3fn" or modules[n].weight.dtype == torch.float32, n
    out = _run(m)
    assert _rel(out[0], ref[0]) < 1e-5 and _rel(out[1], ref[1]) < 1e-5
    q = inspect_file(p).quantization
    want = ("fp8_e5m2, per-tensor scales, ComfyUI mixed-precision (_quantization_metadata): 48 layers float8_e5m2"
            if kind == "float8_e5m2" else
            "ComfyUI mixed-precision (_quantization_metadata): 16 layers float8_e4m3fn, 32 layers int8_tensorwise "
            "(dequantised at load)")
    assert want in q, q


@pytest.mark.skipif(not cpu_scaled_mm_available(), reason="this torch has no CPU torch._scaled_mm")
def test_static_input_scale_is_the_activation_scale_of_scaled_mm(converted, tmp_path, monkeypatch):
    sd, meta = _read(converted["default"])
    layers = sorted(_layers(meta))
    statics = {name: torch.tensor(0.004 * (i + 1), dtype=torch.float32) for i, name in enumerate(layers)}
    for name, s in statics.items():
        sd[name + ".input_scale"] = s
    p = _save(sd, tmp_path / "static.safetensors", meta)
    model = load_fusion_model(p, dtype=torch.bfloat16)
    lin = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert set(lin) == set(layers)
    for name, m in lin.items():  # kept float32 at the file's value whatever the load dtype
        assert m.input_scale.dtype == torch.float32 and torch.equal(m.input_scale, statics[name])
    assert "48 with a static input_scale" in inspect_file(p).quantization
    monkeypatch.setattr(fp8mod, "_forced_cache", {})
    assert set_fp8_compute(model, "scaled_mm", cpu_kernel=True) == 48
    fp8mod.check_forced_scaled_mm("cpu", cpu_kernel=True)  # the kernel probe, before the spy counts calls
    real, seen = torch._scaled_mm, []

    def spy(a, b, *, scale_a, scale_b, **kw):
        seen.append((scale_a.detach().clone(), a.detach().clone()))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    # which layer made which call: each layer's input, quantised with its static scale, is the kernel's operand
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: calls.append((n, args[0].detach().clone())))
             for n, m in lin.items()]
    v, a, ctx = _inputs()
    with torch.no_grad():
        model(v.bfloat16(), a.bfloat16(), 500.0, ctx.bfloat16(), ctx.bfloat16())
    for h in hooks:
        h.remove()
    assert len(seen) == len(calls) >= 48 and {n for n, _ in calls} == set(layers)
    for (name, x), (scale_a, xq) in zip(calls, seen):
        assert scale_a.numel() == 1 and torch.equal(scale_a.reshape(()), statics[name]), name
        x2 = x.reshape(-1, x.shape[-1]).float()
        want = (x2 / statics[name]).clamp(-448, 448).to(E4M3)  # static: x / input_scale, no amax of x
        assert torch.equal(xq[:, : x2.shape[1]].view(torch.uint8), want.view(torch.uint8)), name
        dynamic = (x2.abs().amax() / 448).clamp(min=1e-12)
        assert not torch.equal(scale_a.reshape(()), dynamic), name


# -- malformed files -------------------------------------------------------------------------------------------

L = "video_model.blocks.1.ffn.0"  # the layer most cases damage


def _entry_tensor(obj) -> torch.Tensor:
    return torch.tensor(list((obj if isinstance(obj, str) else json.dumps(obj)).encode()), dtype=torch.uint8)


def _with_layers(meta, change):
    doc = json.loads(meta[QUANT_KEY])
    change(doc["layers"])
    return {**meta, QUANT_KEY: json.dumps(doc)}


def _cases():
    """name -> (tensor changes (None removes), header change (dict or callable on the layers), regex)."""
    ws = f"{L}.weight_scale"
    return {
        "json_syntax": ({}, {QUANT_KEY: "{\"layers\": {"}, r"_quantization_metadata is not valid JSON"),
        "no_layers": ({}, {QUANT_KEY: json.dumps({"format_version": "1.0"})}, r"with a \"layers\" object"),
        "json_duplicate": ({}, {QUANT_KEY: '{"layers": {"a": {"format": "float8_e4m3fn"}, "a": {}}}'},
                           r"not valid JSON \(duplicate key 'a'\)"),
        "entry_not_object": ({}, lambda ls: ls.__setitem__(L, "float8_e4m3fn"), rf"layer '{L}': a layer entry is"),
        "unknown_format": ({}, lambda ls: ls.__setitem__(L, {"format": "nvfp4"}),
                           rf"layer '{L}': unknown quantization format 'nvfp4'"),
        "missing_format": ({}, lambda ls: ls.__setitem__(L, {"params": {}}), r"has no \"format\" string"),
        "unknown_option": ({}, lambda ls: ls.__setitem__(L, {"format": "float8_e4m3fn", "blocks": 4}),
                           r"unknown option 'blocks'"),
        "convrot": ({}, lambda ls: ls.__setitem__(L, {"format": "int8_tensorwise", "params": {"convrot": True}}),
                    r"option convrot=True"),
        "listed_missing_layer": ({}, lambda ls: ls.__setitem__("video_model.blocks.0.self_attn.zz",
                                                               {"format": "float8_e4m3fn"}),
                                 r"lists layer 'video_model.blocks.0.self_attn.zz', but the file has no"),
        "missing_weight_scale": ({ws: None}, {}, rf"lists {L} as float8_e4m3fn, but the file has no {ws}"),
        "int_scale": ({ws: torch.tensor(3, dtype=torch.int32)}, {}, rf"{ws} is int32; a weight scale is"),
        "wrong_shape_scale": ({ws: torch.ones(3)}, {}, rf"{ws} has shape \[3\]; a scale is a scalar"),
        "nan_scale": ({ws: torch.tensor(float("nan"))}, {}, rf"{ws} holds nan; a weight scale is finite"),
        "zero_scale": ({ws: torch.zeros(())}, {}, rf"{ws} holds 0"),
        "bad_input_scale_shape": ({f"{L}.input_scale": torch.ones(2)}, {}, rf"{L}.input_scale is float32 \[2\]"),
        "inf_input_scale": ({f"{L}.input_scale": torch.tensor(float("inf"))}, {},
                            rf"{L}.input_scale holds inf; an input scale is finite"),
        "int8_with_input_scale": ({f"{L}.weight": torch.ones(288, 256, dtype=torch.int8),
                                   f"{L}.input_scale": torch.ones(())},
                                  lambda ls: ls.__setitem__(L, {"format": "int8_tensorwise"}),
                                  r"int8_tensorwise layers have no static input scale"),
        "format_mismatch": ({}, lambda ls: ls.__setitem__(L, {"format": "float8_e5m2"}),
                            rf"{L}.weight is float8_e4m3fn \[288, 256\], but .* lists {L} as float8_e5m2"),
        "bf16_listed": ({f"{L}.weight": torch.zeros(288, 256, dtype=torch.bfloat16)}, {},
                        rf"{L}.weight is bfloat16 \[288, 256\], but .* lists {L} as float8_e4m3fn"),
        "fp8_not_listed": ({}, lambda ls: ls.pop(L), rf"{L}.weight_scale belongs to layer {L}, which"),
        "fp8_not_listed_no_scale": ({ws: None}, lambda ls: ls.pop(L),
                                    rf"{L}.weight is float8_e4m3fn but its layer is not listed"),
        "marker_too": ({"scaled_fp8": torch.empty(0, dtype=E4M3)}, {}, r"scaled_fp8 belongs to the older scaled_fp8"),
        "tensor_entry_not_uint8": ({f"{L}.comfy_quant": torch.zeros(4)}, {}, rf"tensor {L}.comfy_quant is float32"),
        "tensor_entry_bad_json": ({f"{L}.comfy_quant": _entry_tensor("{format")}, {},
                                  rf"tensor {L}.comfy_quant is not UTF-8 JSON"),
        "tensor_entry_conflict": ({f"{L}.comfy_quant": _entry_tensor({"format": "float8_e5m2"})}, {},
                                  rf"layer '{L}' is listed as float8_e4m3fn in _quantization_metadata and as "
                                  rf"float8_e5m2 in {L}.comfy_quant"),
    }


@pytest.fixture(scope="module")
def valid():
    return _comfy_sd()


def _damaged(valid, tmp_path, name) -> Path:
    sd, meta, _ = valid
    changes, header, _ = _cases()[name]
    sd = dict(sd)
    for k, v in changes.items():
        if v is None:
            sd.pop(k)
        else:
            sd[k] = v
    meta = _with_layers(meta, header) if callable(header) else {**meta, **header}
    return _save(sd, tmp_path / f"{name}.safetensors", meta)


def test_the_valid_file_loads(valid, tmp_path):
    sd, meta, _ = valid
    m = load_fusion_model(_save(sd, tmp_path / "ok.safetensors", meta), dtype=torch.float32)
    assert sum(isinstance(x, FP8Linear) for x in m.modules()) == 48


@pytest.mark.parametrize("name", list(_cases()))
def test_malformed_file_is_a_checkpoint_error_naming_the_file(name, valid, tmp_path, capsys):
    p = _damaged(valid, tmp_path, name)
    pattern = _cases()[name][2]
    with pytest.raises(CheckpointError) as e:
        load_fusion_model(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and re.search(pattern, msg), msg
    # the converter refuses it too, writing nothing
    out = tmp_path / "out.safetensors"
    assert main(["convert", "--to", "fp8", str(p), str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: {p}: " in err and re.search(pattern, err), err
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]
    if not re.search(r"holds|nan|inf", name + pattern):  # ovi info reads the header only, not scale values
        with pytest.raises(CheckpointError, match=pattern):
            inspect_file(p)
