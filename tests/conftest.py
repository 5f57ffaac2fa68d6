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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny tensors: with other jobs on a 2-core machine, OpenMP thread
    contention costs far more than the parallelism gains (a tiny window's decode takes 5-10x longer on 2 busy
    threads than on 1)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
