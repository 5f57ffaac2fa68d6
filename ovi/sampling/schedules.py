"""Flow-matching schedules: the model timesteps and the float32 sigma table each solver walks.

The recipes reproduce the official schedulers bit for bit, which is why the intermediate arithmetic
follows their numpy float64 / torch float32 paths instead of one tidy formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..choices import SOLVERS

_ALIASES = {"dpmpp": "dpm++", "dpm": "dpm++", "dpmsolver++": "dpm++"}
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class Schedule:
    """``timesteps`` [N] are what the model sees (int64, or float32 for euler); ``sigmas`` [N+1] float32
    drive the solver and end with 0."""

    solver: str
    steps: int
    shift: float
    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def __len__(self) -> int:
        return self.steps


def solver_name(name: str) -> str:
    """The canonical solver name for ``name`` (case-insensitive, ``dpmpp`` accepted for ``dpm++``)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)} (or 'dpmpp')")
    return key


def _shift(sigma: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigma / (1 + (shift - 1) * sigma)


def _int_schedule(base: np.ndarray, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    # The timestep is truncated from the float64 sigma, not from its float32 rounding.
    sigma = _shift(base, shift)
    timesteps = torch.from_numpy(sigma * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([sigma, [0.0]]).astype(np.float32))
    return timesteps, sigmas


def _euler_schedule(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    # diffusers' FlowMatchEulerDiscreteScheduler shifts its training table in float32 at construction and
    # shifts the inference sigmas again, so the low end (t = 1) is shifted twice.
    table = torch.tensor([NUM_TRAIN_TIMESTEPS, 1.0], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    hi, lo = (shift * table / (1 + (shift - 1) * table)).tolist()
    u = np.linspace(hi * NUM_TRAIN_TIMESTEPS, lo * NUM_TRAIN_TIMESTEPS, steps)
    sigma = torch.from_numpy(_shift(u / NUM_TRAIN_TIMESTEPS, shift)).to(torch.float32)
    timesteps = sigma * NUM_TRAIN_TIMESTEPS
    return timesteps, torch.cat([sigma, torch.zeros(1, dtype=torch.float32)])


def make_schedule(solver: str = "unipc", steps: int = 50, shift: float = 5.0) -> Schedule:
    """The official schedule of ``solver`` for ``steps`` model calls at ``shift``."""
    name = solver_name(solver)
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps, shift = int(steps), float(shift)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    if name == "unipc":
        # sigma_max is the float32 value 0.999 of the scheduler's training table, read back as a float.
        sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
        timesteps, sigmas = _int_schedule(np.linspace(sigma_max, 0.0, steps + 1)[:-1], shift)
    elif name == "dpm++":
        timesteps, sigmas = _int_schedule(np.linspace(1.0, 0.0, steps + 1)[:steps], shift)
    else:
        timesteps, sigmas = _euler_schedule(steps, shift)
    return Schedule(name, steps, shift, timesteps, sigmas)
