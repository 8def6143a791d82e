"""How long one request may hold the inference worker without making later
requests late.

The worker runs one model at a time and cannot be interrupted: a request that
arrives while a 13 ms model runs waits for it. In the load test most missed
deadlines were of that kind (the request's time was gone before the worker
picked it up), not plans that overran. The guard estimates, from the recent
requests, the arrival rate (per ms) and the distribution of deadlines, and
allows a run of t ms only while the number of later requests it is expected
to make late stays under `risk`:

    rate * t * mean over r in [0, t] of P(deadline < r + fastest)

(`rate * t` requests arrive during the run on average; one arriving with r ms
of the run left still needs the fastest model's time after it). The mean over
r uses four midpoints. Cost: a few binary searches per decision.
"""
from __future__ import annotations

import bisect
import math
from collections import deque


class BlockingGuard:
    def __init__(self, risk: float, window: int = 200, min_requests: int = 20) -> None:
        if not 0 < risk < 1:
            raise ValueError(f"blocking risk must be in (0, 1), got {risk}")
        self.risk = risk
        self.min_requests = min_requests
        self.arrivals: deque[float] = deque(maxlen=window)   # perf_counter seconds
        self.order: deque[float] = deque(maxlen=window)      # deadlines (ms) in arrival order
        self.sorted: list[float] = []                         # the same deadlines, sorted

    def record(self, arrival_s: float, deadline_ms: float) -> None:
        if len(self.order) == self.order.maxlen:
            oldest = self.order[0]
            del self.sorted[bisect.bisect_left(self.sorted, oldest)]
        self.order.append(deadline_ms)
        bisect.insort(self.sorted, deadline_ms)
        self.arrivals.append(arrival_s)

    def rate_per_ms(self) -> float:
        if len(self.arrivals) < self.min_requests:
            return 0.0
        span_ms = 1e3 * (self.arrivals[-1] - self.arrivals[0])
        return (len(self.arrivals) - 1) / span_ms if span_ms > 0 else math.inf

    def late_fraction(self, need_ms: float) -> float:
        """Share of recent deadlines shorter than need_ms."""
        return bisect.bisect_left(self.sorted, need_ms) / len(self.sorted)

    def expected_late(self, run_ms: float, fastest_ms: float, rate: float) -> float:
        mean = sum(self.late_fraction(run_ms * m + fastest_ms) for m in (0.125, 0.375, 0.625, 0.875)) / 4
        return rate * run_ms * mean

    def cap_ms(self, times: list[float], fastest_ms: float) -> float:
        """The longest of `times` (non-decreasing) whose run keeps the expected late requests under the risk
        (at least times[0]: nothing is faster); infinity until enough requests have been seen."""
        rate = self.rate_per_ms()
        if rate == 0.0:
            return math.inf
        low, high = 0, len(times)          # times[:low] allowed, times[high:] not
        while low < high:
            middle = (low + high) // 2
            if self.expected_late(times[middle], fastest_ms, rate) <= self.risk:
                low = middle + 1
            else:
                high = middle
        return times[max(low - 1, 0)] if low < len(times) else math.inf
