"""The deadline-aware runtime, usable without the server: a zoo's models,
loaded and warm, and a selector over their expected times, which the runtime
keeps measuring while it serves."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from ..measure.latency import quantile
from .build import load_manifest, load_zoo_models
from .blocking import BlockingGuard
from .front import FrontModel
from .selector import Policy, Selector

QUANTILE_FRACTIONS = {"median": 0.5, "p90": 0.9}


@dataclass
class Prediction:
    label: int
    probabilities: list[float]
    model: str | None          # None when refused
    time_ms: float             # from arrival to the answer being ready
    deadline_ms: float
    deadline_met: bool
    expected_to_fit: bool      # the selector's view when it chose
    expired: bool = False      # the deadline had passed before a model could be chosen: none ran


def has_expired(arrival: float, deadline_ms: float, now: float) -> bool:
    """A request whose deadline passed before it was picked up (times in time.perf_counter() s):
    answered at once without running a model, as a queue policy with a timeout does."""
    return 1e3 * (now - arrival) >= deadline_ms


class Runtime:
    """Most accurate model whose expected time fits the time left; `policy`
    when none fits. `fixed` pins one model (the static baselines: "fastest",
    "most-accurate").

    A model's expected time starts as the manifest's batch-1 quantile (measured
    when the zoo was built, alone on the machine, back to back) and, once the
    model has run `min_samples` times here, becomes the `plan_quantile` of its
    last `window` runs in this process: decision to answer ready, so whatever
    serving adds is in the plan (a model run 20 ms after the last request, with
    cold caches, took 1.6x its back-to-back time; a busy machine adds more).
    `plan_quantile` (default: the manifest's) is about the share of deadlines
    a plan aims to meet: at p90, one run in ten overran its plan.

    `blocking_risk` (None: off) bounds how long one request may hold the
    runtime by the later requests it is expected to make late (zoo/blocking.py).
    """

    def __init__(self, zoo: str | Path, *, policy: Policy = "fastest", overhead_ms: float = 0.0,
                 fixed: str | None = None, threads: int | None = None, calibrate: bool = True,
                 plan_quantile: float | None = None, blocking_risk: float | None = None, window: int = 100,
                 min_samples: int = 10) -> None:
        if threads:
            torch.set_num_threads(threads)
        if fixed not in (None, "fastest", "most-accurate"):
            raise ValueError(f"fixed must be 'fastest' or 'most-accurate', got {fixed!r}")
        self.manifest = load_manifest(Path(zoo))
        self.entries = self.manifest["models"]
        self.names = [e["name"] for e in self.entries]
        self.input_shape = tuple(self.manifest["input_shape"])
        self.models = load_zoo_models(Path(zoo), self.manifest)
        self.policy = policy
        self.fixed = fixed
        self.overhead_ms = overhead_ms
        self.fraction = QUANTILE_FRACTIONS[self.manifest.get("quantile", "p90")] if plan_quantile is None \
            else plan_quantile
        if not 0 < self.fraction <= 1:
            raise ValueError(f"plan_quantile must be in (0, 1], got {plan_quantile}")
        self.calibrate = calibrate
        self.min_samples = min_samples
        self.samples = [deque(maxlen=window) for _ in self.models]
        self.selector = Selector([FrontModel(e["name"], e["expected_ms"], e["accuracy"]) for e in self.entries],
                                 policy)
        self.guard = None if blocking_risk is None else BlockingGuard(blocking_risk)
        self.median_ms = [e.get("latency_median_ms", e["expected_ms"]) for e in self.entries]
        self.warm_up()

    def set_overhead(self, overhead_ms: float) -> None:
        """Time a request costs besides deciding and running the model (hand-off, reply), ms."""
        self.overhead_ms = overhead_ms

    def expected_ms(self) -> list[float]:
        """Each model's expected time now (ms, before the overhead)."""
        return list(self.selector.own_times)

    def warm_up(self, runs: int = 5) -> None:
        """Run every model `runs` times, then (when calibrating) `min_samples` more times taking turns, so
        each run follows other models as it will when serving (caches not its own), and seed the plan with
        those times: the first requests are not planned with the manifest's back-to-back times."""
        x = torch.rand(1, *self.input_shape)
        with torch.no_grad():
            for model in self.models:
                for _ in range(runs):
                    model(x)
            if not self.calibrate:
                return
            for _ in range(self.min_samples):
                for index, model in enumerate(self.models):
                    started = time.perf_counter()
                    int(torch.softmax(model(x), dim=1)[0].argmax())
                    self.observe(index, 1e3 * (time.perf_counter() - started))

    def reseed(self) -> None:
        """Forget the measured times and measure them again (a worker moved to other CPUs, or taking
        over from one that died: its times from before describe another machine state)."""
        for samples in self.samples:
            samples.clear()
        self.warm_up(runs=1)

    def observe(self, index: int, elapsed_ms: float) -> None:
        """One measured run of model `index` (decision to answer, ms)."""
        samples = self.samples[index]
        samples.append(elapsed_ms)
        if self.calibrate and len(samples) >= self.min_samples:
            self.selector.update(index, quantile(list(samples), self.fraction))
            self.median_ms[index] = quantile(list(samples), 0.5)

    def choose(self, time_left_ms: float) -> tuple[int | None, bool]:
        if self.fixed == "fastest":
            return 0, self.selector.own_times[0] <= time_left_ms
        if self.fixed == "most-accurate":
            last = len(self.models) - 1
            return last, self.selector.own_times[last] <= time_left_ms
        # A request arriving during the run still needs the fastest model: its typical (median) time
        # here; the plan quantile would count the same tail twice (a long run and a slow fastest run).
        budget = time_left_ms if self.guard is None else \
            min(time_left_ms, self.guard.cap_ms(self.selector.times, self.median_ms[0] + self.overhead_ms))
        choice = self.selector.choose(budget)
        if choice.index is None:
            return None, False
        return choice.index, self.selector.own_times[choice.index] <= time_left_ms

    def expire(self, arrival: float, deadline_ms: float) -> Prediction:
        """The answer to a request found past its deadline: no model runs; the arrival still counts
        towards the rate the blocking guard sees."""
        if self.guard is not None:
            self.guard.record(arrival, deadline_ms)
        spent = 1e3 * (time.perf_counter() - arrival)
        return Prediction(-1, [], None, spent, deadline_ms, False, False, expired=True)

    def predict(self, image: torch.Tensor, deadline_ms: float, arrival: float | None = None,
                waiting: int = 0) -> Prediction:
        """image: [C, H, W] in [0, 1]; the deadline counts from `arrival` (time.perf_counter()).
        A request already past its deadline is answered expired, no model run.
        `waiting`: requests queued behind this one; each is left the fastest model's expected
        time, so one request does not spend the slack of those behind it (under load the
        choice falls towards the fastest model instead of letting the queue grow)."""
        decided = time.perf_counter()
        arrival = decided if arrival is None else arrival
        if has_expired(arrival, deadline_ms, decided):
            return self.expire(arrival, deadline_ms)
        if self.guard is not None:
            self.guard.record(arrival, deadline_ms)
        reserve = self.overhead_ms + waiting * (self.selector.times[0] + self.overhead_ms)
        time_left = deadline_ms - 1e3 * (decided - arrival) - reserve
        index, fits = self.choose(time_left)
        if index is None:
            spent = 1e3 * (time.perf_counter() - arrival)
            return Prediction(-1, [], None, spent, deadline_ms, False, False)
        with torch.no_grad():
            probabilities = torch.softmax(self.models[index](image.unsqueeze(0)), dim=1)[0]
        label = int(probabilities.argmax())
        values = [round(float(p), 6) for p in probabilities]
        ready = time.perf_counter()
        self.observe(index, 1e3 * (ready - decided))
        spent = 1e3 * (ready - arrival)
        return Prediction(label, values, self.names[index], spent, deadline_ms, spent <= deadline_ms, fits)
