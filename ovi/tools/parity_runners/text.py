"""Parity runners for the text area: umT5 encoder, its key manifest and ComfyUI key map, cleaning, prompts."""

from __future__ import annotations

import os
import tempfile

import torch

from ...loading import meta_device
from ...text.checkpoint import comfy_key, load_umt5, official_key
from ...text.clean import whitespace_clean
from ...text.prompts import (clean_text, engine_t5_text, format_prompt, format_prompt_for_filename,
                             validate_and_process_user_prompt)
from ...text.umt5 import UMT5_XXL, UMT5Config, UMT5Encoder, relative_position_bucket


def run_umt5_encoder(fx) -> dict[str, torch.Tensor]:
    cfg = UMT5Config.from_dict(fx.config)
    model = load_umt5(fx.weights_path, prefix=fx.weights_prefix, dtype=torch.float32, config=cfg)
    ids, mask = fx.inputs["ids"], fx.inputs["mask"]
    context, hidden = model(ids, mask, return_hidden=True)
    out = {"context": context}
    out.update({f"hidden_after_block_{i}": h for i, h in enumerate(hidden)})
    out.update({f"trimmed_{i}": t for i, t in enumerate(model.encode(ids, mask))})
    length = ids.shape[1]
    out["rel_pos_bucket"] = relative_position_bucket(torch.arange(-(length - 1), length), cfg.num_buckets,
                                                     cfg.max_dist)
    return out


def _validate(args: dict):
    if "file_content" not in args:
        res = validate_and_process_user_prompt(args["text_prompt"], args.get("image_path"), args.get("mode", "t2v"))
    else:
        fd, path = tempfile.mkstemp(suffix=args.get("file_extension", ".csv"))
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(args["file_content"])
            res = validate_and_process_user_prompt(path, args.get("image_path"), args.get("mode", "t2v"))
        finally:
            os.unlink(path)
    return {"text_prompts": res[0], "image_paths": res[1]}


_PROMPT_FNS = {
    "model_formatter": lambda a: format_prompt(a["model_name"], a["text"])[0],
    "engine_t5_text": lambda a: engine_t5_text(a["model_name"], a["text"]),
    "clean_text": lambda a: clean_text(a["text"]),
    "t2i2v_image_prompt": lambda a: clean_text(a["text"]),
    "format_prompt_for_filename": lambda a: format_prompt_for_filename(a["text"]),
    "validate_and_process_user_prompt": _validate,
}


def run_prompt_case(case: dict):
    return _PROMPT_FNS[case["fn"]](case["args"])


def umt5_manifest(expected: dict) -> dict:
    with meta_device():
        model = UMT5Encoder(UMT5Config.from_shapes(expected))
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def umt5_keymap(mapping: dict) -> list[str]:
    """Problems with our ComfyUI rename against ``mapping`` (official key -> ComfyUI key)."""
    problems = []
    for off, comfy in mapping.items():
        try:
            ours = comfy_key(off)
        except KeyError as e:
            problems.append(str(e))
            continue
        if ours != comfy:
            problems.append(f"{off}: we map to {ours}, the map says {comfy}")
        try:
            back = official_key(comfy)
        except KeyError as e:
            problems.append(str(e))
            continue
        if back != off:
            problems.append(f"{comfy}: we map back to {back}, expected {off}")
    with meta_device():
        full = list(UMT5Encoder(UMT5_XXL).state_dict(keep_vars=True))
    missing = [k for k in full if k not in mapping]
    extra = [k for k in mapping if k not in set(full)]
    if missing:
        problems.append(f"{len(missing)} keys of our full-size module are not in the map (first: {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} mapped keys are not in our full-size module (first: {extra[:3]})")
    if len(set(mapping.values())) != len(mapping):
        problems.append("the map is not one-to-one")
    return problems


TENSOR_RUNNERS = {"umt5_encoder": run_umt5_encoder}
CASE_RUNNERS = {"text_clean": lambda case: whitespace_clean(case["args"]["text"]), "prompt_processing": run_prompt_case}
MANIFEST_ANCHORS = {"umt5": "token_embedding.weight"}
MANIFEST_RUNNERS = {"umt5": umt5_manifest}
KEYMAP_RUNNERS = {"umt5": umt5_keymap}
