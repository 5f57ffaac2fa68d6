"""Model passes and wall time per generation for the speed options, each against the default measured in the same run.

    python benchmarks/speed.py [--models tiny,full] [--full-steps 50] [--thresholds 0.05,0.1] [--no-compile]
                               [--json FILE]

A generation here is the sampling loop (``ovi.sampling.loop.sample``) over the fusion model, from the seeded noise
to the final latents, with fixed random text contexts: the text encoder and the VAE decode are the same for every
option and are left out. The options:

* ``default``: 50 steps of UniPC, shift 5, video / audio guidance 4 / 3: two model passes per step;
* ``guidance 1``: the same steps with both guidance scales 1: one pass per step (no negative pass);
* ``FastWan steps``: Wan2GP's FastWan recipe, 6 steps, guidance 1, shift 6, one pass per step. Without the
  distillation LoRA (these are random weights) its output is not meant to match the default: the row gives the
  cost of the recipe, the LoRA gives it its quality;
* ``step cache T``: the default with the step cache at threshold T (``ovi.sampling.step_cache``);
* ``compile``: the default with the fused layer compiled (``ovi.compile``); the compile itself is done in a
  warm-up generation before the timed one and reported on its own.

Models, float32 on the CPU, random weights (``benchmarks/engine.py``'s ``randomize``):

* ``tiny``: the tiny test model (2 fused layers, 256 wide), 124 video + 157 audio tokens (64x64, 121 frames);
* ``full``: a REDUCED full-width model: the real layer (dim 3072, 24 heads, FFN 14336, 1.07 B parameters with
  the embeddings and heads) but 1 fused layer, 32 video + 16 audio tokens and a 64-token text context; a pass
  takes seconds, so ``--full-steps`` (default 12) sets its step count, and every option but FastWan (6 steps)
  runs that many.

SLG is off in every option (``slg_layer`` 0): on the 30-layer model the negative pass skips 1 layer of 30, on a
1- or 2-layer model it would skip half or all of it and make the negative pass look cheap. The output difference
is the relative L2 distance ||x - x_default|| / ||x_default|| of the final video and audio latents. Step-cache
skips depend on how the model's output moves from step to step, which random weights do not reproduce: on the
tiny model the rate the cache measures (relative output change per relative input change) is 5-80 and the
per-step estimate ~0.3-0.8, so the default thresholds (0.7, 1.0) are ones that engage on these models, not
advice; the skip counts at usable thresholds need the real model.

Times are wall seconds with one torch thread (``--threads``; CPU seconds beside them): on a 2-core machine shared
with other work, two threads spend much of a step waiting for each other. The tiny model's rows are the median of
three runs taken round the options.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from engine import randomize  # noqa: E402  (benchmarks/engine.py)
from ovi import compile as ovi_compile  # noqa: E402
from ovi.fusion.config import OVI_FUSION_CONFIG, FusionConfig  # noqa: E402
from ovi.fusion.model import FusionModel  # noqa: E402
from ovi.sampling.loop import sample  # noqa: E402
from ovi.sampling.stats import SamplingStats  # noqa: E402
from ovi.tools.tiny.fusion import TINY_CONFIG  # noqa: E402

DEFAULT_STEPS = 50
FULL_STEPS = 12  # the full-width model's steps: 50 would take half an hour on two cores
FASTWAN = dict(steps=6, video_guidance=1.0, audio_guidance=1.0, shift=6.0)  # Wan2GP's FastWan preset for Ovi 1.0
# On random weights the cache's per-step estimate is ~0.3-0.8 (0.05-0.5 skip nothing on the tiny model): thresholds
# that engage on these models, not advice.
DEFAULT_THRESHOLDS = (0.7, 1.0)
DEFAULT_THREADS = 1  # one torch thread: on a 2-core machine shared with other work, two threads wait on each other
TINY_REPEATS = 3  # the tiny model's generations take seconds: median of three
FULL_TEXT_LEN = 64  # the full-width model's text context (512 released): its K/V projections would dominate 48 tokens


@dataclass(frozen=True)
class Bench:
    """One model: its config and the latent shapes of a generation."""

    name: str
    config: FusionConfig
    video_shape: tuple[int, int, int, int]   # [48, F, h, w] latent
    audio_tokens: int
    text_tokens: int                          # non-zero rows of each (zero-padded) context
    description: str


def benches(which: list[str]) -> list[Bench]:
    full_cfg = FusionConfig(replace(OVI_FUSION_CONFIG.video, num_layers=1, text_len=FULL_TEXT_LEN),
                            replace(OVI_FUSION_CONFIG.audio, num_layers=1, text_len=FULL_TEXT_LEN))
    table = {
        "tiny": Bench("tiny", TINY_CONFIG, (48, 31, 4, 4), 157, 40,
                      "tiny model: 2 fused layers, dim 256; 124 video + 157 audio tokens"),
        "full": Bench("full", full_cfg, (48, 2, 8, 8), 16, 30,
                      f"REDUCED full-width model: 1 fused layer, dim 3072, 24 heads, FFN 14336; 32 video + 16 audio "
                      f"tokens, {FULL_TEXT_LEN}-token text context"),
    }
    return [table[w] for w in which]


@dataclass
class Row:
    model: str
    option: str
    steps: int
    passes_run: int
    passes_skipped: int
    seconds: float
    cpu_seconds: float
    video_rel_l2: float = 0.0
    audio_rel_l2: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)


def build(bench: Bench, seed: int = 0) -> FusionModel:
    with torch.device("meta"):
        model = FusionModel(bench.config)
    randomize(model, torch.device("cpu"), torch.float32, seed=seed)
    model.compute_dtype = torch.float32
    return model.eval().requires_grad_(False)


def contexts(bench: Bench, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim = bench.config.video.text_dim
    return {k: torch.randn(bench.text_tokens, dim, generator=g) for k in ("pos", "vneg", "aneg")}


def noise(bench: Bench, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(bench.video_shape, generator=g),
            torch.randn(bench.audio_tokens, bench.config.audio.in_dim, generator=g))


def generate(model: FusionModel, bench: Bench, *, steps: int, video_guidance: float = 4.0,
             audio_guidance: float = 3.0, shift: float = 5.0, cache: float = 0.0):
    """(video, audio, SamplingStats, wall seconds, CPU seconds) of one generation."""
    ctx = contexts(bench)
    video, audio = noise(bench)
    stats = SamplingStats()

    def model_fn(v, a, t, vctx, actx, clean, slg):
        return model(v, a, t, vctx, actx, first_frame_is_clean=clean, slg_layer=slg)

    t0, c0 = time.perf_counter(), time.process_time()
    out_v, out_a = sample(model_fn, video, audio, pos_ctx=ctx["pos"], video_neg_ctx=ctx["vneg"],
                          audio_neg_ctx=ctx["aneg"], steps=steps, shift=shift, video_guidance=video_guidance,
                          audio_guidance=audio_guidance, slg_layer=0, cache_threshold=cache, stats=stats)
    return out_v, out_a, stats, time.perf_counter() - t0, time.process_time() - c0


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def run_bench(bench: Bench, steps: int, thresholds: tuple[float, ...], do_compile: bool) -> list[Row]:
    """Every option on one model. Repeats go round the options (not option by option), so a busy spell of the
    machine lands on all of them alike."""
    repeats = TINY_REPEATS if bench.name == "tiny" else 1
    t0 = time.perf_counter()
    model = build(bench)
    print(f"{bench.description}: built in {time.perf_counter() - t0:.1f} s", flush=True)
    generate(model, bench, steps=2)  # warm-up: allocator, RoPE tables

    options: list[tuple[str, dict, bool]] = [
        ("default", dict(steps=steps), False),
        ("guidance 1 (single pass)", dict(steps=steps, video_guidance=1.0, audio_guidance=1.0), False),
        ("FastWan steps (6, guidance 1, shift 6)", dict(FASTWAN), False)]
    options += [(f"step cache {th:g}", dict(steps=steps, cache=th), False) for th in thresholds]
    layer, compile_note = None, ""
    if do_compile:
        ovi_compile.reset()  # this model's compile is a first compile, whatever the previous model compiled
        layer = ovi_compile.CompiledLayer()
        ovi_compile.use_compiled(model, layer)
        t0 = time.perf_counter()
        generate(model, bench, steps=2)  # compiles (every layer and both passes share the graph)
        compile_note = (f"compiled in {layer.compile_seconds:.1f} s during a {time.perf_counter() - t0:.1f} s "
                        f"warm-up generation (not in the time)")
        options.append(("compile", dict(steps=steps), True))
    runs: dict[str, list] = {name: [] for name, _, _ in options}
    for _ in range(repeats):
        for name, kw, compiled in options:
            ovi_compile.use_compiled(model, layer if compiled else None)
            runs[name].append(generate(model, bench, **kw))
            print(f"  {name}: {runs[name][-1][3]:.2f} s, {runs[name][-1][2].passes_run} passes", flush=True)
    ovi_compile.use_compiled(model, None)

    rows: list[Row] = []
    ref = runs["default"][0][:2]
    for name, _, compiled in options:
        v, a, stats, _, _ = runs[name][0]
        note = f"cached steps {stats.cached_steps}" if stats.cached_steps else ""
        if compiled:
            note = f"{compile_note}; {layer.compiles} compile, {layer.recompiles} recompiles"
        rows.append(Row(bench.name, name, stats.steps, stats.passes_run, stats.passes_skipped,
                        statistics.median(r[3] for r in runs[name]), statistics.median(r[4] for r in runs[name]),
                        rel_l2(v, ref[0]), rel_l2(a, ref[1]), note=note,
                        extra=layer.counts() if compiled else {}))
    return rows


def table(rows: list[Row]) -> str:
    base = {r.model: r for r in rows if r.option == "default"}
    out = ["| model | option | steps | passes run / skipped | wall s / CPU s per generation | time vs default "
           "(wall) | passes vs default | rel. L2 video / audio vs default | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r.model]
        out.append(f"| {r.model} | {r.option} | {r.steps} | {r.passes_run} / {r.passes_skipped} | "
                   f"{r.seconds:.2f} / {r.cpu_seconds:.2f} | {r.seconds / b.seconds:.2f}x "
                   f"({b.seconds / r.seconds:.1f}x faster) | {r.passes_run / b.passes_run:.2f} | "
                   f"{r.video_rel_l2:.2e} / {r.audio_rel_l2:.2e} | {r.note} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,full", help="comma list of tiny, full")
    ap.add_argument("--full-steps", type=int, default=FULL_STEPS,
                    help="steps of the full-width model's default (and its other options)")
    ap.add_argument("--thresholds", default=",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args(argv)
    which = [m.strip() for m in a.models.split(",") if m.strip()]
    thresholds = tuple(float(t) for t in a.thresholds.split(",") if t.strip())
    do_compile = not a.no_compile
    torch.set_num_threads(a.threads)
    if do_compile:
        problem = ovi_compile.compile_problem(torch.device("cpu"))
        if problem:
            print(f"compile: not measured ({problem})")
            do_compile = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU only, float32\n", flush=True)
    t0 = time.perf_counter()
    rows = []
    for bench in benches(which):
        steps = a.full_steps if bench.name == "full" else DEFAULT_STEPS
        rows += run_bench(bench, steps, thresholds, do_compile)
    print("\n" + table(rows))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
