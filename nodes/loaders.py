"""Loader nodes: the component files (umT5, Wan2.2 VAE, MMAudio VAE + vocoder) and the engine over a fusion model.

Both only check files and build the engine object; weights load when the sampler or decoder first needs them.
"""

from __future__ import annotations

from pathlib import Path

from ..ovi.choices import ATTENTION_BACKENDS as ATTENTION
from ..ovi.choices import MEMORY_MODES
from ..ovi.variants import VARIANTS, known_file
from ..utils.folders import AUDIO_FOLDER, FUSION_FOLDER, TEXT_FOLDER, VAE_FOLDER, full_path, list_files

CATEGORY = "Ovi"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
GGUF_MAGIC = b"GGUF"

# component key -> (what it must be (ovi.detect component), words for messages)
_ROLES = {
    "text_encoder": ("umt5", "the umT5-XXL text encoder"),
    "video_vae": ("wan22_vae", "the Wan2.2 video VAE"),
    "audio_vae": ("mmaudio_vae", "the MMAudio VAE (v1-16.pth)"),
    "vocoder": ("bigvgan", "the BigVGAN vocoder (best_netG.pt)"),
}


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _check_component(key: str, name: str, path: str) -> None:
    """A clear error when the file chosen for ``key`` is something else. umT5 may be a GGUF file (ours or
    ComfyUI-GGUF's llama.cpp T5 names); the VAEs and the vocoder have no GGUF form."""
    from ..ovi.detect import inspect_file

    want, words = _ROLES[key]
    if _is_gguf(path) and key != "text_encoder":
        raise ValueError(f"{name} is a GGUF file; {words} is read from .safetensors or .pth only.")
    info = inspect_file(path)
    if info.component != want:
        raise ValueError(f"{name} was chosen as {words}, but it is {info.description} ({info.layout}). "
                         f"Choose {words} in that input.")
    if want == "wan22_vae" and "48-channel" not in info.layout:
        # Wan2.1's VAE has the same key names; its 16-channel latent is what gives it away.
        raise ValueError(f"{name} is a Wan VAE with a different latent ({info.layout}): probably the Wan2.1 VAE. "
                         "Ovi needs the Wan2.2 VAE (48-channel latent): wan2.2_vae.safetensors or Wan2.2_VAE.pth.")


def _check_fusion(name: str, path: str):
    """The file's ``inspect_file`` info: bf16, FP8 (official plain, Kijai scaled, ComfyUI scaled_fp8, ours) and
    GGUF fusion files all load; what is refused is a file of another component."""
    from ..ovi.detect import inspect_file

    info = inspect_file(path)
    if not info.is_fusion:
        raise ValueError(f"{name} is {info.description}, not an Ovi fusion model ({info.layout}). Choose the Ovi "
                         f"model file (e.g. model.safetensors) in 'model'.")
    return info


def _fusion_files() -> list[str]:
    names = list_files(FUSION_FOLDER, (".safetensors", ".gguf"))
    # Ovi's own files first, so a fresh node defaults to one of them rather than another pack's model.
    return sorted(names, key=lambda n: (known_file(n) is None and "ovi" not in n.lower(), n.lower()))


class OviComponentLoader:
    DESCRIPTION = ("Picks the files Ovi shares with other models: the umT5-XXL text encoder (text_encoders), the "
                   "Wan2.2 VAE (vae) and MMAudio's VAE and BigVGAN vocoder (models/mmaudio). Nothing loads yet.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("OVI_COMPONENTS",)
    RETURN_NAMES = ("components",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (list_files(TEXT_FOLDER, (".safetensors", ".pth", ".pt", ".bin", ".gguf"), ("umt5",)), {
                "tooltip": "umT5-XXL from models/text_encoders: umt5_xxl_fp16.safetensors (Comfy-Org), "
                           "umt5_xxl_fp8_e4m3fn_scaled.safetensors, a GGUF such as umt5-xxl-encoder-Q8_0.gguf, or the "
                           "official models_t5_umt5-xxl-enc-bf16.pth; google/umt5-xxl/spiece.model beside it."}),
            "video_vae": (list_files(VAE_FOLDER, (), ("wan2.2", "wan2_2", "wan22")), {
                "tooltip": "Wan2.2 VAE from models/vae: wan2.2_vae.safetensors or the official Wan2.2_VAE.pth."}),
            "audio_vae": (list_files(AUDIO_FOLDER, (), ("v1-16", "vae")), {
                "tooltip": "MMAudio's 16 kHz VAE from models/mmaudio: v1-16.pth."}),
            "vocoder": (list_files(AUDIO_FOLDER, (), ("best_netg", "bigvgan", "vocoder")), {
                "tooltip": "MMAudio's BigVGAN vocoder from models/mmaudio: best_netG.pt."}),
        }}

    def load(self, text_encoder, video_vae, audio_vae, vocoder):
        chosen = {"text_encoder": (TEXT_FOLDER, text_encoder), "video_vae": (VAE_FOLDER, video_vae),
                  "audio_vae": (AUDIO_FOLDER, audio_vae), "vocoder": (AUDIO_FOLDER, vocoder)}
        paths = {}
        for key, (folder, name) in chosen.items():
            paths[key] = full_path(folder, name)
            _check_component(key, name, paths[key])
        return ({**paths, "names": {k: name for k, (_, name) in chosen.items()}},)


class OviEngineLoader:
    DESCRIPTION = ("The Ovi engine over a fusion model from models/diffusion_models and the components. Weights "
                   "load when the sampler runs; ComfyUI's 'Free model and node cache' releases them.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("OVI_ENGINE",)
    RETURN_NAMES = ("engine",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (_fusion_files(), {
                "tooltip": "The Ovi fusion model: model.safetensors (720x720_5s), model_960x960.safetensors "
                           "(960x960_5s) or model_960x960_10s.safetensors (960x960_10s); FP8 files (official, "
                           "Kijai's _scaled_KJ, ComfyUI scaled_fp8) and .gguf files load too. For a pack split into video and "
                           "audio files, pick either: the other is read from beside it."}),
            "components": ("OVI_COMPONENTS",),
            "variant": (["auto", *VARIANTS], {
                "default": "auto",
                "tooltip": "auto: from the file's metadata or its official name. Choose one for a renamed file."}),
            "precision": (list(PRECISIONS), {
                "default": "auto", "tooltip": "Compute dtype of the fusion model and text encoder. auto: bf16 on "
                                              "a GPU, fp32 on the CPU."}),
            "memory_mode": (list(MEMORY_MODES), {
                "default": "auto",
                "tooltip": "all_gpu: everything resident on the GPU. offload: one component on the GPU at a time. "
                           "block_swap: the fusion model streams layer by layer. auto: picked from free memory."}),
            "block_swap_layers": ("INT", {
                "default": 0, "min": 0, "max": 64,
                "tooltip": "block_swap only: fused layers kept resident on the GPU (0 streams every layer)."}),
            "attention": (list(ATTENTION), {
                "default": "auto", "tooltip": "auto: FlashAttention when installed and usable, else PyTorch SDPA."}),
        }, "optional": {
            "compile": ("BOOLEAN", {
                "default": False, "tooltip": "torch.compile the fused layer: compiled during the first step (about "
                                             "a minute), faster steps after; a new size or LoRA recompiles. Needs "
                                             "Triton on the GPU."}),
        }}

    def load(self, model, components, variant, precision, memory_mode, block_swap_layers, attention, compile=False):
        import comfy.model_management as mm

        from ..ovi.detect import split_pair
        from ..ovi.engine import EngineOptions, OviEngine
        from ..utils.model_management import OviModelPatcher

        path = full_path(FUSION_FOLDER, model)
        info = _check_fusion(model, path)
        options = EngineOptions(
            variant=None if variant == "auto" else variant, device=mm.get_torch_device(),
            dtype=None if precision == "auto" else precision, memory_mode=memory_mode,
            block_swap=int(block_swap_layers) if memory_mode == "block_swap" else 0, attention=attention,
            compile=bool(compile))
        fusion = split_pair(path, info)  # a split pack's other half comes from beside the chosen one
        engine = OviEngine(fusion if len(fusion) > 1 else path, components["text_encoder"], None,
                           components["video_vae"], components["audio_vae"], components["vocoder"], options=options)
        return (OviModelPatcher(engine, f"Ovi {engine.variant.name} ({Path(model).name})"),)
