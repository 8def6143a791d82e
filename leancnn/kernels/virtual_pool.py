"""ViP for inference: the wrapped block (its stride-2 convolution a deployed kernel layer, batch
norm folded, ReLU fused) and the interpolation back to full size as one compiled pass
(leancnn/kernels/virtual_upsample.cpp, the operator leancnn::virtual_upsample) instead of
F.interpolate and a replicate pad (two passes and a temporary tensor). Which of the two runs is a
measured plan per input key, like a sparse layer's (leancnn.kernels.plans). The rule and the paper:
leancnn.layers.vip.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers.vip import VirtualPool, virtual_upsample
from . import plans, psconv_extension
from .sparse import capturing_graph

UPSAMPLE_CHOICES = ("fused", "interpolate")


class VirtualPoolInference(nn.Module):
    """A deployed VirtualPool: block(x) at stride 2, then the fused upsample (or the reference one)."""

    def __init__(self, vip: VirtualPool) -> None:
        super().__init__()
        self.block = vip.block
        self.planned = plans.PlannedChoices()   # per (values' shape, map size, channels_last, threads)

    def choices(self) -> list[str]:
        return list(UPSAMPLE_CHOICES) if psconv_extension() is not None else ["interpolate"]

    @staticmethod
    def run(choice: str, values: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if choice == "fused":
            return torch.ops.leancnn.virtual_upsample(values, height, width)
        if choice == "interpolate":
            return virtual_upsample(values, height, width)
        raise ValueError(f"unknown upsample {choice!r}; one of {', '.join(UPSAMPLE_CHOICES)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height < 2 or width < 2:
            raise ValueError(f"ViP cannot apply to a {height}x{width} feature map (it needs at least 2x2)")
        values = self.block(x)
        if (psconv_extension() is None or torch.onnx.is_in_onnx_export() or values.device.type != "cpu"
                or values.dtype != torch.float32 or values.requires_grad):
            return virtual_upsample(values, height, width)   # ONNX sees Resize and Pad
        if capturing_graph():   # what the last eager call ran; no timing on fake tensors
            return self.run(self.planned.last or "fused", values, height, width)
        last = values.is_contiguous(memory_format=torch.channels_last)
        fast_key = (tuple(values.shape), height, width, last, torch.get_num_threads())
        choice = self.planned.get(fast_key)
        if choice is None:
            n, c, h, w = values.shape
            key = (f"vip-upsample {c}ch {h}x{w}->{height}x{width} batch={n} threads={torch.get_num_threads()} "
                   f"{'channels_last' if last else 'contiguous'}")
            choice = self.planned.plan(fast_key, key, {name: (lambda name=name: self.run(name, values, height, width))
                                                       for name in self.choices()})
        return self.run(choice, values, height, width)

    def plan_summary(self) -> list[dict]:
        return self.planned.summary()
