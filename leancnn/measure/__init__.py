"""Measurement: counting (params, MACs dense and effective, storage), latency, robustness."""
from .attacks import ATTACKS, Attack, FGSMOptions, PGDOptions, parse_attack
from .counting import LayerCost, Profile, count
from .latency import latency_table, machine, measure_latency
from .robustness import robust_accuracy

__all__ = ["ATTACKS", "Attack", "FGSMOptions", "PGDOptions", "LayerCost", "Profile", "count", "latency_table",
           "machine", "measure_latency", "parse_attack", "robust_accuracy"]
