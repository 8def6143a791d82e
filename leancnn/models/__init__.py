"""Model registry: every family registers itself on import."""
from . import lenet, mobilenetv2, resnet, shufflenetv2, vgg  # noqa: F401  (registration)
from .common import Normalize
from .registry import MODELS, create_model

__all__ = ["MODELS", "Normalize", "create_model"]
