"""The Ovi engine: one explicit object that loads the components, generates video + audio latents and decodes them.

    engine = OviEngine.from_dir("ckpts", variant="960x960_10s")
    result = engine.generate("A cat plays the piano. Audio: soft piano", seed=100)
    clip = engine.decode(result)
    engine.save_mp4(clip, "cat.mp4")

Memory modes (``EngineOptions.memory_mode``):

* ``all_gpu``: every component resident on the device. After diffusion the fusion model and the text encoder
  are released (no reference left, weights freed, allocator defragmented), so the VAE decode gets the memory
  they held; the next ``generate`` brings them back from a pinned host copy when RAM allows, else from the
  memory-mapped file.
* ``offload``: components live in host RAM (pinned when possible) and a device copy exists only for its phase.
* ``block_swap``: the fusion model stays in pinned host memory and a layer swapper (``ovi/block_swap.py``, or
  ``EngineOptions.block_swapper``) keeps ``block_swap`` fused layers resident and streams the rest; the other
  components behave as in ``offload``.
* ``auto``: picks one of the above from the free device memory and the variant, and logs why (the thresholds
  are the ``FREE_MEMORY_BUDGET`` ... ``SWAP_LAYERS_IN_FLIGHT`` constants below). The CPU gets ``all_gpu`` (the
  weights are in host memory either way). An accelerator whose free memory cannot be read gets ``offload``
  with a warning naming the device; set the mode explicitly to choose otherwise.

A swapper implements ``attach(model, device) -> model`` (called with the host-resident fusion model before
diffusion; returns the model to run, whose ``prepare``/``finish`` weights are on the device),
``run(model, state, skip)`` (runs every fused layer except ``skip`` on ``state`` in order, through
``model.forward_layer``) and ``detach()`` (frees its device copies after diffusion or an interrupt).

Frame size: ``size=(H, W)`` (or ``"HxW"``) is used exactly and must be a multiple of 32 on both sides;
``height``/``width`` or ``aspect="h:w"`` are requests that go through the official rescale to the variant's
area and snap to multiples of 32, and the size chosen is logged. With an image (I2AV) and no ``size`` the image
is prepared as the official code does, at the variant's area; with ``size`` it is resized to exactly that.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import memory
from .attention import BACKENDS as ATTENTION_BACKENDS
from .attention import make_attention
from .block_swap import BlockSwapper
from .choices import MEMORY_MODES
from .compile import CompiledLayer, compile_problem, use_compiled
from .detect import FileInfo, VariantChoice, describe_variant, inspect_file, resolve_variant
from .loading import CheckpointError
from .log import log
from .lora.engine_loras import EngineLoras
from .models_dir import COMPONENT_WORDS, MissingComponentError, locate_components
from .sampling.known import KnownRegion
from .sampling.loop import Interrupted, sample
from .sampling.stats import SamplingStats
from .sampling.schedules import make_schedule
from .residency import ComponentSlot, module_tensors
from .sizes import resolve_frame_size  # noqa: F401  (part of the engine API)
from .text.checkpoint import find_tokenizer_source
from .variants import Variant, get_variant
from .video_io import write_mp4

DEFAULT_SEED = 100  # the official generate() default
Progress = Callable[[int, int], None]

# -- the auto memory policy (``OviEngine._choose_mode``): how a plan is sized against the free device memory ------
# Share of the reported free memory a plan may fill: the rest absorbs allocator fragmentation, the CUDA/ROCm
# context's growth once kernels load, and what other processes allocate meanwhile.
FREE_MEMORY_BUDGET = 0.92
# The activation estimate counts the named per-token buffers only; norms, RoPE, dtype casts and the kernels'
# workspaces add temporaries of about half that again at the peak.
ACTIVATION_MARGIN = 1.5
# dim-wide buffers per token alive at once in a fused layer: the stream, its modulated norm, q, k, v, the
# attention output and its projection, the cross-attention query and output, the residual sum, and the
# modulation's shift and scale.
TOKEN_BUFFERS_PER_DIM = 12
# block_swap: besides the resident layers, the layer being computed and the next one being copied in (the
# swapper prefetches one layer ahead) occupy the device.
SWAP_LAYERS_IN_FLIGHT = 2
# An accelerator whose free memory cannot be read gets the mode that holds at most one component on the device
# at a time, never all_gpu (the hungriest): a warning says so, and an explicit memory_mode overrides it.
UNKNOWN_FREE_MEMORY_MODE = "offload"

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value).strip().lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}; use bf16, fp16 or fp32") from None


class DecodeInterrupted(Interrupted):
    def __init__(self, step: int, total: int):
        self.step, self.total = step, total
        Exception.__init__(self, f"decoding interrupted at {step}/{total}")


@dataclass
class EngineOptions:
    variant: str | None = None               # needed only when neither metadata nor the file name says
    device: str | torch.device | None = None  # None: the accelerator if there is one, else the CPU
    dtype: str | torch.dtype | None = None     # fusion + text compute dtype; None: bf16 on a GPU, fp32 on the CPU
    memory_mode: str = "auto"
    block_swap: int = 0                        # block_swap mode: fused layers kept resident on the device
    block_swapper: Any = None                  # a swapper object (see the module doc); default ovi.block_swap
    attention: str = "auto"
    vae_dtype: str | torch.dtype = torch.float32
    audio_dtype: str | torch.dtype = torch.float32
    tile_size: int | None = None               # decode defaults (latent pixels; None/0 = no tiling)
    tile_overlap: int | None = None
    cpu_copy: bool | None = None               # keep host copies to reload from; None: when RAM allows
    compile: bool = False                      # torch.compile the fused layer (ovi/compile.py)

    def __post_init__(self):
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"unknown memory mode {self.memory_mode!r}; choose one of {', '.join(MEMORY_MODES)}")
        if isinstance(self.block_swap, bool) or int(self.block_swap) != self.block_swap or self.block_swap < 0:
            raise ValueError(f"block_swap must be a layer count >= 0, got {self.block_swap!r}")
        if self.block_swap and self.memory_mode not in ("auto", "block_swap"):
            raise ValueError(f"block_swap={self.block_swap} needs memory_mode 'block_swap' (or 'auto'), "
                             f"not {self.memory_mode!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}; choose one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        if self.variant is not None:
            get_variant(self.variant)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        self.dtype = parse_dtype(self.dtype)
        self.vae_dtype = parse_dtype(self.vae_dtype)
        self.audio_dtype = parse_dtype(self.audio_dtype)


@dataclass
class GenerationResult:
    video_latent: torch.Tensor    # [48, F, h, w] float32, on the CPU
    audio_latent: torch.Tensor    # [L, 20] float32, on the CPU
    height: int                   # frame size in pixels
    width: int
    variant: str
    seed: int
    mode: str                     # "t2av" or "i2av"
    prompt: str                   # the positive prompt as encoded (after the variant's formatter)
    settings: dict = field(default_factory=dict)
    image_latent: torch.Tensor | None = None  # i2av: the encoded first frame [48, 1, h, w]
    timings: dict = field(default_factory=dict)


@dataclass
class DecodedClip:
    frames: torch.Tensor          # [T, H, W, 3] float32 in [0, 1], on the CPU
    waveform: torch.Tensor        # [N] float32 in [-1, 1], on the CPU
    fps: int = 24
    sample_rate: int = 16000
    variant: str | None = None
    seed: int | None = None

    @property
    def video_seconds(self) -> float:
        return self.frames.shape[0] / self.fps

    @property
    def audio_seconds(self) -> float:
        return self.waveform.shape[0] / self.sample_rate


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


# -- the engine ------------------------------------------------------------------------------------------
class OviEngine:
    def __init__(self, fusion: str | os.PathLike | Sequence[str | os.PathLike], text_encoder: str | os.PathLike,
                 tokenizer: str | os.PathLike | None = None, video_vae: str | os.PathLike | None = None,
                 audio_vae: str | os.PathLike | None = None, vocoder: str | os.PathLike | None = None, *,
                 options: EngineOptions | None = None, **option_kw):
        if options is not None and option_kw:
            raise TypeError("give either options= or option keywords, not both")
        self.options = opts = options or _make_options(option_kw)
        fusion_paths = [Path(fusion)] if isinstance(fusion, (str, os.PathLike)) else [Path(p) for p in fusion]
        given = {"fusion": fusion_paths, "text_encoder": [text_encoder], "video_vae": [video_vae],
                 "audio_vae": [audio_vae], "vocoder": [vocoder]}
        missing = [f"{COMPONENT_WORDS[k]}: " + (", ".join(str(p) for p in ps if p is not None) + " does not exist"
                                                 if any(p is not None for p in ps) else "no path given")
                   for k, ps in given.items() if not ps or any(p is None or not Path(p).exists() for p in ps)]
        if tokenizer is not None and not Path(tokenizer).exists():
            missing.append(f"{COMPONENT_WORDS['tokenizer']}: {tokenizer} does not exist")
        if missing:
            raise MissingComponentError("missing Ovi components:\n  " + "\n  ".join(missing))
        self.paths = {"fusion": fusion_paths, "text_encoder": Path(text_encoder),
                      "tokenizer": Path(tokenizer) if tokenizer is not None else None, "video_vae": Path(video_vae),
                      "audio_vae": Path(audio_vae), "vocoder": Path(vocoder)}

        find_tokenizer_source(tokenizer, checkpoint=text_encoder)  # a missing tokenizer fails now, not mid-run
        self.device = memory.pick_device(opts.device)
        self.dtype = opts.dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.fusion_info: list[FileInfo] = [inspect_file(p) for p in fusion_paths]
        bad = [i for i in self.fusion_info if not i.is_fusion]
        if bad:
            raise CheckpointError(bad[0].path, f"given as the fusion model, but it is {bad[0].description}.")
        if len(fusion_paths) > 1 and any(i.format == "gguf" for i in self.fusion_info):
            raise CheckpointError(fusion_paths[0], "a GGUF fusion model is one file; split video + audio pairs are "
                                                   "read from safetensors only")
        self.variant_choice: VariantChoice = resolve_variant(fusion_paths, opts.variant,
                                                             metadata=[i.metadata for i in self.fusion_info])
        self.variant: Variant = self.variant_choice.variant
        fusion_bytes = sum(i.file_bytes for i in self.fusion_info)
        first = self.fusion_info[0]
        # A GGUF file's float summary covers only its unquantised tensors (norms, biases); its quant type says more.
        kind = f"GGUF {first.quantization}" if first.format == "gguf" and first.quantization else first.dtype
        log.info(describe_variant(self.variant_choice, kind, fusion_bytes))

        infos = {k: inspect_file(self.paths[k]) for k in ("text_encoder", "video_vae", "audio_vae", "vocoder")}
        self._infos = infos
        self.report = memory.MemoryReport(self.device)
        self._attention = make_attention(opts.attention, self.device, self.dtype)
        self._tokenizer = None
        self._slots = {
            "fusion": ComponentSlot("fusion model", self._load_fusion, sum(i.cast_numel for i in self.fusion_info),
                                    stored_bytes=sum(sum(i.stored_bytes.values()) for i in self.fusion_info)),
            "text_encoder": ComponentSlot("text encoder", self._load_text, infos["text_encoder"].cast_numel,
                                          stored_bytes=sum(infos["text_encoder"].stored_bytes.values())),
            "video_vae": ComponentSlot("video VAE", self._load_video_vae, infos["video_vae"].numel, torch.float32),
            "audio": ComponentSlot("audio decoder", self._load_audio, infos["audio_vae"].numel + infos["vocoder"].numel,
                           torch.float32),
            # Loaded only to encode the user's audio (lip-sync), and dropped after: decoding never needs it.
            "audio_encoder": ComponentSlot("audio encoder", self._load_audio_encoder, infos["audio_vae"].numel,
                                           torch.float32),
        }
        self.memory_mode, self.resident_layers, why = self._choose_mode()
        log.info("memory mode %s%s on %s: %s", self.memory_mode,
                 f" ({self.resident_layers} layers resident)" if self.memory_mode == "block_swap" else "",
                 memory.device_description(self.device), why)
        self._swapper = self._make_swapper() if self.memory_mode == "block_swap" else None
        self._runner = None  # the swapper while a block-swapped diffusion runs
        self._loras = EngineLoras()  # the LoRA stack (set_loras), put on the fusion model as it is acquired
        self._compiled_layer: CompiledLayer | None = None
        if opts.compile:
            problem = compile_problem(self.device)
            if problem is not None:
                raise RuntimeError(f"compile was asked for, but {problem}; run without compile")
            self._compiled_layer = CompiledLayer()
            log.info("torch.compile of the fused layer: on (compiled at the first step)")

    # -- construction helpers ------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, models_dir: str | os.PathLike, *,
                 fusion: str | os.PathLike | Sequence[str | os.PathLike] | None = None, **options) -> "OviEngine":
        """An engine over the official download tree: ``Ovi/``, ``Wan2.2-TI2V-5B/``, ``MMAudio/ext_weights/``
        (ComfyUI-style ``text_encoders/`` and ``vae/`` copies are accepted as fallbacks).

        The fusion model is the known file of the variant under ``Ovi/``: the bf16 one, else an FP8 one, else a
        GGUF one (``KNOWN_FILES``; the log names the file chosen). ``fusion`` (a bf16, FP8 or GGUF file, or a
        split video + audio pair) is used instead of that lookup; its variant comes from its header metadata or
        name, as for ``OviEngine(...)``."""
        opts = _make_options(options)
        found = locate_components(Path(models_dir), opts.variant, fusion)
        fusion_paths = found["fusion"]
        return cls(fusion_paths[0] if len(fusion_paths) == 1 else fusion_paths, found["text_encoder"],
                   found["tokenizer"], found["video_vae"], found["audio_vae"], found["vocoder"], options=opts)

    def _load_fusion(self, device, dtype):
        from .fusion.checkpoint import load_fusion_model

        paths = self.paths["fusion"]
        return load_fusion_model(paths[0] if len(paths) == 1 else paths, device=device, dtype=dtype)

    def _load_text(self, device, dtype):
        from .text.checkpoint import load_umt5

        return load_umt5(self.paths["text_encoder"], device=device, dtype=dtype)

    def _load_video_vae(self, device, dtype):
        from .vae.checkpoint import load_wan_vae

        return load_wan_vae(self.paths["video_vae"], device=device, dtype=dtype or torch.float32)

    def _load_audio(self, device, dtype):
        from .audio.decoder import AudioDecoder

        return AudioDecoder.from_files(self.paths["audio_vae"], self.paths["vocoder"], device=device, dtype=dtype)

    def _load_audio_encoder(self, device, dtype):
        from .audio.checkpoint import load_mmaudio_vae
        from .audio.mel import MelConfig, MelFrontend

        vae = load_mmaudio_vae(self.paths["audio_vae"], device=device, dtype=dtype, encoder=True)
        return _AudioEncoder(vae, MelFrontend(MelConfig(num_mels=vae.config.data_dim))).to(device=device)

    def _tokenizer_get(self):
        if self._tokenizer is None:
            from .text.checkpoint import load_tokenizer

            self._tokenizer = load_tokenizer(self.paths["tokenizer"], checkpoint=self.paths["text_encoder"])
        return self._tokenizer

    def _fusion_sizes(self) -> tuple[int, int, int, int, int]:
        """(bytes per fused layer, bytes outside the layers, layers, dim, ffn_dim) from the header shapes, at the
        compute dtype; FP8 and GGUF weights count at their stored size, since they stay that way in memory."""
        it = torch.empty((), dtype=self.dtype).element_size()
        per_layer: dict[int, int] = {}
        other = dim = ffn = 0
        for info in self.fusion_info:
            for key, shape in info.shapes.items():
                n = info.stored_bytes.get(key, math.prod(shape) * it)
                parts = key.split(".")
                if "blocks" in parts and parts.index("blocks") + 1 < len(parts):
                    i = int(parts[parts.index("blocks") + 1])
                    per_layer[i] = per_layer.get(i, 0) + n
                    if key.endswith("blocks.0.ffn.0.weight"):
                        ffn = shape[0]
                else:
                    other += n
                    if key.endswith("patch_embedding.weight"):
                        dim = shape[0]
        layers = len(per_layer)
        return (max(per_layer.values()) if per_layer else 0), other, layers, dim, ffn

    def _activation_bytes(self) -> int:
        """A rough activation peak of one forward at the variant's area: the token streams, the FFN hidden state
        and attention working buffers of the widest layer (flash/memory-efficient kernels, no L x L matrix)."""
        _, _, _, dim, ffn = self._fusion_sizes()
        v = self.variant
        tokens = v.video_latent_length * v.target_area // (32 * 32) + v.audio_latent_length
        it = torch.empty((), dtype=self.dtype).element_size()
        return int(tokens * (ffn + TOKEN_BUFFERS_PER_DIM * dim) * it * ACTIVATION_MARGIN)

    def _choose_mode(self) -> tuple[str, int, str]:
        o = self.options
        mode = o.memory_mode
        if mode == "auto" and o.block_swap:
            return "block_swap", o.block_swap, f"block_swap={o.block_swap} was given"
        if mode != "auto":
            return mode, o.block_swap, "chosen in the options"
        if self.device.type == "cpu":
            return "all_gpu", 0, "the device is the CPU, so every component stays in host memory"
        info = memory.device_free(self.device)
        if info is None:
            why = (f"the free memory of {self.device} cannot be read, so the plan cannot be sized: each component "
                   f"goes on the device only for its phase; set memory_mode='all_gpu' (or 'block_swap') to "
                   f"choose yourself")
            log.warning("memory mode %s on %s: %s", UNKNOWN_FREE_MEMORY_MODE, self.device, why)
            return UNKNOWN_FREE_MEMORY_MODE, 0, why
        free = info[0]
        budget = FREE_MEMORY_BUDGET * free
        gib = lambda n: f"{n / memory.GiB:.1f} GiB"  # noqa: E731
        fusion = self._slots["fusion"].host_bytes(self.dtype)
        rest = sum(self._slots[k].host_bytes(self.dtype) for k in ("text_encoder", "video_vae", "audio"))
        act = self._activation_bytes()
        if fusion + rest + act <= budget:
            return "all_gpu", 0, (f"all components ({gib(fusion + rest)}) and activations (~{gib(act)}) fit in "
                                  f"{gib(free)} free")
        if fusion + act <= budget:
            return "offload", 0, (f"the fusion model ({gib(fusion)}) and activations (~{gib(act)}) fit in "
                                  f"{gib(free)} free, but not with the other components ({gib(rest)})")
        layer, other, layers, _, _ = self._fusion_sizes()
        n = int((budget - act - (other + SWAP_LAYERS_IN_FLIGHT * layer)) // max(layer, 1))
        n = max(0, min(layers - 1, n))
        return "block_swap", n, (f"the fusion model ({gib(fusion)}) does not fit in {gib(free)} free with "
                                 f"activations (~{gib(act)}); {n} of {layers} layers stay resident")

    def _make_swapper(self):
        if self.options.block_swapper is not None:
            return self.options.block_swapper
        return BlockSwapper(resident=self.resident_layers)

    # -- component access ------------------------------------------------------------------------------
    def _keep_host(self, slot: str) -> bool:
        if self.options.cpu_copy is not None:
            return self.options.cpu_copy
        if self.memory_mode == "all_gpu":
            if slot not in ("fusion", "text_encoder") or self.device.type == "cpu":
                return False
        elif self.device.type == "cpu":
            return True  # the host copy is the module itself: no second copy
        s = self._slots[slot]
        fits = memory.host_fits(s.host_bytes(self.dtype))
        if not fits:
            log.info("%s: not enough free RAM for a host copy; it will be read from its file each time", s.name)
        return fits

    def _acquire(self, slot: str, dtype: torch.dtype | None = None) -> nn.Module:
        s = self._slots[slot]
        return s.acquire(self.device, dtype or self.dtype, self._keep_host(slot), share=(self._attention,))

    def _drop(self, *slots: str) -> None:
        for name in slots:
            self._slots[name].drop()

    # -- memory accounting, for hosts that plan device memory (ComfyUI's model management) ----------------
    def resident_bytes(self, device: torch.device | None = None) -> int:
        """Bytes of weights held now (on ``device`` only, when given); tensors shared by two copies count once."""
        seen, total = set(), 0
        for slot in self._slots.values():
            for module in (slot.live, slot.host):
                if module is None:
                    continue
                for t in module_tensors(module):
                    if t.device.type == "meta" or (device is not None and not _same_device(t.device, device)):
                        continue
                    key = (t.device, t.untyped_storage().data_ptr())
                    if key not in seen:
                        seen.add(key)
                        total += t.untyped_storage().nbytes()
        return total

    def planned_device_bytes(self) -> int:
        """Weights this engine puts on its device at once in its memory mode."""
        # the audio encoder is held only while the user's audio is encoded, never beside the others
        sizes = {name: slot.host_bytes(self.dtype) for name, slot in self._slots.items() if name != "audio_encoder"}
        if self.memory_mode == "all_gpu":
            return sum(sizes.values())
        if self.memory_mode == "block_swap":
            per_layer, other, layers, _, _ = self._fusion_sizes()
            resident = min(layers, (self.resident_layers or 0) + 2)  # + the two layers in flight
            fusion = per_layer * resident + other
            return max([fusion] + [v for k, v in sizes.items() if k != "fusion"])
        return max(sizes.values())  # offload: one component at a time

    def activation_bytes(self) -> int:
        """A rough activation peak of one forward, so a host can make room for working memory too."""
        return self._activation_bytes()

    def release_device_copies(self) -> None:
        """Drop the device copies of every component, keeping host copies (a reload is then a fast copy)."""
        self._drop(*self._slots)
        memory.defragment(self.device)

    @property
    def fusion_model(self) -> nn.Module | None:
        """The fusion model currently on the device (None while released)."""
        return self._slots["fusion"].live

    @property
    def text_encoder(self) -> nn.Module | None:
        return self._slots["text_encoder"].live

    def load(self) -> None:
        """Load every component the way the memory mode keeps it (all_gpu: on the device; otherwise host copies).
        ``generate`` loads what it needs by itself; the decoders otherwise load at the first ``decode``."""
        with self.report.phase("load"):
            self._load_phase(("text_encoder", "fusion", "video_vae", "audio"))

    def _load_phase(self, names: Sequence[str]) -> None:
        self._tokenizer_get()
        dtypes = {"video_vae": self.options.vae_dtype, "audio": self.options.audio_dtype}
        for name in names:
            if self.memory_mode == "all_gpu":
                self._acquire(name, dtypes.get(name))
            elif (name == "fusion" and self.memory_mode == "block_swap") or self._keep_host(name):
                self._slots[name].ensure_host(self.device, self.dtype)

    def unload(self) -> None:
        """Drop every component (device and host copies)."""
        for s in self._slots.values():
            s.forget()
        memory.defragment(self.device)

    def close(self) -> None:
        self.unload()

    def __enter__(self) -> "OviEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def memory_report(self) -> memory.MemoryReport:
        """The per-phase memory table of the last generate + decode (``str()`` / ``.table()`` formats it)."""
        return self.report

    # -- LoRAs (ovi/lora/engine_loras.py) ---------------------------------------------------------------------
    def set_loras(self, loras: Sequence[tuple[str | os.PathLike, Any]] = (), *, fp8: str | None = None) -> None:
        """The LoRA stack of the next generations: ``(file, strength)`` pairs applied in order, a strength being
        an ``ovi.lora.LoraStrength(video, audio)``, one number for both branches or a (video, audio) pair
        (a Wan 2.2 LoRA without branch prefix acts on the video branch only). Files are read once and cached;
        ``[]`` takes every LoRA off again. A missing file, a file that is no LoRA or one that matches nothing
        on the fusion model is a ``LoraError`` (a ``ValueError``) naming it, raised here or at the next
        ``generate`` (matching needs the model's shapes, known from the first load on). ``fp8``: how FP8
        linears take them, "side" (a low-rank side path, the default) or "merge" (merged and re-quantised);
        None keeps the current choice."""
        self._loras.set(loras, fp8=fp8)

    @property
    def loras(self) -> tuple:
        """The LoRA stack (``LoraEntry``: path, strength) set by ``set_loras``."""
        return self._loras.entries

    def _acquire_fusion_with_loras(self) -> nn.Module:
        """The fusion model on the device with the LoRA stack on it. A copy that carries another stack merged
        without originals (it was to be thrown away) is dropped and acquired afresh from the host copy / file."""
        slot = self._slots["fusion"]
        model = self._acquire("fusion")
        if not self._loras.apply(model, keep_originals=model is slot.host):
            self._drop("fusion")
            model = self._acquire("fusion")
            self._loras.apply(model, keep_originals=model is slot.host)
        return model

    # -- the fusion forward (the one place a layer runner plugs in) -------------------------------------------
    def _fusion_forward(self, model, video, audio, t, video_ctx, audio_ctx, first_frame_is_clean: bool,
                        slg_layer: int):
        state = model.prepare(video, audio, t, video_ctx, audio_ctx, first_frame_is_clean=first_frame_is_clean)
        skip = slg_layer if 0 < slg_layer < model.num_layers else None
        if self._runner is not None:
            self._runner.run(model, state, skip)
        else:
            for i in range(model.num_layers):
                if i != skip:
                    model.forward_layer(i, state)
        return model.finish(state)

    # -- generation ----------------------------------------------------------------------------------------
    def generate(self, prompt: str, *, image=None, video_negative_prompt: str = "", audio_negative_prompt: str = "",
                 size=None, height: int | None = None, width: int | None = None, aspect: str | None = None,
                 seed: int = DEFAULT_SEED, steps: int = 50, solver: str = "unipc", shift: float = 5.0,
                 video_guidance: float = 4.0, audio_guidance: float = 3.0, slg_layer: int = 11,
                 noise: tuple[torch.Tensor, torch.Tensor] | None = None, progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 preview: Callable[[int, int, torch.Tensor], None] | None = None,
                 video_known: KnownRegion | None = None, audio_known: KnownRegion | None = None,
                 known_seed: int | None = None, cache_threshold: float = 0.0) -> GenerationResult:
        """Video and audio latents for ``prompt`` (T2AV), or with ``image`` as the first frame (I2AV).

        ``video_known`` / ``audio_known`` hold given latent frames / tokens through sampling
        (``ovi.sampling.known``; the renoise eps is drawn from ``known_seed``, default ``seed``): the frame size
        then comes from the known video latent unless ``size`` says otherwise. ``cache_threshold`` > 0 turns on
        the step cache; the passes run and skipped are in the result's ``timings``.
        ``noise=(video [48, F, h, w], audio [L, 20])`` replaces the seeded initial noise. ``progress(step,
        total)`` runs after every denoising step; ``preview(step, total, video_x0)`` likewise, with the step's
        clean-video latent estimate [48, F, h, w] (normalised, as the VAE takes it); ``should_stop()`` is
        checked before every step and raises ``Interrupted``, after which the engine is ready for the next call.
        """
        from .text.prompts import format_prompt

        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty; describe the video (speech in <S>...<E>, sound after 'Audio:')")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be a whole number in [0, 2^63), got {seed!r}")
        make_schedule(solver, steps, shift)  # bad solver/steps/shift fail here, before anything loads
        for name, g in (("video_guidance", video_guidance), ("audio_guidance", audio_guidance)):
            if not isinstance(g, (int, float)) or not math.isfinite(g):
                raise ValueError(f"{name} must be a finite number, got {g!r}")
        v = self.variant
        i2v = image is not None
        image_px = None
        if i2v:
            image_px = self._prepare_image(image, size)  # unreadable images fail before loading
            h, w = image_px.shape[-2:]
            how = "exact size" if size is not None else f"image prepared at the {v.name} area"
        elif noise is not None and size is None and height is None and width is None and aspect is None:
            h, w, how = noise[0].shape[-2] * 16, noise[0].shape[-1] * 16, "from the given noise"
        elif video_known is not None and size is None and height is None and width is None and aspect is None:
            h, w = video_known.latent.shape[-2] * 16, video_known.latent.shape[-1] * 16
            how = "from the known video"
        else:
            h, w, how = resolve_frame_size(v, size=size, height=height, width=width, aspect=aspect)
        shape_v = (v.video_latent_channels, v.video_latent_length, h // 16, w // 16)
        shape_a = (v.audio_latent_length, v.audio_latent_channels)
        if noise is not None:
            nv, na = noise
            if tuple(nv.shape) != shape_v or tuple(na.shape) != shape_a:
                raise ValueError(f"noise shapes {list(nv.shape)}, {list(na.shape)} do not match {v.name} at {h}x{w}: "
                                 f"video {list(shape_v)}, audio {list(shape_a)}")
        log.info("%s %dx%d (%s), %d frames + %.2f s audio, seed %d, %d %s steps", "I2AV" if i2v else "T2AV", h, w,
                 how, v.video_frames, v.audio_samples / v.sample_rate, seed, steps, solver)

        self.report.clear()
        t_start = time.perf_counter()
        stats = SamplingStats()
        compiled_before = self._compiled_layer.counts() if self._compiled_layer is not None else None
        with self.report.phase("load"):
            self._load_phase(("text_encoder", "fusion", "video_vae") if i2v else ("text_encoder", "fusion"))

        with self.report.phase("encode text"):
            text = self._acquire("text_encoder")
            positive, _ = format_prompt(v.name, prompt)
            ids, mask = self._tokenizer_get()([positive, video_negative_prompt, audio_negative_prompt])
            pos, vneg, aneg = (c.to(self.dtype) for c in text.encode(ids, mask))
            del text
            if self.memory_mode != "all_gpu":
                self._drop("text_encoder")

        image_latent = None
        if i2v:
            with self.report.phase("encode image"):
                vae = self._acquire("video_vae", self.options.vae_dtype)
                image_latent = vae.encode(image_px[:, :, None].to(self.device, vae.dtype))[0].float()
                del vae
                if self.memory_mode != "all_gpu":
                    self._drop("video_vae")

        try:
            with self.report.phase("diffusion"):
                video, audio = self._diffuse(v, shape_v, shape_a, seed, noise, pos, vneg, aneg, image_latent,
                                             steps=steps, solver=solver, shift=shift, video_guidance=video_guidance,
                                             audio_guidance=audio_guidance, slg_layer=slg_layer, progress=progress,
                                             should_stop=should_stop, preview=preview, video_known=video_known,
                                             audio_known=audio_known,
                                             known_seed=seed if known_seed is None else known_seed,
                                             cache_threshold=cache_threshold, stats=stats)
        except BaseException:
            # Any stop (Interrupted, an error, or a host's interrupt that is no Exception, like ComfyUI's):
            # the engine ends holding what a finished diffusion leaves, so the next call starts as usual.
            del pos, vneg, aneg
            self._release_after_diffusion()
            raise
        del pos, vneg, aneg
        with self.report.phase("release"):
            self._release_after_diffusion()

        timings = {r.phase: r.seconds for r in self.report.rows}
        timings["total"] = time.perf_counter() - t_start
        timings.update(passes_run=stats.passes_run, passes_skipped=stats.passes_skipped,
                       cached_steps=len(stats.cached_steps))
        if compiled_before is not None:
            now = self._compiled_layer.counts()
            timings.update({f"layer_{k}": now[k] - compiled_before[k] for k in now})
        return GenerationResult(
            video_latent=video.cpu(), audio_latent=audio.cpu(), height=h, width=w, variant=v.name, seed=seed,
            mode="i2av" if i2v else "t2av", prompt=positive,
            settings=dict(steps=steps, solver=solver, shift=shift, video_guidance=video_guidance,
                          audio_guidance=audio_guidance, slg_layer=slg_layer, cache_threshold=cache_threshold,
                          video_negative_prompt=video_negative_prompt, audio_negative_prompt=audio_negative_prompt),
            image_latent=None if image_latent is None else image_latent.cpu(), timings=timings)

    def _release_after_diffusion(self) -> None:
        if self.memory_mode == "all_gpu":
            self._drop("fusion", "text_encoder")
            log.info("released the fusion model and the text encoder for decoding")
        memory.defragment(self.device)

    def _prepare_image(self, image, size) -> torch.Tensor:
        """[1, 3, H, W] in [-1, 1]: the official preprocessing at the variant's area, or exactly ``size``."""
        from .image import preprocess_image, resize_bicubic

        if size is None:
            return preprocess_image(image, self.variant.target_area)
        h, w, _ = resolve_frame_size(self.variant, size=size)
        from .image import _to_hwc_uint8  # the same reading and 8-bit mapping as preprocess_image, another size

        x = (_to_hwc_uint8(image).permute(2, 0, 1).to(torch.float32) / 255.0) * 2 - 1
        if tuple(x.shape[-2:]) != (h, w):
            x = resize_bicubic(x, (h, w))
        return x[None].contiguous()

    def _noise(self, shape_v, shape_a, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        # One generator per modality, both seeded with the same seed, drawn on the device: the official order.
        gv = torch.Generator(device=self.device).manual_seed(seed)
        video = torch.randn(shape_v, generator=gv, device=self.device, dtype=torch.float32)
        ga = torch.Generator(device=self.device).manual_seed(seed)
        audio = torch.randn(shape_a, generator=ga, device=self.device, dtype=torch.float32)
        return video, audio

    def _diffuse(self, v: Variant, shape_v, shape_a, seed, noise, pos, vneg, aneg, image_latent, *, steps, solver,
                 shift, video_guidance, audio_guidance, slg_layer, progress, should_stop, preview=None,
                 video_known=None, audio_known=None, known_seed=0, cache_threshold=0.0, stats=None):
        slot = self._slots["fusion"]
        model = None
        try:
            if self.memory_mode == "block_swap":
                host = slot.ensure_host(self.device, self.dtype)
                if self._swapper is not None:
                    self._runner = self._swapper  # set first: a half-done attach is detached below too
                    self._loras.before_attach(host, self._swapper, self.device)
                    model = self._swapper.attach(host, self.device)
                    self._loras.after_attach(model, self._swapper, self.device)
                else:
                    model = host
                    self._loras.apply(model, keep_originals=True)
            else:
                model = self._acquire_fusion_with_loras()
            if hasattr(model, "set_attention"):
                model.set_attention(self._attention)
            if self._compiled_layer is not None:
                use_compiled(model, self._compiled_layer)
            want = model.config.video.text_dim
            if pos.shape[-1] != want:
                raise ValueError(f"the text encoder gives {pos.shape[-1]}-wide embeddings but the fusion model expects "
                                 f"{want}: the two files do not belong together")
            if noise is not None:
                video_noise, audio_noise = (n.to(self.device, torch.float32) for n in noise)
            else:
                video_noise, audio_noise = self._noise(shape_v, shape_a, seed)

            def model_fn(video, audio, t, video_ctx, audio_ctx, first_frame_is_clean, slg):
                return self._fusion_forward(model, video, audio, t, video_ctx, audio_ctx, first_frame_is_clean, slg)

            def callback(i, total, _video, _audio, video_x0):
                if preview is not None:
                    preview(i + 1, total, video_x0)
                if progress is not None:
                    progress(i + 1, total)

            return sample(model_fn, video_noise, audio_noise, pos_ctx=pos, video_neg_ctx=vneg, audio_neg_ctx=aneg,
                          solver=solver, steps=steps, shift=shift, video_guidance=video_guidance,
                          audio_guidance=audio_guidance, slg_layer=slg_layer, image_latent=image_latent,
                          video_known=video_known, audio_known=audio_known, known_seed=known_seed,
                          cache_threshold=cache_threshold, stats=stats,
                          callback=callback if (progress or preview) is not None else None,
                          should_stop=should_stop)
        finally:
            model = None  # the closure above holds the same cell: this drops the last reference
            if self._runner is not None:
                self._runner = None
                self._swapper.detach()
            elif self.memory_mode == "offload":
                self._drop("fusion")

    # -- encoding the user's media (known regions) -------------------------------------------------------------
    def encode_frames(self, frames: torch.Tensor, *, vae_dtype: str | torch.dtype | None = None,
                      progress: Progress | None = None) -> torch.Tensor:
        """Frames [T, H, W, 3] in [0, 1] (H, W multiples of 32; T = 1 + 4k) -> the Wan VAE latent
        [48, 1 + (T - 1) // 4, H / 16, W / 16] (float32, on the CPU), as the sampler holds known video."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3] in [0, 1], got {list(frames.shape)}")
        try:
            with self.report.phase("encode video"):
                vae = self._acquire("video_vae", parse_dtype(vae_dtype) or self.options.vae_dtype)
                x = frames.permute(3, 0, 1, 2)[None].to(self.device, vae.dtype) * 2.0 - 1.0
                kw = {"progress": progress} if progress is not None else {}
                latent = vae.encode(x, **kw)[0].float().cpu()
                del vae, x
        finally:
            if self.memory_mode != "all_gpu":
                self._drop("video_vae")
        return latent

    def encode_waveform(self, waveform: torch.Tensor) -> torch.Tensor:
        """A 16 kHz mono waveform [N] in [-1, 1] -> the MMAudio VAE latent [N / 512, 20] (float32, CPU)."""
        if waveform.ndim != 1:
            raise ValueError(f"the waveform must be mono [N], got {list(waveform.shape)}")
        try:
            with self.report.phase("encode audio"):
                encoder = self._acquire("audio_encoder", self.options.audio_dtype)
                latent = encoder(waveform[None].to(self.device, torch.float32))[0].float().cpu()
                del encoder
        finally:
            self._drop("audio_encoder")
        return latent

    # -- decoding ------------------------------------------------------------------------------------------
    def decode(self, result: GenerationResult, *, tile_size: int | None = None, tile_overlap: int | None = None,
               vae_dtype: str | torch.dtype | None = None, progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None) -> DecodedClip:
        """Frames [T, H, W, 3] in [0, 1] and the 16 kHz waveform of ``result``, decoded on the device.

        ``tile_size``/``tile_overlap`` (latent pixels; None = the engine options, 0 = no tiling) tile the video
        decode spatially. ``vae_dtype`` defaults to float32. ``progress(done, total)`` follows the video
        decode; ``should_stop()`` is checked there and raises ``Interrupted``.
        """
        vae_dtype = parse_dtype(vae_dtype) or self.options.vae_dtype
        tile = self.options.tile_size if tile_size is None else tile_size
        overlap = self.options.tile_overlap if tile_overlap is None else tile_overlap
        if self.report.rows and self.report.rows[-1].phase.startswith("decode"):
            self.report.clear()

        def on_frame(done, total):
            if should_stop is not None and should_stop():
                raise DecodeInterrupted(done, total)
            if progress is not None:
                progress(done, total)

        try:
            with self.report.phase("decode video"):
                vae = self._acquire("video_vae", vae_dtype)
                kw: dict[str, Any] = {"tile_size": tile or None, "progress": on_frame}
                if overlap is not None:
                    kw["tile_overlap"] = overlap
                if "output_device" in inspect.signature(vae.decode).parameters:
                    kw["output_device"] = "cpu"  # the finished frames collect in host RAM, not on the device
                out = vae.decode(result.video_latent[None].to(self.device), **kw)
                del vae
                frames = torch.empty(out.shape[2], out.shape[3], out.shape[4], 3, dtype=torch.float32)
                for i in range(0, out.shape[2], 16):
                    chunk = (out[0, :, i:i + 16].float() + 1.0) / 2.0
                    frames[i:i + 16] = chunk.clamp_(0.0, 1.0).permute(1, 2, 3, 0).cpu()
                del out, chunk
                if self.memory_mode != "all_gpu":
                    self._drop("video_vae")
            with self.report.phase("decode audio"):
                audio = self._acquire("audio", self.options.audio_dtype)
                waveform = audio.decode(result.audio_latent[None].to(self.device))[0].float().cpu()
                del audio
                if self.memory_mode != "all_gpu":
                    self._drop("audio")
                memory.defragment(self.device)
        except BaseException:
            # Stopped part-way (Interrupted, an error, a host's BaseException interrupt): the decoders leave the
            # device as a finished decode leaves them, so no device copy outlives the call.
            if self.memory_mode != "all_gpu":
                self._drop("video_vae", "audio")
            memory.defragment(self.device)
            raise
        log.info("memory by phase:\n%s", self.report.table())
        v = get_variant(result.variant)
        return DecodedClip(frames=frames, waveform=waveform, fps=v.fps, sample_rate=v.sample_rate,
                           variant=result.variant, seed=result.seed)

    def decode_audio(self, result: GenerationResult) -> torch.Tensor:
        """The 16 kHz waveform [N] of ``result`` alone, with no video decode (a soundtrack for the user's own
        frames needs only the sound): the same audio decode as ``decode``."""
        try:
            with self.report.phase("decode audio"):
                audio = self._acquire("audio", self.options.audio_dtype)
                waveform = audio.decode(result.audio_latent[None].to(self.device))[0].float().cpu()
                del audio
        finally:
            if self.memory_mode != "all_gpu":
                self._drop("audio")
            memory.defragment(self.device)
        return waveform

    def save_mp4(self, clip: DecodedClip, path: str | os.PathLike, **kw) -> Path:
        """Write ``clip`` as H.264 + AAC (``ovi.video_io.write_mp4``; keywords pass through)."""
        # uint8 by truncation of (x + 1) / 2 * 255, as the official writer maps the frames
        frames = (clip.frames * 255.0).to(torch.uint8)
        return write_mp4(path, frames, clip.waveform, fps=clip.fps, sample_rate=clip.sample_rate, **kw)


class _AudioEncoder(nn.Module):
    """The MMAudio VAE encoder behind its mel front end: 16 kHz waveform [B, N] -> latent [B, N / 512, 20]."""

    def __init__(self, vae: nn.Module, mel: nn.Module):
        super().__init__()
        self.vae, self.mel = vae, mel

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        mel = self.mel(waveform)
        return self.vae.encode(mel.to(device=self.vae.device, dtype=self.vae.dtype)).transpose(1, 2)


def _make_options(kw: dict) -> EngineOptions:
    names = {f.name for f in fields(EngineOptions)}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; options are {', '.join(sorted(names))}")
    return EngineOptions(**kw)


__all__ = ["OviEngine", "EngineOptions", "GenerationResult", "DecodedClip", "MissingComponentError",
           "DecodeInterrupted", "Interrupted", "resolve_frame_size", "MEMORY_MODES"]
