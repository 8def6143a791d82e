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


# Filters per chunk: the kernel's register tile is chunk x 4 pixel vectors (24 of AVX-512's 32 registers).
MAX_CHUNK = 6
# Input channels per segment. The kernel runs a chunk over several consecutive segments at a
# time, as many as keep a tile's plane vectors for those channels in L1 while every chunk uses
# them, and at least enough for ~128 pairs per pass (it decides per input shape).
CHANNEL_BLOCK = 16


def chunk_sizes(filters: int, limit: int = MAX_CHUNK) -> list[int]:
    """`filters` cut into the fewest chunks of at most `limit`, as equal as possible (16 -> 6, 5, 5):
    a chunk's broadcasts feed as many FMAs as it has filters, so no chunk is left tiny."""
    count = -(-filters // limit)
    return [filters // count + (1 if i < filters % count else 0) for i in range(count)]


@torch.no_grad()
def pack(weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The layer as the kernel reads it: filters grouped by support row (the taps each input
    channel uses); per group the (tap, channel) pairs its filters use, channel by channel, in
    segments of CHANNEL_BLOCK input channels; each group cut into chunks of at most MAX_CHUNK
    filters, whose weights are listed per pair of their group.
    weight, mask: [C_out, C_in, 3, 3]."""
    out_channels, in_channels = weight.shape[:2]
    rows = mask.reshape(out_channels, -1)
    _, group_of = torch.unique(rows, dim=0, return_inverse=True)
    taps_weight = (weight * mask).reshape(out_channels, in_channels, TAPS).float()
    taps_mask = mask.reshape(out_channels, in_channels, TAPS)
    used_by_group, chunks = [], []  # [C_in, 9] taps per group; (filters, group) per chunk
    for group in range(int(group_of.max()) + 1 if out_channels else 0):
        members = torch.nonzero(group_of == group).flatten()
        used_by_group.append(taps_mask[members[0]])  # every member has this support row
        chunks += [(chunk, group) for chunk in members.split(chunk_sizes(len(members)))]
    # Channel block by channel block: each group's pairs in the block (shared by its chunks), and
    # each chunk's weights for them, so that a tile's passes read the weights in one stream.
    pairs, channels, taps, weights = [0], [], [], []
    for first_channel in range(0, in_channels, CHANNEL_BLOCK):
        block_pairs = []
        for used in used_by_group:
            channel_index, tap_index = torch.nonzero(used[first_channel:first_channel + CHANNEL_BLOCK], as_tuple=True)
            block_pairs.append((channel_index + first_channel, tap_index))
            channels.append(channel_index + first_channel)
            taps.append(tap_index)
            pairs.append(pairs[-1] + len(channel_index))
        for chunk, group in chunks:
            channel_index, tap_index = block_pairs[group]
            weights.append(taps_weight[chunk][:, channel_index, tap_index].T.reshape(-1))  # [pairs, R]
    slots = [0]
    for chunk, _ in chunks:
        slots.append(slots[-1] + len(chunk))

    def cat(parts: list[torch.Tensor], dtype) -> torch.Tensor:
        return (torch.cat(parts) if parts else torch.zeros(0)).to(dtype).contiguous()

    position = torch.zeros(out_channels, dtype=torch.int32)
    position[cat([chunk for chunk, _ in chunks], torch.long)] = torch.arange(out_channels, dtype=torch.int32)
    return {
        "weights": cat(weights, torch.float32),
        "channels": cat(channels, torch.int32),
        "taps": cat(taps, torch.int32),
        "chunk_slot": torch.tensor(slots, dtype=torch.int32),
        "chunk_group": torch.tensor([group for _, group in chunks], dtype=torch.int32),
        "segment_pair": torch.tensor(pairs, dtype=torch.int32),
        "bias": (torch.zeros(out_channels) if bias is None else bias.detach().float().cpu()).contiguous(),
        "position": position,
    }


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
        for name, tensor in pack(weight, mask, self.bias).items():
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
                                 self.packed_chunk_slot, self.packed_chunk_group, self.packed_segment_pair,
                                 self.packed_bias,
                                 self.packed_position, self.stride, self.relu, residual)

    def leancnn_cost(self, inputs: tuple, output: torch.Tensor) -> LayerCost:
        uses = output.shape[-2] * output.shape[-1]
        taps = int(self.mask.sum())
        bias = 0 if self.bias is None else self.bias.numel()
        nonzero = int(torch.count_nonzero(self.weight)) + (0 if self.bias is None else int(torch.count_nonzero(self.bias)))
        # Kept weights and bias; per pair of a group a channel (4 bytes) and a tap (1); table entries.
        tables = self.packed_chunk_slot.numel() + self.packed_chunk_group.numel() + self.packed_segment_pair.numel()
        storage = (taps + bias) * FP32_BYTES + self.packed_channels.numel() * 5 + tables * 4
        return LayerCost(self.weight.numel() * uses, taps * uses, self.weight.numel() + bias, nonzero,
                         storage, "psconv_packed")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, relu={self.relu}, "
                f"chunks={self.packed_chunk_slot.numel() - 1}, isa={self.isa}")
