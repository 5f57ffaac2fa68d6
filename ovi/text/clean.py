"""The umT5 tokenizer's text cleaning (Wan/Ovi ``clean='whitespace'``), applied to every prompt before tokenization."""

from __future__ import annotations

import html
import re

# Unicode's White_Space property, spelled out: the official cleaning collapses runs of the `regex` module's
# ``\s`` (which is this set), and Python's ``re`` ``\s`` differs from it (it adds U+001C-U+001F).
WHITE_SPACE = (
    "\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
)
_WS_RUN = re.compile(f"[{WHITE_SPACE}]+")


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError as e:  # the cleaning must match the official one exactly, so there is no fallback
        raise ImportError("The umT5 prompt cleaning needs the 'ftfy' package (pip install ftfy).") from e
    return ftfy.fix_text(text)


def basic_clean(text: str) -> str:
    """ftfy repair, then HTML entities unescaped twice (so '&amp;lt;' becomes '<'), then strip."""
    text = _fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def collapse_whitespace(text: str) -> str:
    """Every run of Unicode White_Space becomes one space; the ends are trimmed with ``str.strip`` as officially."""
    return _WS_RUN.sub(" ", text).strip()


def whitespace_clean(text: str) -> str:
    """The exact text umT5 tokenizes for ``text`` (ftfy, unescape x2, strip, collapse White_Space, strip)."""
    return collapse_whitespace(basic_clean(text))
