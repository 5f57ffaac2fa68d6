"""Checkpoint reading: safetensors through mmap, torch pickles only with ``weights_only=True``.

A checkpoint is read tensor by tensor into a module built on the ``meta`` device, each tensor going
straight to its target dtype and device, so a component never exists twice in system RAM.
Layout adapters (official names, ComfyUI names, weight-norm folds, scaled fp8) are expressed as
mappings from the module's own keys to ``TensorSource`` objects, so every format shares one
loader and one error report.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import contextlib
import torch
from torch import nn
from torch.overrides import TorchFunctionMode


GGUF_MAGIC = b"GGUF"
# header metadata our converters and tiny checkpoints write into fusion files
CONFIG_METADATA_KEY = "ovi.config"
VARIANT_METADATA_KEY = "ovi.variant"

FP8_DTYPES = tuple(
    d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None
)

# Anchor keys that identify what a file holds, used to tell a user which component they gave us.
# Values are (description, keys any of which identifies it).
KNOWN_COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fusion": ("an Ovi fusion model (twin video/audio backbone)", ("video_model.blocks.0.self_attn.q.weight",
                                                                  "audio_model.blocks.0.self_attn.q.weight")),
    "fusion_video": ("the video branch of an Ovi fusion model", ("blocks.0.cross_attn.k_fusion.weight",)),
    "umt5": ("a umT5 text encoder", ("token_embedding.weight", "shared.weight",
                                     "encoder.block.0.layer.0.SelfAttention.q.weight")),
    "wan22_vae": ("a Wan2.2 video VAE", ("decoder.middle.0.residual.0.gamma",)),
    "mmaudio_vae": ("an MMAudio audio VAE", ("decoder.learnable_gain", "encoder.learnable_gain")),
    "bigvgan": ("a BigVGAN vocoder", ("conv_pre.weight_v", "conv_pre.parametrizations.weight.original1",
                                      "conv_pre.weight")),
}


COMPUTE_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def is_compute_float(dtype: torch.dtype) -> bool:
    """True for dtypes a model is cast between; storage formats (fp8, integer blocks) keep their dtype."""
    return dtype in COMPUTE_FLOATS


class _SkipInit(TorchFunctionMode):
    """Turns ``torch.nn.init`` calls into no-ops: weights built on ``meta`` are about to be replaced anyway,
    and running every layer's initialiser costs a third of a full-size model's build time."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else next(iter(kwargs.values()))
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules with placeholder (``meta``) tensors and no initialisation, ready for ``load_into_module``."""
    with torch.device("meta"), _SkipInit():
        yield


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, what is wrong and the likely fix."""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class TensorSource:
    """One tensor of a checkpoint, read only when asked for."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class _SafetensorsSource(TensorSource):
    handle: object
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        return self.handle.get_tensor(self.key)


@dataclass
class _TensorSource(TensorSource):
    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.tensor.dtype

    def load(self) -> torch.Tensor:
        return self.tensor


@dataclass
class DerivedSource(TensorSource):
    """A tensor computed at load time from other sources (a weight-norm fold, an fp8 scale)."""

    inputs: tuple[TensorSource, ...]
    fn: Callable[..., torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        return self.fn(*(s.load() for s in self.inputs))


class CheckpointReader:
    """Random access to the tensors of one checkpoint file.

    ``prefix`` selects and strips a key prefix (the parity fixtures keep weights under ``weights/``);
    ``entry`` selects a sub-dictionary of a torch pickle (``best_netG.pt`` keeps its weights under
    ``generator``). Use as a context manager or call ``close``.
    """

    def __init__(self, path: str | os.PathLike, *, prefix: str = "", entry: str | Iterable[str] | None = None):
        self.path = Path(path)
        self.prefix = prefix
        self.metadata: dict[str, str] = {}
        self._sources: dict[str, TensorSource] = {}
        self._handle = None
        if not self.path.is_file():
            raise CheckpointError(self.path, "file not found. Check the path, or download the file "
                                             "(python -m ovi download --variant ...).")
        with open(self.path, "rb") as f:
            head = f.read(8)
        if head[:4] == GGUF_MAGIC:
            raise CheckpointError(self.path, "this is a GGUF file; it needs the GGUF loader, not the "
                                             "safetensors/torch loader. Pick it in the GGUF-capable loader.")
        suffix = self.path.suffix.lower()
        if suffix == ".safetensors" or (len(head) == 8 and not zipfile.is_zipfile(self.path)
                                        and suffix not in (".pth", ".pt", ".bin", ".ckpt")):
            self._open_safetensors()
        else:
            self._open_torch(entry)

    # -- formats -----------------------------------------------------------------------------
    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        from .safetensors_header import read_header

        header = read_header(self.path)  # CheckpointError for anything malformed, before any tensor exists
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError, OSError: a file that changed under us or a rule we do not check
            raise CheckpointError(self.path, f"unreadable safetensors file ({_first_line(e)}); it is corrupt or "
                                             "truncated. Fetch the file again.") from e
        self.metadata = dict(header.metadata)
        for key, entry in header.entries.items():
            if key.startswith(self.prefix):
                self._sources[key[len(self.prefix):]] = _SafetensorsSource(self._handle, key, entry.shape,
                                                                           entry.dtype)

    def _open_torch(self, entry) -> None:
        obj = self._torch_load()
        entries = [entry] if isinstance(entry, str) else list(entry or [])
        for name in entries:
            if isinstance(obj, Mapping) and name in obj and isinstance(obj[name], Mapping):
                obj = obj[name]
                break
        if not isinstance(obj, Mapping):
            raise CheckpointError(self.path, f"expected a state dict, found {type(obj).__name__}. Use a plain "
                                             "state-dict checkpoint (or a .safetensors file).")
        for key, value in obj.items():
            # nested dicts, step counters, config strings: not weights, and nothing later code should see
            if not isinstance(value, torch.Tensor) or not str(key).startswith(self.prefix):
                continue
            name = str(key)[len(self.prefix):]
            if value.layout != torch.strided or value.is_quantized or value.is_meta:
                raise CheckpointError(self.path, f"tensor {name!r} is a {value.layout} "
                                                 f"{'quantized ' if value.is_quantized else ''}tensor"
                                                 f"{' without data (meta)' if value.is_meta else ''}; only plain "
                                                 "dense tensors are read. Re-save the checkpoint as a plain state "
                                                 "dict.")
            if name in self._sources:
                raise CheckpointError(self.path, f"two entries are named {name!r} once their keys are read as "
                                                 "text; the checkpoint is ambiguous. Re-save it with string keys.")
            self._sources[name] = _TensorSource(value)

    def _torch_load(self) -> object:
        """``torch.load`` with ``weights_only=True``; every way a hostile or broken file fails becomes a
        ``CheckpointError`` (torch raises anything from AssertionError to UnicodeDecodeError on bad bytes)."""
        try:
            try:
                return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e).lower():
                    raise
            # legacy (non-zip) torch files cannot be memory-mapped
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Unsupported global" in str(e):
                raise CheckpointError(
                    self.path, "refused: the file contains pickled Python objects beyond plain tensors, and "
                               "loading it would execute code. Use a plain state-dict checkpoint (or a "
                               f".safetensors file). ({_unpickler_detail(e)})") from e
            raise CheckpointError(self.path, "refused: pickled Python objects or pickle instructions that a plain "
                                             "state dict does not use; the file is corrupt or not a plain torch "
                                             f"checkpoint. ({_unpickler_detail(e)})") from e
        except MemoryError as e:
            raise CheckpointError(self.path, "unreadable torch file: it declares more data than fits in memory; it "
                                             "is corrupt or not a plain state dict. Fetch the file again.") from e
        except Exception as e:
            what = type(e).__name__ + (f": {_first_line(e)}" if str(e).strip() else "")
            raise CheckpointError(self.path, f"unreadable torch file ({what}); it is corrupt or truncated. Fetch the "
                                             "file again.") from e

    # -- access ------------------------------------------------------------------------------
    def sources(self) -> dict[str, TensorSource]:
        return dict(self._sources)

    def keys(self) -> list[str]:
        return list(self._sources)

    def __contains__(self, key: str) -> bool:
        return key in self._sources

    def get(self, key: str) -> torch.Tensor:
        return self._sources[key].load()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s.shape for k, s in self._sources.items()}

    def nbytes(self) -> int:
        return sum(_numel(s.shape) * _itemsize(s.dtype) for s in self._sources.values())

    def close(self) -> None:
        self._sources.clear()
        self._handle = None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line, for one-line error messages (torch's can run to a page)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]


def _unpickler_detail(e: BaseException) -> str:
    """The line of torch's weights-only refusal that says what it met (its first line is generic advice)."""
    lines = [line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line or "Unsupported" in line]
    # torch goes on to explain how to allow-list the global: not advice for a file from a stranger
    return (lines[-1].split(" was not an allowed global")[0] if lines else _first_line(e))[:200]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def is_gguf(path: str | os.PathLike) -> bool:
    """True when the file starts with the GGUF magic (a renamed file still takes the GGUF loader)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def identify_component(keys: Iterable[str]) -> str | None:
    """Name of the known component whose anchor keys appear in ``keys`` (None if none does)."""
    keyset = set(keys)
    for name, (_, anchors) in KNOWN_COMPONENTS.items():
        if any(a in keyset for a in anchors):
            return name
    return None


def _likely_cause(component: str, path, sources: Mapping[str, TensorSource], missing: list[str],
                  unexpected: list[str], expected_count: int) -> str:
    found = identify_component(sources.keys())
    wanted = KNOWN_COMPONENTS.get(component, (component, ()))[0]
    if found is not None and found != component and not (component.startswith("fusion") and found.startswith("fusion")):
        return (f"this file looks like {KNOWN_COMPONENTS[found][0]}, not {wanted}: the wrong component was "
                "given here. Pick the right file in the loader.")
    if any(s.dtype in FP8_DTYPES for s in sources.values()) or "scaled_fp8" in sources:
        return "the file holds FP8 weights; load it with an FP8-capable path rather than the bf16 one."
    if unexpected and not missing:
        return "the file has extra tensors this model does not use: a different model version or architecture."
    if missing and len(missing) < expected_count and not unexpected:
        return ("tensors are missing: the file is partial (one part of a split checkpoint, or an interrupted "
                "conversion). Use the complete file.")
    return f"the file does not hold {wanted} in a layout this loader knows."


def check_keys(component: str, path, expected: Mapping[str, tuple[int, ...]],
               sources: Mapping[str, TensorSource]) -> None:
    """Raise ``CheckpointError`` unless ``sources`` has exactly the expected keys and shapes."""
    missing = [k for k in expected if k not in sources]
    unexpected = [k for k in sources if k not in expected]
    if missing or unexpected:
        cause = _likely_cause(component, path, sources, missing, unexpected, len(expected))
        parts = [f"does not match {KNOWN_COMPONENTS.get(component, (component,))[0]}:"]
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        parts.append(f"Likely cause: {cause}")
        raise CheckpointError(path, " ".join(parts))
    bad = [(k, tuple(s.shape), tuple(expected[k])) for k, s in sources.items() if tuple(s.shape) != tuple(expected[k])]
    if bad:
        k, got, want = bad[0]
        raise CheckpointError(
            path, f"{len(bad)} tensors have the wrong shape (first: {k} is {list(got)}, the model expects "
                  f"{list(want)}). Likely cause: a different model size or configuration than this loader "
                  "built; check that the file and the chosen model/variant belong together.")


def _set_tensor(owners: Mapping[str, nn.Module], name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = owners[owner_name]
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise KeyError(name)


def load_into_module(module: nn.Module, sources: Mapping[str, TensorSource], *, path, component: str,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                     keep_dtype: Callable[[str, torch.Tensor], bool] | None = None) -> nn.Module:
    """Fill ``module`` (typically built on ``meta``) from ``sources`` keyed by the module's own names.

    Each tensor is read, cast to ``dtype`` (floating tensors only, unless ``keep_dtype`` says to keep
    it) and moved to ``device`` one at a time, replacing the meta placeholder, so peak memory is the
    module plus one tensor. Keys and shapes must match exactly.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    check_keys(component, path, expected, sources)
    owners = dict(module.named_modules())
    for name, src in sources.items():
        t = src.load()
        target_dtype = dtype
        if target_dtype is not None and (not is_compute_float(t.dtype) or (keep_dtype and keep_dtype(name, t))):
            target_dtype = None
        t = t.to(device=device if device is not None else t.device, dtype=target_dtype or t.dtype)
        _set_tensor(owners, name, t)
    return module


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Header metadata of a safetensors file ({} for other formats), without reading tensors."""
    from .safetensors_header import read_header

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        return {}
    return dict(read_header(p).metadata)  # validated whole: CheckpointError for a malformed header
