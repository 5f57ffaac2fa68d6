"""Our header metadata in fusion files (``ovi.config``, ``ovi.variant``), read and checked before anything is built.

The converters and the tiny-model tool write the exact config and the variant name into the header; a loader
trusts neither blindly: a corrupt value is a ``CheckpointError`` naming the file and the field, raised before a
model is built or an output file is opened.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from ..loading import CONFIG_METADATA_KEY, VARIANT_METADATA_KEY, CheckpointError
from ..variants import VARIANTS
from .config import ConfigError, FusionConfig

CORRUPT_HINT = "the header metadata is corrupt — re-convert the file or remove the metadata"
# A fusion config serialises to about 1 kB; a header value far above that is not one (and could nest deep
# enough to exhaust the JSON parser's recursion).
MAX_CONFIG_CHARS = 64 * 1024


def config_from_metadata(metadata: Mapping[str, str], path: str | os.PathLike | None) -> FusionConfig | None:
    """The config recorded under ``ovi.config`` (None when the header has none). Raises ``CheckpointError``
    for text that is not JSON, not a config object, or a config with a field of the wrong type or range."""
    if CONFIG_METADATA_KEY not in metadata:
        return None
    raw = metadata[CONFIG_METADATA_KEY]
    if not isinstance(raw, str) or len(raw) > MAX_CONFIG_CHARS:
        size = f"{len(raw)} characters" if isinstance(raw, str) else type(raw).__name__
        raise CheckpointError(path, f"{CONFIG_METADATA_KEY}: {size}, not a fusion config (at most "
                                    f"{MAX_CONFIG_CHARS} characters of JSON); {CORRUPT_HINT}")
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(path, f"{CONFIG_METADATA_KEY}: not valid JSON ({e}); {CORRUPT_HINT}") from None
    try:
        return FusionConfig.from_dict(parsed)
    except ConfigError as e:
        raise CheckpointError(path, f"{CONFIG_METADATA_KEY}: {e}; {CORRUPT_HINT}") from None


def check_config_matches_shapes(config: FusionConfig, shapes: Mapping[str, tuple[int, ...]],
                                path: str | os.PathLike | None) -> None:
    """Raise ``CheckpointError`` naming every field of the recorded ``config`` that the tensor ``shapes``
    (keyed ``video_model.``/``audio_model.``) contradict."""
    wrong = config.shape_mismatches(shapes)
    if wrong:
        raise CheckpointError(path, f"{CONFIG_METADATA_KEY} disagrees with the tensors: {'; '.join(wrong)}; "
                                    f"{CORRUPT_HINT}")


def variant_from_metadata(metadata: Mapping[str, str], path: str | os.PathLike | None) -> str | None:
    """The variant name recorded under ``ovi.variant`` (None when the header has none). Raises
    ``CheckpointError`` naming the known variants for any other value."""
    if VARIANT_METADATA_KEY not in metadata:
        return None
    name = metadata[VARIANT_METADATA_KEY]
    if not isinstance(name, str) or name not in VARIANTS:
        raise CheckpointError(path, f"{VARIANT_METADATA_KEY}={name!r} is not a known variant (known: "
                                    f"{', '.join(VARIANTS)}); {CORRUPT_HINT}")
    return name


def check_fusion_metadata(metadata: Mapping[str, str], path: str | os.PathLike | None,
                          shapes: Mapping[str, tuple[int, ...]] | None = None) -> FusionConfig | None:
    """Check ``ovi.config`` and ``ovi.variant`` of one file (and the config against ``shapes`` when given);
    returns the config, None when there is none."""
    config = config_from_metadata(metadata, path)
    variant_from_metadata(metadata, path)
    if config is not None and shapes is not None:
        check_config_matches_shapes(config, shapes, path)
    return config
