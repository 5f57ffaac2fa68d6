"""The three released Ovi variants, their checkpoint files, and recognising a variant from a file name.

Real checkpoints carry no config and the three variants have identical shapes, so the variant (latent
lengths, target area, prompt style) can only come from the user's choice or from the file's name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

DEFAULT_VARIANT = "960x960_5s"  # what the official engine uses when the config names no model
FP8_ONLY_MESSAGE = "FP8 quantization is only supported for 720x720_5s model currently."
VAE_TIME_STRIDE = 4  # Wan2.2 VAE: 1 + 4*(F-1) frames
AUDIO_SAMPLES_PER_LATENT = 512  # MMAudio VAE upsamples x2, the vocoder hop is 256


@dataclass(frozen=True)
class Variant:
    name: str
    checkpoint: str  # official file name under <ckpt_dir>/Ovi/
    fp8_checkpoint: str | None  # official fp8 file, only 720x720_5s has one
    video_latent_length: int
    audio_latent_length: int
    target_area: int
    duration_s: int
    prompt_style: str  # "audcap": <AUDCAP>..<ENDAUDCAP> (Ovi 1.0); "audio_colon": "Audio: ..." (Ovi 1.1)
    fps: int = 24
    sample_rate: int = 16000
    video_latent_channels: int = 48
    audio_latent_channels: int = 20

    @property
    def video_frames(self) -> int:
        return 1 + VAE_TIME_STRIDE * (self.video_latent_length - 1)

    @property
    def audio_samples(self) -> int:
        return self.audio_latent_length * AUDIO_SAMPLES_PER_LATENT

    def checkpoint_for(self, fp8: bool = False) -> str:
        if not fp8:
            return self.checkpoint
        if self.fp8_checkpoint is None:
            raise ValueError(FP8_ONLY_MESSAGE)
        return self.fp8_checkpoint


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("720x720_5s", "model.safetensors", "model_fp8_e4m3fn.safetensors", 31, 157, 720 * 720, 5, "audcap"),
        Variant("960x960_5s", "model_960x960.safetensors", None, 31, 157, 960 * 960, 5, "audio_colon"),
        Variant("960x960_10s", "model_960x960_10s.safetensors", None, 61, 314, 960 * 960, 10, "audio_colon"),
    )
}


def get_variant(name: str | Variant | None) -> Variant:
    """The variant called ``name`` (None: the official default, 960x960_5s)."""
    if isinstance(name, Variant):
        return name
    if name is None:
        name = DEFAULT_VARIANT
    try:
        return VARIANTS[str(name).strip()]
    except KeyError:
        raise ValueError(f"unknown Ovi variant {name!r}; valid choices: {', '.join(VARIANTS)}") from None


@dataclass(frozen=True)
class VariantSpec:
    """What the official engine resolves a (model_name, fp8) pair to."""

    variant: Variant
    checkpoint_basename: str
    fp8: bool

    @property
    def checkpoint_relpath(self) -> str:
        return f"Ovi/{self.checkpoint_basename}"

    def as_dict(self) -> dict:
        v = self.variant
        return {
            "model_name": v.name,
            "checkpoint_basename": self.checkpoint_basename,
            "checkpoint_relpath": self.checkpoint_relpath,
            "video_latent_length": v.video_latent_length,
            "audio_latent_length": v.audio_latent_length,
            "target_area": v.target_area,
            "video_latent_channel": v.video_latent_channels,
            "audio_latent_channel": v.audio_latent_channels,
        }


def variant_spec(name: str | None = None, fp8: bool = False) -> VariantSpec:
    """The variant and checkpoint file for ``name`` (None: 960x960_5s); fp8 exists for 720x720_5s only."""
    v = get_variant(name)
    return VariantSpec(v, v.checkpoint_for(bool(fp8)), bool(fp8))


@dataclass(frozen=True)
class KnownFile:
    name: str
    variant: str
    fp8: bool = False
    part: str = "full"  # "full", or "video"/"audio" for packs that split the twin backbone into two files
    source: str = "official"
    best_effort: bool = False  # name seen in third-party workflows, not checked against the files themselves


KNOWN_FILES: tuple[KnownFile, ...] = (
    KnownFile("model.safetensors", "720x720_5s"),
    KnownFile("model_fp8_e4m3fn.safetensors", "720x720_5s", fp8=True),
    KnownFile("model_960x960.safetensors", "960x960_5s"),
    KnownFile("model_960x960_10s.safetensors", "960x960_10s"),
    # BennyDaBall930/ComfyUI-Ovi renames on download
    KnownFile("Ovi-11B-bf16.safetensors", "720x720_5s", source="ComfyUI-Ovi"),
    KnownFile("Ovi-11B-fp8.safetensors", "720x720_5s", fp8=True, source="ComfyUI-Ovi"),
    KnownFile("Ovi-960x960-5s.safetensors", "960x960_5s", source="ComfyUI-Ovi"),
    KnownFile("Ovi-960x960-10s.safetensors", "960x960_10s", source="ComfyUI-Ovi"),
    KnownFile("Ovi-960x960-10s-F16.gguf", "960x960_10s", source="ComfyUI-Ovi"),
    KnownFile("Ovi-960x960-10s-Q4_K.gguf", "960x960_10s", source="ComfyUI-Ovi"),
    # Kijai's WanVideo repacks
    KnownFile("Wan2_2-5B-Ovi_960x960_10s_fp8_e4m3fn_scaled_KJ.safetensors", "960x960_10s", fp8=True, source="Kijai"),
    KnownFile("Wan2_2-5B-Ovi_960x960_fp8_e4m3fn_scaled_KJ.safetensors", "960x960_5s", fp8=True, source="Kijai",
              best_effort=True),
    KnownFile("Wan_2_2_Ovi_video_model_bf16.safetensors", "720x720_5s", part="video", source="Kijai", best_effort=True),
    KnownFile("Wan_2_2_Ovi_audio_model_bf16.safetensors", "720x720_5s", part="audio", source="Kijai", best_effort=True),
    KnownFile("Wan_2_1_Ovi_video_model_bf16.safetensors", "720x720_5s", part="video", source="Kijai", best_effort=True),
    KnownFile("Wan_2_1_Ovi_audio_model_bf16.safetensors", "720x720_5s", part="audio", source="Kijai", best_effort=True),
    KnownFile("Wan2_2_Ovi_Video_fp8_e4m3fn_scaled_KJ.safetensors", "720x720_5s", fp8=True, part="video",
              source="Kijai", best_effort=True),
    KnownFile("Wan2_2_Ovi_Audio_fp8_e4m3fn_scaled_KJ.safetensors", "720x720_5s", fp8=True, part="audio",
              source="Kijai", best_effort=True),
)

# Wan2GP (huggingface.co/DeepBeepMeep/Wan2.2): one file per branch, keys without the branch prefix, bf16 or
# optimum-quanto int8. Its model definitions name each pair with an Ovi version and length ("Wan2.2 Ovi v1.0 5s",
# "v1.1 5s", "v1.1 10s"), and each of those is exactly one official checkpoint: 1.0 shipped only 720x720_5s, 1.1
# ships 960x960_5s and 960x960_10s (Wan2GP's 1.1 commit names model_960x960.safetensors beside its save calls; its
# 10 s definition runs 241 frames with 61 video / 314 audio latents, the 960x960_10s lengths).
WAN2GP_PAIRS = (("wan2.2_ovi", "720x720_5s"), ("wan2.2_ovi1_1", "960x960_5s"), ("wan2.2_ovi1_1_10s", "960x960_10s"))
WAN2GP_KINDS = ("bf16", "quanto_bf16_int8")  # bf16 first: the models-folder lookup prefers the unquantised pair
KNOWN_FILES += tuple(KnownFile(f"{stem}_{part}_10B_{kind}.safetensors", variant, part=part, source="Wan2GP")
                     for kind in WAN2GP_KINDS for stem, variant in WAN2GP_PAIRS for part in ("video", "audio"))
_BY_NAME = {f.name.lower(): f for f in KNOWN_FILES}

# Wan2GP-style names that are not the published ones (another dtype tag, e.g. the "quanto_fp16_int8" its Ovi 1.0
# code mentions): the version/length stem still says the variant. Longest stem first.
_WAN2GP_PATTERNS = (
    (re.compile(r"^wan2\.2_ovi1_1_10s_"), "960x960_10s"),
    (re.compile(r"^wan2\.2_ovi1_1_"), "960x960_5s"),
    (re.compile(r"^wan2\.2_ovi_"), "720x720_5s"),
)

# A user's own conversion (e.g. "Ovi-960x960-10s-Q8_0.gguf") usually keeps the resolution/duration tag.
_NAME_PATTERNS = (
    (re.compile(r"960x960[_-]?10s"), "960x960_10s"),
    (re.compile(r"960x960"), "960x960_5s"),
    (re.compile(r"720x720"), "720x720_5s"),
)


def known_file(path: str | os.PathLike) -> KnownFile | None:
    """What a checkpoint file is, judged by its base name only (exact known names first, then a name tag)."""
    base = os.path.basename(os.fspath(path).replace("\\", "/")).strip()
    hit = _BY_NAME.get(base.lower())
    if hit is not None:
        return hit
    low = base.lower()
    for pattern, variant in _WAN2GP_PATTERNS:
        if pattern.search(low):
            part = next((w for w in ("video", "audio") if w in low), "full")
            return KnownFile(base, variant, fp8="fp8" in low, part=part, source="Wan2GP", best_effort=True)
    for pattern, variant in _NAME_PATTERNS:
        if pattern.search(low):
            return KnownFile(base, variant, fp8="fp8" in low, source="name pattern", best_effort=True)
    return None


def variant_from_filename(path: str | os.PathLike) -> Variant | None:
    """The variant a checkpoint file name identifies, or None when the name says nothing."""
    f = known_file(path)
    return VARIANTS[f.variant] if f is not None else None
