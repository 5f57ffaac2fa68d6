"""The pack's entry point without a server: importing it is cheap (no torch, no ComfyUI module, no engine), and
the choices the nodes offer are the engine's own."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from .harness import ROOT, WAIT_BOUND

_IMPORT = f"""
import importlib.util, json, sys, time
t0 = time.process_time()  # CPU time: what the import costs, whatever else the machine runs
spec = importlib.util.spec_from_file_location("ComfyUI-Ovi", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
heavy = sorted(m for m in ("torch", "numpy", "safetensors", "gguf", "sentencepiece", "comfy", "folder_paths")
               if m in sys.modules)
engine = sorted(m for m in sys.modules if m.startswith("ComfyUI-Ovi.ovi.")
                and m not in ("ComfyUI-Ovi.ovi.variants", "ComfyUI-Ovi.ovi.choices"))
print(json.dumps({{"nodes": sorted(pack.NODE_CLASS_MAPPINGS), "names": pack.NODE_DISPLAY_NAME_MAPPINGS,
                  "heavy": heavy, "engine": engine, "seconds": time.process_time() - t0}}))
"""


def test_importing_the_pack_is_cheap():
    proc = subprocess.run([sys.executable, "-c", _IMPORT], capture_output=True, text=True, timeout=WAIT_BOUND,
                          cwd="/")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["heavy"] == [] and out["engine"] == [], out
    assert len(out["nodes"]) == 10 and set(out["names"]) == set(out["nodes"])
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


# Every constant a node module shares with the engine: (node module, its name there, the ovi.choices name).
SHARED_CHOICES = [
    ("loaders", "MEMORY_MODES", "MEMORY_MODES"),
    ("loaders", "ATTENTION", "ATTENTION_BACKENDS"),
    ("sampler", "SOLVERS", "SOLVERS"),
    ("sampler", "VIDEO_NEGATIVE", "VIDEO_NEGATIVE_PROMPT"),
    ("sampler", "AUDIO_NEGATIVE", "AUDIO_NEGATIVE_PROMPT"),
    ("convert", "TARGETS", "CONVERT_TARGETS"),
    ("extend", "SOLVERS", "SOLVERS"),
    ("extend", "KNOWN_MODES", "KNOWN_MODES"),
]
# Where the engine itself uses each ovi.choices constant: (engine module, its name there, the ovi.choices name).
ENGINE_USES = [
    ("ovi.engine", "MEMORY_MODES", "MEMORY_MODES"),
    ("ovi.attention", "BACKENDS", "ATTENTION_BACKENDS"),
    ("ovi.sampling.schedules", "SOLVERS", "SOLVERS"),
    ("ovi.convert", "TARGETS", "CONVERT_TARGETS"),
    ("ovi.convert", "GGUF_TARGETS", "GGUF_TARGETS"),
    ("ovi.__main__", "VIDEO_NEGATIVE", "VIDEO_NEGATIVE_PROMPT"),
    ("ovi.__main__", "AUDIO_NEGATIVE", "AUDIO_NEGATIVE_PROMPT"),
    ("ovi.sampling.known", "KNOWN_MODES", "KNOWN_MODES"),
]
# Constants of the node modules that are the nodes' own (checked against the engine where it has a counterpart).
NODE_ONLY = {"convert.CATEGORY", "loaders.CATEGORY", "loaders.PRECISIONS", "loaders.GGUF_MAGIC",
             "decode.VAE_PRECISIONS", "latents.AUDIO_KEY", "latents.META_KEY", "latents.LATENT_DIR",
             "sampler.EXAMPLE_PROMPT", "sampler.SEED_MAX", "convert._SOURCES", "convert._SUFFIX", "loaders._ROLES",
             "decode._HAS_VIDEO", "extend.PREVIOUS", "latents.TRACK_KEY", "latents.NOT_OVI", "lora.LORA_EXTENSIONS",
             "lora.STRENGTH_LIMIT", "lora.PREFERRED"}


def _node_modules(pack) -> dict:
    return {name: sys.modules[f"{pack.__name__}.nodes.{name}"]
            for name in ("convert", "decode", "extend", "latents", "loaders", "lora", "sampler", "video")}


def test_node_choices_are_the_engines():
    import importlib

    import ovi.choices
    from ovi.engine import parse_dtype
    from ovi.latent_file import AUDIO_KEY
    from ovi.variants import VARIANTS

    pack = _pack()
    nodes = _node_modules(pack)
    pack_choices = sys.modules[f"{pack.__name__}.ovi.choices"]  # the pack's own copy of the module, same file
    for module, name, shared in SHARED_CHOICES:
        assert getattr(nodes[module], name) is getattr(pack_choices, shared), (module, name)
        assert getattr(pack_choices, shared) == getattr(ovi.choices, shared), shared
    for module, name, shared in ENGINE_USES:
        assert getattr(importlib.import_module(module), name) is getattr(ovi.choices, shared), (module, name)

    # and what the user sees in the combo boxes and defaults is exactly that
    inputs = {k: pack.NODE_CLASS_MAPPINGS[k].INPUT_TYPES()["required"]
              for k in ("OviEngineLoader", "OviComponentLoader", "OviSampler", "OviConvertModel")}
    assert inputs["OviEngineLoader"]["memory_mode"][0] == list(ovi.choices.MEMORY_MODES)
    assert inputs["OviEngineLoader"]["attention"][0] == list(ovi.choices.ATTENTION_BACKENDS)
    assert inputs["OviSampler"]["solver"][0] == list(ovi.choices.SOLVERS)
    assert inputs["OviSampler"]["video_negative_prompt"][1]["default"] == ovi.choices.VIDEO_NEGATIVE_PROMPT
    assert inputs["OviSampler"]["audio_negative_prompt"][1]["default"] == ovi.choices.AUDIO_NEGATIVE_PROMPT
    assert inputs["OviConvertModel"]["target"][0] == list(ovi.choices.CONVERT_TARGETS)
    assert "gguf-bf16" in inputs["OviConvertModel"]["target"][0]  # the converter's newest target, once missing
    assert inputs["OviEngineLoader"]["variant"][0] == ["auto", *VARIANTS]
    # node-only constants with an engine counterpart
    for precision in (*nodes["loaders"].PRECISIONS, *nodes["decode"].VAE_PRECISIONS):
        assert precision == "auto" or parse_dtype(precision) is not None, precision
    assert nodes["latents"].AUDIO_KEY == AUDIO_KEY
    # outside ComfyUI there are no model folders: the lists are empty rather than an import error
    assert inputs["OviComponentLoader"]["vocoder"][0] == []


def test_every_shared_constant_is_covered():
    """A constant written into a node module by hand (a copy of an engine tuple, say) fails here until it comes
    from ovi.choices or is listed as the nodes' own; so does an ovi.choices import the checks above miss."""
    import ast

    import ovi.choices

    shared_values = [getattr(ovi.choices, n) for n in ovi.choices.__all__]
    written, imported = set(), set()
    for path in sorted(p for p in (ROOT / "nodes").glob("*.py") if p.stem != "__init__"):  # __init__: the mappings
        for stmt in ast.parse(path.read_text()).body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(
                stmt, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name) and t.id.lstrip("_").isupper():
                    written.add(f"{path.stem}.{t.id}")
                    value = getattr(sys.modules[f"{_pack().__name__}.nodes.{path.stem}"], t.id)
                    assert value not in shared_values, f"{path.stem}.{t.id} copies an ovi.choices constant"
            if isinstance(stmt, ast.ImportFrom) and (stmt.module or "").endswith("ovi.choices"):
                imported |= {(path.stem, a.asname or a.name, a.name) for a in stmt.names}
    assert written - NODE_ONLY == set(), "node constants neither from ovi.choices nor listed as the nodes' own"
    assert NODE_ONLY - written == set(), "NODE_ONLY lists constants the node modules no longer have"
    assert imported == set(SHARED_CHOICES), "SHARED_CHOICES must list every ovi.choices import of the nodes"
    engine_side = {shared for _, _, shared in SHARED_CHOICES} | {shared for _, _, shared in ENGINE_USES}
    assert engine_side == set(ovi.choices.__all__), "every ovi.choices constant is checked where it is used"


def test_frame_size_rule():
    frame_size = sys.modules[f"{_pack().__name__}.nodes.sampler"].frame_size
    assert frame_size(0, 0) is None
    assert frame_size(96, 64) == (64, 96)  # (height, width), used exactly
    for w, h, words in ((100, 64, "multiples of 32"), (96, 0, "give both"), (0, 64, "give both")):
        with pytest.raises(ValueError, match=words):
            frame_size(w, h)
