"""The perturbation-budget curriculum of smooth adversarial training (SAT, METHODS.md): the
attack's budget starts easy and rises as the model copes, measured by a difficulty metric.

The budget moves in `stages` equal steps up to the target eps (stage s trains at
s / stages x eps). Every `check_every` optimizer steps the difficulty of the current stage is
measured; if the model copes, the next stage opens:

- prob (P-SAT): the mean softmax probability of the true class on this batch's adversarial
  examples; the model copes when it is at least `threshold` (default 0.5).
- hessian (H-SAT): the largest eigenvalue of the adversarial loss's Hessian with respect to the
  weights (power iteration, leancnn.measure.sharpness); the first check of a stage records it,
  and the model copes when a later check finds it at most `threshold` (default 1.0) times that
  value: the loss landscape at this budget is no sharper than when the stage began.

A deadline bounds the curriculum from below: by the fraction `ramp` of training the budget is at
the target whatever the metric says (stage >= ceil(stages x step / (ramp x total steps))), so a
run always trains its last part at the budget it is evaluated at, and a SAT run and plain
adversarial training at the same eps are comparable. The difficulty only makes the rise faster
than that linear ramp, never slower. Choices the description leaves open (unconfirmed): the
stage count, the thresholds, the deadline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConfigError

METRICS = ("prob", "hessian")
DEFAULT_THRESHOLD = {"prob": 0.5, "hessian": 1.0}


@dataclass
class CurriculumSettings:
    metric: str = "prob"           # prob (P-SAT) or hessian (H-SAT)
    stages: int = 8                # the budget rises in this many equal steps to the target
    ramp: float = 0.6              # fraction of training by which the budget reaches the target at the latest
    threshold: float | None = None  # prob: coping probability (0.5); hessian: eigenvalue ratio (1.0)
    check_every: int = 25          # optimizer steps between difficulty checks

    def check(self, owner: str) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"{owner}: metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.stages < 1:
            raise ConfigError(f"{owner}: stages must be a whole number >= 1, got {self.stages}")
        if not 0 < self.ramp <= 1:
            raise ConfigError(f"{owner}: ramp must be in (0, 1] (the fraction of training by which the budget "
                              f"reaches eps), got {self.ramp}")
        if self.threshold is not None and not self.threshold > 0:
            raise ConfigError(f"{owner}: threshold must be > 0, got {self.threshold}")
        if self.metric == "prob" and self.threshold is not None and self.threshold > 1:
            raise ConfigError(f"{owner}: metric=prob compares a probability: threshold must be in (0, 1], "
                              f"got {self.threshold}")
        if self.check_every < 1:
            raise ConfigError(f"{owner}: check_every must be a whole number >= 1, got {self.check_every}")


@dataclass
class Curriculum:
    """The budget schedule's state: which stage is open, and what the checks measured."""

    settings: CurriculumSettings
    target_eps: float
    stage: int = 1
    reference: float | None = None   # hessian: the eigenvalue at the stage's first check
    last_difficulty: float | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        s = self.settings
        return s.threshold if s.threshold is not None else DEFAULT_THRESHOLD[s.metric]

    @property
    def eps(self) -> float:
        return self.target_eps * self.stage / self.settings.stages

    def deadline_stage(self, step: int, total_steps: int) -> int:
        """The lowest stage allowed at optimizer step `step` (from 0) of `total_steps`."""
        s = self.settings
        progress = min(1.0, (step + 1) / max(1.0, s.ramp * total_steps))
        return max(1, min(s.stages, math.ceil(s.stages * progress - 1e-9)))

    def is_check(self, step: int) -> bool:
        return step % self.settings.check_every == self.settings.check_every - 1

    def budget_at(self, step: int, total_steps: int) -> float:
        """The budget optimizer step `step` (from 0) of `total_steps` trains at: the open stage's,
        raised to the deadline's where it lags."""
        self.advance(max(self.stage, self.deadline_stage(step, total_steps)))
        return self.eps

    def observe(self, step: int, difficulty: Callable[[], float]) -> None:
        """After step `step`'s loss: on a check step `difficulty()` measures the open stage, and
        the next stage opens if the model copes (from the next step on)."""
        if self.stage >= self.settings.stages or not self.is_check(step):
            return
        value = float(difficulty())
        self.last_difficulty = value
        if self.settings.metric == "prob":
            copes = value >= self.threshold
        elif self.reference is None:
            self.reference, copes = value, False
        else:
            copes = value <= self.threshold * self.reference
        self.checks.append({"step": step, "eps": self.eps, "difficulty": value, "copes": copes})
        if copes:
            self.advance(self.stage + 1)

    def advance(self, stage: int) -> None:
        if stage != self.stage:
            self.stage, self.reference = stage, None

    # -- resume: the schedule's state is the method's --------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "reference": self.reference, "last_difficulty": self.last_difficulty,
                "checks": list(self.checks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state.get("stage", 1))
        self.reference = state.get("reference")
        self.last_difficulty = state.get("last_difficulty")
        self.checks = list(state.get("checks", []))
