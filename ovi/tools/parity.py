"""Run reference fixtures and key manifests and report whether this implementation reproduces them.

    python -m ovi.tools.parity FILE [FILE ...]

One line per file: ``NAME kind=KIND max_rel=X tol=Y PASS|FAIL|SKIP``; the exit status is non-zero
when any file fails. Everything (module sizes, shapes, steps, cases) is read from the file itself,
and weights go through the project's real loaders.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..loading import CheckpointReader
from .parity_runners import CASE_RUNNERS, KEYMAP_RUNNERS, MANIFEST_RUNNERS, TENSOR_RUNNERS, identify_manifest

WEIGHTS_ONLY_KINDS = {"fusion_tiny_weights"}


@dataclass
class Fixture:
    """A tensor fixture: inputs, expected outputs, metadata, and where its weights live."""

    path: Path
    meta: dict
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    weights_path: Path
    weights_prefix: str = "weights/"

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})

    @property
    def args(self) -> dict:
        return self.meta.get("args", {})

    def weights(self) -> CheckpointReader:
        """The fixture's weights through the project's checkpoint reader (``weights/`` prefix stripped)."""
        return CheckpointReader(self.weights_path, prefix=self.weights_prefix)


@dataclass
class Result:
    name: str
    kind: str
    max_rel: float
    tol: float
    status: str  # PASS, FAIL or SKIP
    detail: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.name} kind={self.kind} max_rel={self.max_rel:.3g} tol={self.tol:.3g} {self.status}"


def load_fixture(path: Path) -> Fixture:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        meta = json.loads(md["fixture"])
        inputs, outputs = {}, {}
        for k in f.keys():
            if k.startswith("inputs/"):
                inputs[k[len("inputs/"):]] = f.get_tensor(k)
            elif k.startswith("outputs/"):
                outputs[k[len("outputs/"):]] = f.get_tensor(k)
    weights_file = meta.get("weights_file") or md.get("weights_file")
    weights_path = path.parent / weights_file if weights_file else path
    return Fixture(path=path, meta=meta, inputs=inputs, outputs=outputs, weights_path=weights_path)


def compare_tensors(name: str, ours: torch.Tensor, ref: torch.Tensor, rel: float) -> tuple[float, bool, str]:
    """(relative error, ok, message) under the pass rule max|ours-ref| <= rel*max|ref|."""
    ours = torch.as_tensor(ours).detach().cpu()
    if tuple(ours.shape) != tuple(ref.shape):
        return math.inf, False, f"{name}: shape {list(ours.shape)} != reference {list(ref.shape)}"
    if not ref.is_floating_point():
        ok = ours.dtype == ref.dtype and torch.equal(ours, ref)
        return (0.0 if ok else math.inf), ok, f"{name}: integer output {'matches' if ok else 'differs'}" + (
            "" if ours.dtype == ref.dtype else f" (dtype {ours.dtype} != {ref.dtype})")
    diff = (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    r = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    if math.isnan(r):
        r = math.inf
    return r, r <= rel, f"{name}: max_rel={r:.3g} tol={rel:.3g}"


def _tolerance(meta: dict, name: str) -> float:
    tol = meta.get("tolerance", {})
    return float(tol.get("per_output", {}).get(name, tol.get("rel", 0.0)))


def run_tensor_fixture(path: Path) -> Result:
    fx = load_fixture(path)
    kind = fx.kind
    if kind in WEIGHTS_ONLY_KINDS or (not fx.outputs and not fx.inputs):
        return Result(path.stem, kind, 0.0, 0.0, "SKIP", ["weights only"])
    runner = TENSOR_RUNNERS.get(kind)
    if runner is None:
        return Result(path.stem, kind, math.inf, 0.0, "FAIL", [f"no runner for kind {kind!r}"])
    with torch.no_grad():
        ours = runner(fx)
    worst, tol_of_worst, ok_all, detail = 0.0, _tolerance(fx.meta, ""), True, []
    for name, ref in fx.outputs.items():
        rel = _tolerance(fx.meta, name)
        if name not in ours:
            ok_all = False
            detail.append(f"{name}: not produced")
            worst = math.inf
            continue
        r, ok, msg = compare_tensors(name, ours[name], ref, rel)
        detail.append(msg)
        ok_all &= ok
        if r >= worst:
            worst, tol_of_worst = r, rel
    return Result(path.stem, kind, worst, tol_of_worst, "PASS" if ok_all else "FAIL", detail)


def _normalise(value: Any) -> Any:
    """JSON view of a Python result (tuples become lists) so it compares with the fixture exactly."""
    return json.loads(json.dumps(value))


def run_case(runner: Callable[[dict], Any], case: dict) -> tuple[bool, str]:
    expected = case.get("expected")
    raises = expected.get("raises") if isinstance(expected, dict) and set(expected) == {"raises"} else None
    try:
        got = runner(case)
    except Exception as e:  # the fixture may expect exactly this exception
        if raises is not None and type(e).__name__ == raises:
            return True, ""
        return False, f"raised {type(e).__name__}: {e}"
    if raises is not None:
        return False, f"expected {raises}, got {got!r}"
    got = _normalise(got)
    return (got == expected), ("" if got == expected else f"got {got!r}, expected {expected!r}")


def run_json_fixture(path: Path, data: dict) -> Result:
    kind = data["kind"]
    runner = CASE_RUNNERS.get(kind)
    if runner is None:
        return Result(path.stem, kind, math.inf, 0.0, "FAIL", [f"no runner for kind {kind!r}"])
    failures = []
    for i, case in enumerate(data["cases"]):
        ok, msg = run_case(runner, case)
        if not ok:
            failures.append(f"case {i} {json.dumps(case.get('fn') or case.get('args'))[:160]}: {msg[:400]}")
    n = len(data["cases"])
    res = Result(path.stem, kind, (len(failures) / n if n else 0.0) if not failures else math.inf, 0.0,
                 "FAIL" if failures else "PASS", failures or [f"{n} cases match exactly"])
    if not failures:
        res.max_rel = 0.0
    return res


def run_manifest(path: Path, data: dict) -> Result:
    component = identify_manifest(data)
    runner = MANIFEST_RUNNERS.get(component) if component else None
    if runner is None:
        return Result(path.stem, "manifest", math.inf, 0.0, "FAIL", ["no known component matches these keys"])
    expected = {k: tuple(v[0]) for k, v in data.items()}
    ours = runner(expected)  # {key: shape} of our module built on meta from the inferred configuration
    missing = [k for k in expected if k not in ours]
    extra = [k for k in ours if k not in expected]
    wrong = [k for k in expected if k in ours and tuple(ours[k]) != expected[k]]
    ok = not (missing or extra or wrong)
    detail = [f"component={component} keys={len(expected)}"]
    if missing:
        detail.append(f"missing {len(missing)}: {missing[:5]}")
    if extra:
        detail.append(f"extra {len(extra)}: {extra[:5]}")
    if wrong:
        detail.append(f"shape mismatch {len(wrong)}: {[(k, ours[k], expected[k]) for k in wrong[:3]]}")
    return Result(path.stem, f"manifest:{component}", 0.0 if ok else math.inf, 0.0, "PASS" if ok else "FAIL", detail)


def run_keymap(path: Path, data: dict) -> Result:
    mapping = data.get("mapping") or data.get("map") or {}
    component = identify_manifest({k: None for k in mapping})
    runner = KEYMAP_RUNNERS.get(component) if component else None
    if runner is None:
        return Result(path.stem, "keymap", math.inf, 0.0, "FAIL", ["no known component matches these keys"])
    errors = runner(mapping)  # list of problems: our Comfy-layout adapter vs this map
    ok = not errors
    return Result(path.stem, f"keymap:{component}", 0.0 if ok else math.inf, 0.0, "PASS" if ok else "FAIL",
                  errors[:10] or [f"component={component} {len(mapping)} keys map as stated"])


def run_file(path: str | Path) -> Result:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return run_tensor_fixture(path)
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "cases" in data and "kind" in data:
            return run_json_fixture(path, data)
        if isinstance(data, dict) and ("mapping" in data or "map" in data):
            return run_keymap(path, data)
        if isinstance(data, dict) and data and all(isinstance(v, list) and len(v) == 2 for v in data.values()):
            return run_manifest(path, data)
        return Result(path.stem, "unknown", math.inf, 0.0, "FAIL", ["not a fixture, manifest or key map"])
    except Exception as e:  # a crash is a failure of that file, not of the whole run
        return Result(path.stem, "error", math.inf, 0.0, "FAIL",
                      [f"{type(e).__name__}: {e}"] + traceback.format_exc().splitlines()[-6:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovi.tools.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("-v", "--verbose", action="store_true", help="print per-output details")
    a = p.parse_args(argv)
    # One line per file: the engine's own warnings (e.g. a CSV case without images) would interleave with it.
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    failed = 0
    for f in a.files:
        r = run_file(f)
        print(r.line(), flush=True)
        if a.verbose or r.status == "FAIL":
            for d in r.detail:
                print(f"    {d}", flush=True)
        failed += r.status == "FAIL"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
