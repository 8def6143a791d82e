"""Model zoo and deadline-aware runtime (see leancnn.zoo.runtime)."""
from .front import FrontModel, pareto_front, thin
from .selector import Selector

__all__ = ["FrontModel", "Selector", "pareto_front", "thin"]
