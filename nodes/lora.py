"""The LoRA node: an engine plus one LoRA file from models/loras at a strength per branch -> the engine, chainable.

The node only names the file and the strengths (utils/lora_engine.py): the engine reads the file once, and puts
the stack on the fusion model when the sampler runs, so ComfyUI's cache keeps the loader's engine and a changed
strength costs no reload.
"""

from __future__ import annotations

from ..utils.folders import LORA_FOLDER, full_path, list_files

LORA_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
STRENGTH_LIMIT = 10.0  # far past any useful strength; beyond it a LoRA only breaks the model
# the preset LoRA (the FastWan workflow's) first, so a fresh node offers it where it is installed
PREFERRED = ("fastwan",)


class OviLora:
    DESCRIPTION = ("Adds a LoRA from models/loras to the Ovi engine, with a strength for the video branch and one "
                   "for the audio branch; chain several. A Wan 2.2 5B LoRA (e.g. the FastWan distillation "
                   "LoRA) acts on the video branch only; an Ovi LoRA (video_model./audio_model. keys) on both. "
                   "A LoRA that matches nothing on Ovi (another model's) fails the sampler with the file named.")
    CATEGORY = "Ovi"
    RETURN_TYPES = ("OVI_ENGINE",)
    RETURN_NAMES = ("engine",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "engine": ("OVI_ENGINE",),
            "lora_name": (list_files(LORA_FOLDER, LORA_EXTENSIONS, PREFERRED), {
                "tooltip": "A LoRA from models/loras: Wan 2.2 TI2V-5B LoRAs in the ComfyUI, kohya/musubi or "
                           "diffusers/PEFT conventions, or an Ovi LoRA. Wan 14B / 1.3B LoRAs do not fit."}),
            "strength_video": ("FLOAT", {
                "default": 1.0, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.01,
                "tooltip": "Strength on the video branch (what a Wan 2.2 5B LoRA changes)."}),
            "strength_audio": ("FLOAT", {
                "default": 1.0, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.01,
                "tooltip": "Strength on the audio branch; only Ovi LoRAs have audio layers (a Wan LoRA ignores "
                           "it)."}),
        }}

    def apply(self, engine, lora_name, strength_video, strength_audio):
        from ..utils.lora_engine import with_lora

        path = full_path(LORA_FOLDER, lora_name)
        return (with_lora(engine, path, strength_video, strength_audio),)
