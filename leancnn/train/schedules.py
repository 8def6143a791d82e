"""Learning-rate schedules as pure functions of the global step, so a resumed
run needs only the step count to continue exactly."""
from __future__ import annotations

import math


def learning_rate(schedule: str, step: int, total_steps: int, peak: float, *, warmup_fraction: float = 0.15,
                  steps_per_epoch: int = 1, milestones: list[int] | None = None, gamma: float = 0.2) -> float:
    if schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return peak * gamma ** sum(epoch >= m for m in (milestones or []))
    warmup = warmup_fraction * total_steps
    if schedule == "onecycle":
        # Linear up from peak/25 to peak, then linear down to ~0 (airbench-style one-cycle).
        if step < warmup:
            return peak * (0.04 + 0.96 * step / warmup)
        return peak * max(0.0, 1.0 - (step - warmup) / max(total_steps - warmup, 1))
    if schedule == "cosine":
        if step < warmup:
            return peak * (step + 1) / warmup
        remaining = (step - warmup) / max(total_steps - warmup, 1)
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(remaining, 1.0)))
    raise ValueError(f"unknown schedule {schedule!r}")
