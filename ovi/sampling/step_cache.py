"""A training-free step cache (in the manner of EasyCache): reuse the model's last transformation on steps
where its output is estimated to change little.

At a full step the model maps the latent x to the guided velocity o; the cache keeps the transformation
``o - x`` and, from the last two full steps, the transformation rate ``k = (|Δo| / |o|) / (|Δx| / |x|)``:
how much the output moves per unit of relative input change. Every later step adds ``k * |x_k - x_{k-1}| /
|x_{k-1}|`` (the estimated relative output change) to an accumulator; while it stays below ``threshold`` the
step's velocity is ``x_k + (o - x)`` of the last full step and the model does not run. Once it reaches the
threshold the model runs, the accumulator restarts and the rate is measured again. Video and audio are
estimated separately and the larger estimate decides, as one model pass computes both.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# The rate needs two full steps to be measured, and the first steps move the latent the most.
FULL_STEPS_AT_START = 2


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """|new - old| / |old| (L2 over every element); inf when ``old`` is zero."""
    den = float(torch.linalg.vector_norm(old.float()))
    if den == 0.0:
        return math.inf
    return float(torch.linalg.vector_norm((new - old).float())) / den


class StepCache:
    """Decides step by step whether the model runs, and stands in for it when it does not.

    Per step: ``should_run(k, inputs)``; then either ``store(inputs, outputs)`` after running the model,
    or ``reuse(inputs)`` for the estimated outputs. ``threshold`` <= 0 runs every step (and keeps nothing).
    The first ``full_at_start`` steps and the last step always run.
    """

    def __init__(self, threshold: float, steps: int, full_at_start: int = FULL_STEPS_AT_START):
        threshold = float(threshold)
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"cache threshold must be a finite number >= 0, got {threshold!r}")
        self.threshold, self.steps, self.full_at_start = threshold, steps, full_at_start
        self.rates: list[float] | None = None      # per modality, from the last two full steps
        self.accumulated: list[float] = []
        self.previous: list[torch.Tensor] | None = None     # the last step's inputs
        self.last_in: list[torch.Tensor] | None = None      # the last full step's inputs and outputs
        self.last_out: list[torch.Tensor] | None = None

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def should_run(self, k: int, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether step ``k`` must run the model, given the latents it starts from."""
        if not self.enabled:
            return True
        if self.previous is not None and self.rates is not None:
            self.accumulated = [acc + rate * _relative_change(x, prev) for acc, rate, x, prev
                                in zip(self.accumulated, self.rates, inputs, self.previous)]
        self.previous = [x.clone() for x in inputs]
        forced = k < self.full_at_start or k >= self.steps - 1 or self.rates is None or self.last_out is None
        # Written as 'not below' so a NaN estimate (an infinite rate times no change) runs the model too.
        return forced or any(not acc < self.threshold for acc in self.accumulated)

    def store(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        """Keep a full step's transformation and measure the rate against the previous full step."""
        if not self.enabled:
            return
        inputs = [x.clone() for x in inputs]
        outputs = [o.detach().clone() for o in outputs]
        if self.last_in is not None:
            rates = []
            for x, o, x0, o0 in zip(inputs, outputs, self.last_in, self.last_out):
                moved = _relative_change(x, x0)
                # An input that did not move (or a zero one) gives no rate: keep running until one is measured.
                if not 0.0 < moved < math.inf:
                    rates = None
                    break
                rates.append(_relative_change(o, o0) / moved)
            self.rates = rates
        self.last_in, self.last_out = inputs, outputs
        self.accumulated = [0.0] * len(inputs)

    def reuse(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The estimated outputs for ``inputs``: each input plus the last full step's ``output - input``."""
        return [x + (o - x0) for x, o, x0 in zip(inputs, self.last_out, self.last_in)]
