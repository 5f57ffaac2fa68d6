"""Fixtures for tests against a real ComfyUI server and its frontend (see harness.py).

Without the set-up from `make comfy-env` these tests skip, unless COMFY_REQUIRED=1 (as `make test` and CI set
it): then they fail, so a broken install can never pass as "nothing to run".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .harness import (COMFY_DIR, PACK_NAMES, ROOT, ComfyServer, browser_problem, install_models, required,
                      run_browser, setup_problem)
from .nodes_helpers import CONVERTED, FASTWAN_LORA


def unavailable(reason: str):
    if required():
        pytest.fail(f"{reason} (COMFY_REQUIRED is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def comfy_install() -> Path:
    """The ComfyUI tree; skips (or fails under COMFY_REQUIRED=1) when it or its deps are missing."""
    problem = setup_problem()
    if problem:
        unavailable(problem)
    return COMFY_DIR


@pytest.fixture(scope="session")
def start_comfy(comfy_install, tmp_path_factory):
    """Factory: start_comfy(pack_name="ComfyUI-Ovi", extra_args=(), block_imports=(), env=None) -> a started
    ComfyServer with a fresh base directory. Stop it yourself when done (each costs ~0.9 GB); whatever is
    still running at the end of the session is stopped here."""
    started: list[ComfyServer] = []

    def start(pack_name: str = PACK_NAMES[0], **kwargs) -> ComfyServer:
        server = ComfyServer(tmp_path_factory.mktemp(f"comfy-{pack_name}-"), pack_name=pack_name, **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def comfy_server(start_comfy) -> ComfyServer:
    """The shared server of the session: the pack symlinked as custom_nodes/ComfyUI-Ovi, with latent previews
    on (the sampler sends one per step)."""
    server = start_comfy(PACK_NAMES[0], extra_args=("--preview-method", "latent2rgb"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """A complete tiny checkpoint set, written once per session by `python -m ovi.tools.make_tiny`, plus the
    FP8 / GGUF files of nodes_helpers.CONVERTED made from it by `python -m ovi convert`."""
    out = tmp_path_factory.mktemp("tiny-checkpoints")
    proc = subprocess.run([sys.executable, "-m", "ovi.tools.make_tiny", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"make_tiny failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    # The FP8 / GGUF workflows' files, made the way a user makes them, under the names the workflows use.
    for to, src, dst in CONVERTED:
        proc = subprocess.run([sys.executable, "-m", "ovi", "convert", "--to", to, str(out / src), str(out / dst)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            pytest.fail(f"ovi convert --to {to} {src} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


@pytest.fixture(scope="session")
def comfy_models(comfy_server, tiny_checkpoints) -> dict[str, list[str]]:
    """The tiny checkpoints placed in the shared server's models folder: {folder: [names]} for
    diffusion_models, text_encoders, vae, mmaudio and loras. ComfyUI rescans folders on use, so placing them
    after the start is enough."""
    from ovi.tools.tiny.lora import write_tiny_lora

    placed = install_models(comfy_server.models_dir, tiny_checkpoints)
    # the FastWan workflow's LoRA: a tiny Wan-convention LoRA for the tiny video branch, under the real name
    write_tiny_lora(comfy_server.models_dir / "loras" / FASTWAN_LORA)
    placed["loras"] = [FASTWAN_LORA]
    return placed


@pytest.fixture(scope="session")
def browser(comfy_install):
    """run_browser(url, screenshot, workflow=None, run=False, fit=False, timeout=90) -> summary dict;
    skips (or fails under COMFY_REQUIRED=1) when Chromium or playwright-core is missing."""
    problem = browser_problem()
    if problem:
        unavailable(problem)
    return run_browser


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """tests/_artifacts/comfy: screenshots and files worth keeping after the run (gitignored)."""
    path = ROOT / "tests" / "_artifacts" / "comfy"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used a server gets that server's log tail in its report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call"):
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, ComfyServer):
                report.sections.append((f"ComfyUI log tail ({name}, {value.log_path})", value.log_tail(80)))
