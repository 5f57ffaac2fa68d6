"""Write a complete tiny Ovi checkpoint set with random weights, in the real file formats and key layouts.

    python -m ovi.tools.make_tiny OUT_DIR [--seed N]

OUT_DIR mirrors the official download tree (``Ovi/``, ``Wan2.2-TI2V-5B/``, ``MMAudio/ext_weights/``) and also
holds the ComfyUI-style copies (``text_encoders/``, ``vae/``). Everything is deterministic from the seed and
small enough for CPU tests and the demo.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..log import log
from .tiny import audio, fusion, text, wan_vae

# Each area writes its own files; seeds are offset so no two components share random streams.
_WRITERS = (("fusion", fusion.write_tiny, 0), ("text", text.write_tiny, 1000),
            ("wan_vae", wan_vae.write_tiny, 2000), ("audio", audio.write_tiny, 3000))


def make_tiny(out_dir: str | Path, seed: int = 0) -> dict[str, list[Path]]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for name, write, offset in _WRITERS:
        written[name] = [Path(p) for p in write(out, seed + offset)]
    index = {k: [str(p.relative_to(out)) for p in v] for k, v in written.items()}
    (out / "tiny_manifest.json").write_text(json.dumps({"seed": seed, "files": index}, indent=1))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovi.tools.make_tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = make_tiny(a.out_dir, a.seed)
    for name, paths in written.items():
        for path in paths:
            log.info("%s: %s (%.1f MB)", name, path, path.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
