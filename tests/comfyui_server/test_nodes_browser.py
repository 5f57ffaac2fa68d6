"""The shipped UI-format workflows in the real ComfyUI frontend (headless Chromium): every node type exists, and
what the Run button would queue is exactly the API-format twin; the demo is queued from the UI and its
screenshot kept (tests/_artifacts/comfy/, and docs/screenshot_demo.png for the README)."""

from __future__ import annotations

import os
import shutil

from .harness import ROOT, PromptResult
from .nodes_helpers import UI_WORKFLOWS, WORKFLOWS, check_clip, load_workflow, output_videos, run_ui_jobs

DOCS_SCREENSHOT = ROOT / "docs" / "screenshot_demo.png"


def _twin(name: str) -> dict:
    """The API twin without titles (graphToPrompt adds its own _meta)."""
    api = load_workflow(name.replace(".json", "_api.json"))
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def twin_differences(queued: dict, twin: dict) -> list[str]:
    """How the prompt the frontend queues differs from the API twin, in what OUR workflows set: the same nodes and
    classes, and every input the twin sets with the twin's value. Newer cores and frontends may add to core nodes
    (CreateVideo gained an optional ``bit_depth``; frontends that send SaveVideo's ``format`` as a nested
    combo send ``codec`` as ``format.codec``), so a core node may carry inputs the twin does not set and an
    input may arrive under ``<parent>.<name>``; the pack's own nodes must match exactly."""
    problems = []
    if sorted(queued) != sorted(twin):
        problems.append(f"node ids {sorted(queued)} != {sorted(twin)}")
    for node_id in sorted(set(queued) & set(twin)):
        got, want = queued[node_id], twin[node_id]
        kind = want["class_type"]
        if got["class_type"] != kind:
            problems.append(f"{node_id}: class {got['class_type']} != {kind}")
            continue
        if kind.startswith("Ovi"):
            if got["inputs"] != want["inputs"]:
                problems.append(f"{node_id} {kind}: inputs {got['inputs']} != {want['inputs']}")
            continue
        for name, value in want["inputs"].items():
            keys = [k for k in got["inputs"] if k == name or k.endswith("." + name)]
            if not keys:
                problems.append(f"{node_id} {kind}: input {name} not queued (has {sorted(got['inputs'])})")
            elif all(got["inputs"][k] != value for k in keys):
                problems.append(f"{node_id} {kind}: {name} = {[got['inputs'][k] for k in keys]} != {value!r}")
    return problems


def test_twin_comparison_tolerates_what_newer_cores_add():
    twin = {"4": {"class_type": "OviDecode", "inputs": {"tile_size": 0, "latent": ["3", 0]}},
            "5": {"class_type": "CreateVideo", "inputs": {"images": ["4", 0], "fps": ["4", 2]}},
            "6": {"class_type": "SaveVideo", "inputs": {"video": ["5", 0], "format": "auto", "codec": "auto"}}}
    newer = {"4": {"class_type": "OviDecode", "inputs": {"tile_size": 0, "latent": ["3", 0]}},
             "5": {"class_type": "CreateVideo", "inputs": {"images": ["4", 0], "fps": ["4", 2], "bit_depth": 8}},
             "6": {"class_type": "SaveVideo", "inputs": {"video": ["5", 0], "format": "auto",
                                                         "format.codec": "auto"}}}
    assert twin_differences(twin, twin) == [] and twin_differences(newer, twin) == []
    changed = {**newer, "6": {"class_type": "SaveVideo", "inputs": {"video": ["5", 0], "format": "mp4",
                                                                    "format.codec": "auto"}}}
    assert twin_differences(changed, twin) == ["6 SaveVideo: format = ['mp4'] != 'auto'"]
    extra = {**newer, "4": {"class_type": "OviDecode", "inputs": {"tile_size": 0, "latent": ["3", 0], "x": 1}}}
    assert len(twin_differences(extra, twin)) == 1  # the pack's own nodes: exactly the twin's inputs
    missing = {k: v for k, v in newer.items() if k != "5"}
    assert twin_differences(missing, twin)[0].startswith("node ids")
    dropped = {**newer, "5": {"class_type": "CreateVideo", "inputs": {"images": ["4", 0]}}}
    assert twin_differences(dropped, twin) == ["5 CreateVideo: input fps not queued (has ['images'])"]


def test_every_ui_workflow_has_an_api_twin():
    assert len(UI_WORKFLOWS) >= 4 and "demo_tiny_t2av.json" in UI_WORKFLOWS
    for name in UI_WORKFLOWS:
        wf = load_workflow(name)
        assert wf["version"] == 0.4 and wf["last_node_id"] >= max(n["id"] for n in wf["nodes"])
        assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
        for node in wf["nodes"]:
            assert {"id", "type", "pos", "size", "inputs", "outputs", "widgets_values"} <= node.keys(), node
        assert (WORKFLOWS / name.replace(".json", "_api.json")).is_file(), name


def test_ui_workflows_load_in_the_frontend_and_queue_their_api_twin(comfy_server, comfy_models, browser):
    results = run_ui_jobs(comfy_server.url, [{"op": "to_api", "ui": str(WORKFLOWS / n)} for n in UI_WORKFLOWS])
    assert [r["ui"] for r in results] == UI_WORKFLOWS
    for r in results:
        assert r["unknown"] == [], (r["ui"], r["unknown"])
        assert any(t.startswith("Ovi") for t in r["types"]), r
        queued = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in r["output"].items()}
        assert twin_differences(queued, _twin(r["ui"])) == [], r["ui"]
        sampler = next(w for n, w in r["widgets"].items() if dict(w).get("solver"))
        assert dict(sampler)["control_after_generate"] == "fixed", r["ui"]  # shared workflows reproduce


def test_demo_queued_from_the_ui(comfy_server, comfy_models, browser, artifacts_dir):
    shot = artifacts_dir / "screenshot_demo.png"
    summary = browser(comfy_server.url, shot, workflow=WORKFLOWS / "demo_tiny_t2av.json", run=True)
    assert summary["missing_node_types"] == [] and summary["dialogs"] == [], summary
    prompt = summary["prompt"]
    assert prompt["status"] == "success", prompt
    (video,) = output_videos(comfy_server, PromptResult("success", outputs=prompt["outputs"])).values()
    check_clip(video, "720x720_5s", size=(160, 96))
    assert shot.stat().st_size > 50_000
    # The README's picture: written when missing, refreshed on request (it changes with every run's timings).
    if not DOCS_SCREENSHOT.exists() or os.environ.get("OVI_UPDATE_SCREENSHOT"):
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
