"""Block-circulant convolutions and linear layers (CirCNN).

Ding et al., "CirCNN: Accelerating and Compressing Deep Neural Networks Using
Block-Circulant Weight Matrices", MICRO 2017.

The layer's [out, in] channel matrix (for a convolution: per tap) is split into
k x k blocks, and each block is circulant, defined by one length-k vector c:
block[a, b] = c[(a - b) mod k]. A block times a length-k slice of the input is
then a circular convolution, computed through the FFT: y_p = sum_q
IRFFT(RFFT(c_pq) * RFFT(x_q)). Storage falls from k^2 to k values per block;
the gradient of a block is again circulant (autograd through the FFT gives it).

`weight` holds the vectors, [out/k, in/k, k, kh, kw] (a linear layer: kh = kw = 1).
`compute="fft"` runs the FFT route above, `compute="dense"` multiplies by the
expanded dense matrix (the same function, often faster for small k on CPU).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..measure.counting import FP32_BYTES, LayerCost

COMPUTE_MODES = ("fft", "dense")


def check_block(block: int, in_features: int, out_features: int, what: str) -> None:
    if block < 2:
        raise ValueError(f"{what}: the circulant block must be >= 2, got {block}")
    if in_features % block or out_features % block:
        raise ValueError(f"{what}: block {block} does not divide its channels ({in_features} in, {out_features} out)")


def check_compute(compute: str, what: str) -> None:
    if compute not in COMPUTE_MODES:
        raise ValueError(f"{what}: compute must be one of {', '.join(COMPUTE_MODES)}, got {compute!r}")


def _diagonal_index(block: int, device: torch.device | None = None) -> torch.Tensor:
    """index[a, b] = (a - b) mod k: which entry of the defining vector block[a, b] is."""
    rows = torch.arange(block, device=device)
    return (rows.view(-1, 1) - rows.view(1, -1)) % block


def circulant_expand(vectors: torch.Tensor) -> torch.Tensor:
    """[P, Q, k, *taps] defining vectors -> the dense [P*k, Q*k, *taps] block-circulant weight."""
    blocks, inputs, k = vectors.shape[:3]
    taps = vectors.shape[3:]
    full = vectors[:, :, _diagonal_index(k, vectors.device)]            # [P, Q, k(a), k(b), *taps]
    return full.permute(0, 2, 1, 3, *range(4, 4 + len(taps))).reshape(blocks * k, inputs * k, *taps)


def circulant_project(weight: torch.Tensor, block: int) -> torch.Tensor:
    """The block-circulant weight nearest to a dense `weight` [out, in, *taps] (Frobenius norm):
    each block's vector is the mean along its circulant diagonals. Exact (returns the defining
    vectors) when `weight` already is block-circulant."""
    check_block(block, weight.shape[1], weight.shape[0], "projection")
    out, inputs = weight.shape[:2]
    taps = weight.shape[2:]
    grid = weight.reshape(out // block, block, inputs // block, block, *taps)
    grid = grid.permute(0, 2, 1, 3, *range(4, 4 + len(taps)))            # [P, Q, k(a), k(b), *taps]
    rows = torch.arange(block, device=weight.device)
    columns = (rows.view(1, -1) - rows.view(-1, 1)) % block               # [d, a] -> b = (a - d) mod k
    return grid[:, :, rows.view(1, -1), columns].mean(dim=3)              # [P, Q, k(d), *taps]


def frequency_weight(vectors: torch.Tensor) -> torch.Tensor:
    """The real grouped-convolution weight of the frequency-domain product, [F*2P, 2Q, *taps]
    with F = k//2 + 1: per frequency, [[Re, -Im], [Im, Re]] acting on (Re x, Im x)."""
    spectrum = torch.fft.rfft(vectors, dim=2)                             # [P, Q, F, *taps]
    real, imag = spectrum.real.movedim(2, 0), spectrum.imag.movedim(2, 0)  # [F, P, Q, *taps]
    top = torch.cat([real, -imag], dim=2)                                 # real outputs: Re w Re x - Im w Im x
    bottom = torch.cat([imag, real], dim=2)                               # imaginary: Im w Re x + Re w Im x
    stacked = torch.cat([top, bottom], dim=1)                             # [F, 2P, 2Q, *taps]
    return stacked.reshape(stacked.shape[0] * stacked.shape[1], *stacked.shape[2:])


def circulant_conv_fft(x: torch.Tensor, grouped_weight: torch.Tensor, block: int, stride, padding,
                       dilation=1) -> torch.Tensor:
    """conv2d(x, circulant_expand(vectors)) through the FFT over each block's channels, given
    `grouped_weight` = frequency_weight(vectors). x: [N, Q*k, H, W] -> [N, P*k, H', W']."""
    n, channels, height, width = x.shape
    inputs = channels // block
    frequencies = block // 2 + 1
    spectrum = torch.fft.rfft(x.reshape(n, inputs, block, height, width), dim=2)   # [N, Q, F, H, W]
    planes = torch.cat([spectrum.real, spectrum.imag], dim=1)                       # [N, 2Q, F, H, W]
    planes = planes.transpose(1, 2).reshape(n, frequencies * 2 * inputs, height, width)
    product = F.conv2d(planes, grouped_weight, None, stride, padding, dilation, groups=frequencies)
    out_h, out_w = product.shape[-2:]
    blocks = product.shape[1] // (2 * frequencies)
    product = product.reshape(n, frequencies, 2, blocks, out_h, out_w)
    result = torch.complex(product[:, :, 0], product[:, :, 1]).transpose(1, 2)      # [N, P, F, H', W']
    return torch.fft.irfft(result, n=block, dim=2).reshape(n, blocks * block, out_h, out_w)


def fft_macs(block: int) -> int:
    """MACs counted for one length-k real FFT or inverse: 1.25 k log2 k, the usual 5 k log2 k
    flops of a complex radix-2 FFT halved for a real signal, at 2 flops per MAC."""
    return math.ceil(1.25 * block * math.log2(block))


def circulant_cost(vectors: torch.Tensor, bias: torch.Tensor | None, block: int, inputs: tuple,
                   output: torch.Tensor, dense_taps: int) -> LayerCost:
    """Dense MACs: the expanded layer's. Effective MACs: the cheaper of the two routes the layer
    runs, the dense one or the FFT route per image: the frequency-domain products (4 real MACs
    per complex one, k//2+1 frequencies per block) plus one RFFT per input block and pixel and
    one inverse per output block and pixel (the weight's spectrum is computed once at
    deployment, not per image). The FFT route is the cheaper one from k = 4 on for 3x3 layers
    (k = 2: 8 real MACs per block and tap against the dense 4)."""
    blocks, in_blocks = vectors.shape[:2]
    in_pixels = inputs[0][0].numel() // (in_blocks * block)
    out_pixels = output[0].numel() // (blocks * block)
    frequencies = block // 2 + 1
    products = 4 * frequencies * blocks * in_blocks * dense_taps * out_pixels
    transforms = (in_blocks * in_pixels + blocks * out_pixels) * fft_macs(block)
    dense = blocks * block * in_blocks * block * dense_taps * out_pixels
    params = vectors.numel() + (bias.numel() if bias is not None else 0)
    nonzero = int(torch.count_nonzero(vectors.detach())) + (int(torch.count_nonzero(bias.detach())) if bias is not None else 0)
    return LayerCost(dense, min(dense, products + transforms), params, nonzero, params * FP32_BYTES, f"circulant{block}")


class BlockCirculantConv2d(nn.Module):
    """A convolution whose weight is block-circulant over its channels, k x k blocks per tap."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple = 3, stride: int | tuple = 1,
                 padding: int | tuple = 0, bias: bool = True, *, block: int = 8, compute: str = "fft") -> None:
        super().__init__()
        check_block(block, in_channels, out_channels, "BlockCirculantConv2d")
        check_compute(compute, "BlockCirculantConv2d")
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride, self.padding = nn.modules.utils._pair(stride), nn.modules.utils._pair(padding)
        self.in_channels, self.out_channels, self.block, self.compute = in_channels, out_channels, block, compute
        self.weight = nn.Parameter(torch.empty(out_channels // block, in_channels // block, block, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # The expanded matrix's entries are the vectors' entries, so the dense layer's He
        # initialisation (fan_out) gives the same activation scale.
        fan_out = out_channels * self.kernel_size[0] * self.kernel_size[1]
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / fan_out))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, block: int, compute: str = "fft", project: bool = False) -> "BlockCirculantConv2d":
        """A block-circulant layer shaped like `conv`; with `project`, its weights the nearest
        block-circulant ones to `conv`'s (else freshly initialised)."""
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError("a block-circulant layer replaces plain dense convolutions (groups 1, no dilation)")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.bias is not None, block=block, compute=compute).to(conv.weight.device)
        if project:
            with torch.no_grad():
                layer.weight.copy_(circulant_project(conv.weight, block))
                if conv.bias is not None:
                    layer.bias.copy_(conv.bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        return circulant_expand(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"BlockCirculantConv2d expects {self.in_channels} input channels, got {x.shape[1]}")
        if self.compute == "dense":
            return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding)
        out = circulant_conv_fft(x, frequency_weight(self.weight), self.block, self.stride, self.padding)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def leancnn_cost(self, inputs: tuple, output: torch.Tensor) -> LayerCost:
        return circulant_cost(self.weight, self.bias, self.block, inputs, output,
                              self.kernel_size[0] * self.kernel_size[1])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, block={self.block}, compute={self.compute}")


class BlockCirculantLinear(nn.Module):
    """A linear layer whose [out, in] weight is block-circulant, k x k blocks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block: int = 8,
                 compute: str = "fft") -> None:
        super().__init__()
        check_block(block, in_features, out_features, "BlockCirculantLinear")
        check_compute(compute, "BlockCirculantLinear")
        self.in_features, self.out_features, self.block, self.compute = in_features, out_features, block, compute
        self.weight = nn.Parameter(torch.empty(out_features // block, in_features // block, block))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        bound = 1.0 / math.sqrt(in_features)   # nn.Linear's default scale
        nn.init.uniform_(self.weight, -bound, bound)
        if bias:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int, compute: str = "fft",
                    project: bool = False) -> "BlockCirculantLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, block=block,
                    compute=compute).to(linear.weight.device)
        if project:
            with torch.no_grad():
                layer.weight.copy_(circulant_project(linear.weight, block))
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        return circulant_expand(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"BlockCirculantLinear expects {self.in_features} input features, got {x.shape[-1]}")
        if self.compute == "dense":
            return F.linear(x, self.dense_weight(), self.bias)
        leading = x.shape[:-1]
        flat = x.reshape(-1, self.in_features, 1, 1)
        out = circulant_conv_fft(flat, frequency_weight(self.weight.unsqueeze(-1).unsqueeze(-1)), self.block, 1, 0)
        out = out.reshape(*leading, self.out_features)
        return out if self.bias is None else out + self.bias

    def leancnn_cost(self, inputs: tuple, output: torch.Tensor) -> LayerCost:
        return circulant_cost(self.weight, self.bias, self.block, inputs, output, 1)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, block={self.block}, compute={self.compute}"
