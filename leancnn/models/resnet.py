"""ResNets: small-image ResNet18/34 (3x3 stem, no max-pool), the bottleneck ResNet50 with the
same stem, and CIFAR-style ResNet20/32/56/110 (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016)."""
from __future__ import annotations

import torch
from torch import nn

from .common import Classifier, ConvLayer, Normalize, conv_bn, init_weights, scaled
from .registry import MODELS


def shortcut(conv_layer: ConvLayer, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The identity, or a 1x1 projection (with batch norm) where the block changes the shape."""
    if stride != 1 or in_channels != out_channels:
        return conv_bn(conv_layer, in_channels, out_channels, 1, stride, relu=False)
    return nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; a 1x1 projection shortcut where the shape changes."""

    def __init__(self, conv_layer: ConvLayer, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(conv_layer, in_channels, out_channels, 3, stride)
        self.conv2 = conv_bn(conv_layer, out_channels, out_channels, 3, relu=False)
        self.shortcut = shortcut(conv_layer, in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 down to `inner` channels, 3x3 (carrying the stride, as torchvision's v1.5 does), 1x1
    up to `out_channels`; a 1x1 projection shortcut where the shape changes."""

    def __init__(self, conv_layer: ConvLayer, in_channels: int, inner: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(conv_layer, in_channels, inner, 1)
        self.conv2 = conv_bn(conv_layer, inner, inner, 3, stride)
        self.conv3 = conv_bn(conv_layer, inner, out_channels, 1, relu=False)
        self.shortcut = shortcut(conv_layer, in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


def _resnet(*, blocks: list[int], channels: list[int], stem_channels: int, num_classes: int,
            in_channels: int, width: float, normalize: Normalize, conv_layer: ConvLayer,
            expansion: int = 1) -> nn.Module:
    """`expansion` 1: basic blocks of `channels` per stage; 4: bottleneck blocks whose inner width
    is `channels` and output 4x that."""
    stem = scaled(stem_channels, width)
    layers: list[nn.Module] = [conv_bn(conv_layer, in_channels, stem, 3)]
    current = stem
    for stage, (count, base) in enumerate(zip(blocks, channels)):
        inner = scaled(base, width)
        out = inner * expansion
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            block = BasicBlock(conv_layer, current, out, stride) if expansion == 1 else \
                Bottleneck(conv_layer, current, inner, out, stride)
            layers.append(block)
            current = out
    model = Classifier(normalize, nn.Sequential(*layers), current, num_classes)
    init_weights(model)
    return model


@MODELS.register("resnet18")
def resnet18(**kw) -> nn.Module:
    return _resnet(blocks=[2, 2, 2, 2], channels=[64, 128, 256, 512], stem_channels=64, **kw)


@MODELS.register("resnet34")
def resnet34(**kw) -> nn.Module:
    return _resnet(blocks=[3, 4, 6, 3], channels=[64, 128, 256, 512], stem_channels=64, **kw)


@MODELS.register("resnet50")
def resnet50(**kw) -> nn.Module:
    return _resnet(blocks=[3, 4, 6, 3], channels=[64, 128, 256, 512], stem_channels=64, expansion=4, **kw)


def _cifar_resnet(depth: int, **kw) -> nn.Module:
    per_stage = (depth - 2) // 6
    return _resnet(blocks=[per_stage] * 3, channels=[16, 32, 64], stem_channels=16, **kw)


@MODELS.register("resnet20")
def resnet20(**kw) -> nn.Module:
    return _cifar_resnet(20, **kw)


@MODELS.register("resnet32")
def resnet32(**kw) -> nn.Module:
    return _cifar_resnet(32, **kw)


@MODELS.register("resnet56")
def resnet56(**kw) -> nn.Module:
    return _cifar_resnet(56, **kw)


@MODELS.register("resnet110")
def resnet110(**kw) -> nn.Module:
    return _cifar_resnet(110, **kw)
