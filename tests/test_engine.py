"""OviEngine on the CPU with the tiny checkpoint set: generation, decoding, memory modes, release, interrupts,
I2AV, variant detection and the errors a user can run into."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ovi import memory
from ovi.attention import AttentionBackendError
from ovi.block_swap import BlockSwapper, _CloneCopier
from ovi.detect import describe_variant, inspect_file, resolve_variant
from ovi.engine import (EngineOptions, Interrupted, MissingComponentError, OviEngine, resolve_frame_size)
from ovi.image import first_frame_size, resize_bicubic
from ovi.loading import CheckpointError
from ovi.sizes import t2v_frame_size
from ovi.variants import VARIANTS

PROMPT = "A man walks on the beach at sunset. Audio: waves crashing and seagulls calling"
# The tiny fusion model has 2 layers, so SLG skips layer 1 (the default 11 would skip nothing).
GEN = dict(size=(64, 64), steps=2, seed=7, slg_layer=1, video_negative_prompt="blur",
           audio_negative_prompt="muffled")



def _engine(tiny_dir: Path, variant: str = "720x720_5s", **kw) -> OviEngine:
    return OviEngine.from_dir(tiny_dir, variant=variant, **kw)


@pytest.fixture(scope="module")
def run_720(tiny_dir):
    """One all_gpu generation + decode, with weak references to the models taken while they were loaded."""
    engine = _engine(tiny_dir, memory_mode="all_gpu")
    engine.load()
    refs = weakref.ref(engine.fusion_model), weakref.ref(engine.text_encoder)
    steps = []
    result = engine.generate(PROMPT, progress=lambda done, total: steps.append((done, total)), **GEN)
    gc.collect()
    dead_after_generate = [r() is None for r in refs]
    clip = engine.decode(result)
    gc.collect()
    return SimpleNamespace(engine=engine, result=result, clip=clip, refs=refs, steps=steps,
                           dead_after_generate=dead_after_generate)


# -- generation and decoding -------------------------------------------------------------------------
def test_generate_decode_720(run_720):
    r, clip, v = run_720.result, run_720.clip, VARIANTS["720x720_5s"]
    assert r.video_latent.shape == (48, 31, 4, 4) and r.video_latent.dtype == torch.float32
    assert r.audio_latent.shape == (157, 20) and r.audio_latent.dtype == torch.float32
    assert (r.height, r.width, r.variant, r.seed, r.mode) == (64, 64, "720x720_5s", 7, "t2av")
    assert r.prompt.endswith("<AUDCAP>waves crashing and seagulls calling<ENDAUDCAP>")  # Ovi 1.0 caption style
    assert torch.isfinite(r.video_latent).all() and torch.isfinite(r.audio_latent).all()
    assert run_720.steps == [(1, 2), (2, 2)]
    assert clip.frames.shape == (121, 64, 64, 3) == (v.video_frames, 64, 64, 3)
    assert clip.frames.dtype == torch.float32 and 0.0 <= clip.frames.min() and clip.frames.max() <= 1.0
    assert clip.waveform.shape == (80384,) == (v.audio_samples,) and clip.waveform.dtype == torch.float32
    assert clip.waveform.abs().max() <= 1.0 and clip.waveform.std() > 0
    assert (clip.fps, clip.sample_rate) == (24, 16000)
    assert abs(clip.video_seconds - clip.audio_seconds) <= 1 / clip.fps


def test_generate_decode_960_10s(tiny_dir):
    engine = _engine(tiny_dir, "960x960_10s")  # auto on the CPU -> all_gpu
    assert engine.memory_mode == "all_gpu"
    r = engine.generate(PROMPT, **GEN)
    assert r.video_latent.shape == (48, 61, 4, 4) and r.audio_latent.shape == (314, 20)
    assert r.prompt.endswith("Audio: waves crashing and seagulls calling")  # Ovi 1.1 keeps "Audio:"
    clip = engine.decode(r)
    assert clip.frames.shape == (241, 64, 64, 3) and clip.waveform.shape == (160768,)
    assert abs(clip.video_seconds - clip.audio_seconds) <= 1 / clip.fps


def test_release_frees_and_decode_does_not_reload(run_720):
    # all_gpu drops the fusion model and the text encoder after diffusion: no reference survives
    assert run_720.dead_after_generate == [True, True]
    assert all(ref() is None for ref in run_720.refs)
    assert run_720.engine.fusion_model is None and run_720.engine.text_encoder is None
    phases = [row.phase for row in run_720.engine.memory_report().rows]
    assert phases == ["load", "encode text", "diffusion", "release", "decode video", "decode audio"]
    table = run_720.engine.memory_report().table()
    assert "process RSS" in table and all(p in table for p in phases)
    assert all(row.allocated and row.peak and row.free for row in run_720.engine.memory_report().rows)


def test_decode_interrupt(run_720):
    frames = []
    with pytest.raises(Interrupted, match="decoding interrupted"):
        run_720.engine.decode(run_720.result, progress=lambda done, total: frames.append(done),
                              should_stop=lambda: True)
    assert frames == []  # stopped at the first latent frame, before reporting it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")
def test_release_frees_device_memory(tiny_dir):
    engine = _engine(tiny_dir, memory_mode="all_gpu", device="cuda")
    engine.load()
    fusion_bytes = sum(t.numel() * t.element_size() for t in engine.fusion_model.parameters())
    refs = weakref.ref(engine.fusion_model), weakref.ref(engine.text_encoder)
    loaded = torch.cuda.memory_allocated(engine.device)
    result = engine.generate(PROMPT, **GEN)
    gc.collect()
    assert all(r() is None for r in refs)
    assert torch.cuda.memory_allocated(engine.device) <= loaded - fusion_bytes
    engine.decode(result)
    assert engine.fusion_model is None
    assert torch.cuda.memory_allocated(engine.device) <= loaded - fusion_bytes


def test_interrupt_then_same_result(run_720):
    engine, base = run_720.engine, run_720.result
    calls = []

    def stop_after_one_step():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Interrupted) as info:
        engine.generate(PROMPT, should_stop=stop_after_one_step, **GEN)
    assert (info.value.step, info.value.total) == (1, 2)
    assert engine.memory_report().rows[-1].note.startswith("stopped")
    again = engine.generate(PROMPT, **GEN)  # reloads the released models from their files
    assert torch.equal(again.video_latent, base.video_latent)
    assert torch.equal(again.audio_latent, base.audio_latent)


def test_explicit_noise_matches_seeded(run_720):
    base = run_720.result
    gen = torch.Generator().manual_seed(GEN["seed"])
    video = torch.randn(48, 31, 4, 4, generator=gen)
    audio = torch.randn(157, 20, generator=torch.Generator().manual_seed(GEN["seed"]))
    kw = {k: v for k, v in GEN.items() if k not in ("size", "seed")}
    r = run_720.engine.generate(PROMPT, noise=(video, audio), **kw)  # size taken from the noise
    assert (r.height, r.width) == (64, 64)
    assert torch.equal(r.video_latent, base.video_latent) and torch.equal(r.audio_latent, base.audio_latent)
    with pytest.raises(ValueError, match="noise shapes"):
        run_720.engine.generate(PROMPT, noise=(video[:, :30], audio), **GEN)


def test_preview_gets_each_steps_clean_estimate(run_720):
    seen = []
    r = run_720.engine.generate(PROMPT, preview=lambda done, total, x0: seen.append((done, total, x0.clone())), **GEN)
    assert [s[:2] for s in seen] == [(k + 1, GEN["steps"]) for k in range(GEN["steps"])]
    assert all(s[2].shape == r.video_latent.shape for s in seen)
    # The last step's estimate is the result itself (every solver ends on x - sigma*v), and previews leave the
    # result unchanged.
    assert torch.allclose(seen[-1][2], r.video_latent, atol=1e-5)
    assert torch.equal(r.video_latent, run_720.result.video_latent)


# -- memory modes ------------------------------------------------------------------------------------------
class RecordingSwapper:
    """A stand-in block swapper: runs the layers in place and records what the engine asked of it."""

    def __init__(self):
        self.calls = []

    def attach(self, model, device):
        self.calls.append(("attach", str(device)))
        return model

    def run(self, model, state, skip):
        self.calls.append(("run", skip))
        for i in range(model.num_layers):
            if i != skip:
                model.forward_layer(i, state)

    def detach(self):
        self.calls.append(("detach",))


class CountingCopier(_CloneCopier):
    """The block swapper's host -> device copier on one device: every streamed layer is really copied (cloned)
    into the model for its compute and the master put back after, as on a GPU; each ``start`` is one layer."""

    made: list["CountingCopier"] = []

    def __init__(self, device):
        super().__init__(device)
        self.layers_copied = 0
        self.bytes_copied = 0
        CountingCopier.made.append(self)

    def start(self, tensors):
        self.layers_copied += 1
        self.bytes_copied += sum(t.numel() * t.element_size() for t in tensors)
        return super().start(tensors)


def _streaming_swapper(resident: int) -> BlockSwapper:
    swapper = BlockSwapper(resident=resident, copier=CountingCopier)
    swapper.trace = []
    return swapper


# case: (engine options, the mode it must run, streamed-layer copies per generate (block swap only))
# The tiny model has 2 fused layers and GEN runs 2 steps, each a positive pass over every layer and a negative
# pass without the SLG layer 1.
MODE_CASES = {
    "offload": (lambda: dict(memory_mode="offload"), "offload", None),
    "offload_no_copy": (lambda: dict(memory_mode="offload", cpu_copy=False), "offload", None),
    # nothing resident: layers 0 and 1 streamed in the positive pass, layer 0 in the negative one
    "block_swap": (lambda: dict(memory_mode="block_swap", block_swapper=_streaming_swapper(0)), "block_swap", 6),
    # auto with a resident-layer count resolves to block_swap: layer 1 streamed, in the positive pass only
    "auto_to_block_swap": (lambda: dict(memory_mode="auto", block_swap=1, block_swapper=_streaming_swapper(1)),
                           "block_swap", 2),
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_memory_modes_give_identical_latents(tiny_dir, run_720, case):
    make_options, mode, copies = MODE_CASES[case]
    CountingCopier.made.clear()
    engine = _engine(tiny_dir, **make_options())
    assert engine.memory_mode == mode != run_720.engine.memory_mode == "all_gpu"  # not the baseline again
    r = engine.generate(PROMPT, **GEN)
    assert torch.equal(r.video_latent, run_720.result.video_latent)
    assert torch.equal(r.audio_latent, run_720.result.audio_latent)
    assert engine.fusion_model is None and engine.text_encoder is None  # device copies only for their phase
    if copies is not None:
        (copier,) = CountingCopier.made  # one attach per generate
        assert copier.layers_copied == copies and copier.bytes_copied > 0
        trace = engine.options.block_swapper.trace
        streamed = [i for op, i in trace if op == "fetch"]
        assert len(streamed) == copies and streamed == [i for op, i in trace if op == "evict"]


def test_block_swap_uses_the_given_swapper(tiny_dir, run_720):
    swapper = RecordingSwapper()
    engine = _engine(tiny_dir, memory_mode="block_swap", block_swap=1, block_swapper=swapper)
    assert engine.memory_mode == "block_swap" and engine.resident_layers == 1
    r = engine.generate(PROMPT, **GEN)
    # per step: the positive pass skips nothing, the negative pass skips the SLG layer
    assert swapper.calls == [("attach", "cpu"), ("run", None), ("run", 1), ("run", None), ("run", 1), ("detach",)]
    assert torch.equal(r.video_latent, run_720.result.video_latent)
    swapper.calls.clear()
    with pytest.raises(Interrupted):
        engine.generate(PROMPT, should_stop=lambda: True, **GEN)
    assert swapper.calls == [("attach", "cpu"), ("detach",)]  # detached on an interrupt too


def test_offload_interrupt_leaves_nothing_on_device(tiny_dir):
    engine = _engine(tiny_dir, memory_mode="offload")
    with pytest.raises(Interrupted):
        engine.generate(PROMPT, should_stop=lambda: True, **GEN)
    assert engine.fusion_model is None and engine.text_encoder is None


# free bytes the fake accelerator reports -> (mode, resident layers) auto must choose. The sizes are faked (see
# test_auto_mode_policy): fusion model 122_000 B (30 layers of 4000 B + 2000 B outside them), the other
# components 16_000 B, activations 10_000 B. The documented rule, with 92% of the free memory as the budget:
# all_gpu when everything and the activations fit (148_000 B: from 160_870 B free), offload when the fusion model
# and the activations fit (132_000 B: from 143_479 B free), else block_swap with as many layers resident as fit
# beside the activations, the 2000 B outside the layers and 2 layers in flight.
AUTO_CASES = [
    (10 ** 9, "all_gpu", 0),
    (160_870, "all_gpu", 0),
    (160_869, "offload", 0),
    (143_479, "offload", 0),
    (143_478, "block_swap", 27),  # budget 131_999 B: 27 layers (108_000 B) + 20_000 B
    (99_000, "block_swap", 17),   # budget 91_080 B
    (25_000, "block_swap", 0),    # budget 23_000 B: room for the in-flight layers only
    (10_000, "block_swap", 0),    # not even that: everything streams
]


def test_auto_mode_policy(tiny_dir, monkeypatch, caplog):
    """The auto choice on an accelerator, from the free memory the device reports (all sizes faked: a 30-layer
    model of 4-byte weights, 1000 per layer, 500 outside the layers, 10 kB of activations)."""
    e = _engine(tiny_dir)
    assert e.memory_mode == "all_gpu" and "the device is the CPU" in e._choose_mode()[2]
    layer, other, layers, _, _ = e._fusion_sizes()
    assert (layers, 2 * layer + other) == (2, e._slots["fusion"].host_bytes(e.dtype)) and e._activation_bytes() > 0
    e.device = torch.device("cuda", 0)  # only its type is read: nothing is allocated on it
    monkeypatch.setattr(e, "_fusion_sizes", lambda: (4000, 2000, 30, 0, 0))
    monkeypatch.setattr(e, "_activation_bytes", lambda: 10_000)
    for name, n in (("fusion", 30_500), ("text_encoder", 2000), ("video_vae", 1000), ("audio", 1000)):
        e._slots[name].numel, e._slots[name].stored_bytes = n, 0
    assert e.dtype == torch.float32

    def free(n):
        monkeypatch.setattr(memory, "device_free", lambda device: (n, 2 * n))
        return e._choose_mode()

    chosen = [(n, *free(n)[:2]) for n, _, _ in AUTO_CASES]
    assert chosen == AUTO_CASES
    assert "not with the other components" in free(143_479)[2]
    assert "27 of 30 layers stay resident" in free(143_478)[2]

    # free memory that cannot be read: offload, never all_gpu, and a warning that says so
    monkeypatch.setattr(memory, "device_free", lambda device: None)
    with caplog.at_level("WARNING", logger="ovi"):
        mode, n, why = e._choose_mode()
    assert (mode, n) == ("offload", 0) and "cannot be read" in why
    assert any(r.levelname == "WARNING" and "memory mode offload on cuda:0" in r.getMessage() for r in caplog.records)
    e.options.memory_mode = "all_gpu"  # the user's explicit choice stands
    assert e._choose_mode()[:2] == ("all_gpu", 0)
    e.options.memory_mode, e.options.block_swap = "auto", 3
    assert e._choose_mode()[:2] == ("block_swap", 3)


def test_unreadable_accelerator_memory_is_reported(monkeypatch, caplog):
    """An accelerator whose free memory PyTorch cannot report: device_free answers None and warns, naming the
    device and the error, once per device."""
    def refuse(device=None):
        raise RuntimeError("getMemoryInfo is not implemented for this backend")

    monkeypatch.setattr(torch.accelerator, "get_memory_info", refuse)
    monkeypatch.setattr(memory, "_unreadable_warned", set())
    with caplog.at_level("WARNING", logger="ovi"):
        assert memory.device_free(torch.device("xpu", 0)) is None
        assert memory.device_free(torch.device("xpu", 0)) is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "xpu:0" in warned[0] and "not implemented for this backend" in warned[0], warned
    monkeypatch.setattr(torch.accelerator, "get_memory_info", lambda device=None: (7 * 2 ** 30, 8 * 2 ** 30))
    assert memory.device_free(torch.device("xpu", 0)) == (7 * 2 ** 30, 8 * 2 ** 30)


# -- I2AV ------------------------------------------------------------------------------------------------
def _png(path: Path, h: int, w: int, seed: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_i2av_keeps_the_first_frame(tiny_dir, run_720, tmp_path):
    from ovi.vae.checkpoint import load_wan_vae

    img = _png(tmp_path / "first.png", 48, 80)
    r = run_720.engine.generate(PROMPT, image=img, **GEN)
    assert r.mode == "i2av" and (r.height, r.width) == (64, 64)
    assert r.image_latent.shape == (48, 1, 4, 4)
    assert torch.equal(r.video_latent[:, :1], r.image_latent)  # frame 0 is the clean image latent at the end
    assert not torch.equal(r.video_latent, run_720.result.video_latent)
    # the image latent is the VAE encoding of the image resized (bicubic, no crop) to exactly 64x64
    from PIL import Image

    x = torch.from_numpy(np.array(Image.open(img))).permute(2, 0, 1).float() / 255 * 2 - 1
    x = resize_bicubic(x, (64, 64))
    vae = load_wan_vae(tiny_dir / "Wan2.2-TI2V-5B" / "Wan2.2_VAE.pth")
    expected = vae.encode(x[None, :, None])[0]
    torch.testing.assert_close(r.image_latent, expected, rtol=0, atol=0)


def test_i2av_without_size_uses_the_official_preprocessing(run_720, tmp_path):
    img = _png(tmp_path / "wide.png", 90, 160)
    x = run_720.engine._prepare_image(img, None)
    assert tuple(x.shape[-2:]) == first_frame_size(90, 160, VARIANTS["720x720_5s"].target_area)
    assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0


# -- frame size ------------------------------------------------------------------------------------------
def test_frame_size_rules():
    assert resolve_frame_size("720x720_5s", size=(64, 96))[:2] == (64, 96)
    assert resolve_frame_size("720x720_5s", size="96x64")[:2] == (96, 64)
    assert resolve_frame_size("720x720_5s", height=720, width=1280)[:2] == (544, 960)  # official snapping
    assert resolve_frame_size("960x960_10s", height=704, width=1280)[:2] == (704, 1280)
    assert resolve_frame_size("720x720_5s")[:2] == (704, 704)
    assert resolve_frame_size("960x960_5s")[:2] == (960, 960)
    assert resolve_frame_size("960x960_5s", aspect="9:16")[:2] == t2v_frame_size("960x960_5s", 9, 16)[:2]
    with pytest.raises(ValueError, match="multiples of 32.*96x64"):
        resolve_frame_size("720x720_5s", size=(100, 64))
    with pytest.raises(ValueError, match="only one of"):
        resolve_frame_size("720x720_5s", size=(64, 64), height=64, width=64)
    with pytest.raises(ValueError, match="both height and width"):
        resolve_frame_size("720x720_5s", height=64)


# -- bad inputs --------------------------------------------------------------------------------------------
def test_bad_generate_inputs(run_720, tmp_path):
    e = run_720.engine
    with pytest.raises(ValueError, match="prompt is empty"):
        e.generate("   ", **GEN)
    with pytest.raises(ValueError, match="multiples of 32"):
        e.generate(PROMPT, **{**GEN, "size": (100, 64)})
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        e.generate(PROMPT, image=bad, **GEN)
    with pytest.raises(FileNotFoundError):
        e.generate(PROMPT, image=tmp_path / "absent.png", **GEN)
    with pytest.raises(ValueError, match="unknown solver"):
        e.generate(PROMPT, **{**GEN, "steps": 2}, solver="heun")
    with pytest.raises(ValueError, match="seed"):
        e.generate(PROMPT, **{**GEN, "seed": -1})


def _mirror(src: Path, dst: Path, skip: str) -> Path:
    """A models folder that links to ``src`` but lacks the top-level entry ``skip``."""
    dst.mkdir()
    for child in src.iterdir():
        if child.name != skip:
            (dst / child.name).symlink_to(child, target_is_directory=child.is_dir())
    return dst


def test_missing_components(tiny_dir, tmp_path):
    with pytest.raises(MissingComponentError, match="does not exist"):
        OviEngine.from_dir(tmp_path / "nowhere", variant="720x720_5s")
    no_audio = _mirror(tiny_dir, tmp_path / "no_audio", "MMAudio")
    with pytest.raises(MissingComponentError) as info:
        OviEngine.from_dir(no_audio, variant="720x720_5s")
    msg = str(info.value)
    assert "MMAudio VAE" in msg and "BigVGAN vocoder" in msg and str(no_audio / "MMAudio/ext_weights/v1-16.pth") in msg
    assert "fusion" not in msg
    no_ovi = _mirror(tiny_dir, tmp_path / "no_ovi", "Ovi")
    with pytest.raises(MissingComponentError, match=r"fusion model.*Ovi/model_960x960_10s\.safetensors"):
        OviEngine.from_dir(no_ovi, variant="960x960_10s")
    with pytest.raises(ValueError, match="several Ovi models"):
        OviEngine.from_dir(tiny_dir)  # three variants there and none chosen
    t = tiny_dir / "Wan2.2-TI2V-5B"
    with pytest.raises(MissingComponentError, match="Wan2.2 video VAE: no path given"):
        OviEngine(tiny_dir / "Ovi" / "model.safetensors", t / "models_t5_umt5-xxl-enc-bf16.pth",
                  audio_vae=tiny_dir / "MMAudio/ext_weights/v1-16.pth",
                  vocoder=tiny_dir / "MMAudio/ext_weights/best_netG.pt")


def _paths(tiny_dir: Path) -> dict:
    t = tiny_dir / "Wan2.2-TI2V-5B"
    return dict(text_encoder=t / "models_t5_umt5-xxl-enc-bf16.pth", video_vae=t / "Wan2.2_VAE.pth",
                audio_vae=tiny_dir / "MMAudio/ext_weights/v1-16.pth",
                vocoder=tiny_dir / "MMAudio/ext_weights/best_netG.pt")


def _strip_variant(src: Path, dst: Path) -> Path:
    """A copy of a tiny fusion file without the ovi.variant metadata (the config stays, so it still loads)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "ovi.variant"}
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_variant_sources_and_conflicts(tiny_dir, tmp_path, caplog):
    official = tiny_dir / "Ovi" / "model.safetensors"
    with pytest.raises(ValueError, match="metadata"):  # an explicit choice contradicting our metadata
        OviEngine(official, **_paths(tiny_dir), variant="960x960_10s")
    with caplog.at_level("INFO", logger="ovi"):
        e = OviEngine(official, **_paths(tiny_dir))
    assert e.variant.name == "720x720_5s" and e.variant_choice.source == "metadata"
    assert ("variant 720x720_5s (5 s, 720x720 area, 31 video latent frames, 157 audio tokens), bf16, 0.0 GB, "
            "from metadata") in caplog.text

    named = _strip_variant(official, tmp_path / "Ovi-960x960-10s.safetensors")  # a ComfyUI-Ovi name
    assert OviEngine(named, **_paths(tiny_dir)).variant.name == "960x960_10s"
    assert resolve_variant([named]).source == "name"
    with pytest.raises(ValueError, match="ComfyUI-Ovi name of the 960x960_10s"):
        resolve_variant([named], "720x720_5s")

    anon = _strip_variant(official, tmp_path / "my_ovi.safetensors")
    with pytest.raises(ValueError, match="720x720_5s, 960x960_5s, 960x960_10s"):
        OviEngine(anon, **_paths(tiny_dir))
    e = OviEngine(anon, **_paths(tiny_dir), variant="960x960_5s")
    assert e.variant.name == "960x960_5s" and e.variant_choice.source == "explicit choice"
    assert "from explicit choice" in describe_variant(e.variant_choice, "bf16", 23_300_000_000)
    assert "23.3 GB" in describe_variant(e.variant_choice, "bf16", 23_300_000_000)
    with pytest.raises(ValueError, match="unknown Ovi variant"):
        EngineOptions(variant="1080p")


def test_wrong_component_and_options(tiny_dir):
    p = _paths(tiny_dir)
    with pytest.raises(CheckpointError, match="given as the fusion model.*Wan2.2 video VAE"):
        OviEngine(p["video_vae"], **p)
    with pytest.raises(ValueError, match="memory mode"):
        OviEngine(tiny_dir / "Ovi" / "model.safetensors", **p, memory_mode="gpu_only")
    with pytest.raises(ValueError, match="block_swap"):
        EngineOptions(memory_mode="all_gpu", block_swap=4)
    with pytest.raises(AttentionBackendError, match="flash_attn"):  # asked for by name: no silent fallback
        OviEngine(tiny_dir / "Ovi" / "model.safetensors", **p, attention="flash_attn")
    with pytest.raises(TypeError, match="unknown engine option"):
        OviEngine.from_dir(tiny_dir, variant="720x720_5s", memory="all_gpu")


def test_host_copy_clone_is_independent(tiny_dir):
    """The device copy made from a host copy (the all_gpu reload and offload path on a GPU) computes the same and
    shares no storage; freeing it leaves the host copy intact."""
    from ovi.residency import _clone_to
    from ovi.fusion.checkpoint import load_fusion_model

    host = load_fusion_model(tiny_dir / "Ovi" / "model.safetensors", dtype=torch.float32)
    clone = _clone_to(host, torch.device("cpu"), torch.float32)
    assert not {p.data_ptr() for p in host.parameters()} & {p.data_ptr() for p in clone.parameters()}
    args = (torch.randn(48, 2, 4, 4), torch.randn(9, 20), torch.tensor([500]), torch.randn(5, 32), torch.randn(6, 32))
    with torch.no_grad():
        expected = host(*args)
        got = clone(*args)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    clone.to("meta")
    assert next(host.parameters()).device.type == "cpu"
    assert _clone_to(host, torch.device("cpu"), torch.bfloat16).video_model.head.head.weight.dtype == torch.bfloat16


# -- detection and memory helpers ---------------------------------------------------------------------------
def test_inspect_files(tiny_dir, tmp_path):
    f = inspect_file(tiny_dir / "Ovi" / "model_960x960_10s.safetensors")
    assert (f.component, f.format, f.dtype, f.variant) == ("fusion", "safetensors", "bf16", "960x960_10s")
    assert f.variant_source.startswith("metadata") and f.tensor_count == len(f.shapes) > 0
    t = inspect_file(tiny_dir / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    assert t.component == "umt5" and t.quantization == "fp8_e4m3fn scaled"
    assert inspect_file(tiny_dir / "Wan2.2-TI2V-5B" / "Wan2.2_VAE.pth").component == "wan22_vae"
    assert inspect_file(tiny_dir / "MMAudio/ext_weights/best_netG.pt").component == "bigvgan"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        inspect_file(junk)


def test_memory_helpers():
    assert memory.pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            memory.pick_device("cuda")
    m = torch.nn.Linear(8, 8)
    ref = weakref.ref(m.weight)
    memory.release(m)
    assert m.weight.device.type == "meta" and (ref() is None or ref().device.type == "meta")
    report = memory.MemoryReport(torch.device("cpu"))
    before = memory.process_rss()
    with report.phase("load"):
        big = torch.ones(16, 1024, 1024)  # 64 MiB
        del big
    with pytest.raises(RuntimeError):
        with report.phase("decode video"):
            raise RuntimeError("boom")
    assert [r.phase for r in report.rows] == ["load", "decode video"]
    assert report.rows[1].note == "stopped: RuntimeError"
    if report.rows[0].note == "":  # a per-phase high-water mark sees the freed 64 MiB tensor
        assert report.rows[0].peak - before >= 60 * 2 ** 20
    assert "decode video" in report.table() and str(report) == report.table()


def test_memory_accounting_for_hosts(tiny_dir):
    # What ComfyUI's model management plans with: nothing resident before a load, the weights after, and
    # device copies dropped (the CPU host copy is the module itself, so it stays) by release_device_copies.
    e = _engine(tiny_dir, memory_mode="all_gpu")
    assert e.resident_bytes() == 0
    planned = e.planned_device_bytes()
    # every component at once, but not the audio encoder: it is loaded only to encode a user's audio, then dropped
    assert planned == sum(s.host_bytes(e.dtype) for n, s in e._slots.items() if n != "audio_encoder") > 0
    assert e._slots["audio_encoder"].host_bytes(e.dtype) > 0
    e.load()
    held = e.resident_bytes()
    assert 0 < held and e.resident_bytes(torch.device("cpu")) == held
    assert e.activation_bytes() > 0
    e.release_device_copies()
    assert e.resident_bytes() <= held
    e.unload()
    assert e.resident_bytes() == 0


# -- quantised fusion files: an explicit file, and the Ovi/ fallback to FP8 / GGUF --------------------------
@pytest.fixture(scope="module")
def quantised(tiny_dir, tmp_path_factory):
    """An FP8 copy of the tiny 720x720_5s model and a Q8_0 GGUF copy of the 960x960_10s one, under neutral names
    so the variant can only come from the header metadata the converters record."""
    from ovi.convert import convert_fp8
    from ovi.quant.gguf_write import convert_gguf

    d = tmp_path_factory.mktemp("quantised")
    fp8, gguf = d / "my_ovi_fp8.safetensors", d / "my_ovi.gguf"
    convert_fp8(tiny_dir / "Ovi" / "model.safetensors", fp8)
    convert_gguf(tiny_dir / "Ovi" / "model_960x960_10s.safetensors", gguf, "q8_0")
    return SimpleNamespace(fp8=fp8, gguf=gguf)


def _models_with(tiny_dir: Path, dst: Path, ovi_files: dict[str, Path]) -> Path:
    """A models folder linking to the tiny set's other components, whose Ovi/ holds only ``ovi_files``
    ({name there: the file it links to})."""
    _mirror(tiny_dir, dst, "Ovi")
    (dst / "Ovi").mkdir()
    for name, target in ovi_files.items():
        (dst / "Ovi" / name).symlink_to(target)
    return dst


def test_quantised_fusion_sizes_are_stored_sizes(tiny_dir, quantised, monkeypatch):
    """Memory planning counts FP8 / GGUF weights at the size they keep in memory, not at the compute dtype: the
    planned bytes match what a load holds, and the auto policy keeps more layers resident than for bf16."""
    from ovi.residency import module_tensors

    held = {}
    for name, fusion in (("bf16", tiny_dir / "Ovi" / "model_960x960_10s.safetensors"), ("gguf", quantised.gguf)):
        e = OviEngine.from_dir(tiny_dir, fusion=fusion, memory_mode="all_gpu")
        planned = e._slots["fusion"].host_bytes(e.dtype)
        e.load()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module_tensors(e.fusion_model)}
        held[name] = sum(storages.values())
        assert abs(planned - held[name]) <= 0.02 * held[name], (name, planned, held[name])
        layer, other, layers, _, _ = e._fusion_sizes()
        assert layer * layers + other == planned
        e.unload()
    # Q8_0 blocks (~1.06 B a value) against float32 weights; the tiny model's small tensors stay float32
    assert held["gguf"] < 0.7 * held["bf16"]
    e = OviEngine.from_dir(tiny_dir, fusion=quantised.fp8, memory_mode="all_gpu")
    fp8_layer, _, _, _, _ = e._fusion_sizes()
    bf16 = OviEngine.from_dir(tiny_dir, fusion=tiny_dir / "Ovi" / "model.safetensors", memory_mode="all_gpu")
    bf16_layer, _, _, _, _ = bf16._fusion_sizes()
    assert fp8_layer < 0.5 * bf16_layer
    # free memory that holds everything with the FP8 fusion model is too little with the float32 one
    for eng in (e, bf16):
        eng.device, eng.options.memory_mode = SimpleNamespace(type="cuda"), "auto"
        monkeypatch.setattr(eng, "_activation_bytes", lambda: 0)
    need = sum(slot.host_bytes(e.dtype) for slot in e._slots.values())
    monkeypatch.setattr(memory, "device_free", lambda device: (int(need / 0.92) + 1, 2 * need))
    assert e._choose_mode()[0] == "all_gpu"
    assert bf16._choose_mode()[0] in ("offload", "block_swap")


def test_from_dir_with_an_explicit_fp8_file(tiny_dir, quantised, run_720, caplog):
    # tiny_dir/Ovi holds three variants: the given file bypasses that lookup (no "choose a variant" error)
    with caplog.at_level("INFO", logger="ovi"):
        e = OviEngine.from_dir(tiny_dir, fusion=quantised.fp8, memory_mode="all_gpu")
    assert e.paths["fusion"] == [quantised.fp8]
    assert e.variant.name == "720x720_5s" and e.variant_choice.source == "metadata"
    assert "fusion model:" not in caplog.text  # no Ovi/ lookup happened
    assert "fp8_e4m3fn" in e.fusion_info[0].quantization
    e.load()
    stored = {t.dtype for t in e.fusion_model.state_dict().values()}
    assert torch.float8_e4m3fn in stored  # the FP8 weights are kept as stored, not widened at load
    r = e.generate(PROMPT, **GEN)
    assert r.variant == "720x720_5s" and r.prompt.endswith("<ENDAUDCAP>")
    assert r.video_latent.shape == run_720.result.video_latent.shape and r.audio_latent.shape == (157, 20)
    assert torch.isfinite(r.video_latent).all() and torch.isfinite(r.audio_latent).all()
    # the same model at lower precision: close to the bf16 run, not identical to it
    assert not torch.equal(r.video_latent, run_720.result.video_latent)
    for got, ref in ((r.video_latent, run_720.result.video_latent), (r.audio_latent, run_720.result.audio_latent)):
        assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.98
        assert (got - ref).norm() < 0.2 * ref.norm()
    with pytest.raises(ValueError, match="metadata"):  # the header says 720x720_5s; a contrary choice is refused
        OviEngine.from_dir(tiny_dir, fusion=[quantised.fp8], variant="960x960_10s")


def test_from_dir_with_an_explicit_gguf_file(tiny_dir, quantised, caplog):
    with caplog.at_level("INFO", logger="ovi"):
        e = OviEngine.from_dir(tiny_dir, fusion=[str(quantised.gguf)])
    assert e.paths["fusion"] == [quantised.gguf]
    assert e.variant.name == "960x960_10s" and e.variant_choice.source == "metadata"
    assert "variant 960x960_10s" in caplog.text and "GGUF Q8_0" in caplog.text
    e.load()
    assert e.fusion_model.num_layers == 2
    with pytest.raises(CheckpointError, match="GGUF fusion model is one file"):
        OviEngine.from_dir(tiny_dir, fusion=[quantised.gguf, quantised.gguf])


def test_from_dir_bad_explicit_fusion(tiny_dir, tmp_path):
    absent = tmp_path / "absent.gguf"
    with pytest.raises(MissingComponentError) as info:
        OviEngine.from_dir(tiny_dir, fusion=absent)
    msg = str(info.value)
    assert f"fusion model: {absent} (given) does not exist" in msg and "Download" not in msg
    with pytest.raises(MissingComponentError, match="is not a file"):
        OviEngine.from_dir(tiny_dir, fusion=tiny_dir / "Ovi")
    with pytest.raises(MissingComponentError, match=f"{absent}.*\n.*models folder .*nowhere does not exist"):
        OviEngine.from_dir(tmp_path / "nowhere", fusion=absent)
    with pytest.raises(ValueError, match="one file or a video \\+ audio pair, got 3"):
        OviEngine.from_dir(tiny_dir, fusion=[absent] * 3)


def test_ovi_folder_falls_back_to_fp8_then_gguf(tiny_dir, quantised, tmp_path, caplog):
    fp8_name = "model_fp8_e4m3fn.safetensors"  # the official FP8 file of 720x720_5s
    only_fp8 = _models_with(tiny_dir, tmp_path / "only_fp8", {fp8_name: quantised.fp8})
    with caplog.at_level("INFO", logger="ovi"):
        e = OviEngine.from_dir(only_fp8)  # one variant present: no choice needed
    assert e.paths["fusion"] == [only_fp8 / "Ovi" / fp8_name] and e.variant.name == "720x720_5s"
    assert f"fusion model: {only_fp8 / 'Ovi' / fp8_name} (FP8; no bf16 file for 720x720_5s there)" in caplog.text

    # two files of one variant: bf16 wins, and the log names the file left unused
    both = _models_with(tiny_dir, tmp_path / "both", {fp8_name: quantised.fp8,
                                                      "model.safetensors": tiny_dir / "Ovi" / "model.safetensors"})
    caplog.clear()
    with caplog.at_level("INFO", logger="ovi"):
        e = OviEngine.from_dir(both)
    assert e.paths["fusion"] == [both / "Ovi" / "model.safetensors"]
    assert f"(bf16); also present, not used: {fp8_name}" in caplog.text

    gguf_name = "Ovi-960x960-10s-Q4_K.gguf"  # a ComfyUI-Ovi GGUF name (its content here is our Q8_0 file)
    only_gguf = _models_with(tiny_dir, tmp_path / "only_gguf", {gguf_name: quantised.gguf})
    caplog.clear()
    with caplog.at_level("INFO", logger="ovi"):
        e = OviEngine.from_dir(only_gguf, variant="960x960_10s")
    assert e.paths["fusion"] == [only_gguf / "Ovi" / gguf_name] and e.variant.name == "960x960_10s"
    assert "(GGUF; no bf16 or FP8 file for 960x960_10s there)" in caplog.text

    # files of two variants and none chosen is still the user's choice to make
    two = _models_with(tiny_dir, tmp_path / "two", {fp8_name: quantised.fp8, gguf_name: quantised.gguf})
    with pytest.raises(ValueError, match=f"several Ovi models \\(720x720_5s: {fp8_name}; 960x960_10s: {gguf_name}"):
        OviEngine.from_dir(two)
    assert OviEngine.from_dir(two, variant="720x720_5s").paths["fusion"] == [two / "Ovi" / fp8_name]


def test_split_pairs_count_only_when_whole(tmp_path):
    from ovi.models_dir import _find_fusion

    ovi = tmp_path / "Ovi"
    ovi.mkdir()
    video, audio = ovi / "Wan2_2_Ovi_Video_fp8_e4m3fn_scaled_KJ.safetensors", ovi / \
        "Wan2_2_Ovi_Audio_fp8_e4m3fn_scaled_KJ.safetensors"
    video.touch()
    found, tried = _find_fusion(tmp_path, "720x720_5s")
    assert found is None and video in tried and audio in tried
    audio.touch()
    assert _find_fusion(tmp_path, None)[0] == (video, audio)
    (ovi / "Wan_2_2_Ovi_audio_model_bf16.safetensors").touch()  # half a bf16 pack does not outrank a whole FP8 one
    assert _find_fusion(tmp_path, "720x720_5s")[0] == (video, audio)


def test_missing_fusion_lists_every_kind(tiny_dir, tmp_path):
    no_ovi = _mirror(tiny_dir, tmp_path / "no_ovi", "Ovi")
    with pytest.raises(MissingComponentError) as info:
        OviEngine.from_dir(no_ovi, variant="960x960_10s")
    msg = str(info.value)
    for name in ("model_960x960_10s.safetensors", "Ovi-960x960-10s.safetensors",
                 "Wan2_2-5B-Ovi_960x960_10s_fp8_e4m3fn_scaled_KJ.safetensors", "Ovi-960x960-10s-F16.gguf",
                 "Ovi-960x960-10s-Q4_K.gguf"):
        assert str(no_ovi / "Ovi" / name) in msg
    assert "model.safetensors," not in msg and "fp8_e4m3fn.safetensors" not in msg  # other variants' files
    assert "fusion= (--fusion)" in msg and "Download them" in msg
