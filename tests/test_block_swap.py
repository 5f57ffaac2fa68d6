"""Block swap on the CPU: same outputs as FusionModel.forward, masters untouched, and the fetch schedule.

The CUDA copies cannot run here; the swap mechanics (device copies swapped into the modules and the masters
put back) run with a clone-based stand-in copier, and the schedule is checked on ``plan`` and on the trace.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ovi.block_swap import BlockSwapper, _CloneCopier, plan
from ovi.fusion.config import FusionConfig
from ovi.fusion.model import FusionModel
from ovi.tools.tiny.fusion import TINY_CONFIG, random_state_dict

LAYERS = 4
CONFIG = FusionConfig(replace(TINY_CONFIG.video, num_layers=LAYERS), replace(TINY_CONFIG.audio, num_layers=LAYERS))


@pytest.fixture(scope="module")
def model() -> FusionModel:
    m = FusionModel(CONFIG)
    m.load_state_dict(random_state_dict(CONFIG, seed=3))
    return m.eval()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(1, 48, 3, 4, 4, generator=g)
    audio = torch.randn(1, 6, 20, generator=g)
    ctx_v = torch.randn(1, 7, CONFIG.video.text_dim, generator=g)
    ctx_a = torch.randn(1, 5, CONFIG.audio.text_dim, generator=g)
    return video, audio, torch.tensor([700.0]), ctx_v, ctx_a


def _snapshot(m: FusionModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


CASES = [dict(), dict(slg_layer=2), dict(first_frame_is_clean=True), dict(slg_layer=1, first_frame_is_clean=True)]


@pytest.mark.parametrize("resident", [0, 1, 3, LAYERS, LAYERS + 5])
@pytest.mark.parametrize("kind", ["cpu", "clone"])
def test_same_outputs_as_model(model, resident, kind):
    before = _snapshot(model)
    tensors_before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    swapper = BlockSwapper(model, resident, "cpu", copier=_CloneCopier if kind == "clone" else None)
    for case in CASES:
        with torch.no_grad():
            want = model(*_inputs(), **case)
            got = swapper.forward(*_inputs(), **case)
        for w, g in zip(want, got):
            assert torch.equal(w, g), (resident, kind, case)
    swapper.detach()
    # Masters: the same tensor objects, with the same values, after attach/forward/detach.
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is tensors_before[k] for k in after)
    assert all(torch.equal(before[k], after[k]) for k in after)


def test_streamed_layer_uses_a_copy_then_the_master_returns(model):
    seen, live = {}, []
    swapper = BlockSwapper(model, 1, "cpu", copier=_CloneCopier)
    vb2, _ = model.layer_modules(2)
    master = vb2.self_attn.q.weight
    orig = model.forward_layer

    def spy(i, state):
        seen[i] = vb2.self_attn.q.weight
        live.append(set(swapper._active) | set(swapper._inflight))  # streamed layers held as device copies
        return orig(i, state)

    model.forward_layer = spy
    try:
        with torch.no_grad():
            swapper.forward(*_inputs())
    finally:
        del model.forward_layer
    assert seen[2] is not master and torch.equal(seen[2], master)
    assert live == [{1}, {1, 2}, {2, 3}, {3}]  # the next layer is in flight while one computes; never 3 at once
    assert vb2.self_attn.q.weight is master  # evicted: the master is back while other layers run
    assert seen[0] is master  # not yet swapped in during layer 0
    # resident and non-block parts hold copies while attached and get their masters back on detach
    head = model.video_model.head.head.weight
    swapper.detach()
    assert model.video_model.head.head.weight is not head


def test_plan_prefetches_one_ahead_and_bounds_memory():
    ops = plan(6, 2, skip=None)
    assert ops[0] == ("fetch", 2)  # overlaps the resident layers
    assert [o for o in ops if o[0] == "compute"] == [("compute", i) for i in range(6)]
    for i in range(3, 6):  # layer i is requested before layer i-1 computes
        assert ops.index(("fetch", i)) < ops.index(("compute", i - 1))
        assert ops.index(("fetch", i)) > ops.index(("fetch", i - 1))
    for i in range(2, 6):
        assert ops.index(("fetch", i)) < ops.index(("compute", i)) < ops.index(("evict", i))
    on_device, most = set(), 0
    for op, i in ops:
        if op == "fetch":
            on_device.add(i)
        elif op == "evict":
            on_device.discard(i)
        most = max(most, len(on_device))
    assert most == 2
    assert not any(op == "fetch" and i < 2 for op, i in ops)  # resident layers never fetched


def test_plan_skips_slg_layer_and_all_resident():
    ops = plan(5, 0, skip=3)
    assert ("fetch", 3) not in ops and ("compute", 3) not in ops
    assert ops.index(("fetch", 4)) < ops.index(("compute", 2))
    assert plan(3, 3) == [("compute", 0), ("compute", 1), ("compute", 2)]
    assert plan(3, 10) == plan(3, 3)


def test_trace_of_a_forward(model):
    swapper = BlockSwapper(model, 1, "cpu", copier=_CloneCopier)
    swapper.trace = []
    with torch.no_grad():
        swapper.forward(*_inputs(), slg_layer=2)
    t = swapper.trace
    assert ("fetch", 2) not in t and ("compute", 2) not in t
    assert t[0] == ("fetch", 1)
    assert t.index(("fetch", 3)) < t.index(("compute", 1))
    assert t.count(("fetch", 1)) == 1
    swapper.detach()


def test_engine_style_attach_run_detach(model):
    swapper = BlockSwapper(resident=2)
    m = swapper.attach(model, torch.device("cpu"))
    assert m is model
    with torch.no_grad():
        want = model(*_inputs(1), slg_layer=1)
        state = m.prepare(*_inputs(1))
        swapper.run(m, state, 1)
        got = m.finish(state)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    swapper.detach()
    with pytest.raises(RuntimeError):
        swapper.run(model, state, None)


def test_bytes_report(model):
    swapper = BlockSwapper(model, 1, "cpu", copier=_CloneCopier)
    layer = sum(p.numel() * p.element_size() for b in model.layer_modules(3) for p in b.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert swapper.streamed_bytes() == 3 * layer
    assert swapper.to_device_bytes() == total - 3 * layer
    swapper.detach()
    assert BlockSwapper(model, 1, "cpu").to_device_bytes() == 0  # nothing moves on a CPU device


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_invalid_resident_count(bad):
    with pytest.raises((ValueError, TypeError)):
        BlockSwapper(resident=bad)
