"""Fewer model passes: one pass per step at guidance 1, and the step cache (its arithmetic, threshold 0,
skipped steps) on the tiny fusion model, counting the model calls."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from ovi.sampling.guidance import needs_negative_pass
from ovi.sampling.schedules import make_schedule
from ovi.sampling.stats import SamplingStats
from ovi.sampling.step_cache import FULL_STEPS_AT_START, StepCache
from tiny_sampling import GUIDE, STEPS, inputs, load_tiny, reference_sample, run_sample

CACHE_STEPS = 6  # the first two and the last step always run, so three can be cached


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_tiny(tiny_dir)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding carried through a few solver steps."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_negative_pass_decision():
    assert not needs_negative_pass(1.0, 1.0) and not needs_negative_pass(1, 1)
    assert needs_negative_pass(1.0, 3.0) and needs_negative_pass(4.0, 1.0) and needs_negative_pass(0.0, 0.0)


def test_guidance_one_runs_one_pass_per_step(model, caplog):
    inp = inputs()
    ref_v, ref_a = reference_sample(model, inp, steps=STEPS, video_guidance=1.0, audio_guidance=1.0)
    calls, stats = [], SamplingStats()
    with caplog.at_level(logging.INFO, logger="ovi"):
        video, audio = run_sample(model, inp, calls, video_guidance=1.0, audio_guidance=1.0, stats=stats)
    assert len(calls) == STEPS and all(slg == 0 for _, _, slg in calls)  # positive passes only: half the calls
    assert _close(video, ref_v) and _close(audio, ref_a)
    assert (stats.passes_per_step, stats.passes_run, stats.passes_skipped) == (1, STEPS, STEPS)
    assert "one model pass per step" in caplog.text
    # One scale away from 1 keeps the negative pass.
    calls = []
    run_sample(model, inp, calls, video_guidance=1.0, audio_guidance=3.0)
    assert len(calls) == 2 * STEPS


def test_step_cache_arithmetic():
    # Inputs and outputs of two full steps give the rate; the third step's estimate is rate * relative input change.
    x0, x1, x2 = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]), torch.tensor([2.5, 3.0])
    o0, o1 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.5])
    rate = (0.5 / 1.0) / (1.0 / 5.0)
    estimate = rate * 0.5 / math.sqrt(18.0)
    for threshold, runs in ((estimate * 1.01, False), (estimate * 0.99, True)):
        cache = StepCache(threshold, steps=5, full_at_start=2)
        assert cache.should_run(0, [x0])  # forced: the first steps
        cache.store([x0], [o0])
        assert cache.should_run(1, [x1])
        cache.store([x1], [o1])
        assert cache.rates == [pytest.approx(rate)]
        assert cache.should_run(2, [x2]) is runs
        assert cache.accumulated == [pytest.approx(estimate)]
    assert torch.equal(cache.reuse([x2])[0], x2 + (o1 - x1))  # the last full step's output - input
    # The last step always runs; threshold 0 always runs and keeps nothing.
    cache = StepCache(1e9, steps=3, full_at_start=2)
    for k, x, o in ((0, x0, o0), (1, x1, o1)):
        cache.should_run(k, [x])
        cache.store([x], [o])
    assert cache.should_run(2, [x2])
    off = StepCache(0.0, steps=3)
    assert not off.enabled and all(off.should_run(k, [x0]) for k in range(3)) and off.last_in is None
    with pytest.raises(ValueError):
        StepCache(-0.1, steps=3)
    with pytest.raises(ValueError):
        StepCache(float("nan"), steps=3)


def test_cache_threshold_zero_is_bit_identical(model):
    inp = inputs()
    ref_v, ref_a = reference_sample(model, inp, steps=CACHE_STEPS, **GUIDE)
    calls, stats = [], SamplingStats()
    video, audio = run_sample(model, inp, calls, steps=CACHE_STEPS, cache_threshold=0.0, stats=stats)
    assert torch.equal(video, ref_v) and torch.equal(audio, ref_a)
    assert len(calls) == 2 * CACHE_STEPS and stats.cached_steps == [] and stats.passes_skipped == 0


@pytest.fixture(scope="module")
def uncached(model):
    return run_sample(model, inputs(), steps=CACHE_STEPS)


# On the random tiny model the rate is large (~10-20): 0.05 skips nothing, 1.5 skips one step, 1e6 all it may.
@pytest.mark.parametrize("threshold", [0.05, 1.5, 1e6])
def test_cache_skips_steps_but_not_the_first_and_last(model, uncached, threshold, caplog):
    inp = inputs()
    calls, stats = [], SamplingStats()
    with caplog.at_level(logging.INFO, logger="ovi"):
        video, audio = run_sample(model, inp, calls, steps=CACHE_STEPS, cache_threshold=threshold, stats=stats)
    timesteps = make_schedule("unipc", CACHE_STEPS, 5.0).timesteps.tolist()
    called = sorted({timesteps.index(t) for t, _, _ in calls})
    skipped = stats.cached_steps
    # Every full step ran both passes, every cached step none; the counts add up to the default loop's.
    assert called == sorted(set(range(CACHE_STEPS)) - set(skipped))
    assert len(calls) == stats.passes_run == 2 * (CACHE_STEPS - len(skipped))
    assert stats.passes_run + stats.passes_skipped == 2 * CACHE_STEPS
    assert all(FULL_STEPS_AT_START <= k < CACHE_STEPS - 1 for k in skipped)
    assert f"{len(skipped)} of {CACHE_STEPS} steps reused" in caplog.text
    if threshold >= 1e6:  # big enough: everything between the forced steps is cached
        assert skipped == list(range(FULL_STEPS_AT_START, CACHE_STEPS - 1))
    ref_v, ref_a = uncached
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()
    if skipped:
        assert not torch.equal(video, ref_v)
    else:
        assert torch.equal(video, ref_v) and torch.equal(audio, ref_a)
