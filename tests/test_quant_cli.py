"""`python -m ovi convert` end to end: FP8 and GGUF files that the ordinary loaders and `ovi info` accept."""

from __future__ import annotations

import pytest
import torch

from ovi.__main__ import main
from ovi.fusion.checkpoint import load_fusion_model
from ovi.quant.gguf_load import GGUFLinear
from ovi.text.checkpoint import load_umt5


def _forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(48, 2, 4, 4, generator=g)
    a = torch.randn(9, 20, generator=g)
    ctx = torch.randn(5, model.config.video.text_dim, generator=g)
    with torch.no_grad():
        return model(v, a, torch.tensor([500]), ctx, ctx)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("target,tol", [("gguf-q8_0", 0.05), ("fp8", 0.1)])
def test_convert_fusion_then_load_and_inspect(tiny_dir, tmp_path, capsys, target, tol):
    src = tiny_dir / "Ovi" / "model_960x960_10s.safetensors"
    # A neutral name: the variant must survive through the header metadata, not the file name.
    dst = tmp_path / ("converted.gguf" if target.startswith("gguf") else "converted.safetensors")
    assert main(["convert", "--to", target, str(src), str(dst)]) == 0
    assert main(["info", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "variant:      960x960_10s, from metadata" in out
    ref = load_fusion_model(src, dtype=torch.float32)
    got = load_fusion_model(dst, dtype=torch.float32)
    if target.startswith("gguf"):
        assert any(isinstance(m, GGUFLinear) for m in got.modules())
    # Tolerances: Q8_0 keeps ~0.5 % rms per weight and fp8 e4m3 ~2.6 %; the tiny random model chains about a
    # dozen quantised linears per stream, which the measured end-to-end errors (1.3 % / 2.8-6 %) stay well under.
    for r, q in zip(_forward(ref), _forward(got)):
        assert _rel(q, r) < tol


def test_convert_umt5_to_gguf_and_load(tiny_dir, tmp_path):
    src = tiny_dir / "text_encoders" / "umt5_xxl_fp16.safetensors"
    dst = tmp_path / "umt5-Q8_0.gguf"
    assert main(["convert", "--to", "gguf-q8_0", str(src), str(dst)]) == 0
    ref = load_umt5(src, dtype=torch.float32)
    got = load_umt5(dst, dtype=torch.float32)
    # a seeded draw: the error depends on the tokens, and an unseeded one on whichever test ran before
    ids = torch.randint(3, ref.config.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert _rel(got(ids, mask), ref(ids, mask)) < 0.05


def test_convert_rejects_unknown_target(tiny_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(["convert", "--to", "int3", str(tiny_dir / "Ovi" / "model.safetensors"), str(tmp_path / "x")])
