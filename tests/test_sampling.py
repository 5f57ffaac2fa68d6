from __future__ import annotations

import pytest
import torch

from ovi.sampling.loop import Interrupted, sample
from ovi.sampling.schedules import make_schedule, solver_name
from ovi.sampling.solvers import DPMPPSolver, EulerSolver, UniPCSolver, make_solver
from ovi.tools.parity import run_file

SCHEDULER_FIXTURES = ["scheduler_unipc", "scheduler_euler", "scheduler_dpmpp"]
SAMPLING_FIXTURES = ["sampling_unipc_t2v", "sampling_euler_t2v", "sampling_dpmpp_t2v", "sampling_unipc_i2v"]


@pytest.mark.parametrize("name", SCHEDULER_FIXTURES)
def test_scheduler_fixture(parity_dir, name):
    res = run_file(parity_dir / f"{name}.safetensors")
    assert res.status == "PASS", res.detail


@pytest.mark.parametrize("name", SAMPLING_FIXTURES)
def test_sampling_fixture(parity_dir, name):
    res = run_file(parity_dir / f"{name}.safetensors")
    assert res.status == "PASS", res.detail


# ---- schedules ----

def test_unipc_default_schedule():
    s = make_schedule("unipc", 50, 5.0)
    assert s.timesteps.dtype == torch.int64 and s.sigmas.dtype == torch.float32
    assert s.timesteps.shape == (50,) and s.sigmas.shape == (51,)
    assert s.timesteps[:5].tolist() == [999, 995, 991, 987, 982]
    assert s.timesteps[-3:].tolist() == [241, 172, 92]
    assert s.sigmas[-1].item() == 0.0
    assert torch.all(s.sigmas[1:] < s.sigmas[:-1])


@pytest.mark.parametrize("steps", [1, 2, 5, 13, 50])
def test_euler_last_timestep_independent_of_steps(steps):
    s = make_schedule("euler", steps, 5.0)
    assert s.timesteps.dtype == torch.float32 and s.timesteps.shape == (steps,)
    assert s.timesteps[0].item() == 1000.0
    if steps > 1:
        assert s.timesteps[-1].item() == pytest.approx(24.414066, abs=1e-6)
    assert s.sigmas[-1].item() == 0.0


def test_euler_five_steps():
    ts = make_schedule("euler", 5, 5.0).timesteps.tolist()
    assert ts == pytest.approx([1000.0, 937.89, 834.71, 629.63, 24.41], abs=6e-3)


@pytest.mark.parametrize("name", ["dpm++", "dpmpp", "DPM++"])
def test_dpmpp_starts_at_1000(name):
    s = make_schedule(name, 50, 5.0)
    assert s.solver == "dpm++"
    assert s.timesteps.dtype == torch.int64 and s.timesteps[0].item() == 1000 and s.sigmas[0].item() == 1.0
    # Same shifted grid as unipc apart from the start point.
    assert s.timesteps[-1].item() == 92


def test_schedule_errors():
    with pytest.raises(ValueError, match="unipc.*euler.*dpm"):
        make_schedule("ddim", 10, 5.0)
    with pytest.raises(ValueError):
        make_schedule("unipc", 0, 5.0)
    with pytest.raises(ValueError):
        make_schedule("euler", -3, 5.0)
    with pytest.raises(ValueError):
        make_schedule("unipc", 10, 0.0)
    assert solver_name(" UniPC ") == "unipc"


def test_make_solver_classes():
    assert isinstance(make_solver("unipc", 4, 5.0), UniPCSolver)
    assert isinstance(make_solver(make_schedule("euler", 4, 5.0)), EulerSolver)
    assert isinstance(make_solver("dpmpp", 4, 5.0), DPMPPSolver)


# ---- solvers ----

@pytest.mark.parametrize("name", ["unipc", "euler", "dpm++"])
def test_solver_keeps_state_dtype_and_ends_at_x0(name):
    g = torch.Generator().manual_seed(0)
    schedule = make_schedule(name, 6, 3.0)
    solver = make_solver(schedule)
    x = torch.randn(3, 4, generator=g)
    for k, t in enumerate(schedule.timesteps):
        v = torch.randn(3, 4, generator=g).to(torch.bfloat16)
        x_in = x
        x = solver.step(v, t, x)
        assert x.dtype == torch.float32
    # Every solver's last step lands on the x0 estimate of the uncorrected input latent.
    torch.testing.assert_close(x, x_in - schedule.sigmas[-2].item() * v.float(), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError):
        solver.step(v, schedule.timesteps[-1], x)


def test_solver_rejects_foreign_timestep():
    solver = make_solver("unipc", 5, 5.0)
    with pytest.raises(ValueError):
        solver.step(torch.zeros(2), torch.tensor([123]), torch.zeros(2))


def test_unipc_history_is_per_instance():
    # Two instances stepping the same data agree; one stepping other data in between does not disturb the other.
    g = torch.Generator().manual_seed(1)
    schedule = make_schedule("unipc", 5, 5.0)
    xs, vs = torch.randn(4, generator=g), torch.randn(5, 4, generator=g)
    a, b, c = make_solver(schedule), make_solver(schedule), make_solver(schedule)
    xa = xb = xs
    xc = torch.randn(4, generator=g)
    for k, t in enumerate(schedule.timesteps):
        xa = a.step(vs[k], t, xa)
        xc = c.step(-vs[k], t, xc)
        xb = b.step(vs[k], t, xb)
    assert torch.equal(xa, xb)


# ---- the loop ----

def _toy_model(calls: list | None = None):
    """A cheap deterministic stand-in for the fusion model that depends on every input it is given."""

    def fn(video, audio, t, video_ctx, audio_ctx, first_frame_is_clean, slg_layer):
        if calls is not None:
            calls.append(dict(t=t.clone(), video=video.clone(), clean=first_frame_is_clean, slg=slg_layer,
                              vctx=video_ctx, actx=audio_ctx))
        s = t.to(torch.float64).item() / 1000.0
        v = 0.9 * video + 0.1 * torch.tanh(video.roll(1, 0)) + s * video_ctx.mean() + 0.01 * slg_layer
        a = 0.8 * audio - 0.2 * torch.sin(audio) + s * audio_ctx.mean() + 0.02 * slg_layer
        if first_frame_is_clean:
            v = v.clone()
            v[:, 0] *= 0.5
        return v, a

    return fn


def _inputs(seed=0, i2v=False):
    g = torch.Generator().manual_seed(seed)
    d = dict(video_noise=torch.randn(4, 3, 2, 2, generator=g), audio_noise=torch.randn(5, 3, generator=g),
             pos_ctx=torch.randn(3, 8, generator=g), video_neg_ctx=torch.randn(2, 8, generator=g),
             audio_neg_ctx=torch.randn(4, 8, generator=g))
    if i2v:
        d["image_latent"] = torch.randn(4, 1, 2, 2, generator=g)
    return d


def _run(inp, **kw):
    inp, model_fn = dict(inp), kw.pop("model_fn", None) or _toy_model()
    video, audio = inp.pop("video_noise"), inp.pop("audio_noise")
    opts = dict(solver="unipc", steps=6, shift=5.0, video_guidance=5.0, audio_guidance=4.0, slg_layer=1)
    opts.update(kw)
    return sample(model_fn, video, audio, **inp, **opts)


def test_loop_passes_and_guidance():
    inp, calls = _inputs(), []
    record = {}
    video, audio = _run(inp, model_fn=_toy_model(calls), steps=4, record=record)
    assert len(calls) == 8
    for k in range(4):
        pos, neg = calls[2 * k], calls[2 * k + 1]
        assert pos["slg"] == 0 and neg["slg"] == 1
        assert pos["vctx"] is inp["pos_ctx"] and pos["actx"] is inp["pos_ctx"]
        assert neg["vctx"] is inp["video_neg_ctx"] and neg["actx"] is inp["audio_neg_ctx"]
        assert torch.equal(pos["video"], neg["video"])
        assert pos["t"].shape == (1,) and pos["t"].dtype == torch.int64
        assert pos["t"].item() == record["timesteps"][k].item() and not pos["clean"]
    assert torch.equal(torch.cat(record["model_timesteps"]), record["timesteps"])
    # Recompute step 0 by hand: split CFG then one unipc step of each modality on its own solver.
    sched = make_schedule("unipc", 4, 5.0)
    fn = _toy_model()
    t0 = sched.timesteps[:1]
    vp, ap = fn(inp["video_noise"], inp["audio_noise"], t0, inp["pos_ctx"], inp["pos_ctx"], False, 0)
    vn, an = fn(inp["video_noise"], inp["audio_noise"], t0, inp["video_neg_ctx"], inp["audio_neg_ctx"], False, 1)
    assert torch.equal(record["step0_video_pos"], vp) and torch.equal(record["step0_audio_neg"], an)
    v0 = make_solver(sched).step(vn + 5.0 * (vp - vn), t0, inp["video_noise"])
    a0 = make_solver(sched).step(an + 4.0 * (ap - an), t0, inp["audio_noise"])
    torch.testing.assert_close(record["video_states"][0], v0, rtol=0, atol=0)
    torch.testing.assert_close(record["audio_states"][0], a0, rtol=0, atol=0)
    assert torch.equal(record["video_states"][-1], video) and torch.equal(record["audio_states"][-1], audio)


def test_loop_euler_timestep_dtype():
    calls = []
    _run(_inputs(), model_fn=_toy_model(calls), solver="euler", steps=3)
    assert all(c["t"].dtype == torch.float32 for c in calls)
    assert calls[0]["t"].item() == 1000.0


def test_loop_i2v_first_frame():
    inp, calls, record = _inputs(3, i2v=True), [], {}
    video, _ = _run(inp, model_fn=_toy_model(calls), steps=5, record=record)
    img = inp["image_latent"]
    assert all(c["clean"] for c in calls)
    assert all(torch.equal(c["video"][:, :1], img) for c in calls)
    assert torch.equal(video[:, :1], img)
    # The solver still evolves frame 0; only the final overwrite puts the image back.
    assert not torch.equal(record["video_states"][-1][:, :1], img)
    assert torch.equal(record["video_states"][-1][:, 1:], video[:, 1:])


def test_loop_does_not_modify_inputs():
    inp = _inputs(4, i2v=True)
    before = {k: v.clone() for k, v in inp.items()}
    _run(inp, steps=3)
    assert all(torch.equal(inp[k], before[k]) for k in inp)


def test_callback_indices():
    seen = []
    video, audio = _run(_inputs(), steps=5, callback=lambda i, n, v, a, x0: seen.append((i, n, v.clone(), x0.clone())))
    assert [s[:2] for s in seen] == [(k, 5) for k in range(5)]
    assert torch.equal(seen[-1][2], video)
    # Every solver's last step lands on x - sigma*v, which is exactly the preview estimate of that step.
    assert seen[-1][3].shape == video.shape and torch.allclose(seen[-1][3], video, atol=1e-6)
    assert not torch.allclose(seen[0][3], seen[0][2])


@pytest.mark.parametrize("solver", ["unipc", "euler", "dpm++"])
def test_interrupt_then_fresh_run_matches(solver):
    inp = _inputs(5)
    ref = _run(inp, solver=solver, steps=6)
    done = []
    with pytest.raises(Interrupted) as info:
        _run(inp, solver=solver, steps=6, callback=lambda i, n, v, a, x0: done.append(i),
             should_stop=lambda: len(done) >= 3)
    assert info.value.step == 3 and info.value.total == 6 and done == [0, 1, 2]
    again = _run(inp, solver=solver, steps=6, should_stop=lambda: False)
    assert torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1])


def test_interrupt_before_first_step_calls_no_model():
    calls = []
    with pytest.raises(Interrupted):
        _run(_inputs(), model_fn=_toy_model(calls), should_stop=lambda: True)
    assert calls == []


def test_record_is_optional_and_accepts_objects():
    class Rec:
        pass

    inp = _inputs(6)
    plain = _run(inp, solver="dpm++", steps=4)
    rec = Rec()
    recorded = _run(inp, solver="dpm++", steps=4, record=rec)
    assert torch.equal(plain[0], recorded[0]) and torch.equal(plain[1], recorded[1])
    assert len(rec.video_states) == 4 and len(rec.audio_states) == 4 and rec.sigmas.shape == (5,)
