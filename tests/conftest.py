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
