from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = ROOT / "tests" / "fixtures" / "parity"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY_DIR


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """One tiny checkpoint set (make_tiny, seed 0) shared by every test of the session."""
    from ovi.tools.make_tiny import make_tiny

    d = tmp_path_factory.getbasetemp() / "ovi_tiny_models"
    if not (d / "tiny_manifest.json").is_file():
        make_tiny(d, seed=0)
    return d
