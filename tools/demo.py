"""`make demo`: a headless ComfyUI with this pack runs the demo workflow on a tiny checkpoint over HTTP.

    .venv/bin/python tools/demo.py [--keep]

Writes a tiny random-weight checkpoint set (python -m ovi.tools.make_tiny), lays it out as a ComfyUI models
folder, starts ComfyUI 0.3.75 on 127.0.0.1, queues workflows/demo_tiny_t2av_api.json through /prompt, waits for
/history, and prints the path of the mp4 it wrote (video + audio). The weights are random, so the clip is
noise with a soundtrack: the demo proves the whole path runs, not the model's quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ovi.tools.make_tiny import make_tiny  # noqa: E402
from ovi.video_io import probe_mp4  # noqa: E402
from tests.comfyui_server.harness import ComfyServer, install_models, setup_problem  # noqa: E402

WORKFLOW = ROOT / "workflows" / "demo_tiny_t2av_api.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=ROOT / "build" / "demo", help="where models and outputs go")
    p.add_argument("--keep", action="store_true", help="leave the server running until Ctrl-C")
    a = p.parse_args()
    problem = setup_problem()
    if problem:
        print(f"ComfyUI is not set up: {problem}. Run `make demo` (it installs everything first).", file=sys.stderr)
        return 1
    base = a.dir.resolve()
    tiny = base / "tiny_models"
    if not (tiny / "tiny_manifest.json").is_file():
        print(f"writing a tiny checkpoint set to {tiny}", flush=True)
        make_tiny(tiny, seed=0)
    server_dir = base / "comfyui"
    (server_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
    install_models(server_dir / "models", tiny)
    with ComfyServer(server_dir) as server:
        print(f"ComfyUI {server.url} started in {server.start_seconds:.1f} s; queueing {WORKFLOW.name}", flush=True)
        t0 = time.perf_counter()
        result = server.run_prompt(json.loads(WORKFLOW.read_text()), timeout=600)
        if not result.ok:
            print(f"the demo prompt failed: {result.summary()}\n--- server log ---\n{server.log_tail()}",
                  file=sys.stderr)
            return 1
        videos = [server.file_path(e) for e in result.files() if str(e.get("filename", "")).endswith(".mp4")]
        if not videos:
            print(f"the demo ran but wrote no mp4: {result.summary()}", file=sys.stderr)
            return 1
        info = probe_mp4(videos[0])
        kinds = ", ".join(f"{s['type']} {s['codec']}" for s in info["streams"])
        print(f"demo finished in {time.perf_counter() - t0:.1f} s: {kinds}, video {info['video']['frames']} frames "
              f"({info['video']['duration']:.2f} s), audio {info['audio']['duration']:.2f} s")
        print(videos[0])
        if a.keep:
            print(f"server left running at {server.url} (Ctrl-C to stop)", flush=True)
            try:
                while server.alive():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
