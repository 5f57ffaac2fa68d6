"""``python -m ovi``: info on good and bad files, generate to an mp4 on the tiny set, Ctrl-C, download dispatch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from ovi.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A woman says <S>hello there<E> on a busy street. Audio: traffic and footsteps"



def test_info_on_tiny_files(tiny_dir, capsys):
    rc = main(["info", str(tiny_dir / "Ovi" / "model_960x960_10s.safetensors"),
               str(tiny_dir / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
               str(tiny_dir / "MMAudio" / "ext_weights" / "best_netG.pt")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "component: fusion" in out and "variant:   960x960_10s, from metadata" in out
    assert "format:    safetensors" in out and "dtype:     bf16" in out and "tensors:   169" in out
    assert "quantization: fp8_e4m3fn scaled" in out and "component:    umt5" in out
    assert "component: bigvgan" in out and "format:    torch" in out


def test_info_on_a_bad_file(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes((tiny_dir / "Ovi" / "model.safetensors").read_bytes()[:5000])  # a truncated download
    rc = main(["info", str(bad), str(tiny_dir / "Wan2.2-TI2V-5B" / "Wan2.2_VAE.pth")])
    captured = capsys.readouterr()
    assert rc == 1
    assert str(bad) in captured.err and "truncated" in captured.err
    assert "component: wan22_vae" in captured.out  # the good file is still reported
    assert main(["info", str(tmp_path / "absent.pth")]) == 1


def test_generate_writes_an_mp4(tiny_dir, tmp_path, capsys):
    from ovi.video_io import probe_mp4

    out = tmp_path / "clip.mp4"
    rc = main(["generate", "--models", str(tiny_dir), "--variant", "720x720_5s", "--prompt", PROMPT,
               "--steps", "2", "--size", "64x64", "--slg-layer", "1", "--seed", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "[Ovi] diffusion 2/2" in err and "memory by phase" in err
    info = probe_mp4(out)
    kinds = [(s["type"], s["codec"]) for s in info["streams"]]
    assert kinds == [("video", "h264"), ("audio", "aac")]
    assert info["video"]["frames"] == 121 and (info["video"]["width"], info["video"]["height"]) == (64, 64)
    assert info["audio"]["sample_rate"] == 16000 and info["audio"]["samples"] == 80384
    assert abs(info["video"]["duration"] - info["audio"]["duration"]) <= 1 / 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temporary files left


def test_generate_bad_arguments(tiny_dir, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    base = ["generate", "--models", str(tiny_dir), "--variant", "720x720_5s", "--out", str(out)]
    assert main(base + ["--prompt", PROMPT, "--size", "100x64"]) == 2
    assert "multiples of 32" in capsys.readouterr().err
    assert main(base + ["--prompt", "  "]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--models", str(tmp_path), "--prompt", PROMPT, "--out", str(out)]) == 2
    assert "missing Ovi components" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(base + ["--prompt", PROMPT, "--memory-mode", "everything"])
    assert info.value.code == 2
    assert not out.exists()


def test_ctrl_c_stops_cleanly(tiny_dir, tmp_path):
    out = tmp_path / "never.mp4"
    cmd = [sys.executable, "-m", "ovi", "generate", "--models", str(tiny_dir), "--variant", "720x720_5s",
           "--prompt", PROMPT, "--steps", "500", "--size", "64x64", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:  # wait until sampling has begun
            lines.append(line)
            if "[Ovi] diffusion" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    assert "interrupted; no video written" in text
    assert list(tmp_path.iterdir()) == []  # no mp4, no partial file


def test_download_is_delegated(monkeypatch):
    seen = []
    fake = types.ModuleType("ovi.download")
    fake.main_download = lambda argv: seen.append(list(argv)) or 7
    monkeypatch.setitem(sys.modules, "ovi.download", fake)
    import ovi

    monkeypatch.setattr(ovi, "download", fake, raising=False)
    assert main(["download", "--variant", "720x720_5s", "--dest", "somewhere"]) == 7
    assert seen == [["--variant", "720x720_5s", "--dest", "somewhere"]]


def test_generate_fusion_option(tiny_dir, tmp_path, capsys):
    from ovi.__main__ import _parser

    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    assert "--fusion PATH" in capsys.readouterr().out
    base = ["generate", "--models", str(tiny_dir), "--prompt", PROMPT, "--out", str(tmp_path / "x.mp4")]
    assert _parser().parse_args(base).fusion is None
    assert _parser().parse_args(base + ["--fusion", "a.gguf"]).fusion == [Path("a.gguf")]
    assert _parser().parse_args(base + ["--fusion", "v.safetensors", "a.safetensors"]).fusion == [
        Path("v.safetensors"), Path("a.safetensors")]
    with pytest.raises(SystemExit) as info:
        main(base + ["--fusion", "a", "b", "c"])
    assert info.value.code == 2 and "one file or a video + audio pair, got 3" in capsys.readouterr().err
    # passed through to the engine: a missing file is named, without the three-variant lookup of tiny_dir/Ovi
    absent = tmp_path / "absent.gguf"
    assert main(base + ["--fusion", str(absent)]) == 2
    err = capsys.readouterr().err
    assert f"{absent} (given) does not exist" in err and "several Ovi models" not in err
