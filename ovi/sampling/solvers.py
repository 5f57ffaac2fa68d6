"""Flow-matching solvers: Euler, DPM-Solver++ 2M (midpoint) and UniPC bh2 with corrector.

The model predicts the velocity v ~ noise - x0, so the x0 estimate at sigma is ``x - sigma * v``.
Scalar coefficients are computed in float64 from the float32 sigma table; the tensor arithmetic runs in
the latent's own dtype and device, so keep latents in float32 for the reference behaviour.
"""

from __future__ import annotations

import math

import torch

from .schedules import Schedule, make_schedule, solver_name


def _lam(sigma: float) -> float:
    """log-SNR of the flow path, log(1 - sigma) - log(sigma), with the infinities at the ends."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


class Solver:
    """One scheduler instance: a schedule plus the history its multistep update needs.

    ``step(v, t, x)`` takes the model velocity at timestep ``t`` and the latent it was computed from and
    returns the next latent. Timesteps must come in schedule order; use a fresh instance per run.
    """

    name = ""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.sigmas = [float(s) for s in schedule.sigmas.tolist()]
        self.index: int | None = None
        self.calls = 0

    def __len__(self) -> int:
        return self.schedule.steps

    def _begin(self, t) -> int:
        """The step index of this call: located from ``t`` on the first call, then one per call."""
        if self.index is None:
            if t is None:
                self.index = 0
            else:
                ts = self.schedule.timesteps
                t = torch.as_tensor(t).detach().reshape(-1)[:1].to("cpu", ts.dtype)
                hits = (ts == t).nonzero().flatten().tolist()
                if not hits:
                    raise ValueError(f"timestep {t.item()} is not in the {self.name} schedule")
                # As the official schedulers: with a repeated first timestep, start at its second occurrence.
                self.index = hits[1] if len(hits) > 1 else hits[0]
        if self.index >= self.schedule.steps:
            raise RuntimeError(f"{self.name} solver already took all {self.schedule.steps} steps")
        return self.index

    def _advance(self) -> None:
        self.index += 1
        self.calls += 1

    def step(self, v: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EulerSolver(Solver):
    name = "euler"

    def step(self, v, t, x):
        k = self._begin(t)
        dt = torch.tensor(self.sigmas[k + 1], dtype=torch.float32) - torch.tensor(self.sigmas[k], dtype=torch.float32)
        out = x + dt.item() * v.to(x.dtype)
        self._advance()
        return out


class DPMPPSolver(Solver):
    """Multistep DPM-Solver++ of order 2, midpoint form; first order at the first and the last step."""

    name = "dpm++"

    def __init__(self, schedule: Schedule):
        super().__init__(schedule)
        self.prev_x0: torch.Tensor | None = None

    def step(self, v, t, x):
        k = self._begin(t)
        s0, s1 = self.sigmas[k], self.sigmas[k + 1]
        m = x - s0 * v.to(x.dtype)
        h = _lam(s1) - _lam(s0)
        b = -(1.0 - s1) * math.expm1(-h)
        out = (s1 / s0) * x + b * m
        if self.calls >= 1 and k < self.schedule.steps - 1:
            # D = (m_k - m_{k-1}) / r with r = h0 / h; written as a product so h0 = inf (sigma 1) gives D = 0.
            c = h / (_lam(s0) - _lam(self.sigmas[k - 1]))
            out = out + (0.5 * b * c) * (m - self.prev_x0)
        self.prev_x0 = m
        self._advance()
        return out


class UniPCSolver(Solver):
    """UniPC with B(h) = expm1(-h) ("bh2"), order 2, x0 prediction, corrector on, lower order at the end."""

    name = "unipc"

    def __init__(self, schedule: Schedule):
        super().__init__(schedule)
        self.x0s: list[torch.Tensor] = []  # the last two x0 predictions, oldest first
        self.last: torch.Tensor | None = None
        self.prev_order = 0

    def _correct(self, k: int, m: torch.Tensor) -> torch.Tensor:
        s0, st = self.sigmas[k - 1], self.sigmas[k]
        lam0 = _lam(s0)
        h = _lam(st) - lam0
        phi = math.expm1(-h)
        a, b = st / s0, -(1.0 - st) * phi
        prev = self.x0s[-1]
        if self.prev_order == 1:
            return a * self.last + b * prev + (0.5 * b) * (m - prev)
        r = (_lam(self.sigmas[k - 2]) - lam0) / h
        g1 = phi / -h - 1.0
        g2 = g1 / -h - 0.5
        y0, y1 = g1 / phi, 2.0 * g2 / phi
        rho0 = (y0 - y1) / (1.0 - r)  # [[1, 1], [r, 1]] @ (rho0, rho1) = (y0, y1)
        rho1 = y0 - rho0
        return a * self.last + b * prev + (b * rho0 / r) * (self.x0s[-2] - prev) + (b * rho1) * (m - prev)

    def step(self, v, t, x):
        k = self._begin(t)
        m = x - self.sigmas[k] * v.to(x.dtype)
        if self.calls >= 1:
            x = self._correct(k, m)
        self.x0s = (self.x0s + [m])[-2:]
        order = min(2, self.schedule.steps - k, self.calls + 1)
        self.last, self.prev_order = x, order
        s0, st = self.sigmas[k], self.sigmas[k + 1]
        lam0 = _lam(s0)
        h = _lam(st) - lam0
        b = -(1.0 - st) * math.expm1(-h)
        out = (st / s0) * x + b * m
        if order == 2:
            r = (_lam(self.sigmas[k - 1]) - lam0) / h
            out = out + (0.5 * b / r) * (self.x0s[-2] - m)
        self._advance()
        return out


SOLVER_CLASSES = {"unipc": UniPCSolver, "euler": EulerSolver, "dpm++": DPMPPSolver}


def make_solver(schedule_or_name: Schedule | str, steps: int | None = None, shift: float | None = None) -> Solver:
    """A fresh solver for a schedule, or for ``(name, steps, shift)``."""
    if isinstance(schedule_or_name, Schedule):
        schedule = schedule_or_name
    else:
        schedule = make_schedule(schedule_or_name, 50 if steps is None else steps, 5.0 if shift is None else shift)
    return SOLVER_CLASSES[solver_name(schedule.solver)](schedule)
