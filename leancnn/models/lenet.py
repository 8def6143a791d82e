"""LeNet-5 as the compression literature uses it (LeCun, Bottou, Bengio, Haffner, "Gradient-based
learning applied to document recognition", Proc. IEEE 1998; the Caffe variant of Deep Compression
and ADMM-NN, Ren et al., ASPLOS 2019, whose headline model it is): conv 20@5x5, max-pool, conv
50@5x5, max-pool, linear 800 -> 500, ReLU, linear 500 -> 10; about 431k weights, 92% of them in
the first linear layer. No batch norm, biases everywhere, as in the original.

The second pool is adaptive to a 4x4 map, so that 28x28 inputs (the original: 24 -> 12 -> 8 -> 4)
and 32x32 ones give the same 800 features.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvLayer, Normalize, init_weights, scaled
from .registry import MODELS


class LeNet5(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, width: float, normalize: Normalize,
                 conv_layer: ConvLayer) -> None:
        super().__init__()
        first, second, hidden = scaled(20, width), scaled(50, width), scaled(500, width)
        self.normalize = normalize
        self.features = nn.Sequential(
            conv_layer(in_channels, first, 5, bias=True), nn.MaxPool2d(2),
            conv_layer(first, second, 5, bias=True), nn.AdaptiveMaxPool2d(4))
        self.hidden = nn.Sequential(nn.Linear(second * 16, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_classes)
        init_weights(self)
        for linear in (self.hidden[0], self.classifier):   # N(0, 0.01) starves a net without batch norm
            nn.init.kaiming_uniform_(linear.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(self.hidden(torch.flatten(x, 1)))


@MODELS.register("lenet5")
def lenet5(**kw) -> nn.Module:
    return LeNet5(**kw)
