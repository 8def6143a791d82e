"""The deadline-aware runtime, usable without the server: a zoo's models,
loaded and warm, and a selector over their expected times."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .build import load_manifest, load_zoo_models
from .front import Candidate
from .selector import Policy, Selector


@dataclass
class Prediction:
    label: int
    probabilities: list[float]
    model: str | None          # None when refused
    time_ms: float             # from arrival to the answer being ready
    deadline_ms: float
    deadline_met: bool
    expected_to_fit: bool      # the selector's view when it chose


class Runtime:
    """Most accurate model whose expected time (batch-1 quantile from the
    manifest + `overhead_ms`) fits the time left; `policy` when none fits.
    `fixed` pins one model (the static baselines: "fastest", "most-accurate")."""

    def __init__(self, zoo: str | Path, *, policy: Policy = "fastest", overhead_ms: float = 0.0,
                 fixed: str | None = None, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.manifest = load_manifest(Path(zoo))
        self.entries = self.manifest["models"]
        self.names = [e["name"] for e in self.entries]
        self.input_shape = tuple(self.manifest["input_shape"])
        self.models = load_zoo_models(Path(zoo), self.manifest)
        self.policy = policy
        self.set_overhead(overhead_ms)
        if fixed not in (None, "fastest", "most-accurate"):
            raise ValueError(f"fixed must be 'fastest' or 'most-accurate', got {fixed!r}")
        self.fixed = fixed
        self.warm_up()

    def set_overhead(self, overhead_ms: float) -> None:
        """Time a request costs besides the model (decoding, hand-off), ms: added to every expected time."""
        self.overhead_ms = overhead_ms
        self.selector = Selector([Candidate(e["name"], e["expected_ms"] + overhead_ms, e["accuracy"])
                                  for e in self.entries], self.policy)

    def warm_up(self, runs: int = 5) -> None:
        x = torch.rand(1, *self.input_shape)
        with torch.no_grad():
            for model in self.models:
                for _ in range(runs):
                    model(x)

    def choose(self, time_left_ms: float) -> tuple[int | None, bool]:
        if self.fixed == "fastest":
            return 0, self.selector.times[0] <= time_left_ms
        if self.fixed == "most-accurate":
            last = len(self.models) - 1
            return last, self.selector.times[last] <= time_left_ms
        choice = self.selector.choose(time_left_ms)
        return choice.index, choice.fits

    def predict(self, image: torch.Tensor, deadline_ms: float, arrival: float | None = None,
                waiting: int = 0) -> Prediction:
        """image: [C, H, W] in [0, 1]; the deadline counts from `arrival` (time.perf_counter()).
        `waiting`: requests queued behind this one; each is left the fastest model's expected
        time, so one request does not spend the slack of those behind it (under load the
        choice falls towards the fastest model instead of letting the queue grow)."""
        arrival = time.perf_counter() if arrival is None else arrival
        time_left = deadline_ms - 1e3 * (time.perf_counter() - arrival) - waiting * self.selector.times[0]
        index, fits = self.choose(time_left)
        if index is None:
            spent = 1e3 * (time.perf_counter() - arrival)
            return Prediction(-1, [], None, spent, deadline_ms, False, False)
        with torch.no_grad():
            probabilities = torch.softmax(self.models[index](image.unsqueeze(0)), dim=1)[0]
        spent = 1e3 * (time.perf_counter() - arrival)
        return Prediction(int(probabilities.argmax()), [round(float(p), 6) for p in probabilities],
                          self.names[index], spent, deadline_ms, spent <= deadline_ms, fits)
