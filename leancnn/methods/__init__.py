"""Method registry: each method module registers itself on import."""
from .base import METHODS, Method, apply_methods, parse_method, register_method
from . import admm, bcr, cap, circulant, csr, dnr, dynamic, init_prune, l1prune, magprune, psconv, rsr, sat, vip  # noqa: F401,E402  (registration)

__all__ = ["METHODS", "Method", "apply_methods", "parse_method", "register_method"]
