"""Model registry and the one factory, `create_model`."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .common import ConvLayer, Normalize
from .user import build_user_model, is_user_model, user_source_file

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 conv_layer: ConvLayer = nn.Conv2d) -> nn.Module:
    """Build a registered model. `mean`/`std` (per channel, [0, 1] units) set the
    input normalisation that is the model's first op; `conv_layer` replaces
    nn.Conv2d everywhere so a method can inject its own convolution. `name` may be a user model,
    FILE.py:FUNCTION or package.module:FUNCTION (leancnn.models.user)."""
    builder = None if is_user_model(name) else MODELS.get(name)
    if width <= 0:
        raise ConfigError(f"width must be > 0, got {width}")
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    mean = list(mean) if mean is not None else [0.0] * in_channels
    std = list(std) if std is not None else [1.0] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
    if builder is None:
        return build_user_model(name, num_classes=num_classes, in_channels=in_channels, width=width, mean=mean, std=std)
    return builder(num_classes=num_classes, in_channels=in_channels, width=width,
                   normalize=Normalize(mean, std), conv_layer=conv_layer)


def check_model_name(name: str) -> None:
    """Raise ConfigError, before any work, for a model that cannot be built: an unknown registered
    name, or a user model whose file or module is not there."""
    if is_user_model(name):
        user_source_file(name)
    else:
        MODELS.get(name)
