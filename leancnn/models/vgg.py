"""VGG with batch norm for small images (Simonyan, Zisserman, ICLR 2015): the
conv stack with one linear classifier, as the CIFAR literature uses it."""
from __future__ import annotations

from torch import nn

from .common import Classifier, ConvLayer, Normalize, conv_bn, init_weights, scaled
from .registry import MODELS

POOL = "M"
CONFIGS = {
    "vgg11": [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    "vgg16": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL],
}


def _vgg(config: list, *, num_classes: int, in_channels: int, width: float,
         normalize: Normalize, conv_layer: ConvLayer) -> nn.Module:
    layers: list[nn.Module] = []
    current = in_channels
    for item in config:
        if item == POOL:
            # ceil_mode keeps 28x28 inputs alive through five pools (28->14->7->4->2->1).
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            out = scaled(item, width)
            layers.append(conv_bn(conv_layer, current, out, 3))
            current = out
    model = Classifier(normalize, nn.Sequential(*layers), current, num_classes)
    init_weights(model)
    return model


@MODELS.register("vgg11")
def vgg11(**kw) -> nn.Module:
    return _vgg(CONFIGS["vgg11"], **kw)


@MODELS.register("vgg16")
def vgg16(**kw) -> nn.Module:
    return _vgg(CONFIGS["vgg16"], **kw)
