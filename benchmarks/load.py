"""Checkpoint load time and peak RSS: our fusion loader against ``safetensors.torch.load_file``.

    python benchmarks/load.py [--layers N] [--repeats R] [--dir DIR]

Writes a synthetic bf16 fusion checkpoint at the real width (3072, 24 heads, FFN 14336, the real key layout) with
``--layers`` fused layers (4 gives about 4.3 GB), then loads it in fresh processes, alternating the two methods:
once with the file evicted from the page cache before every load (cold, what a user's first load costs) and once
with it cached (warm, where fixed overheads show). Reports median times, peak RSS and the ratios (goal: ours
<= 1.1x the baseline in time and in peak RSS).
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
    from safetensors.torch import load_file

    from ovi.fusion.checkpoint import load_fusion_model

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method == "ours":
        model = load_fusion_model(path, device="cpu", dtype=torch.bfloat16)
        tensors = list(model.state_dict().values())
    else:
        tensors = list(load_file(path, device="cpu").values())
    dt = time.perf_counter() - t0
    # Both methods hand back tensors over the mmapped file; reading one byte per page makes every byte
    # resident, which is what a real load (and the move to the GPU) pays for.
    for t in tensors:
        t.reshape(-1).view(torch.uint8)[::4096].sum()
    dt_resident = time.perf_counter() - t0
    n = sum(t.numel() for t in tensors)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"method": method, "seconds": dt, "resident_seconds": dt_resident, "peak_rss_mb": peak / 1024,
                      "rss_before_mb": before / 1024, "params": n}))


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (no privileges needed for clean pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(method: str, path: Path, cold: bool) -> dict:
    if cold:
        evict(path)
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
    print(f"{'cache':<6}{'method':<26}{'tensors s':>11}{'resident s':>12}{'peak RSS MB':>13}")
    for cold in (True, False):
        if not cold:
            for m in ("baseline", "ours"):
                measure(m, path, cold=False)
        runs = {"ours": [], "baseline": []}
        for _ in range(a.repeats):
            for m in ("baseline", "ours"):
                runs[m].append(measure(m, path, cold))
        res = {}
        for m, rs in runs.items():
            res[m] = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "resident_seconds", "peak_rss_mb")}
            res[m]["params"] = rs[0]["params"]
        assert res["ours"]["params"] == res["baseline"]["params"]
        tag = "cold" if cold else "warm"
        for label, m in (("safetensors load_file", "baseline"), ("ovi load_fusion_model", "ours")):
            r = res[m]
            print(f"{tag:<6}{label:<26}{r['seconds']:>11.3f}{r['resident_seconds']:>12.3f}{r['peak_rss_mb']:>13.0f}")
        b, o = res["baseline"], res["ours"]
        print(f"{tag:<6}ratio ours/baseline: resident time {o['resident_seconds'] / b['resident_seconds']:.2f}x, "
              f"time to tensors {o['seconds'] / b['seconds']:.2f}x, peak RSS {o['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
