"""Model zoo and deadline-aware runtime (see leancnn.zoo.runtime)."""
from .front import Candidate, pareto_front, thin
from .selector import Selector

__all__ = ["Candidate", "Selector", "pareto_front", "thin"]
