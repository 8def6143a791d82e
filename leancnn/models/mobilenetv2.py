"""MobileNetV2 for small images (Sandler et al., CVPR 2018): stride-1 stem and
stride 1 in the second stage, as is usual for 32x32 inputs."""
from __future__ import annotations

import torch
from torch import nn

from .common import Classifier, ConvLayer, Normalize, conv_bn, init_weights, scaled
from .registry import MODELS

# expansion t, output channels c, repeats n, first stride s
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, conv_layer: ConvLayer, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn(conv_layer, in_channels, hidden, 1))
        layers += [conv_bn(conv_layer, hidden, hidden, 3, stride, groups=hidden),
                   conv_bn(conv_layer, hidden, out_channels, 1, relu=False)]
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


@MODELS.register("mobilenetv2")
def mobilenetv2(*, num_classes: int, in_channels: int, width: float,
                normalize: Normalize, conv_layer: ConvLayer) -> nn.Module:
    current = scaled(32, width, 8)
    layers: list[nn.Module] = [conv_bn(conv_layer, in_channels, current, 3)]
    for expansion, channels, repeats, stride in SETTINGS:
        out = scaled(channels, width, 8)
        for index in range(repeats):
            layers.append(InvertedResidual(conv_layer, current, out, stride if index == 0 else 1, expansion))
            current = out
    last = scaled(1280, max(1.0, width), 8)
    layers.append(conv_bn(conv_layer, current, last, 1))
    model = Classifier(normalize, nn.Sequential(*layers), last, num_classes)
    init_weights(model)
    return model
