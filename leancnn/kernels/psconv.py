"""pSConv for inference: a trained PSConv2d packed for the compiled sparse kernel
(leancnn/kernels/sparse.py), with bias and ReLU fused. Its P support patterns
make P groups of filters that share one pair list, so the kernel runs up to six
filters per broadcast. Training keeps the differentiable PSConv2d;
`leancnn.deploy` swaps this in.
"""
from __future__ import annotations

from torch import nn

from ..layers.psconv import PSConv2d
from .sparse import CHANNEL_BLOCK, MAX_CHUNK, TAPS, SparseConvInference, chunk_sizes, pack

__all__ = ["CHANNEL_BLOCK", "MAX_CHUNK", "TAPS", "PSConvInference", "chunk_sizes", "kernel_applies", "pack"]


def kernel_applies(conv: nn.Module) -> bool:
    """Shapes the kernel computes: 3x3, padding 1, stride 1 or 2, no groups or dilation."""
    return (isinstance(conv, PSConv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride in ((1, 1), (2, 2)) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


class PSConvInference(SparseConvInference):
    """A packed PSConv2d (+ bias, + optional ReLU) for inference, run by its measured plan
    (the kernel, or the masked dense convolution where that is faster or no compiler was found)."""

    storage_format = "psconv_packed"

    def __init__(self, conv: PSConv2d, relu: bool = False) -> None:
        if not kernel_applies(conv):
            raise ValueError(f"the pSConv kernel computes 3x3 stride-1/2 padding-1 convolutions, not {conv}")
        super().__init__(conv.weight, conv.bias, conv.stride[0], mask=conv.mask, relu=relu)
