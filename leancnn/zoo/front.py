"""The accuracy/time front of a set of models, and its thinning.

Adaptive deep learning for soft real-time classification (see METHODS.md):
a runtime keeps only models whose accuracy rises with their time, so that
"the most accurate model that fits" is also "the slowest model that fits".
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    name: str
    time_ms: float     # expected time per request (a latency quantile plus overhead), ms
    accuracy: float    # fraction in [0, 1]


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """Models no other model beats on both axes, by rising time. A model slower
    and no more accurate than another is dropped; of equal times the more
    accurate stays."""
    ordered = sorted(candidates, key=lambda c: (c.time_ms, -c.accuracy, c.name))
    front: list[Candidate] = []
    for candidate in ordered:
        if not front or candidate.accuracy > front[-1].accuracy:
            if front and candidate.time_ms == front[-1].time_ms:
                continue  # same time, and the kept one was at least as accurate
            front.append(candidate)
    return front


def thin(front: list[Candidate], epsilon: float) -> list[Candidate]:
    """Keep the fastest model, then each model at least `epsilon` more accurate
    than the last one kept: accuracy rises strictly with time, by a step worth
    the extra time."""
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    kept: list[Candidate] = []
    for candidate in front:
        if not kept or candidate.accuracy >= kept[-1].accuracy + epsilon and candidate.accuracy > kept[-1].accuracy:
            kept.append(candidate)
    return kept
