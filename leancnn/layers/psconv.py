"""Pre-defined sparse 3x3 convolution (pSConv).

Kundu, Nazemi, Pedram, Chugg, Beerel, "pSConv: A Pre-defined Sparse Kernel
Based Convolution for Deep CNNs", Allerton 2019; and "Pre-defined Sparsity for
Low-Complexity Convolutional Neural Networks", IEEE Trans. Computers 2020
(periodic supports).

Each 3x3 kernel (filter i, input channel j) keeps a fixed subset of its 9 taps,
chosen before training and never changed. With periodic assignment, kernel
(i, j) uses support number r = (i + j + 1) mod P, so a layer holds only P
distinct supports and needs no per-weight index.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..measure.counting import FP32_BYTES, LayerCost

TAPS = 9  # a 3x3 kernel, taps numbered row-major 0..8

# The supports the papers use, by taps kept.
CORNER_SUPPORTS = [(0, 1, 3, 4), (1, 2, 4, 5), (3, 4, 6, 7), (4, 5, 7, 8)]            # k = 4: 2x2 corners
PAIR_SUPPORTS = [(0, 1), (1, 2), (3, 4), (4, 5), (6, 7), (7, 8)]                      # k = 2: horizontal pairs
SINGLE_SUPPORTS = [(t,) for t in range(TAPS)]                                         # k = 1


def base_supports(k: int, count: int, generator: torch.Generator) -> list[tuple[int, ...]]:
    """The distinct supports with k taps; k outside {1, 2, 4, 9} draws `count`
    random k-subsets (the papers fix no pattern for those)."""
    if k == 4:
        return CORNER_SUPPORTS
    if k == 2:
        return PAIR_SUPPORTS
    if k == 1:
        return SINGLE_SUPPORTS
    if k == TAPS:
        return [tuple(range(TAPS))]
    return [tuple(sorted(torch.randperm(TAPS, generator=generator)[:k].tolist())) for _ in range(count)]


def support_assignment(out_channels: int, in_channels: int, *, k: int, period: int, dense_every: bool,
                       assign: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(patterns [S, 9] bool, index [C_out, C_in] long): kernel (i, j) uses patterns[index[i, j]].

    periodic: residue r = (i + j + 1) mod P picks the support; with dense_every
    (PSD) residue 0 is a dense kernel and residues 1..P-1 cycle through the
    k-tap supports. random: each kernel draws a support independently (the
    Allerton paper's assignment; which distribution it used is unconfirmed:
    uniform over the same supports here).
    """
    generator = torch.Generator().manual_seed(seed)
    supports = base_supports(k, period, generator)
    # Residues 0..n-1 (1..P-1 under PSD) cycle through the k-tap supports.
    sparse_residues = period - 1 if dense_every else period
    used = supports[:max(1, min(sparse_residues, len(supports)))]
    patterns_list = ([tuple(range(TAPS))] if dense_every else []) + used
    patterns = torch.zeros(len(patterns_list), TAPS, dtype=torch.bool)
    for row, support in enumerate(patterns_list):
        patterns[row, list(support)] = True
    rows = torch.arange(out_channels)[:, None]
    cols = torch.arange(in_channels)[None, :]
    if assign == "periodic":
        residue = (rows + cols + 1) % period
    else:
        residue = torch.randint(0, period, (out_channels, in_channels), generator=generator)
    if dense_every:
        index = torch.where(residue == 0, 0, 1 + (residue - 1) % len(used))
    else:
        index = residue % len(used)
    return patterns, index


class PSConv2d(nn.Conv2d):
    """A 3x3 convolution whose kernels keep only pre-defined taps.

    The mask is rebuilt from two small buffers, `support_patterns` [S, 9] and
    `support_index` [C_out, C_in / groups]; the weight is multiplied by it in
    every forward, so autograd masks the gradients, and `apply_mask_()` zeroes
    the stored weights again after each optimizer step (momentum and decoupled
    weight decay must never let a masked weight drift from exactly zero).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=1, dilation=1,
                 groups: int = 1, bias: bool = True, *, k: int = 4, period: int = 4, dense_every: bool = False,
                 assign: str = "periodic", seed: int = 0, padding_mode: str = "zeros") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode)
        if self.kernel_size != (3, 3):
            raise ValueError(f"PSConv2d needs a 3x3 kernel, got {self.kernel_size}")
        self.k, self.period, self.dense_every, self.assign = k, period, dense_every, assign
        patterns, index = support_assignment(out_channels, in_channels // groups, k=k, period=period,
                                             dense_every=dense_every, assign=assign, seed=seed)
        self.register_buffer("support_patterns", patterns)
        # Periodic: the per-kernel support number follows from (i + j + 1) mod P, so only the
        # P patterns are saved; random assignment must save each kernel's number.
        self.register_buffer("support_index", index.to(torch.uint8 if len(patterns) < 256 else torch.int32),
                             persistent=assign != "periodic")
        self._mask_cache: tuple[tuple, torch.Tensor] | None = None
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None
        self.apply_mask_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.assign == "periodic":  # files written before the index was derived still load
            state_dict.pop(prefix + "support_index", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options) -> "PSConv2d":
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, padding_mode=conv.padding_mode, **options)
        layer = layer.to(conv.weight.device)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.apply_mask_()
        return layer

    @property
    def mask(self) -> torch.Tensor:
        """Boolean [C_out, C_in / groups, 3, 3] support mask (cached: it changes only on load)."""
        index = self.support_index
        key = (index.data_ptr(), index._version, self.support_patterns._version, index.device)
        if self._mask_cache is None or self._mask_cache[0] != key:
            self._mask_cache = (key, self.support_patterns[index.long()].view_as(self.weight))
        return self._mask_cache[1]

    def masked_weight(self) -> torch.Tensor:
        """weight * mask; without autograd it is cached until the weight changes
        in place (its version counter moves), so inference pays nothing per call."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self.weight * self.mask
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype, id(self.mask))
        if self._weight_cache is None or self._weight_cache[0] != key:
            with torch.no_grad():
                self._weight_cache = (key, weight * self.mask)
        return self._weight_cache[1]

    @torch.no_grad()
    def apply_mask_(self) -> None:
        self.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.masked_weight()
        if self.padding_mode != "zeros":
            return super()._conv_forward(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def leancnn_cost(self, inputs: tuple, output: torch.Tensor) -> LayerCost:
        uses = output.shape[-2] * output.shape[-1]
        taps = int(self.mask.sum())
        params = self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)
        nonzero = int(torch.count_nonzero(self.weight.detach() * self.mask))
        if self.bias is not None:
            nonzero += int(torch.count_nonzero(self.bias))
        # Values of the taps that exist + S support patterns of 9 bits (2 bytes);
        # random assignment also stores each kernel's support number.
        storage = taps * FP32_BYTES + len(self.support_patterns) * 2
        if self.assign != "periodic":
            bits = max(1, math.ceil(math.log2(max(len(self.support_patterns), 2))))
            storage += math.ceil(self.support_index.numel() * bits / 8)
        if self.bias is not None:
            storage += self.bias.numel() * FP32_BYTES
        fmt = f"{'psd' if self.dense_every else 'ps'}{self.k}_p{self.period}" + ("" if self.assign == "periodic" else "_random")
        return LayerCost(self.weight.numel() * uses, taps * uses, params, nonzero, storage, fmt)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}, period={self.period}, dense_every={self.dense_every}, assign={self.assign}"
