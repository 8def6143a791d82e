"""Pieces shared by the model families."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

ConvLayer = Callable[..., nn.Module]  # same signature as nn.Conv2d


class Normalize(nn.Module):
    """Per-channel (x - mean) / std as the model's first op, so attacks, data
    and deployment all work in [0, 1] pixel space."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def scaled(channels: int, width: float, divisor: int = 1) -> int:
    """Channel count times the width multiplier, at least one divisor's worth."""
    value = max(divisor, int(round(channels * width / divisor)) * divisor)
    return value


def conv_bn(conv_layer: ConvLayer, in_channels: int, out_channels: int, kernel_size: int,
            stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        conv_layer(in_channels, out_channels, kernel_size, stride=stride,
                   padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


class Classifier(nn.Module):
    """Normalize -> features -> global average pool -> linear."""

    def __init__(self, normalize: Normalize, features: nn.Module, feature_channels: int, num_classes: int) -> None:
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(feature_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.pool(x), 1))
