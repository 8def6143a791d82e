"""Model registry: every family registers itself on import."""
from . import lenet, mobilenetv2, resnet, shufflenetv2, vgg  # noqa: F401  (registration)
from .common import Normalize
from .registry import MODELS, check_model_name, create_model
from .user import check_user_model_source, is_user_model, reload_reference, user_model_source

__all__ = ["MODELS", "Normalize", "check_model_name", "check_user_model_source", "create_model", "is_user_model",
           "reload_reference", "user_model_source"]
