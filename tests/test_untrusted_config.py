"""Our header metadata is not trusted: a tiny fusion file whose ``ovi.config`` / ``ovi.variant`` is corrupt in each
way fails at once (the 2 s bound is the task's, generous for a header check) with a CheckpointError naming the file
and the field, through the loader, ``python -m ovi info`` and ``python -m ovi convert`` (which writes nothing)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ovi.__main__ import main
from ovi.fusion.checkpoint import load_fusion_model
from ovi.fusion.config import ConfigError, FusionConfig
from ovi.loading import CheckpointError
from ovi.tools.tiny.fusion import TINY_CONFIG

FAST_S = 2.0  # required by the task: a corrupt header fails within 2 s, never after building a model


def _with(branch: str, **fields) -> dict:
    d = TINY_CONFIG.to_dict()
    d[branch] = {**d[branch], **fields}
    return d


# name -> (ovi.config text, or None to keep the good one; ovi.variant; regex the message must contain)
CASES = {
    "not_json": ("{video: [", None, r"ovi\.config: not valid JSON"),
    "not_a_dict": (json.dumps([1, 2, 3]), None, r"ovi\.config: the config is a list, not a JSON object"),
    "branch_not_a_dict": (json.dumps({"video": 3, "audio": TINY_CONFIG.audio.to_dict()}), None,
                          r"ovi\.config: video is an int, not a JSON object"),
    "num_heads_zero": (json.dumps(_with("video", num_heads=0)), None,
                       r"video\.num_heads=0 is out of range \(1\.\.256\)"),
    "string_count": (json.dumps(_with("audio", num_layers="2")), None,
                     r"audio\.num_layers='2' is a str, not an integer"),
    "bool_for_int": (json.dumps(_with("video", dim=True)), None, r"video\.dim=True is a bool, not an integer"),
    "float_for_int": (json.dumps(_with("video", ffn_dim=288.0)), None, r"video\.ffn_dim=288\.0 is a float"),
    "negative_dim": (json.dumps(_with("video", in_dim=-48)), None, r"video\.in_dim=-48 is out of range"),
    "absurd_dim": (json.dumps(_with("video", dim=10 ** 9)), None, r"video\.dim=1000000000 is out of range"),
    "dim_not_divisible": (json.dumps(_with("video", num_heads=3)), None,
                          r"video\.dim=256 is not divisible by num_heads=3"),
    "head_dim_for_rope": (json.dumps(_with("video", num_heads=128)), None,
                          r"video\.num_heads=128 gives head_dim 2 .*rotary embedding needs an even head_dim"),
    "num_layers_huge": (json.dumps(_with("video", num_layers=100000)), None,
                        r"ovi\.config: video\.num_layers=100000 is out of range \(1\.\.128\); the header metadata is "
                        r"corrupt — re-convert the file or remove the metadata"),
    "unknown_key": (json.dumps(_with("audio", magic=1)), None, r"audio\.magic is not a backbone config field"),
    "unknown_top_key": (json.dumps({**TINY_CONFIG.to_dict(), "extra": {}}), None,
                        r"extra is not a fusion config entry"),
    "missing_field": (json.dumps({**TINY_CONFIG.to_dict(), "video": {k: v for k, v in TINY_CONFIG.video.to_dict().items()
                                                                     if k != "dim"}}), None, r"video\.dim is missing"),
    "nan_eps": (json.dumps(_with("video", eps=float("nan"))), None, r"video\.eps=nan is out of range"),
    "bad_patch": (json.dumps(_with("video", patch_size=[1, "2", 2])), None,
                  r"video\.patch_size\[1\]='2' is a str, not an integer"),
    "layer_counts_differ": (json.dumps(_with("audio", num_layers=3)), None,
                            r"audio\.num_layers=3 differs from video\.num_layers=2"),
    "disagrees_with_shapes": (json.dumps({"video": {**TINY_CONFIG.video.to_dict(), "ffn_dim": 320},
                                          "audio": {**TINY_CONFIG.audio.to_dict(), "ffn_dim": 320}}), None,
                              r"ovi\.config disagrees with the tensors: video\.ffn_dim=320 \(the tensors have 288\)"),
    "unknown_variant": (None, "1080p_20s", r"ovi\.variant='1080p_20s' is not a known variant \(known: 720x720_5s, "
                                           r"960x960_5s, 960x960_10s\)"),
}


@pytest.fixture(scope="module")
def tiny_sd(tiny_dir) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_dir / "Ovi" / "model.safetensors"))


def _corrupt(sd, d: Path, name: str) -> Path:
    config, variant, _ = CASES[name]
    folder = d / name
    folder.mkdir()
    p = folder / "model.safetensors"
    save_file(sd, str(p), metadata={"ovi.config": config if config is not None else json.dumps(TINY_CONFIG.to_dict()),
                                    "ovi.variant": variant or "720x720_5s"})
    return p


def _fails_fast(fn, *args):
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        fn(*args)
    assert time.perf_counter() - t0 < FAST_S
    return str(e.value)


@pytest.mark.parametrize("name", list(CASES))
def test_corrupt_config_fails_to_load(name, tiny_sd, tmp_path):
    p = _corrupt(tiny_sd, tmp_path, name)
    msg = _fails_fast(load_fusion_model, p)
    assert msg.startswith(f"{p}: ") and re.search(CASES[name][2], msg), msg


@pytest.mark.parametrize("name", list(CASES))
def test_corrupt_config_in_cli_info(name, tiny_sd, tmp_path, capsys):
    p = _corrupt(tiny_sd, tmp_path, name)
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(["info", str(p)]) != 0
    assert time.perf_counter() - t0 < FAST_S
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {p}: ") and re.search(CASES[name][2], lines[0]), cap.err
    assert cap.out == ""


@pytest.mark.parametrize("to", ["fp8", "gguf-bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_corrupt_config_is_never_converted(name, to, tiny_sd, tmp_path, capsys):
    p = _corrupt(tiny_sd, tmp_path, name)
    out = tmp_path / ("out.safetensors" if to == "fp8" else "out.gguf")
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(["convert", "--to", to, str(p), str(out)]) != 0
    assert time.perf_counter() - t0 < FAST_S
    err = capsys.readouterr().err
    assert f"error: {p}: " in err and re.search(CASES[name][2], err), err
    assert sorted(x.name for x in tmp_path.iterdir()) == [name]  # no output, no partial file


def test_invalid_config_from_shapes_fails_fast(tiny_sd, tmp_path):
    """Without header metadata the config comes from the shapes, checked the same way: a stray block index
    100000 would otherwise build 100001 layers."""
    sd = dict(tiny_sd)
    sd["video_model.blocks.99999.norm3.weight"] = sd["video_model.blocks.0.norm3.weight"].clone()
    p = tmp_path / "model.safetensors"
    save_file(sd, str(p))
    msg = _fails_fast(load_fusion_model, p)
    assert msg.startswith(f"{p}: ") and "video.num_layers=100000 is out of range (1..128)" in msg, msg
    out = tmp_path / "out.safetensors"
    assert main(["convert", "--to", "fp8", str(p), str(out)]) != 0 and not out.exists()


def test_corrupt_config_in_gguf_header(tiny_sd, tmp_path):
    """The GGUF loader reads ovi.config through the same checked FusionConfig.from_dict."""
    src = tmp_path / "model.safetensors"
    save_file(tiny_sd, str(src), metadata={"ovi.config": json.dumps(TINY_CONFIG.to_dict()), "ovi.variant": "720x720_5s"})
    good = tmp_path / "model.gguf"
    assert main(["convert", "--to", "gguf-bf16", str(src), str(good)]) == 0
    data = good.read_bytes()
    needle = b'"num_heads": 2'
    assert data.count(needle) == 2  # video and audio; same length replacement keeps the file layout intact
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data.replace(needle, b'"num_heads": 0', 1))
    msg = _fails_fast(load_fusion_model, bad)
    assert str(bad) in msg and "video.num_heads=0 is out of range (1..256)" in msg, msg
    assert "header metadata is corrupt" in msg and "tensors are missing" not in msg, msg


def test_config_error_names_the_field():
    with pytest.raises(ConfigError) as e:
        FusionConfig.from_dict(_with("video", num_layers=100000))
    assert e.value.field == "video.num_layers" and e.value.value == 100000
    assert FusionConfig.from_dict(TINY_CONFIG.to_dict()) == TINY_CONFIG
    # the official JSON's names and its keys without effect on inference are still read
    official = {"video_config": {**TINY_CONFIG.video.to_dict(), "gradient_checkpointing": False},
                "audio_config": {**TINY_CONFIG.audio.to_dict(), "additional_emb_dim": None}}
    assert FusionConfig.from_dict(official) == TINY_CONFIG
