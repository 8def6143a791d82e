"""ShuffleNetV2 for small images (Ma et al., ECCV 2018): stride-1 stem, no
max-pool, three stages that each halve the resolution."""
from __future__ import annotations

import torch
from torch import nn

from .common import Classifier, ConvLayer, Normalize, conv_bn, init_weights, scaled
from .registry import MODELS

STAGE_CHANNELS = [116, 232, 464]  # the 1.0x variant
STAGE_REPEATS = [4, 8, 4]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    # sizes read one by one, not unpacked: torch.fx (channel surgery's tracer) cannot unpack a shape
    batch, channels, height, width = x.size(0), x.size(1), x.size(2), x.size(3)
    return x.view(batch, groups, channels // groups, height, width).transpose(1, 2).reshape(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, conv_layer: ConvLayer, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = out_channels // 2
        branch_in = in_channels if stride > 1 else branch
        if stride > 1:
            self.left = nn.Sequential(conv_bn(conv_layer, in_channels, in_channels, 3, stride, groups=in_channels, relu=False),
                                      conv_bn(conv_layer, in_channels, branch, 1))
        self.right = nn.Sequential(conv_bn(conv_layer, branch_in, branch, 1),
                                   conv_bn(conv_layer, branch, branch, 3, stride, groups=branch, relu=False),
                                   conv_bn(conv_layer, branch, branch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat([left, self.right(right)], dim=1)
        else:
            out = torch.cat([self.left(x), self.right(x)], dim=1)
        return channel_shuffle(out, 2)


@MODELS.register("shufflenetv2")
def shufflenetv2(*, num_classes: int, in_channels: int, width: float,
                 normalize: Normalize, conv_layer: ConvLayer) -> nn.Module:
    current = scaled(24, width, 2)
    layers: list[nn.Module] = [conv_bn(conv_layer, in_channels, current, 3)]
    for channels, repeats in zip(STAGE_CHANNELS, STAGE_REPEATS):
        out = scaled(channels, width, 2)
        for index in range(repeats):
            layers.append(ShuffleUnit(conv_layer, current, out, 2 if index == 0 else 1))
            current = out
    last = scaled(1024, max(1.0, width), 2)
    layers.append(conv_bn(conv_layer, current, last, 1))
    model = Classifier(normalize, nn.Sequential(*layers), last, num_classes)
    init_weights(model)
    return model
