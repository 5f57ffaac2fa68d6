"""OviConvertModel: rewrite a fusion model (or umT5) as FP8 or GGUF next to its source, so the loaders list it."""

from __future__ import annotations

import os
from pathlib import Path

from ..ovi.choices import CONVERT_TARGETS as TARGETS
from ..utils.folders import FUSION_FOLDER, TEXT_FOLDER, full_path, list_files

CATEGORY = "Ovi"
_SOURCES = {FUSION_FOLDER: (".safetensors", ".pt", ".pth"), TEXT_FOLDER: (".safetensors", ".pth", ".pt", ".bin")}
_SUFFIX = {"fp8": "_fp8_e4m3fn_scaled.safetensors"}


def _choices() -> list[str]:
    # One list over both folders: "<folder>/<name>", so a name present in both stays unambiguous.
    return [f"{folder}/{n}" for folder, exts in _SOURCES.items() for n in list_files(folder, exts)]


def default_name(source: str, target: str) -> str:
    """`model_960x960_10s.safetensors` -> `model_960x960_10s_fp8_e4m3fn_scaled.safetensors` / `..._Q4_K.gguf`."""
    stem = Path(source).stem
    return stem + _SUFFIX.get(target, f"-{target.removeprefix('gguf-').upper()}.gguf")


class OviConvertModel:
    DESCRIPTION = ("Converts an Ovi fusion model (diffusion_models) to FP8 (scaled e4m3fn) or GGUF, or the umT5 "
                   "text encoder (text_encoders) to GGUF, tensor by tensor. The result is written into the source's "
                   "folder; refresh the page (R) and pick it in the loader.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("file_name",)
    FUNCTION = "convert"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source": (_choices(), {"tooltip": "The file to convert: an Ovi fusion model from diffusion_models or "
                                               "umT5 from text_encoders (umT5 converts to GGUF only). Either half "
                                               "of a video/audio split pack converts the whole model."}),
            "target": (list(TARGETS), {
                "default": "fp8", "tooltip": "fp8: block linear weights float8_e4m3fn with a per-tensor scale, "
                                             "listed per layer in ComfyUI's mixed-precision metadata "
                                             "(_quantization_metadata). gguf-*: llama.cpp block quantization; "
                                             "q8_0 is nearly lossless, q4_k is the smallest."}),
            "output_name": ("STRING", {
                "default": "", "tooltip": "File name of the result in the source's folder; empty: the source name "
                                          "with the format appended. An existing file is not overwritten."}),
        }}

    def convert(self, source, target, output_name):
        from ..ovi.convert import convert_fp8
        from ..ovi.detect import inspect_file, split_pair
        from ..ovi.quant.gguf_write import convert_gguf
        from ..utils.progress import progress_bar

        folder, _, name = source.partition("/")
        if folder not in _SOURCES or not name:
            raise ValueError(f"source {source!r} must be <diffusion_models|text_encoders>/<file name>")
        if target not in TARGETS:
            raise ValueError(f"target {target!r} must be one of {', '.join(TARGETS)}")
        src = Path(full_path(folder, name))
        out = (output_name or "").strip() or default_name(name, target)
        ext = ".safetensors" if target == "fp8" else ".gguf"
        if not out.lower().endswith(ext):
            out += ext
        if os.sep in out or "/" in out or out.startswith("."):
            raise ValueError(f"output_name {out!r} must be a plain file name (it is written beside the source)")
        dst = src.parent / out  # the folder the source was listed from: the loader lists the result there
        if dst.exists():
            raise ValueError(f"{out} already exists in {src.parent}; choose another output_name or delete it")

        info = inspect_file(src)
        if folder == FUSION_FOLDER and not info.is_fusion:
            raise ValueError(f"{name} is {info.description}, not an Ovi fusion model; umT5 lives in text_encoders")
        if folder == TEXT_FOLDER and info.component != "umt5":
            raise ValueError(f"{name} is {info.description}, not the umT5 text encoder")
        if folder == TEXT_FOLDER and target == "fp8":
            raise ValueError("umT5 converts to GGUF only (Comfy-Org already ships umt5_xxl_fp8_e4m3fn_scaled); "
                             "choose a gguf-* target")

        sources = split_pair(src, info) if info.is_fusion else [src]  # a split pack converts as one model
        bar = progress_bar(1)
        try:
            if target == "fp8":
                convert_fp8(sources, dst, progress=bar)
            else:
                convert_gguf(sources if len(sources) > 1 else src, dst, target.removeprefix("gguf-"),
                             progress=lambda done, total, _: bar(done, total))
        except BaseException:
            dst.unlink(missing_ok=True)  # a half-written file must not show up in the loader's list
            raise
        return {"ui": {"text": [out]}, "result": (out,)}
