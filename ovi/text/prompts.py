"""Prompt utilities: the per-variant audio-caption formatter, the t2i2v image prompt, file names, CLI prompt input.

Ovi 1.0 (720x720_5s) was trained with audio captions as ``<AUDCAP>…<ENDAUDCAP>``, Ovi 1.1 (960 variants) with a
trailing ``Audio: …``; the engine rewrites the positive prompt into the variant's style before encoding.
"""

from __future__ import annotations

import csv
import os
import re

from ..log import log
from .clean import whitespace_clean

AUDCAP = "audcap"  # Ovi 1.0: <AUDCAP>caption<ENDAUDCAP>
AUDIO_COLON = "audio_colon"  # Ovi 1.1: Audio: caption

# The official per-variant formatters, keyed by style name (regexes are case-sensitive, '.' spans newlines).
_FORMATTERS = {
    AUDCAP: (re.compile(r"Audio:\s*(.*)", re.DOTALL), r"<AUDCAP>\1<ENDAUDCAP>"),
    AUDIO_COLON: (re.compile(r"<AUDCAP>(.*?)<ENDAUDCAP>", re.DOTALL), r"Audio: \1"),
}
PROMPT_STYLES = tuple(_FORMATTERS)


def prompt_style_for_variant(name: str) -> str:
    """Style name of a variant, from the variant table (``ovi/variants.py``); a style name passes through.

    Derived names such as ``720x720_5s_fp8`` use their base variant's style.
    """
    if name in _FORMATTERS:
        return name
    from ..variants import VARIANTS  # imported late so that the variant table may import this module

    if name in VARIANTS:
        return VARIANTS[name].prompt_style
    for base, variant in VARIANTS.items():
        if name.startswith(base + "_"):
            return variant.prompt_style
    raise KeyError(f"unknown Ovi variant {name!r} (known: {', '.join(VARIANTS)})")


def format_prompt(variant_or_style: str, text: str) -> tuple[str, bool]:
    """(prompt in the variant's audio-caption style, whether it changed). Applied to the positive prompt only."""
    pattern, repl = _FORMATTERS[prompt_style_for_variant(variant_or_style)]
    out = pattern.sub(repl, text)
    if out != text:
        log.info("prompt reformatted for %s: %r", variant_or_style, out)
    return out, out != text


def engine_t5_text(variant_or_style: str, text: str) -> str:
    """The exact string umT5 tokenizes for a positive prompt: the variant's formatter, then the cleaning."""
    return whitespace_clean(format_prompt(variant_or_style, text)[0])


_SPEECH = re.compile(r"<S>.*?<E>", re.DOTALL)
_CAPTION = re.compile(r"<AUDCAP>.*?<ENDAUDCAP>", re.DOTALL)
_AUDIO_TAIL = re.compile(r"Audio:.*", re.DOTALL)
_TAG = re.compile(r"<.*?>")


def clean_text(text: str) -> str:
    """The t2i2v image prompt: speech spans, audio captions and any ``Audio:`` tail removed, then stripped."""
    for pattern in (_SPEECH, _CAPTION, _AUDIO_TAIL):
        text = pattern.sub("", text)
    return text.strip()


def format_prompt_for_filename(text: str) -> str:
    """Output-file stem: tags dropped (within a line), spaces and slashes to '_', first 50 characters."""
    return _TAG.sub("", text).replace(" ", "_").replace("/", "_")[:50]


# pandas.read_csv's default NaN spellings: a prompt cell holding one of these reads as empty, as officially
_NA_STRINGS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
               "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _read_table(path: str, delimiter: str) -> dict[str, list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r]  # blank lines are skipped
    if not rows:
        raise ValueError(f"{path}: empty prompt file (a header row with a text_prompt column is needed)")
    header, body = rows[0], rows[1:]
    return {name: [("" if (r[i] if i < len(r) else "") in _NA_STRINGS else r[i]) for r in body]
            for i, name in enumerate(header)}


def validate_and_process_user_prompt(text_prompt: str, image_path: str | None = None,
                                     mode: str = "t2v") -> tuple[list[str], list[str | None]]:
    """CLI prompt input: a prompt, or a .csv/.tsv file with a ``text_prompt`` column (and ``image_path`` for i2v).

    Returns (prompts, image paths), one image path per prompt (None where there is none).
    """
    if not isinstance(text_prompt, str):
        raise ValueError("the prompt must be a string")
    text_prompt = text_prompt.strip()
    if os.path.isfile(text_prompt):
        ext = os.path.splitext(text_prompt.lower())[1]
        if ext not in (".csv", ".tsv"):
            raise ValueError(f"unsupported prompt file type {ext!r}: only .csv and .tsv are read")
        table = _read_table(text_prompt, "," if ext == ".csv" else "\t")
        if "text_prompt" not in table:
            raise ValueError(f"{text_prompt}: no 'text_prompt' column")
        prompts = table["text_prompt"]
        if mode == "i2v" and "image_path" in table:
            paths = table["image_path"]
            missing = [p for p in paths if p and not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"{text_prompt}: image paths that do not exist: {missing[:3]}")
        else:
            if mode == "i2v":
                log.warning("%s has no image_path column: the prompts run without an image", text_prompt)
            paths = [None] * len(prompts)
        return prompts, paths
    if image_path is not None and not os.path.isfile(image_path):
        raise FileNotFoundError(f"image path {image_path!r} does not exist")
    return [text_prompt], [image_path]
