"""Parity runners for the variant table, size selection and first-frame preprocessing."""

from __future__ import annotations

from ... import sizes
from ...image import preprocess_image
from ...variants import VARIANTS, get_variant, variant_spec


def _variant_spec_case(args: dict) -> dict:
    name = args.get("model_name")
    # The official engine checks these with asserts; the fixture records the assertion text.
    if name is not None and name not in VARIANTS:
        return {"error": f"AssertionError: Model name {name} not found in predefined model name to path map."}
    try:
        return variant_spec(name, bool(args.get("fp8", False))).as_dict()
    except ValueError as e:
        return {"error": f"AssertionError: {e}"}


def _format_prompt_case(args: dict) -> dict:
    from ...text.prompts import format_prompt

    formatted, changed = format_prompt(get_variant(args.get("model_name")).prompt_style, args["prompt"])
    return {"formatted": formatted, "changed": changed}


def _t2v_latent_size_case(args: dict) -> dict:
    h, w = args["video_frame_height_width"]
    sh, sw, warn = sizes.t2v_frame_size(get_variant(args.get("model_name")), h, w)
    return {"snapped_height_width": [sh, sw], "video_latent_hw": [sh // 16, sw // 16], "area_warning": warn}


_VARIANT_OPS = {
    "variant_spec": _variant_spec_case,
    "format_prompt": _format_prompt_case,
    "t2v_latent_size": _t2v_latent_size_case,
}

_SIZE_FNS = {
    name: getattr(sizes, name)
    for name in ("snap_hw_to_multiple_of_32", "best_hw_for_area", "scale_hw_to_area_divisible",
                 "calc_dims_from_area", "parse_area", "t2v_sizes", "area_warning")
}


def run_variants_case(case: dict):
    args = case["args"]
    return _VARIANT_OPS[args["op"]](args)


def run_sizes_case(case: dict):
    return _SIZE_FNS[case["fn"]](**case["args"])


def run_image_preprocess(fx) -> dict:
    out = {}
    for i, c in enumerate(fx.args["cases"]):
        name = c.get("name", f"image_{i}")
        out[name] = preprocess_image(fx.inputs[name], c["resize_total_area"])
    return out


CASE_RUNNERS = {"variants": run_variants_case, "sizes": run_sizes_case}
TENSOR_RUNNERS = {"image_preprocess": run_image_preprocess}
