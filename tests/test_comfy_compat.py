"""Newer ComfyUI cores: an interrupt that is no ``Exception``, throttled progress hooks, keyword calls on the model
patcher, and stricter input paths.

Since ComfyUI 0.3.x's successor made ``InterruptProcessingException`` a ``BaseException``, ``except Exception``
no longer sees it. The engine tests raise such an exception (``HostInterrupt``, defined here the way the core
defines its own) from every callback the engine calls, during diffusion and decoding, in every memory mode, and
check it arrives unchanged and leaves nothing behind: the same resident bytes, no block-swap copy or stream, no
new thread, and a next generate equal to a fresh engine's. The ComfyUI tests run inside the ComfyUI tree the
server suite uses (``tests/comfyui_server/harness.py``); without one they skip, unless COMFY_REQUIRED is set.
"""

from __future__ import annotations

import gc
import json
import subprocess
import threading
import weakref
from pathlib import Path

import pytest
import torch

from comfyui_server.harness import COMFY_DIR, COMFY_PYTHON, ROOT, WAIT_BOUND, required, setup_problem
from ovi.block_swap import BlockSwapper, _CloneCopier
from ovi.engine import OviEngine

PROMPT = "A man walks on the beach at sunset. Audio: waves crashing and seagulls calling"
# Two steps (the interrupt lands after the first or before the second) on the tiny model's two fused layers,
# SLG on layer 1.
GEN = dict(size=(64, 64), steps=2, seed=7, slg_layer=1, video_negative_prompt="blur",
           audio_negative_prompt="muffled")
DECODE_STOP_FRAME = 2  # latent frames decoded before the interrupt lands (of 31)


class HostInterrupt(BaseException):
    """Like ComfyUI's newer ``InterruptProcessingException``: a BaseException, so ``except Exception`` misses it."""


class TrackingCopier(_CloneCopier):
    """The block swapper's copier on one device (clones, as on a GPU each streamed layer gets its own copy):
    keeps weak references to every copy it made, counts ``drain`` calls, and with ``fail_on_wait`` set raises
    ``HostInterrupt`` when the compute would start using the n-th copied layer (the next one is then in flight).
    The swapper makes one per attach; ``next_fail_on_wait`` arms the next one made."""

    made: list["TrackingCopier"] = []
    next_fail_on_wait: int | None = None

    def __init__(self, device):
        super().__init__(device)
        self.copies: list[weakref.ref] = []
        self.drains = 0
        self.waits = 0
        self.fail_on_wait, TrackingCopier.next_fail_on_wait = TrackingCopier.next_fail_on_wait, None
        self.raised: BaseException | None = None
        TrackingCopier.made.append(self)

    def start(self, tensors):
        copies, event = super().start(tensors)
        self.copies += [weakref.ref(c) for c in copies]
        return copies, event

    def wait(self, copies, event) -> None:
        self.waits += 1
        if self.fail_on_wait is not None and self.waits == self.fail_on_wait:
            self.raised = HostInterrupt("interrupt while a layer copy is in flight")
            raise self.raised

    def drain(self) -> None:
        self.drains += 1


# mode -> engine options; each streams or reloads what it can, so a leftover copy shows up
MODES = {
    "all_gpu": lambda: dict(memory_mode="all_gpu"),
    "offload": lambda: dict(memory_mode="offload", cpu_copy=False),  # every device copy read from its file
    # both layers stream; the fusion host copy is block swap's master, the rest is read from the files
    "block_swap": lambda: dict(memory_mode="block_swap", cpu_copy=False,
                               block_swapper=BlockSwapper(resident=0, copier=TrackingCopier)),
}


@pytest.fixture(scope="module")
def fresh(tiny_dir):
    """The latents of a fresh engine (memory modes give identical latents: tests/test_engine.py)."""
    return OviEngine.from_dir(tiny_dir, variant="720x720_5s", memory_mode="all_gpu").generate(PROMPT, **GEN)


@pytest.fixture(scope="module")
def warm(tiny_dir, fresh):
    """warm(mode) -> an engine of that mode after one finished generate (the state between two runs). Every test
    that stops it ends with a finished generate, so it is in that state again for the next test."""
    engines: dict[str, OviEngine] = {}

    def get(mode: str) -> OviEngine:
        if mode not in engines:
            TrackingCopier.made.clear()
            engine = OviEngine.from_dir(tiny_dir, variant="720x720_5s", **MODES[mode]())
            assert engine.memory_mode == mode
            _same_latents(engine.generate(PROMPT, **GEN), fresh)
            engines[mode] = engine
        return engines[mode]

    return get


def _same_latents(got, want) -> None:
    assert torch.equal(got.video_latent, want.video_latent) and torch.equal(got.audio_latent, want.audio_latent)


def _raise_at(calls_before_raise: int, exc: list):
    """A callback that returns quietly ``calls_before_raise`` times, then raises a HostInterrupt (kept in ``exc``)."""
    calls = []

    def callback(*_args):
        calls.append(1)
        if len(calls) > calls_before_raise:
            exc.append(HostInterrupt(f"interrupted at call {len(calls)}"))
            raise exc[-1]
        return False  # should_stop: not yet

    return callback


def _swap_state(engine: OviEngine) -> dict:
    s = engine._swapper
    return {"runner": engine._runner is not None, "model": s.model is not None, "stream": s._copier is not None,
            "active": sorted(s._active), "in_flight": sorted(s._inflight), "swapped": len(s._masters),
            "layer_slots": len(s._layer_slots)}


IDLE_SWAP = {"runner": False, "model": False, "stream": False, "active": [], "in_flight": [], "swapped": 0,
             "layer_slots": 0}

# (mode, where the interrupt comes from, phase)
CASES = [
    ("all_gpu", "progress", "diffusion"),
    ("offload", "should_stop", "diffusion"),
    ("block_swap", "preview", "diffusion"),
    ("block_swap", "layer_copy", "diffusion"),
    ("offload", "progress", "decode"),
    ("block_swap", "should_stop", "decode"),
]


@pytest.mark.parametrize("mode,source,phase", CASES, ids=["-".join(c) for c in CASES])
def test_base_exception_interrupt_propagates_and_leaves_nothing(warm, fresh, mode, source, phase):
    engine = warm(mode)
    resident = engine.resident_bytes()
    threads = set(threading.enumerate())
    host = engine._slots["fusion"].host
    masters = dict(host.state_dict(keep_vars=True)) if host is not None else {}
    TrackingCopier.made.clear()
    raised: list[BaseException] = []

    with pytest.raises(HostInterrupt) as info:
        if phase == "diffusion":
            kw = {}
            if source == "layer_copy":  # step 1, positive pass: layer 0 about to compute, layer 1 in flight
                TrackingCopier.next_fail_on_wait = 1
            else:  # progress and preview after step 1 of 2, should_stop before step 2
                kw[source] = _raise_at(1 if source == "should_stop" else 0, raised)
            try:
                engine.generate(PROMPT, **GEN, **kw)
            finally:
                TrackingCopier.next_fail_on_wait = None
        else:
            engine.decode(fresh, **{source: _raise_at(DECODE_STOP_FRAME, raised)})
    copier = None
    if mode == "block_swap" and phase == "diffusion":
        (copier,) = TrackingCopier.made  # the interrupted run's attach
        if source == "layer_copy":
            raised.append(copier.raised)
    assert info.value is raised[0] and type(info.value) is HostInterrupt  # unchanged, not wrapped
    assert engine.memory_report().rows[-1].note == "stopped: HostInterrupt"
    # the exception's traceback holds the frames (and their tensors) that were running
    del info
    raised.clear()
    if copier is not None:
        copier.raised = None

    gc.collect()
    assert engine.resident_bytes() == resident
    assert engine.fusion_model is None and engine.text_encoder is None
    if mode != "all_gpu":
        assert engine._slots["video_vae"].live is None and engine._slots["audio"].live is None
    assert set(threading.enumerate()) == threads
    if mode == "block_swap":
        assert _swap_state(engine) == IDLE_SWAP
        now = host.state_dict(keep_vars=True)
        assert all(now[k] is masters[k] for k in masters)  # every master back in its module
    if copier is not None:
        assert copier.copies and all(ref() is None for ref in copier.copies)  # every layer copy freed
        if source == "layer_copy":
            assert copier.drains == 1  # the copy in flight was waited for before it was dropped

    _same_latents(engine.generate(PROMPT, **GEN), fresh)  # reusable: as a fresh engine
    assert engine.resident_bytes() == resident


def test_block_swap_run_stopped_mid_layer_puts_masters_back(tiny_dir):
    # An interrupt inside a streamed layer's compute (layer 0 swapped in, layer 1 in flight).
    from ovi.fusion.checkpoint import load_fusion_model

    model = load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", device=torch.device("cpu"),
                              dtype=torch.float32)
    masters = dict(model.state_dict(keep_vars=True))
    swapper = BlockSwapper(model, 0, "cpu", copier=TrackingCopier)
    copier = swapper._copier
    seen = []
    orig = model.forward_layer

    def forward_layer(i, state):
        seen.append((i, sorted(swapper._active), sorted(swapper._inflight)))
        raise HostInterrupt("stop inside layer 0")

    model.forward_layer = forward_layer
    try:
        with pytest.raises(HostInterrupt):
            swapper.run(model, object(), None)
    finally:
        model.forward_layer = orig
    assert seen == [(0, [0], [1])]
    assert swapper._active == {} and swapper._inflight == {} and copier.drains == 1
    swapper.detach()
    gc.collect()
    now = model.state_dict(keep_vars=True)
    assert all(now[k] is masters[k] for k in masters)
    assert copier.copies and all(ref() is None for ref in copier.copies)


# -- inside ComfyUI: the model patcher, the progress bar, the latent loader -----------------------------------
_IN_COMFY = r"""
import importlib, importlib.util, json, math, os, sys, tempfile, threading, traceback
comfy_dir, root, tiny = sys.argv[1:4]
sys.path.insert(0, comfy_dir)
os.chdir(comfy_dir)
import comfy.options
comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]
import torch
import comfy.model_management as mm
import comfy.utils
import folder_paths

spec = importlib.util.spec_from_file_location("ComfyUI-Ovi", os.path.join(root, "__init__.py"),
                                              submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
model_management = importlib.import_module("ComfyUI-Ovi.utils.model_management")
progress = importlib.import_module("ComfyUI-Ovi.utils.progress")
OviEngine = importlib.import_module("ComfyUI-Ovi.ovi.engine").OviEngine
out = {"interrupt_is_exception": issubclass(mm.InterruptProcessingException, Exception)}


def patcher_calls():  # the patcher under the keyword calls newer cores make
    engine = OviEngine.from_dir(tiny, variant="720x720_5s", memory_mode="all_gpu")
    patcher = model_management.OviModelPatcher(engine, "compat")
    model_management.prepare(patcher)
    engine.load()
    held = patcher.loaded_size()
    calls = {}
    for name, call in [("clone()", lambda: patcher.clone()),
                       ("clone(disable_dynamic=True)", lambda: patcher.clone(disable_dynamic=True)),
                       ("clone(model_override=None)", lambda: patcher.clone(model_override=None)),
                       ("clone(force_deepcopy=True)", lambda: patcher.clone(force_deepcopy=True))]:
        got = call()
        calls[name] = [got is patcher, got.engine is engine]
    got = patcher.detach(unpatch_all=False)
    calls["detach(unpatch_all=False)"] = [got is patcher.model, patcher.loaded_size() == held]
    model_management.prepare(patcher.clone(model_override=None))  # core re-registers a clone of a loaded model
    out["loaded_entries"] = len([m for m in mm.current_loaded_models if m.model is patcher])
    freed = patcher.partially_unload(torch.device("cpu"), 0, extra_kw=1)
    calls["partially_unload(device, 0, extra_kw=1)"] = [isinstance(freed, int), freed == held,
                                                        patcher.engine is engine]
    out.update(calls=calls, held=held, after_unload=patcher.loaded_size(),
               is_dynamic=patcher.is_dynamic() if hasattr(patcher, "is_dynamic") else None)


def progress_without_hook():  # progress bars raise the interrupt themselves, hook or no hook
    comfy.utils.set_progress_bar_global_hook(None)  # what a throttled hook amounts to between its calls
    bar = progress.progress_bar(10)
    bar(1, 10)
    mm.interrupt_current_processing(True)
    try:
        bar(2, 10)
        out["bar_raised"] = False
    except mm.InterruptProcessingException:
        out["bar_raised"] = True
    out["flag_after"] = mm.processing_interrupted()


def save_video_interrupted():  # OviSaveVideo stopped part-way: ComfyUI's interrupt, no file, no thread
    # the user presses Cancel while frame 3 is written; no hook runs (as between two calls of a throttled one)
    comfy.utils.set_progress_bar_global_hook(None)
    update = comfy.utils.ProgressBar.update_absolute

    def update_and_press(self, value, total=None, preview=None):
        update(self, value, total, preview)
        if value == 3:
            mm.interrupt_current_processing(True)

    comfy.utils.ProgressBar.update_absolute = update_and_press
    outdir = tempfile.mkdtemp(prefix="ovi-compat-out-")
    folder_paths.set_output_directory(outdir)
    threads = set(threading.enumerate())
    images = torch.rand(12, 32, 32, 3)
    audio = {"waveform": torch.zeros(1, 1, 8000), "sample_rate": 16000}
    try:
        pack.NODE_CLASS_MAPPINGS["OviSaveVideo"]().save(images=images, fps=24.0, filename_prefix="video/compat",
                                                        crf=18, audio=audio)  # ComfyUI passes inputs by name
        out["save_raised"] = None
    except mm.InterruptProcessingException:
        out["save_raised"] = "InterruptProcessingException"
    finally:
        comfy.utils.ProgressBar.update_absolute = update
        mm.interrupt_current_processing(False)
    out["save_files"] = sorted(os.path.relpath(os.path.join(r, f), outdir) for r, _, fs in os.walk(outdir)
                               for f in fs)
    out["save_new_threads"] = len(set(threading.enumerate()) - threads)


def latent_loader_paths():  # newer cores raise ValueError for a name whose real path leaves its folder
    load = pack.NODE_CLASS_MAPPINGS["OviLoadLatent"]
    out["missing_is_changed_nan"] = math.isnan(load.IS_CHANGED("no_such_latent.safetensors"))
    out["missing_validate"] = load.VALIDATE_INPUTS("no_such_latent.safetensors")
    real = folder_paths.get_annotated_filepath

    def refuse(name, default_dir=None):
        raise ValueError(f"Invalid file path: {name}")

    folder_paths.get_annotated_filepath = refuse
    try:
        out["refused_is_changed_nan"] = math.isnan(load.IS_CHANGED("../outside.safetensors"))
        out["refused_validate"] = load.VALIDATE_INPUTS("../outside.safetensors")
    finally:
        folder_paths.get_annotated_filepath = real


for section in (patcher_calls, progress_without_hook, save_video_interrupted, latent_loader_paths):
    try:
        section()
    except BaseException:
        out[section.__name__ + "_error"] = traceback.format_exc()[-3000:]
print("OVI-COMPAT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def in_comfy(tiny_dir, tmp_path_factory):
    problem = setup_problem()
    if problem:
        if required():
            pytest.fail(f"{problem} (COMFY_REQUIRED is set, so this is a failure, not a skip)", pytrace=False)
        pytest.skip(problem)
    script = tmp_path_factory.mktemp("compat") / "in_comfy.py"
    script.write_text(_IN_COMFY)
    proc = subprocess.run([COMFY_PYTHON, str(script), str(COMFY_DIR), str(ROOT), str(tiny_dir)],
                          capture_output=True, text=True, timeout=WAIT_BOUND, cwd=str(Path(COMFY_DIR)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("OVI-COMPAT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1].removeprefix("OVI-COMPAT "))


def test_patcher_takes_newer_keyword_calls_and_stays_one_engine(in_comfy):
    assert "patcher_calls_error" not in in_comfy, in_comfy["patcher_calls_error"]
    assert in_comfy["calls"] == {
        "clone()": [True, True],
        "clone(disable_dynamic=True)": [True, True],
        "clone(model_override=None)": [True, True],
        "clone(force_deepcopy=True)": [True, True],
        "detach(unpatch_all=False)": [True, True],  # weights stay
        "partially_unload(device, 0, extra_kw=1)": [True, True, True],  # on the CPU: everything released
    }
    assert in_comfy["held"] > 0 and in_comfy["after_unload"] == 0
    assert in_comfy["loaded_entries"] == 1  # a clone re-registered is still the one entry
    assert in_comfy["is_dynamic"] in (None, False)  # stays a plain (non-dynamic) model in newer cores


def test_progress_bar_raises_the_interrupt_without_the_hook(in_comfy):
    assert "progress_without_hook_error" not in in_comfy, in_comfy["progress_without_hook_error"]
    assert in_comfy["bar_raised"] is True and in_comfy["flag_after"] is False  # raised once, flag consumed


def test_save_video_interrupted_leaves_no_file(in_comfy):
    assert "save_video_interrupted_error" not in in_comfy, in_comfy["save_video_interrupted_error"]
    assert in_comfy["save_raised"] == "InterruptProcessingException"
    assert in_comfy["save_files"] == [] and in_comfy["save_new_threads"] == 0


def test_latent_loader_reports_refused_paths(in_comfy):
    assert "latent_loader_paths_error" not in in_comfy, in_comfy["latent_loader_paths_error"]
    assert in_comfy["missing_is_changed_nan"] is True
    assert in_comfy["missing_validate"] == "latent file not found: no_such_latent.safetensors"
    assert in_comfy["refused_is_changed_nan"] is True
    assert in_comfy["refused_validate"].startswith("latent file not usable: ../outside.safetensors: Invalid file path")
