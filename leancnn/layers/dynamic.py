"""Layers of a run-time dynamic network: one set of weights, and a sub-network chosen by how
many leading channels each layer keeps (the method and the paper: leancnn.methods.dynamic).

A layer becomes dynamic by a class swap in place (`make_dynamic`), so its parameters, buffers
and state-dict names do not change:

- DynamicConv2d computes its first `active_out` filters (None: all) on the channels it is given
  (a prefix of its input channels: the producer before it kept a prefix); a depthwise one
  filters each channel it is given;
- DynamicBatchNorm2d normalises the channels it is given, with the statistics of the chosen
  sub-network (`subnet`, recalibrated per sub-network after training) in eval mode, or its own
  running statistics when none is chosen;
- DynamicLinear reads the features it is given.

Slicing a leading dimension is a view; slicing input channels is a strided view that the
convolution copies per call, so switching sub-networks allocates no weights that stay.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..measure.counting import FP32_BYTES, LayerCost


class DynamicConv2d(nn.Conv2d):
    active_out: int | None = None   # filters computed (None: all)
    chooses_width: bool = False     # a channel group's producer, whose width a sub-network sets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups > 1:   # depthwise (groups = channels): one filter per channel it is given
            channels = x.shape[1]
            bias = None if self.bias is None else self.bias[:channels]
            return F.conv2d(x, self.weight[:channels], bias, self.stride, self.padding, self.dilation, channels)
        out = self.out_channels if self.active_out is None else self.active_out
        weight = self.weight[:out, :x.shape[1]]
        bias = None if self.bias is None else self.bias[:out]
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def leancnn_cost(self, inputs: tuple, output: torch.Tensor) -> LayerCost:
        used = self.weight[:output.shape[1], :inputs[0].shape[1]]
        uses = output.shape[-2] * output.shape[-1]
        nonzero = int(torch.count_nonzero(used.detach()))
        params = used.numel() + (output.shape[1] if self.bias is not None else 0)
        return LayerCost(used.numel() * uses, nonzero * uses, params, nonzero, params * FP32_BYTES, "dense")


class DynamicBatchNorm2d(nn.BatchNorm2d):
    subnet: int | None = None   # the row of subnet_mean / subnet_var used in eval mode
    frozen: bool = False        # in training: normalise by the batch, leave the running statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if self.training and self.frozen:
            return F.batch_norm(x, None, None, self.weight[:channels], self.bias[:channels], True, 0.0, self.eps)
        if self.training or self.subnet is None:
            mean, var = self.running_mean[:channels], self.running_var[:channels]
        else:
            mean, var = self.subnet_mean[self.subnet, :channels], self.subnet_var[self.subnet, :channels]
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.momentum is None:   # a cumulative average, as nn.BatchNorm2d does
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, mean, var, self.weight[:channels], self.bias[:channels], self.training,
                            momentum, self.eps)


class DynamicLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, :x.shape[-1]], self.bias)

    def leancnn_cost(self, inputs: tuple, output: torch.Tensor) -> LayerCost:
        used = self.weight[:, :inputs[0].shape[-1]]
        uses = output.numel() // output.shape[0] // self.out_features
        nonzero = int(torch.count_nonzero(used.detach()))
        params = used.numel() + (self.bias.numel() if self.bias is not None else 0)
        return LayerCost(used.numel() * uses, nonzero * uses, params, nonzero, params * FP32_BYTES, "dense")


DYNAMIC_CLASSES = {nn.Conv2d: DynamicConv2d, nn.BatchNorm2d: DynamicBatchNorm2d, nn.Linear: DynamicLinear}
PLAIN_CLASSES = {dynamic: plain for plain, dynamic in DYNAMIC_CLASSES.items()}


def make_dynamic(module: nn.Module, subnets: int) -> None:
    """Swap a Conv2d, BatchNorm2d or Linear for its dynamic class in place (a batch norm gains a
    row of statistics per sub-network)."""
    if type(module) not in DYNAMIC_CLASSES:
        raise TypeError(f"no dynamic form of {type(module).__name__}")
    module.__class__ = DYNAMIC_CLASSES[type(module)]
    if isinstance(module, DynamicBatchNorm2d):
        channels = module.num_features
        module.register_buffer("subnet_mean", torch.zeros(subnets, channels, device=module.running_mean.device))
        module.register_buffer("subnet_var", torch.ones(subnets, channels, device=module.running_var.device))


def make_plain(module: nn.Module) -> None:
    """The inverse of make_dynamic (a batch norm keeps the statistics it is given, and drops its rows)."""
    module.__class__ = PLAIN_CLASSES[type(module)]
    for name in ("subnet_mean", "subnet_var"):
        module._buffers.pop(name, None)
    for attribute in ("active_out", "chooses_width", "subnet", "frozen"):
        module.__dict__.pop(attribute, None)
