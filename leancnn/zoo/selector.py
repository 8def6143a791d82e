"""Pick the most accurate model whose expected time fits the time left."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from .front import FrontModel

Policy = Literal["fastest", "refuse"]


@dataclass(frozen=True)
class Choice:
    index: int | None        # into the selector's models, None when refused
    fits: bool               # whether the chosen model's expected time fits the time left


class Selector:
    """Models sorted by expected time with accuracy rising (a thinned front).
    `choose` is one binary search: O(log n), about a microsecond in Python.

    When nothing fits: policy "fastest" answers with the fastest model and
    reports the deadline as expected to be missed; "refuse" answers with none.

    `update` replaces one model's expected time (a runtime measuring its
    models as it serves), after which the times need not rise with accuracy.
    The search then runs on their suffix minimum, min(times[i:]), which never
    falls: the last index whose suffix minimum fits is the most accurate model
    that fits (its own time must fit, since the suffix after it does not), so
    the choice stays exact and one bisection.
    """

    def __init__(self, models: list[FrontModel], policy: Policy = "fastest") -> None:
        if not models:
            raise ValueError("a selector needs at least one model")
        times = [m.time_ms for m in models]
        if any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError("models must be sorted by strictly rising expected time (use zoo.front.thin)")
        if policy not in ("fastest", "refuse"):
            raise ValueError(f"policy must be 'fastest' or 'refuse', got {policy!r}")
        self.models = list(models)
        self.own_times = times
        self.times = list(times)   # suffix minimum of own_times: what the bisection searches
        self.policy = policy

    def update(self, index: int, time_ms: float) -> None:
        self.own_times[index] = time_ms
        self.times = list(accumulate(reversed(self.own_times), min))[::-1]

    def choose(self, time_left_ms: float) -> Choice:
        # bisect_right: among equal suffix minima the last, i.e. the most accurate, is taken.
        index = bisect.bisect_right(self.times, time_left_ms) - 1
        if index >= 0:
            return Choice(index, True)
        return Choice(0, False) if self.policy == "fastest" else Choice(None, False)
