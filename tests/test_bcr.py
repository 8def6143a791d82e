"""BCR block pruning: the block row/column structure, the norms that choose the kept rows and
columns (a hand-made case), the kernel's grouping of a block's filters, and bad options."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from leancnn.errors import ConfigError
from leancnn.kernels.sparse import pack
from leancnn.methods import parse_method
from leancnn.methods.bcr import block_masks
from leancnn.methods.masking import PRUNE_MASK, masked_layers, set_masks
from leancnn.models import create_model


@pytest.mark.parametrize("rows, cols, density, row_density", [(4, 0, 0.1, 1.0), (4, 12, 0.25, 0.5), (2, 9, 0.3, 1.0)])
def test_every_block_is_the_outer_product_of_its_kept_rows_and_columns(rows, cols, density, row_density):
    generator = torch.Generator().manual_seed(rows * 100 + cols)
    weight = torch.randn(16, 8, 3, 3, generator=generator)
    mask = block_masks(weight, rows, cols, density, row_density).reshape(16, 72)
    cols = cols or 72
    keep_rows = round(row_density * rows)
    keep_cols = min(cols, max(1, round(density * rows * cols / keep_rows)))
    for r in range(0, 16, rows):
        for c in range(0, 72, cols):
            block = mask[r:r + rows, c:c + cols]
            kept_rows, kept_cols = block.any(1), block.any(0)
            assert int(kept_rows.sum()) == keep_rows and int(kept_cols.sum()) == keep_cols
            assert torch.equal(block, kept_rows[:, None] & kept_cols[None, :])


def test_the_kept_rows_and_columns_are_those_of_largest_norm():
    # One block of 2 x 4: row 1 is the larger; of its columns 3 and 0 are the largest.
    weight = torch.tensor([[0.1, 0.1, 0.1, 0.1],
                           [0.8, 0.2, -0.1, -0.9]])
    mask = block_masks(weight, rows=2, cols=4, density=0.25, row_density=0.5)
    assert mask.tolist() == [[False] * 4, [True, False, False, True]]
    # Both rows kept: the column norms over both rows choose column 3 (0.82) alone at 1/8.
    mask = block_masks(weight, rows=2, cols=4, density=1 / 8, row_density=1.0)
    assert mask.tolist() == [[False, False, False, True], [False, False, False, True]]


def test_a_band_of_four_filters_is_one_group_of_the_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    mask = block_masks(conv.weight, 4, 0, 0.1, 1.0)
    packed = pack(conv.weight, mask, conv.bias)
    assert torch.diff(packed["chunk_slot"]).tolist() == [4] * 8     # 8 chunks of 4 filters, not 32 of 1
    irregular = torch.rand(conv.weight.shape) < 0.1
    assert torch.diff(pack(conv.weight, irregular, conv.bias)["chunk_slot"]).tolist() == [1] * 32


def test_compress_prunes_every_convolution_but_the_stem_to_the_density():
    torch.manual_seed(1)
    model = create_model("resnet20", num_classes=10, in_channels=1, width=0.5)
    method = parse_method("bcr:density=0.1")
    model, applied = method.compress(model, context=None)
    names = [name for name, _ in masked_layers(model)]
    assert "features.0.0" not in names and len(names) == 20   # 9 blocks x two 3x3s + 2 shortcuts (the stem stays)
    for name, module in masked_layers(model):
        mask = getattr(module, PRUNE_MASK)
        assert not module.weight[~mask].any(), name
        width = mask[0].numel()
        assert int(mask.sum()) == mask.shape[0] * round(0.1 * width), name   # 4 x round(0.1 x 4 x width / 4)
    # Fine-tuning re-masks after every step.
    with torch.no_grad():
        for _, module in masked_layers(model):
            module.weight.add_(1.0)
    method.after_step(type("T", (), {"model": model})())
    assert all(not m.weight[~getattr(m, PRUNE_MASK)].any() for _, m in masked_layers(model))
    assert applied is method


@pytest.mark.parametrize("spec, message", [
    ("bcr:density=0", "density must be in (0, 1]"),
    ("bcr:density=1.5", "density must be in (0, 1]"),
    ("bcr:rows=0", "need rows >= 1 and cols >= 0"),
    ("bcr:row_density=0", "row_density must be in (0, 1]"),
    ("bcr:density=0.6,row_density=0.5", "cannot exceed row_density"),
])
def test_bad_options_fail_before_anything_is_pruned(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_method(spec)


def test_blocks_that_do_not_divide_a_layer_are_named():
    model = create_model("resnet20", num_classes=10, in_channels=1, width=0.5)
    with pytest.raises(ConfigError, match=r"blocks of 3 x 72 do not divide layer .*'s 8 x 72 weight matrix"):
        parse_method("bcr:rows=3").compress(model, context=None)
    with pytest.raises(ConfigError, match=r"blocks of 4 x 10 do not divide"):
        parse_method("bcr:cols=10").compress(model, context=None)
