"""benchmarks/gpu_check.py keeps working without a GPU: its --dry mode runs every section's code at toy size on the
CPU, in a subprocess as a user would run it, and writes a JSON and a Markdown report naming every section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ("phases", "decode", "bf16_sdpa", "bf16_flash_attn", "lora", "block_swap", "compile", "fp8")
PHASES = ["load", "encode text", "diffusion", "release", "decode video", "decode audio"]
RUN_BOUND_S = 1800  # ends a hung run only; the dry run takes one to three minutes on two busy cores


def _run(out: Path, *extra: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=RUN_BOUND_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("gpu_check"))


def test_dry_run_measures_every_section(dry):
    report, md = dry
    meta, results = report["meta"], report["results"]
    assert meta["dry"] is True and sorted(results) == sorted(SECTIONS)
    # Every section the CPU can run does run: only flash-attn (GPU kernels) is not available.
    status = {k: v["status"] for k, v in results.items()}
    assert status == {**{k: "ok" for k in SECTIONS}, "bf16_flash_attn": "not available"}, {
        k: results[k].get("reason") for k in results}
    assert "CUDA or ROCm" in results["bf16_flash_attn"]["reason"]

    phases = results["phases"]
    assert [r["phase"] for r in phases["rows"]] == PHASES and phases["variant"] == "960x960_10s"
    assert all(r["peak"] is not None and r["allocated"] is not None for r in phases["rows"])
    decode = results["decode"]
    assert decode["complete"] and decode["output_shape"][2] == 1 + 4 * (decode["latent"][0] - 1)
    sdpa = results["bf16_sdpa"]
    assert sdpa["seconds_per_step"] > 0 and sdpa["reference_seconds_per_step"] > 0
    assert sdpa["max_rel_diff_vs_reference"] < 5e-2  # bf16: ours and the official order agree to rounding
    lora = results["lora"]
    assert lora["linears"] == 2 * 12 and lora["merge_seconds"] > 0 and lora["side_path_seconds_per_step"] > 0
    swap = results["block_swap"]
    assert swap["resident_layers"] == 1 and swap["cap_bytes"] is None and swap["ratio_to_all_gpu"] > 0
    comp = results["compile"]
    assert (comp["compiles"], comp["recompiles"]) == (1, 0) and comp["max_rel_diff_vs_eager"] < 5e-2
    fp8 = results["fp8"]
    assert fp8["linears"] == 2 * 2 * 12 and 0 < fp8["max_rel_diff_vs_bf16"] < 0.2

    assert md.startswith("# GPU check (DRY RUN")
    rows = [line.split(" | ")[0].removeprefix("| ") for line in md.splitlines() if line.startswith("| ")]
    assert set(SECTIONS) <= set(rows)
    assert "| bf16_flash_attn | not available |" in md and "| phases | release peak / allocated after |" in md
    assert "decode video" in md.split("All-GPU phase memory")[1]  # the MemoryReport table itself


def test_sections_that_do_not_fit_the_budget_say_so(tmp_path):
    report, md = _run(tmp_path, "--budget", "1", "--sections", "phases,bf16_sdpa,compile")
    results = report["results"]
    assert sorted(results) == ["bf16_sdpa", "compile", "phases"]
    for name, r in results.items():
        assert r["status"] == "skipped" and r["reason"].startswith("time budget"), (name, r)
    assert "| lora | status | not requested |" in md and "| compile | skipped | time budget" in md
