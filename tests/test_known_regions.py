"""Known regions in the sampling loop on the tiny fusion model: clean and renoised video frames and audio
tokens, against today's T2AV and I2AV loops, the renoise formula and the timesteps the model sees."""

from __future__ import annotations

import pytest
import torch

from ovi.fusion.model import CleanTokens
from ovi.sampling.known import KnownRegion, index_mask, range_mask, renoise_noise
from ovi.sampling.schedules import make_schedule
from tiny_sampling import FRAMES, GUIDE, STEPS, TOKENS, inputs, known_latents, load_tiny, reference_sample, run_sample

KNOWN_FRAMES = [1, 2]          # in the middle of the 4 latent frames
KNOWN_TOKENS = (4, 8)          # a time range in the middle of the 12 audio tokens


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_tiny(tiny_dir)


def _region_masks():
    return index_mask(FRAMES, KNOWN_FRAMES), range_mask(TOKENS, *KNOWN_TOKENS)


@pytest.fixture(scope="module")
def t2av(model):
    """Today's T2AV loop on ``inputs()`` (the reference) and the loop without known regions."""
    inp = inputs()
    return reference_sample(model, inp, steps=STEPS, **GUIDE), run_sample(model, inp)


def test_no_known_region_is_todays_t2av(model, t2av):
    inp = inputs()
    (ref_v, ref_a), (video, audio) = t2av
    assert torch.equal(video, ref_v) and torch.equal(audio, ref_a)
    # Regions that mark nothing are no regions: same bits, and the model is never told about clean tokens.
    kv, ka = known_latents()
    calls = []
    video, audio = run_sample(model, inp, calls,
                           video_known=KnownRegion(kv, torch.zeros(FRAMES, dtype=torch.bool), "clean"),
                           audio_known=KnownRegion(ka, torch.zeros(TOKENS, dtype=torch.bool), "clean"))
    assert torch.equal(video, ref_v) and torch.equal(audio, ref_a)
    assert len(calls) == 2 * STEPS and all(clean is False for _, clean, _ in calls)


def test_video_frame0_clean_is_todays_i2av(model):
    inp = inputs()
    kv, _ = known_latents()
    image_latent = kv[:, :1].clone()
    ref_v, ref_a = reference_sample(model, inp, steps=STEPS, image_latent=image_latent, **GUIDE)
    i2v_v, i2v_a = run_sample(model, inp, image_latent=image_latent)
    assert torch.equal(i2v_v, ref_v) and torch.equal(i2v_a, ref_a)
    frame0 = index_mask(FRAMES, [0])
    # The known part alone with the mode given, and the full latent (other frames ignored) with the default.
    for region in (KnownRegion(image_latent, frame0, "clean"), KnownRegion(kv, frame0)):
        video, audio = run_sample(model, inp, video_known=region)
        assert torch.equal(video, ref_v) and torch.equal(audio, ref_a)


@pytest.mark.parametrize("video_mode,audio_mode", [("clean", "clean"), ("renoise", "renoise"),
                                                   ("clean", "renoise"), ("renoise", "clean")])
def test_known_regions_are_exact_at_the_end(model, t2av, video_mode, audio_mode):
    inp = inputs()
    kv, ka = known_latents()
    fm, tm = _region_masks()
    _, (free_v, free_a) = t2av
    video, audio = run_sample(model, inp, video_known=KnownRegion(kv, fm, video_mode),
                           audio_known=KnownRegion(ka, tm, audio_mode), known_seed=5)
    assert torch.equal(video[:, fm], kv[:, fm]) and torch.equal(audio[tm], ka[tm])
    # The rest is generated, finite, and conditioned on the regions (it is not the unconstrained result).
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()
    assert not torch.equal(video[:, ~fm], free_v[:, ~fm]) and not torch.equal(audio[~tm], free_a[~tm])
    if video_mode != audio_mode:
        return
    # Known values given as only the marked part give the same result as the full-size latent.
    video2, audio2 = run_sample(model, inp, video_known=KnownRegion(kv[:, fm], fm, video_mode),
                             audio_known=KnownRegion(ka[tm], tm, audio_mode), known_seed=5)
    assert torch.equal(video2, video) and torch.equal(audio2, audio)


def test_renoised_region_follows_the_formula_each_step(model):
    inp = inputs()
    kv, ka = known_latents()
    fm, tm = _region_masks()
    seed = 21
    record, calls = {}, []
    video, audio = run_sample(model, inp, calls, video_known=KnownRegion(kv, fm, "renoise"),
                           audio_known=KnownRegion(ka, tm), known_seed=seed, record=record)  # audio default: renoise
    sigmas = make_schedule("unipc", STEPS, 5.0).sigmas
    eps_v = renoise_noise(kv.shape, seed)
    eps_a = renoise_noise(ka.shape, seed)
    assert len(record["video_inputs"]) == len(record["audio_inputs"]) == STEPS
    for k in range(STEPS):
        s = float(sigmas[k])
        want_v = (1 - s) * kv + s * eps_v
        want_a = (1 - s) * ka + s * eps_a
        assert torch.equal(record["video_inputs"][k][:, fm], want_v[:, fm])
        assert torch.equal(record["audio_inputs"][k][tm], want_a[tm])
    # Step 0 outside the regions is the initial noise itself: the main noise stream is untouched...
    assert torch.equal(record["video_inputs"][0][:, ~fm], inp["video_noise"][:, ~fm])
    assert torch.equal(record["audio_inputs"][0][~tm], inp["audio_noise"][~tm])
    # ...and eps is a stream of its own, fixed by the seed.
    assert not torch.allclose(eps_v, inp["video_noise"]) and not torch.allclose(eps_a, inp["audio_noise"])
    assert torch.equal(renoise_noise(kv.shape, seed), eps_v)
    assert not torch.equal(renoise_noise(kv.shape, seed + 1), eps_v)
    # Renoised tokens keep the step's scalar timestep: the model is told of no clean tokens.
    assert all(clean is False for _, clean, _ in calls)
    assert torch.equal(video[:, fm], kv[:, fm]) and torch.equal(audio[tm], ka[tm])


def _spy_prepare(model, seen: list):
    """A stand-in for ``model.prepare`` that records the per-group timesteps of every forward."""
    original = model.prepare

    def prepare(*args, **kw):
        state = original(*args, **kw)
        seen.append((state.video_t.clone(), state.audio_t.clone()))
        return state

    return prepare


def test_clean_regions_see_t0(model, monkeypatch):
    inp = inputs()
    kv, ka = known_latents()
    fm, tm = _region_masks()
    seen = []
    monkeypatch.setattr(model, "prepare", _spy_prepare(model, seen))
    calls = []
    run_sample(model, inp, calls, video_known=KnownRegion(kv, fm, "clean"), audio_known=KnownRegion(ka, tm, "clean"))
    timesteps = make_schedule("unipc", STEPS, 5.0).timesteps
    assert len(seen) == 2 * STEPS
    for i, (video_t, audio_t) in enumerate(seen):
        t = int(timesteps[i // 2])
        assert isinstance(calls[i][1], CleanTokens)
        # One group per latent frame and per audio token; the known ones at 0, the rest at the step's t.
        assert video_t.shape == (1, FRAMES) and audio_t.shape == (1, TOKENS)
        assert (video_t[0, fm] == 0).all() and (video_t[0, ~fm] == t).all()
        assert (audio_t[0, tm] == 0).all() and (audio_t[0, ~tm] == t).all()


def test_audio_clean_alone_leaves_video_on_the_step_timestep(model, monkeypatch):
    inp = inputs()
    _, ka = known_latents()
    tm = range_mask(TOKENS, *KNOWN_TOKENS)
    seen = []
    monkeypatch.setattr(model, "prepare", _spy_prepare(model, seen))
    _, audio = run_sample(model, inp, audio_known=KnownRegion(ka, tm, "clean"))
    timesteps = make_schedule("unipc", STEPS, 5.0).timesteps
    for i, (video_t, audio_t) in enumerate(seen):
        t = int(timesteps[i // 2])
        assert video_t.shape == (1, 1) and int(video_t) == t
        assert (audio_t[0, tm] == 0).all() and (audio_t[0, ~tm] == t).all()
    assert torch.equal(audio[tm], ka[tm])


def test_per_token_audio_modulation_agrees_with_the_shared_one(model):
    # At t = 0 every token sees 0 either way: one modulation group per token must give what one shared
    # group gives, up to float32 rounding (it is the same arithmetic, arranged per token).
    inp = inputs()
    v, a, ctx = inp["video_noise"], inp["audio_noise"], inp["pos_ctx"]
    zero = torch.tensor([0])
    shared_v, shared_a = model(v, a, zero, ctx, ctx)
    per_token = CleanTokens(audio_tokens=range_mask(TOKENS, *KNOWN_TOKENS))
    token_v, token_a = model(v, a, zero, ctx, ctx, first_frame_is_clean=per_token)
    assert torch.allclose(token_a, shared_a, rtol=1e-5, atol=1e-5 * float(shared_a.abs().max()))
    assert torch.allclose(token_v, shared_v, rtol=1e-5, atol=1e-5 * float(shared_v.abs().max()))
    # At t > 0 the clean tokens change the result (they are modulated as clean).
    t = torch.tensor([700])
    plain_v, plain_a = model(v, a, t, ctx, ctx)
    clean_v, clean_a = model(v, a, t, ctx, ctx, first_frame_is_clean=per_token)
    assert (clean_a - plain_a).abs().max() > 1e-3


def test_bad_known_regions_are_refused(model):
    inp = inputs()
    kv, ka = known_latents()
    fm, tm = _region_masks()
    with pytest.raises(ValueError, match="mask"):
        run_sample(model, inp, video_known=KnownRegion(kv, index_mask(FRAMES + 1, [0])))
    with pytest.raises(ValueError, match="mask"):
        run_sample(model, inp, audio_known=KnownRegion(ka, tm.to(torch.int64)))
    with pytest.raises(ValueError, match="matches neither"):
        run_sample(model, inp, audio_known=KnownRegion(ka[:3], tm))
    with pytest.raises(ValueError, match="mode"):
        run_sample(model, inp, video_known=KnownRegion(kv, fm, "inpaint"))
    bad = kv.clone()
    bad[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        run_sample(model, inp, video_known=KnownRegion(bad, fm))
    with pytest.raises(ValueError, match="not both"):
        run_sample(model, inp, image_latent=kv[:, :1], video_known=KnownRegion(kv, fm))
    with pytest.raises(ValueError, match="clean mask"):
        model(inp["video_noise"], inp["audio_noise"], torch.tensor([500]), inp["pos_ctx"], inp["pos_ctx"],
              first_frame_is_clean=CleanTokens(audio_tokens=torch.ones(TOKENS + 2, dtype=torch.bool)))
