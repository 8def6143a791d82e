"""The methods' layers."""
from .csrconv import CSRConv2d
from .psconv import PSConv2d
from .vip import VirtualPool, virtual_upsample

__all__ = ["CSRConv2d", "PSConv2d", "VirtualPool", "virtual_upsample"]
