"""Peak memory and time per window of a long clip, for 1, 2, 4 and 8 windows, on the tiny model on the CPU.

    python benchmarks/long_clip.py [--windows 1,2,4,8] [--size 128] [--steps 2] [--threads 1] [--models DIR]

Each clip runs in a fresh Python process (``--child``): the tiny checkpoint set (``ovi.tools.make_tiny``, made
in a temporary folder unless ``--models`` names one), ``OviEngine`` on the CPU, ``generate_clip`` writing the
mp4, then the process's peak resident memory (``VmHWM`` of ``/proc/self/status``; the ffmpeg encoder is a
separate process and not counted) and the per-window times from ``ClipResult.timings``. Goal: peak RSS flat
(within 10 %) from 2 to 8 windows, and the time linear in the windows (a constant time per window). The tiny
model's figures say how memory behaves as a clip grows, not how fast the real model is.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANT = "720x720_5s"
PROMPT = "A lighthouse on a cliff at dusk. Audio: waves and a distant foghorn"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(a: argparse.Namespace) -> None:
    import torch

    from ovi.engine import OviEngine
    from ovi.long_clip import generate_clip, plan_clip

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    engine = OviEngine.from_dir(a.models, variant=VARIANT)
    plan = plan_clip(VARIANT, windows=a.child, overlap=1.0, seed=1)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = generate_clip(engine, PROMPT, Path(out) / "clip.mp4", plan=plan, size=(a.size, a.size),
                               steps=a.steps, slg_layer=1)
        total = time.perf_counter() - t0
    per = [t["generate"] + t["decode"] + t["write"] for t in result.timings]
    frames_mb = plan.frames * a.size * a.size * 3 * 4 / 2 ** 20  # the whole clip's frames as float32, for scale
    print(json.dumps(dict(windows=a.child, seconds=plan.frames / 24, frames_mb=frames_mb,
                          peak_mb=_status_kb("VmHWM") / 1024,
                          end_mb=_status_kb("VmRSS") / 1024, total_s=total, per_window_s=per)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", default="1,2,4,8", help="window counts, comma-separated")
    p.add_argument("--size", type=int, default=128, help="frame side in pixels (a multiple of 32)")
    p.add_argument("--steps", type=int, default=2)
    # one thread by default: on a shared 2-core machine OpenMP contention makes 2 threads several times slower
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each run")
    p.add_argument("--models", type=Path, default=None, help="a tiny checkpoint set (default: made in a temp dir)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        child(a)
        return 0
    counts = [int(x) for x in a.windows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        models = a.models
        if models is None:
            from ovi.tools.make_tiny import make_tiny

            models = Path(tmp) / "tiny"
            make_tiny(models, seed=0)
        rows = []
        for n in counts:
            cmd = [sys.executable, __file__, "--child", str(n), "--size", str(a.size), "--steps", str(a.steps),
                   "--threads", str(a.threads), "--models", str(models)]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{n} windows: peak {r['peak_mb']:.0f} MB, {r['total_s']:.1f} s", file=sys.stderr)
    base = next((r for r in rows if r["windows"] == 2), rows[0])
    print(f"\n{VARIANT} tiny model, {a.size}x{a.size}, {a.steps} steps, overlap 1 s, CPU, {a.threads} thread(s)\n")
    print("| windows | clip s | clip frames (float32) MB | peak RSS MB | vs 2 windows | total s | s per window (mean) "
          "| slowest window s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        per = r["per_window_s"]
        print(f"| {r['windows']} | {r['seconds']:.2f} | {r['frames_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / base['peak_mb']:.3f}x | {r['total_s']:.1f} | {sum(per) / len(per):.2f} | "
              f"{max(per):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
