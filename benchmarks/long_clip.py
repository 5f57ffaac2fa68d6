"""Peak memory and time per window of a long clip, for 1, 2, 4 and 8 windows, on the tiny model on the CPU.

    python benchmarks/long_clip.py [--windows 1,2,4,8] [--size 128] [--steps 2] [--threads 1] [--models DIR]

Each clip runs in a fresh Python process (``--child``): the tiny checkpoint set (``ovi.tools.make_tiny``, made
in a temporary folder unless ``--models`` names one), ``OviEngine`` on the CPU, ``generate_clip`` writing the
mp4, then the process's peak resident memory (``VmHWM`` of ``/proc/self/status``; the ffmpeg encoder is a
separate process and not counted). Time per window is measured from one window's first denoising step to the
next one's, as wall time and as this process's CPU time (``time.process_time``: on a machine shared with
other jobs the wall time says as much about them as about the clip). The first window also loads the models,
so the per-window figures are the means over the later windows. Goal: peak RSS flat (within 10 %) from 2 to 8
windows, and the time linear in the windows (a constant time per window). The tiny model's figures say how
memory behaves as a clip grows, not how fast the real model is.
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


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(a: argparse.Namespace) -> None:
    import torch

    from ovi.engine import OviEngine
    from ovi.long_clip import generate_clip, plan_clip

    torch.set_num_threads(a.threads)
    engine = OviEngine.from_dir(a.models, variant=VARIANT)
    plan = plan_clip(VARIANT, windows=a.child, overlap=1.0, seed=1)
    marks = []  # (wall, cpu, peak so far) as each window's first step ends

    def progress(window, windows, step, steps):
        if step == 1:
            marks.append((time.perf_counter(), time.process_time(), _status_mb("VmHWM")))

    with tempfile.TemporaryDirectory() as out:
        start = (time.perf_counter(), time.process_time())
        generate_clip(engine, PROMPT, Path(out) / "clip.mp4", plan=plan, size=(a.size, a.size), steps=a.steps,
                      slg_layer=1, progress=progress)
        end = (time.perf_counter(), time.process_time())
    ends = [m[:2] for m in marks[1:]] + [end]
    later = list(zip(marks, ends))[1:]
    print(json.dumps(dict(
        windows=a.child, seconds=plan.frames / 24,
        frames_mb=plan.frames * a.size * a.size * 3 * 4 / 2 ** 20,  # the whole clip's frames as float32
        peak_mb=_status_mb("VmHWM"), wall_s=end[0] - start[0], cpu_s=end[1] - start[1],
        later_wall_s=[e[0] - m[0] for m, e in later], later_cpu_s=[e[1] - m[1] for m, e in later],
        peak_by_window=[round(m[2]) for m in marks])))


def _mean(xs: list[float]) -> str:
    return f"{sum(xs) / len(xs):.2f}" if xs else "-"


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
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{n} windows: peak {r['peak_mb']:.0f} MB, {r['wall_s']:.1f} s; peak as each window started "
                  f"{r['peak_by_window']} MB", file=sys.stderr)
    base = next((r for r in rows if r["windows"] == 2), rows[0])
    print(f"\n{VARIANT} tiny model, {a.size}x{a.size}, {a.steps} steps, overlap 1 s, CPU, {a.threads} thread(s)\n")
    print("| windows | clip s | clip frames as float32 MB | peak RSS MB | vs 2 windows | wall s | CPU s "
          "| later windows: wall s each | CPU s each |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['windows']} | {r['seconds']:.2f} | {r['frames_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / base['peak_mb']:.3f}x | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
              f"{_mean(r['later_wall_s'])} | {_mean(r['later_cpu_s'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
