"""The accuracy/time front of a set of models, and its thinning.

Adaptive deep learning for soft real-time classification (see METHODS.md):
a runtime keeps only models whose accuracy rises with their time, so that
"the most accurate model that fits" is also "the slowest model that fits".
"""
from __future__ import annotations

from dataclasses import dataclass

from ..measure.pareto import pareto_front as front_indices


@dataclass(frozen=True)
class FrontModel:
    name: str
    time_ms: float     # expected time per request (a latency quantile plus overhead), ms
    accuracy: float    # fraction in [0, 1]


def pareto_front(candidates: list[FrontModel]) -> list[FrontModel]:
    """Models no other model beats on both axes, by rising time. A model slower
    and no more accurate than another is dropped; of equal times the more
    accurate stays."""
    by_name = sorted(candidates, key=lambda c: c.name)   # of exact duplicates, the first name stays
    return [by_name[i] for i in front_indices([c.time_ms for c in by_name], [c.accuracy for c in by_name])]


def thin(front: list[FrontModel], epsilon: float) -> list[FrontModel]:
    """Keep the fastest model, then each model at least `epsilon` more accurate
    than the last one kept: accuracy rises strictly with time, by a step worth
    the extra time."""
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    kept: list[FrontModel] = []
    for candidate in front:
        if not kept or candidate.accuracy >= kept[-1].accuracy + epsilon and candidate.accuracy > kept[-1].accuracy:
            kept.append(candidate)
    return kept
