"""Virtual pooling (ViP).

Chen, Zhang, Ding, Marculescu, "ViP: Virtual Pooling for Accelerating
CNN-based Image Classification and Object Detection", WACV 2020.

A convolution block (conv, batch norm, activation) runs at stride 2, a quarter
of the output pixels, and its output is interpolated back to the full size:
computed values land on even positions, odd rows and columns take the mean of
their two neighbours, odd-odd positions the mean of four, and a border without
a second neighbour copies the nearest value. The error is bounded because the
convolution is linear and the activation 1-Lipschitz.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def upsample_axis(values: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """The rule on one axis, written out (the reference the fast path is tested against):
    computed values on even positions, neighbour means on odd ones, the nearest value
    where a second neighbour is missing."""
    computed = (size + 1) // 2
    odd = size // 2
    if values.shape[dim] < computed:
        raise ValueError(f"ViP: {values.shape[dim]} computed values cannot fill size {size}")
    even = values.narrow(dim, 0, computed)
    padded = torch.cat([even, even.narrow(dim, computed - 1, 1)], dim=dim)  # border: nearest value
    between = (padded.narrow(dim, 0, odd) + padded.narrow(dim, 1, odd)) / 2
    pairs = torch.stack([even.narrow(dim, 0, odd), between], dim=dim + 1)
    shape = list(values.shape)
    shape[dim] = 2 * odd
    woven = pairs.reshape(shape)
    if size % 2:
        woven = torch.cat([woven, even.narrow(dim, computed - 1, 1)], dim=dim)
    return woven


def virtual_upsample(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, C, h, w] computed at stride 2 -> [N, C, height, width].

    The rule is bilinear interpolation with aligned corners onto the odd-sized
    grid (2h - 1) x (2w - 1): even positions keep their values, odd ones get
    the mean of two neighbours, odd-odd the mean of four. An even size adds a
    last row or column with no second neighbour, which copies the nearest
    (replicate padding). One optimised kernel instead of a dozen copies."""
    h, w = (height + 1) // 2, (width + 1) // 2
    if values.shape[-2] < h or values.shape[-1] < w:
        raise ValueError(f"ViP: {tuple(values.shape[-2:])} computed values cannot fill {height}x{width}")
    values = values[..., :h, :w]
    grid = F.interpolate(values, size=(2 * h - 1, 2 * w - 1), mode="bilinear", align_corners=True) \
        if h > 1 or w > 1 else values
    extra_rows, extra_cols = height - (2 * h - 1), width - (2 * w - 1)
    if extra_rows or extra_cols:
        grid = F.pad(grid, (0, extra_cols, 0, extra_rows), mode="replicate")
    return grid


class VirtualPool(nn.Module):
    """Wraps a block whose first layer is a stride-1 convolution: runs it at stride 2, interpolates back."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        conv = block[0] if isinstance(block, nn.Sequential) else block
        if not isinstance(conv, nn.Conv2d) or conv.stride != (1, 1):
            raise ValueError("ViP wraps a block that starts with a stride-1 convolution")
        conv.stride = (2, 2)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height < 2 or width < 2:
            raise ValueError(f"ViP cannot apply to a {height}x{width} feature map (it needs at least 2x2)")
        return virtual_upsample(self.block(x), height, width)
