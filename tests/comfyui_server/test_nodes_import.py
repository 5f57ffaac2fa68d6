"""The pack's entry point without a server: importing it is cheap (no torch, no ComfyUI module, no engine), and
the choices the nodes offer are the engine's own."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from .harness import ROOT

_IMPORT = f"""
import importlib.util, json, sys, time
t0 = time.perf_counter()
spec = importlib.util.spec_from_file_location("ComfyUI-Ovi", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
heavy = sorted(m for m in ("torch", "numpy", "safetensors", "gguf", "sentencepiece", "comfy", "folder_paths")
               if m in sys.modules)
engine = sorted(m for m in sys.modules if m.startswith("ComfyUI-Ovi.ovi.") and m != "ComfyUI-Ovi.ovi.variants")
print(json.dumps({{"nodes": sorted(pack.NODE_CLASS_MAPPINGS), "names": pack.NODE_DISPLAY_NAME_MAPPINGS,
                  "heavy": heavy, "engine": engine, "seconds": time.perf_counter() - t0}}))
"""


def test_importing_the_pack_is_cheap():
    proc = subprocess.run([sys.executable, "-c", _IMPORT], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["heavy"] == [] and out["engine"] == [], out
    assert len(out["nodes"]) == 8 and set(out["names"]) == set(out["nodes"])
    assert out["seconds"] < 2.0, out


def _pack():
    """The pack imported as ComfyUI imports it: a package named after its folder, outside ComfyUI here."""
    name = "ovi_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_node_choices_are_the_engines():
    pack = _pack()
    from ovi.attention import BACKENDS
    from ovi.engine import MEMORY_MODES
    from ovi.sampling.schedules import SOLVERS
    from ovi.variants import VARIANTS

    loaders, sampler = sys.modules[f"{pack.__name__}.nodes.loaders"], sys.modules[f"{pack.__name__}.nodes.sampler"]
    assert loaders.MEMORY_MODES == tuple(MEMORY_MODES)
    assert loaders.ATTENTION == tuple(BACKENDS)
    assert sampler.SOLVERS == tuple(SOLVERS)
    variants = pack.NODE_CLASS_MAPPINGS["OviEngineLoader"].INPUT_TYPES()["required"]["variant"][0]
    assert variants == ["auto", *VARIANTS]
    # outside ComfyUI there are no model folders: the lists are empty rather than an import error
    assert pack.NODE_CLASS_MAPPINGS["OviComponentLoader"].INPUT_TYPES()["required"]["vocoder"][0] == []


def test_frame_size_rule():
    frame_size = sys.modules[f"{_pack().__name__}.nodes.sampler"].frame_size
    assert frame_size(0, 0) is None
    assert frame_size(96, 64) == (64, 96)  # (height, width), used exactly
    for w, h, words in ((100, 64, "multiples of 32"), (96, 0, "give both"), (0, 64, "give both")):
        with pytest.raises(ValueError, match=words):
            frame_size(w, h)
