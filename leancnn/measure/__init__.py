"""Measurement: counting (params, MACs dense and effective, storage), latency, robustness."""
from .attacks import ATTACKS, Attack, FGSMOptions, PGDOptions, parse_attack
from .autoattack import APGDOptions, APGDTargetedOptions, AutoAttackOptions, SquareOptions
from .counting import LayerCost, Profile, count
from .latency import latency_table, machine, measure_latency
from .robustness import robust_accuracies, robust_accuracy

__all__ = ["ATTACKS", "APGDOptions", "APGDTargetedOptions", "Attack", "AutoAttackOptions", "FGSMOptions",
           "PGDOptions", "SquareOptions", "LayerCost", "Profile", "count", "latency_table",
           "machine", "measure_latency", "parse_attack", "robust_accuracies", "robust_accuracy"]
