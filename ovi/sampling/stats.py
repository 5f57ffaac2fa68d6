"""What one sampling run cost: model passes run and saved, steps taken from the step cache."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingStats:
    """Filled in by ``sample(..., stats=...)``. ``passes_skipped`` counts against the default loop's two
    model passes per step (the negative pass when guidance is 1, both passes of a cached step)."""

    steps: int = 0
    passes_per_step: int = 2
    passes_run: int = 0
    passes_skipped: int = 0
    cached_steps: list[int] = field(default_factory=list)  # 0-based steps whose velocity came from the cache

    @property
    def full_steps(self) -> int:
        return self.steps - len(self.cached_steps)
