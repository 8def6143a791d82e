"""Pareto fronts: the points no other point beats on both cost and accuracy."""
from __future__ import annotations

from typing import Sequence


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Indices of the points on the front (lower cost, higher accuracy), by
    rising cost. A point is dropped when another costs no more and is at least
    as accurate, being strictly better in one; of exact duplicates the first stays."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -accuracies[i], i))
    front: list[int] = []
    best = float("-inf")
    for index in order:
        if accuracies[index] > best:
            front.append(index)
            best = accuracies[index]
    return front
