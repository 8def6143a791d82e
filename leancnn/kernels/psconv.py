"""pSConv for inference: a trained PSConv2d packed for the compiled kernel
(leancnn/kernels/psconv_kernel.cpp), with bias and ReLU fused. Training keeps
the differentiable PSConv2d; `leancnn.deploy` swaps this in.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..layers.psconv import PSConv2d
from ..measure.counting import FP32_BYTES, LayerCost
from . import psconv_extension

TAPS = 9


def kernel_applies(conv: nn.Module) -> bool:
    """Shapes the kernel computes: 3x3, padding 1, stride 1 or 2, no groups or dilation."""
    return (isinstance(conv, PSConv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride in ((1, 1), (2, 2)) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


@torch.no_grad()
def pack(weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, block: int) -> dict[str, torch.Tensor]:
    """Blocks of `block` filters that share their support row; per block, the
    (tap, channel) pairs any of its filters uses, tap by tap, with the weights;
    each filter's place in block order, and the bias in that order.
    weight, mask: [C_out, C_in, 3, 3]."""
    out_channels, in_channels = weight.shape[:2]
    rows = mask.reshape(out_channels, -1)
    _, group_of = torch.unique(rows, dim=0, return_inverse=True)
    filters_by_block: list[torch.Tensor] = []
    for group in range(int(group_of.max()) + 1 if out_channels else 0):
        members = torch.nonzero(group_of == group).flatten()
        filters_by_block += list(members.split(block))
    taps_weight = (weight * mask).reshape(out_channels, in_channels, TAPS)
    taps_mask = mask.reshape(out_channels, in_channels, TAPS)
    begins, channels, taps, weights, block_filters = [0], [], [], [], []
    for members in filters_by_block:
        used = taps_mask[members].any(dim=0).T  # [9, C_in]: tap t of channel c is used by some filter
        # Tap-major (measured faster than channel-major on resnet18's layers).
        tap_index, channel_index = torch.nonzero(used, as_tuple=True)
        begins.append(begins[-1] + len(channel_index))
        lanes = torch.zeros(len(channel_index), block)
        lanes[:, :len(members)] = taps_weight[members][:, channel_index, tap_index].T
        weights.append(lanes)
        channels.append(channel_index)
        taps.append(tap_index)
        padded = torch.full((block,), -1, dtype=torch.long)
        padded[:len(members)] = members
        block_filters.append(padded)

    def stack(parts: list[torch.Tensor], empty_shape: tuple[int, ...], dtype) -> torch.Tensor:
        return (torch.cat(parts) if parts else torch.zeros(empty_shape)).to(dtype).contiguous()

    order = stack(block_filters, (0,), torch.long)  # filter in each block-order slot, -1 = padding lane
    position = torch.zeros(out_channels, dtype=torch.int32)
    lanes_used = order >= 0
    position[order[lanes_used]] = torch.nonzero(lanes_used).flatten().to(torch.int32)
    packed_bias = torch.zeros(len(order))
    if bias is not None:
        packed_bias[lanes_used] = bias[order[lanes_used]].float()
    return {
        "weights": stack(weights, (0, block), torch.float32),
        "channels": stack(channels, (0,), torch.int32),
        "taps": stack(taps, (0,), torch.int32),
        "block_begin": torch.tensor(begins, dtype=torch.int32),
        "bias": packed_bias.contiguous(),
        "position": position,
    }


def block_width(out_channels: int, groups: int, isa: str) -> int:
    """32 filters per block where every support group fills them (AVX-512's two-vector tile), else 16."""
    if isa == "avx512" and groups and out_channels // groups >= 32 and out_channels % (32 * groups) == 0:
        return 32
    return 16


class PSConvInference(nn.Module):
    """A packed PSConv2d (+ bias, + optional ReLU) for inference; falls back to
    the masked dense convolution where the compiled kernel is unavailable."""

    def __init__(self, conv: PSConv2d, relu: bool = False) -> None:
        super().__init__()
        if not kernel_applies(conv):
            raise ValueError(f"the pSConv kernel computes 3x3 stride-1/2 padding-1 convolutions, not {conv}")
        mask = conv.mask.detach().cpu()
        weight = conv.weight.detach().float().cpu()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride = conv.stride[0]
        self.relu = relu
        # Parameters (frozen) so counting and state dicts see them as the layer's weights.
        self.weight = nn.Parameter(weight * mask, requires_grad=False)  # the fallback and the reference
        self.register_buffer("mask", mask.clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().float().cpu().clone(),
                                                                 requires_grad=False)
        extension = psconv_extension()
        self.isa = extension.isa() if extension is not None else "unavailable"
        groups = len(torch.unique(mask.reshape(self.out_channels, -1), dim=0))
        self.block = block_width(self.out_channels, groups, self.isa)
        for name, tensor in pack(weight, mask, self.bias, self.block).items():
            self.register_buffer(f"packed_{name}", tensor)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv(x) + bias [+ residual], then the ReLU if fused: a residual block's add and
        ReLU ride along in the kernel's last pass over the output."""
        extension = psconv_extension()
        # Tracing (ONNX export, torch.jit) must see ordinary ops: the kernel is opaque to it.
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if extension is None or tracing or x.device.type != "cpu" or x.dtype != torch.float32 \
                or (torch.is_grad_enabled() and x.requires_grad) \
                or (residual is not None and (residual.dtype != torch.float32 or residual.requires_grad)):
            out = F.conv2d(x, self.weight.to(x), None if self.bias is None else self.bias.to(x),
                           self.stride, 1)
            if residual is not None:
                out = out + residual
            return F.relu(out) if self.relu else out
        return extension.forward(x, self.packed_weights, self.packed_channels, self.packed_taps,
                                 self.packed_block_begin, self.packed_bias, self.packed_position, self.stride,
                                 self.relu, residual)

    def leancnn_cost(self, inputs: tuple, output: torch.Tensor) -> LayerCost:
        uses = output.shape[-2] * output.shape[-1]
        taps = int(self.mask.sum())
        bias = 0 if self.bias is None else self.bias.numel()
        nonzero = int(torch.count_nonzero(self.weight)) + (0 if self.bias is None else int(torch.count_nonzero(self.bias)))
        storage = (taps + bias) * FP32_BYTES + self.packed_channels.numel() * 5 + self.packed_block_begin.numel() * 4
        return LayerCost(self.weight.numel() * uses, taps * uses, self.weight.numel() + bias, nonzero,
                         storage, "psconv_packed")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, relu={self.relu}, "
                f"block={self.block}, isa={self.isa}")
