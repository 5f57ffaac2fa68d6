"""The Ovi nodes (V1 node API). Importing this imports no torch and no ComfyUI module: the classes import what
they need when they run."""

from .convert import OviConvertModel
from .decode import OviDecode
from .extend import OviExtend
from .latents import OviLoadLatent, OviSaveLatent
from .loaders import OviComponentLoader, OviEngineLoader
from .lora import OviLora
from .sampler import OviSampler
from .video import OviSaveVideo

NODE_CLASS_MAPPINGS = {
    "OviComponentLoader": OviComponentLoader,
    "OviEngineLoader": OviEngineLoader,
    "OviLora": OviLora,
    "OviSampler": OviSampler,
    "OviExtend": OviExtend,
    "OviDecode": OviDecode,
    "OviSaveLatent": OviSaveLatent,
    "OviLoadLatent": OviLoadLatent,
    "OviSaveVideo": OviSaveVideo,
    "OviConvertModel": OviConvertModel,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "OviComponentLoader": "Ovi Component Loader",
    "OviEngineLoader": "Ovi Engine Loader",
    "OviLora": "Ovi LoRA",
    "OviSampler": "Ovi Sampler",
    "OviExtend": "Ovi Extend",
    "OviDecode": "Ovi Decode",
    "OviSaveLatent": "Ovi Save Latent",
    "OviLoadLatent": "Ovi Load Latent",
    "OviSaveVideo": "Ovi Save Video (mp4)",
    "OviConvertModel": "Ovi Convert Model (FP8 / GGUF)",
}
