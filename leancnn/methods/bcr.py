"""`bcr`: block-based column-row pruning (Niu, Ma, Wang, Zhan, Ren, Wang, Lin, Shen, Wang,
"GRIM: A General, Real-Time Deep Learning Inference Framework for Mobile Devices based on
Fine-Grained Structured Weight Sparsity", TPAMI 2021).

A convolution's weight is seen as its GEMM matrix [filters, channels x taps] and cut into blocks
of `rows` filters x `cols` columns (cols=0: the whole row). Inside each block, whole rows and
then whole columns are pruned by their L2 norm (the group norm the paper prunes by): the block
keeps round(row_density x rows) rows and, of those, enough columns for `density` of the block,
so each block is a smaller dense matrix. Post-training (`leancnn compress`): prune a trained
run, then fine-tune with the masks fixed.

Why it pays here: the sparse kernel (leancnn.kernels.sparse) computes filters with one support
together, one broadcast of an input vector feeding an FMA per filter. With irregular masks every
filter is its own group (one FMA per load); a block of `rows` filters that keep the same columns
is one group of `rows` filters. The default, row_density=1 and whole-row blocks, gives every band
of 4 filters one support: the kernel's register tile is full (4 filters x pixel vectors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import register_method
from .masking import FixedMaskMethod, check_density, masked_layers, set_masks
from .selection import stem_conv


@dataclass
class BCROptions:
    density: float = 0.1       # fraction of each pruned convolution's weights kept
    rows: int = 4              # filters per block (must divide every pruned layer's filters)
    cols: int = 0              # matrix columns per block, 0 = all (must divide channels x taps)
    row_density: float = 1.0   # fraction of a block's rows kept (1: column pruning inside blocks)


@torch.no_grad()
def block_masks(weight: torch.Tensor, rows: int, cols: int, density: float, row_density: float) -> torch.Tensor:
    """The BCR mask of `weight` ([filters, ...], seen as [filters, rest]): per block of `rows` x
    `cols` (0 = all columns), the rows of largest L2 norm, then the columns of largest L2 norm over
    those rows; each block's mask is the outer product of its kept rows and columns."""
    filters = weight.shape[0]
    matrix = weight.detach().reshape(filters, -1).float()
    width = matrix.shape[1]
    cols = cols or width
    keep_rows = max(1, round(row_density * rows))
    keep_cols = min(cols, max(1, round(density * rows * cols / keep_rows)))
    blocks = matrix.reshape(filters // rows, rows, width // cols, cols).permute(0, 2, 1, 3)  # [R, C, rows, cols]
    squares = blocks.pow(2)
    row_mask = torch.zeros(squares.shape[:3], dtype=torch.bool)
    row_mask.scatter_(2, squares.sum(3).topk(keep_rows, dim=2).indices, True)
    col_norms = (squares * row_mask[..., None]).sum(2)
    col_mask = torch.zeros(col_norms.shape, dtype=torch.bool)
    col_mask.scatter_(2, col_norms.topk(keep_cols, dim=2).indices, True)
    mask = row_mask[..., :, None] & col_mask[..., None, :]
    return mask.permute(0, 2, 1, 3).reshape(weight.shape)


@register_method
class BCR(FixedMaskMethod):
    """Block-based column-row pruning of a trained model (Niu et al., GRIM, TPAMI 2021)."""

    name = "bcr"
    Options = BCROptions
    post_training = True
    test_specs = ["bcr:density=0.25", "bcr:density=0.2,row_density=0.5"]
    bench_specs = ["bcr:density=0.1"]   # from the dense run, one epoch of fine-tuning

    def validate(self) -> None:
        o = self.options
        check_density(self.name, o.density)
        if o.rows < 1 or o.cols < 0:
            raise ConfigError(f"method 'bcr': need rows >= 1 and cols >= 0 (0 = whole rows), got rows={o.rows}, "
                              f"cols={o.cols}")
        if not 0 < o.row_density <= 1:
            raise ConfigError(f"method 'bcr': row_density must be in (0, 1], got {o.row_density}")
        if o.density > o.row_density:
            raise ConfigError(f"method 'bcr': density {o.density} cannot exceed row_density {o.row_density} "
                              "(the rows kept bound the block's weights)")

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every dense convolution but the stem, each checked for a whole number of blocks."""
        stem = stem_conv(model)
        chosen = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups == 1 and n != stem]
        for name, conv in chosen:
            width = conv.weight[0].numel()
            if conv.out_channels % self.options.rows or (self.options.cols and width % self.options.cols):
                raise ConfigError(
                    f"method 'bcr': blocks of {self.options.rows} x {self.options.cols or width} do not divide layer "
                    f"{name}'s {conv.out_channels} x {width} weight matrix (filters x channels*taps); choose rows "
                    f"dividing {conv.out_channels} and cols dividing {width}")
        if not chosen:
            raise ConfigError("method 'bcr': the model has no dense convolution to prune (the stem stays dense)")
        return chosen

    def compress(self, model, context):
        model = self.prepare(model)
        o = self.options
        set_masks(model, {name: block_masks(m.weight, o.rows, o.cols, o.density, o.row_density)
                          for name, m in masked_layers(model)})
        return model, self
