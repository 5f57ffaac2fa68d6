"""FP8 files are not trusted: a scale that is not a positive finite float of the expected shape, a weight that is
not FP8 where the layout says it is quantised, a malformed ``scaled_fp8`` marker, FP8 header metadata that
disagrees with the tensors: each is a CheckpointError naming the key, from the loader and the converter (which
writes nothing), before a model is built."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ovi.__main__ import main
from ovi.detect import inspect_file
from ovi.fusion.checkpoint import load_fusion_model
from ovi.loading import CheckpointError
from ovi.quant.fp8 import E4M3, quantise_fp8
from ovi.quant.fp8_checkpoint import is_quantised_key
from ovi.tools.tiny.fusion import TINY_CONFIG, random_state_dict

Q = "video_model.blocks.1.ffn.0"  # the layer each case damages
ROWS = TINY_CONFIG.video.ffn_dim  # its output rows


@pytest.fixture(scope="module")
def scaled_sd() -> dict[str, torch.Tensor]:
    """A valid ComfyUI-convention file's tensors: marker, e4m3 linears with float32 per-tensor scales, bf16 rest."""
    out = {"scaled_fp8": torch.empty(0, dtype=E4M3)}
    for k, v in random_state_dict(TINY_CONFIG, 3).items():
        if is_quantised_key(k):
            out[k], out[k[: -len(".weight")] + ".scale_weight"] = quantise_fp8(v, "tensor")
        else:
            out[k] = v.to(torch.bfloat16)
    return out


def _replace(sd, changes):
    """``sd`` with ``changes`` applied (a value of None removes the key)."""
    out = dict(sd)
    for k, v in changes.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


def _w(sd):
    return sd[Q + ".weight"]


# name -> (changes to the valid tensors, header metadata, the key the message names, regex it must contain)
def _cases(sd):
    scale = f"{Q}.scale_weight"
    return {
        "int32_scale": ({scale: torch.tensor(1 << 20, dtype=torch.int32)}, {}, scale, r"is int32; a weight scale is"),
        "float64_scale": ({scale: torch.tensor(0.01, dtype=torch.float64)}, {}, scale, r"is float64"),
        "int_alias_scale": ({scale: None, f"{Q}.weight_scale": torch.tensor([3], dtype=torch.int64)}, {},
                            f"{Q}.weight_scale", r"is int64"),
        "wrong_shape_scale": ({scale: torch.ones(3)}, {}, scale, r"has shape \[3\]; a scale is a scalar or one value"),
        "transposed_rows": ({scale: torch.ones(1, ROWS)}, {}, scale, rf"has shape \[1, {ROWS}\]"),
        "nan_scale": ({scale: torch.tensor(float("nan"))}, {}, scale, r"holds nan; a weight scale is finite and > 0"),
        "inf_scale": ({scale: torch.full((ROWS, 1), float("inf"))}, {}, scale, r"holds inf"),
        "zero_scale": ({scale: torch.zeros(())}, {}, scale, r"holds 0; a weight scale is finite and > 0"),
        "negative_row": ({scale: torch.cat([torch.ones(ROWS - 1), -torch.ones(1)]) * 0.01}, {}, scale, r"holds -0\.01"),
        "bf16_weight_with_scale": ({f"{Q}.weight": _w(sd).to(torch.bfloat16)}, {}, f"{Q}.weight",
                                   r"is bfloat16, but has a scale .*scale_weight beside it"),
        "int8_weight_with_scale": ({f"{Q}.weight": _w(sd).view(torch.int8)}, {}, f"{Q}.weight",
                                   r"is int8, but has a scale"),
        "int8_weight": ({f"{Q}.weight": _w(sd).view(torch.int8), scale: None}, {}, f"{Q}.weight",
                        r"is int8; in an FP8 file a weight is FP8"),
        "float_marker": ({"scaled_fp8": torch.empty(0)}, {}, "scaled_fp8", r"malformed scaled_fp8 marker"),
        "big_marker": ({"scaled_fp8": torch.zeros(64, dtype=E4M3)}, {}, "scaled_fp8", r"malformed scaled_fp8 marker"),
        "marker_other_format": ({"scaled_fp8": torch.empty(0, dtype=torch.float8_e5m2)}, {}, "scaled_fp8",
                                r"names float8_e5m2, but the FP8 weights are float8_e4m3fn"),
        "int_input_scale": ({f"{Q}.scale_input": torch.tensor(1, dtype=torch.int32)}, {}, f"{Q}.scale_input",
                            r"is int32; a scale is"),
        "granularity_disagrees": ({}, {"ovi.quant.granularity": "channel"}, "ovi.quant.granularity",
                                  r"='channel', but the scales are tensor"),
        "granularity_unknown": ({}, {"ovi.quant.granularity": "block"}, "ovi.quant.granularity",
                                r"='block' is not a scale granularity"),
    }


def _file(sd, d: Path, name: str) -> tuple[Path, str, str]:
    changes, meta, key, pattern = _cases(sd)[name]
    p = d / "ovi_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in _replace(sd, changes).items()}, str(p), metadata=meta or None)
    return p, key, pattern


CASE_NAMES = ["int32_scale", "float64_scale", "int_alias_scale", "wrong_shape_scale", "transposed_rows", "nan_scale",
              "inf_scale", "zero_scale", "negative_row", "bf16_weight_with_scale", "int8_weight_with_scale",
              "int8_weight", "float_marker", "big_marker", "marker_other_format", "int_input_scale",
              "granularity_disagrees", "granularity_unknown"]


def test_case_list_is_complete(scaled_sd):
    assert sorted(CASE_NAMES) == sorted(_cases(scaled_sd))


def test_the_valid_file_loads(scaled_sd, tmp_path):
    """The undamaged tensors the cases start from are a file the loader reads (so each case fails for its one
    change)."""
    p = tmp_path / "ovi_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in scaled_sd.items()}, str(p))
    m = load_fusion_model(p, dtype=torch.float32)
    assert m.config == TINY_CONFIG


@pytest.mark.parametrize("name", CASE_NAMES)
def test_damaged_fp8_file_fails_to_load_naming_the_key(name, scaled_sd, tmp_path):
    p, key, pattern = _file(scaled_sd, tmp_path, name)
    with pytest.raises(CheckpointError) as e:
        load_fusion_model(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and key in msg and re.search(pattern, msg), msg


@pytest.mark.parametrize("name", CASE_NAMES)
def test_damaged_fp8_file_is_never_converted(name, scaled_sd, tmp_path, capsys):
    p, key, pattern = _file(scaled_sd, tmp_path, name)
    out = tmp_path / "out.safetensors"
    assert main(["convert", "--to", "fp8", "--granularity", "channel", str(p), str(out)]) != 0
    err = capsys.readouterr().err
    assert f"error: {p}: " in err and key in err and re.search(pattern, err), err
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]  # no output, no partial file


@pytest.mark.parametrize("name", ["int32_scale", "wrong_shape_scale", "bf16_weight_with_scale", "int8_weight",
                                  "float_marker", "granularity_disagrees"])
def test_damaged_fp8_header_in_info(name, scaled_sd, tmp_path):
    """What the header shows (dtypes, shapes, marker, metadata) ``ovi info`` reports too."""
    p, key, pattern = _file(scaled_sd, tmp_path, name)
    with pytest.raises(CheckpointError) as e:
        inspect_file(p)
    assert key in str(e.value) and re.search(pattern, str(e.value)), str(e.value)


def test_fp8_metadata_on_a_file_without_fp8_weights(scaled_sd, tmp_path):
    bf = {k: (v.float() * scaled_sd[k[:-7] + ".scale_weight"]).to(torch.bfloat16) if v.dtype == E4M3 else v
          for k, v in scaled_sd.items() if not k.endswith(".scale_weight") and k != "scaled_fp8"}
    p = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in bf.items()}, str(p), metadata={"ovi.quant.format": "fp8_e4m3fn_scaled"})
    with pytest.raises(CheckpointError, match=r"ovi\.quant\.format says FP8, but the file holds no FP8 weights"):
        load_fusion_model(p)
