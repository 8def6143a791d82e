"""A block-circulant layer for inference (CirCNN; the layer and the paper:
leancnn.layers.circulant), with the batch norm after it folded in, run the way its
deploy plan says (leancnn.kernels.plans): the FFT route, or the dense convolution of
the expanded weight (oneDNN), whichever measured faster for the input shape, batch
size, memory format and thread count. ONNX sees the dense convolution.

The FFT route keeps the weight's spectrum (computed once here, not per image); a
folded batch norm scales each output channel differently, which a circulant block
cannot absorb, so that route applies it after the inverse FFT (scale and shift),
while the dense route folds it into the expanded weight.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..layers.circulant import (BlockCirculantConv2d, BlockCirculantLinear, circulant_conv_fft, circulant_cost,
                                frequency_weight)
from ..measure.counting import LayerCost
from ..surgery import replace_module
from . import plans
from .sparse import SparseConvInference, capturing_graph, conv_applies

CIRCULANT_CHOICES = ("fft", "dense")


class CirculantInference(nn.Module):
    """`norm(layer(x))` (eval-mode statistics; `norm` may be None) for inference."""

    def __init__(self, layer: BlockCirculantConv2d | BlockCirculantLinear, norm: nn.BatchNorm2d | None = None) -> None:
        super().__init__()
        self.linear = isinstance(layer, BlockCirculantLinear)
        self.block = layer.block
        self.stride = (1, 1) if self.linear else layer.stride
        self.padding = (0, 0) if self.linear else layer.padding
        with torch.no_grad():
            vectors = layer.weight.detach().clone()
            taps = vectors if not self.linear else vectors.unsqueeze(-1).unsqueeze(-1)
            out_channels = vectors.shape[0] * self.block
            bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(out_channels)
            scale = torch.ones(out_channels)
            if norm is not None:
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                bias = (bias - norm.running_mean) * scale + norm.bias
            dense = layer.dense_weight().detach() * (scale.view(-1, 1) if self.linear else scale.view(-1, 1, 1, 1))
        self.register_buffer("vectors", vectors)                      # for counting: what is stored
        self.register_buffer("grouped_weight", frequency_weight(taps))
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.in_features = vectors.shape[1] * self.block
        self.out_features = out_channels
        self.relu = False
        self.kernel_ready = False
        # The dense route: the expanded weight as an ordinary layer; use_kernel() makes it the
        # sparse-kernel layer, whose own plan picks the compiled kernel or oneDNN.
        if self.linear:
            self.dense_layer: nn.Module = nn.Linear(self.in_features, out_channels)
        else:
            self.dense_layer = nn.Conv2d(self.in_features, out_channels, tuple(dense.shape[2:]), self.stride,
                                         self.padding)
        with torch.no_grad():
            self.dense_layer.weight.copy_(dense)
            self.dense_layer.bias.copy_(bias)
        self.planned = plans.PlannedChoices()

    def use_kernel(self, relu: bool) -> "CirculantInference":
        """The dense route on the sparse-kernel layer (when the kernel computes this shape), the
        ReLU after the layer fused into both routes."""
        self.relu, self.kernel_ready = relu, True
        if not self.linear and conv_applies(self.dense_layer):
            self.dense_layer = SparseConvInference.from_conv(self.dense_layer, relu=relu)
        return self

    def run(self, choice: str, x: torch.Tensor) -> torch.Tensor:
        if choice == "dense":
            out = self.dense_layer(x)
            return F.relu(out) if self.relu and not isinstance(self.dense_layer, SparseConvInference) else out
        if choice != "fft":
            raise ValueError(f"unknown circulant implementation {choice!r}; one of {', '.join(CIRCULANT_CHOICES)}")
        if self.linear:
            leading = x.shape[:-1]
            out = circulant_conv_fft(x.reshape(-1, self.in_features, 1, 1), self.grouped_weight, self.block, 1, 0)
            out = out.reshape(*leading, -1) * self.scale + self.bias
        else:
            out = circulant_conv_fft(x.contiguous(), self.grouped_weight, self.block, self.stride, self.padding)
            out = out * self.scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return F.relu(out) if self.relu else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() or x.device.type != "cpu" or x.requires_grad:
            return self.run("dense", x)
        if capturing_graph():   # what the last eager call ran; nothing to time on fake tensors
            return self.run(self.planned.last or "dense", x)
        last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        fast_key = (tuple(x.shape), last, torch.get_num_threads())
        choice = self.planned.get(fast_key)
        if choice is None:
            shape = "x".join(map(str, x.shape[1:]))
            taps = "x".join(map(str, self.dense_layer.weight.shape[2:])) or "1"
            dense_route = "kernel" if isinstance(self.dense_layer, SparseConvInference) else "onednn"
            key = (f"circulant{self.block} {'linear' if self.linear else 'conv'} {shape} -> {self.out_features}ch "
                   f"k={taps} stride={self.stride[0]} relu={int(self.relu)} dense={dense_route} batch={x.shape[0]} "
                   f"threads={torch.get_num_threads()} {'channels_last' if last else 'contiguous'}")
            choice = self.planned.plan(fast_key, key, {name: (lambda name=name: self.run(name, x))
                                                       for name in CIRCULANT_CHOICES})
        return self.run(choice, x)

    def plan_summary(self) -> list[dict]:
        return self.planned.summary()

    def leancnn_cost(self, inputs: tuple, output: torch.Tensor) -> LayerCost:
        taps = 1 if self.linear else self.dense_layer.weight.shape[2] * self.dense_layer.weight.shape[3]
        return circulant_cost(self.vectors, self.bias, self.block, inputs, output, taps)

    def extra_repr(self) -> str:
        kind = "linear" if self.linear else f"conv stride={self.stride}"
        return f"{self.in_features}, {self.out_features}, {kind}, block={self.block}, relu={self.relu}"


@torch.no_grad()
def swap_circulant_layers(model: nn.Module) -> nn.Module:
    """Every block-circulant layer -> CirculantInference, absorbing the batch norm right after
    it in a Sequential (the caller's copy of the model, in eval mode)."""
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for index in range(len(module)):
            layer = module[index]
            if not isinstance(layer, (BlockCirculantConv2d, BlockCirculantLinear)):
                continue
            norm = module[index + 1] if index + 1 < len(module) else None
            if isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats and not isinstance(layer, BlockCirculantLinear):
                module[index] = CirculantInference(layer, norm)
                module[index + 1] = nn.Identity()
            else:
                module[index] = CirculantInference(layer)
    for name, layer in list(model.named_modules()):
        if name and isinstance(layer, (BlockCirculantConv2d, BlockCirculantLinear)):
            replace_module(model, name, CirculantInference(layer))
    return model
