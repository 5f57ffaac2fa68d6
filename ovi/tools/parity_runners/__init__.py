"""Per-area parity runners, merged into the tables the parity tool dispatches on.

Each submodule may define:
- ``TENSOR_RUNNERS``: {kind: fn(Fixture) -> {output name: tensor}}
- ``CASE_RUNNERS``: {kind: fn(case dict) -> result} for JSON fixtures (compared exactly)
- ``MANIFEST_ANCHORS``: {component: key} a key whose presence identifies a full-size manifest
- ``MANIFEST_RUNNERS``: {component: fn({key: shape}) -> {key: shape} of our module built on meta}
- ``KEYMAP_RUNNERS``: {component: fn({official key: comfy key}) -> [problems]}
"""

from __future__ import annotations

import importlib

_AREAS = ("fusion", "sampling", "text", "wan_vae", "audio", "misc")

TENSOR_RUNNERS: dict = {}
CASE_RUNNERS: dict = {}
MANIFEST_ANCHORS: dict = {}
MANIFEST_RUNNERS: dict = {}
KEYMAP_RUNNERS: dict = {}

for _area in _AREAS:
    _mod = importlib.import_module(f"{__name__}.{_area}")
    for _table in ("TENSOR_RUNNERS", "CASE_RUNNERS", "MANIFEST_ANCHORS", "MANIFEST_RUNNERS", "KEYMAP_RUNNERS"):
        globals()[_table].update(getattr(_mod, _table, {}))


def identify_manifest(data: dict) -> str | None:
    """The component whose anchor key appears among the manifest's (or key map's) keys."""
    for component, anchor in MANIFEST_ANCHORS.items():
        if anchor in data:
            return component
    return None
