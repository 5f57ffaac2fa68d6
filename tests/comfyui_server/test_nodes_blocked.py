"""With flash_attn, sageattention and gguf made uninstalled (an import shim), ComfyUI still lists every Ovi node
with the same interface, a generation runs, and asking for a missing backend is a clear error on that node."""

from __future__ import annotations

import pytest

from .harness import OPTIONAL_IMPORTS, install_models
from .nodes_helpers import NODES, error_text, graph


@pytest.fixture(scope="module")
def blocked_server(start_comfy, tiny_checkpoints):
    server = start_comfy(block_imports=OPTIONAL_IMPORTS)
    install_models(server.models_dir, tiny_checkpoints)
    yield server
    server.stop()


def test_every_node_listed_with_optional_imports_blocked(blocked_server, comfy_server):
    assert "[ovi-test] imports blocked: flash_attn,sageattention,gguf" in blocked_server.log_text()
    assert blocked_server.pack_import_problems() == []
    ours = blocked_server.pack_nodes()
    assert sorted(ours) == sorted(NODES)
    full = comfy_server.pack_nodes()
    for name in NODES:  # same inputs and outputs as with everything installed (file lists aside)
        assert list(ours[name]["input"]["required"]) == list(full[name]["input"]["required"])
        assert ours[name]["output"] == full[name]["output"]


def test_generation_runs_without_optional_packages(blocked_server):
    result = blocked_server.run_prompt(graph("blocked_ok", decode=False))
    assert result.ok, result.summary()
    assert result.outputs["5"]["latents"]


@pytest.mark.parametrize("backend, words", [("sage", ["'sage'", "pip install sageattention"]),
                                            ("flash_attn", ["'flash_attn'", "pip install flash-attn"])])
def test_missing_attention_backend_is_an_error_on_the_node(blocked_server, backend, words):
    result = blocked_server.run_prompt(graph(f"blocked_{backend}", decode=False, engine={"attention": backend}))
    assert result.status == "error" and result.error["node_type"] == "OviEngineLoader", result.summary()
    text = error_text(result)
    assert all(w in text for w in words), text
