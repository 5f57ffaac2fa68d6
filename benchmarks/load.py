"""Checkpoint load time and peak RSS: our fusion loader against ``safetensors.torch.load_file``.

    python benchmarks/load.py [--layers N] [--repeats R] [--dir DIR]

Writes a synthetic bf16 fusion checkpoint at the real width (3072, 24 heads, FFN 14336, the real key layout) with
``--layers`` fused layers (4 gives about 4.3 GB), then loads it in fresh processes, alternating the two methods,
after one warm-up load each so both read from the page cache. Reports the median time and peak RSS of each and
their ratios (goal: ours <= 1.1x the baseline in both).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_checkpoint(path: Path, layers: int) -> int:
    import torch
    from safetensors.torch import save_file

    from ovi.fusion.config import OVI_AUDIO_CONFIG, OVI_VIDEO_CONFIG, FusionConfig
    from ovi.fusion.model import FusionModel

    cfg = FusionConfig(replace(OVI_VIDEO_CONFIG, num_layers=layers), replace(OVI_AUDIO_CONFIG, num_layers=layers))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FusionModel(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    # A small random block tiled over each tensor: realistic bytes without minutes of RNG.
    block = (torch.randn(1 << 20, generator=g) * 0.02).to(torch.bfloat16)
    tensors = {}
    for k, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        reps = -(-n // block.numel())
        tensors[k] = block.repeat(reps)[:n].reshape(shape).clone()
    save_file(tensors, str(path), metadata={"ovi.config": json.dumps(cfg.to_dict())})
    return path.stat().st_size


def child(method: str, path: str) -> None:
    import torch

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method == "ours":
        from ovi.fusion.checkpoint import load_fusion_model

        model = load_fusion_model(path, device="cpu", dtype=torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
    else:
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
        n = sum(t.numel() for t in sd.values())
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"method": method, "seconds": dt, "peak_rss_mb": peak / 1024,
                      "rss_before_mb": before / 1024, "params": n}))


def measure(method: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, str(path)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=ROOT / "build" / "bench")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "FILE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return 0
    a.dir.mkdir(parents=True, exist_ok=True)
    path = a.dir / f"fusion_synthetic_{a.layers}l.safetensors"
    if not path.exists():
        size = write_checkpoint(path, a.layers)
    size = path.stat().st_size
    print(f"checkpoint: {path} ({size / 1e9:.2f} GB, {a.layers} fused layers at full width)")
    for m in ("baseline", "ours"):  # warm the page cache for both
        measure(m, path)
    runs = {"ours": [], "baseline": []}
    for _ in range(a.repeats):
        for m in ("baseline", "ours"):
            runs[m].append(measure(m, path))
    res = {}
    for m, rs in runs.items():
        res[m] = {"seconds": statistics.median(r["seconds"] for r in rs),
                  "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                  "params": rs[0]["params"]}
    assert res["ours"]["params"] == res["baseline"]["params"]
    print(f"{'method':<28}{'load s':>10}{'peak RSS MB':>14}")
    print(f"{'safetensors load_file':<28}{res['baseline']['seconds']:>10.2f}{res['baseline']['peak_rss_mb']:>14.0f}")
    print(f"{'ovi load_fusion_model':<28}{res['ours']['seconds']:>10.2f}{res['ours']['peak_rss_mb']:>14.0f}")
    print(f"ratio time {res['ours']['seconds'] / res['baseline']['seconds']:.2f}x, "
          f"peak RSS {res['ours']['peak_rss_mb'] / res['baseline']['peak_rss_mb']:.2f}x (goal <= 1.10x both)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
