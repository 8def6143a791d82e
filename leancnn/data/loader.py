"""Batches from in-memory uint8 tensors, augmented as whole-batch tensor ops
(no per-sample Python, no worker processes)."""
from __future__ import annotations

from typing import Iterator

import torch


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` pixels and crop back at a random offset per image."""
    if padding <= 0:
        return images
    dy, dx = crop_offsets(len(images), padding, generator)
    return crop_at(images, padding, dy, dx)


def crop_offsets(count: int, padding: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    dy = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    return dy, dx


def crop_at(images: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Each image zero-padded by `padding` and cropped back at row offset dy[i], column offset dx[i]."""
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + torch.arange(width))[:, None, :]   # [B, 1, W]
    batch_index = torch.arange(batch)[:, None, None]
    # Advanced indexing puts the indexed dims first: [B, H, W, C] -> [B, C, H, W]. A fresh tensor in
    # the contiguous format, not .contiguous(): with one channel the permuted result has strides
    # (HW, 1, W, 1), which counts as contiguous and as channels_last at once, and oneDNN's
    # convolution backward on an AVX2 AMD EPYC corrupted the heap on such an input (abort in
    # training on one thread, a hang on two).
    return padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2).clone(
        memory_format=torch.contiguous_format)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return flip_where(images, torch.rand(images.shape[0], generator=generator) < 0.5)


def flip_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def shard_bounds(count: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's part of `count` items: contiguous, sizes differing by at most one."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class BatchLoader:
    """Iterates (float images in [0, 1], labels) batches.

    Shuffling and augmentation draw from a generator seeded by (seed, epoch), so
    an epoch's batches are the same whether or not the run was resumed.

    With `shard=(rank, world)` it yields rank's contiguous part of each global batch of
    `batch_size` images, augmented exactly as one process augments them (the random draws are
    made for the whole global batch, then sliced). A last global batch with fewer images than
    ranks is skipped (it would leave a rank without an image).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, crop_padding: int = 0, horizontal_flip: bool = False,
                 seed: int = 0, drop_last: bool = False, shard: tuple[int, int] = (0, 1)) -> None:
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.shuffle, self.crop_padding, self.horizontal_flip = shuffle, crop_padding, horizontal_flip
        self.seed, self.drop_last = seed, drop_last
        self.rank, self.world = shard
        if not 0 <= self.rank < self.world or batch_size < self.world:
            raise ValueError(f"shard {shard} of batches of {batch_size}: needs 0 <= rank < world <= batch_size")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(len(self.images), self.batch_size)
        return full if (self.drop_last or rest < max(1, self.world)) else full + 1

    def global_batch_sizes(self) -> list[int]:
        """Images in each global batch (all ranks together) of an epoch."""
        return [min(self.batch_size, len(self.images) - number * self.batch_size) for number in range(len(self))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        count = len(self.images)
        order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
        for batch_number in range(len(self)):
            index = order[batch_number * self.batch_size:(batch_number + 1) * self.batch_size]
            size = len(index)
            # The draws are those one process makes for the whole batch, in its order.
            offsets = crop_offsets(size, self.crop_padding, generator) if self.crop_padding else None
            flips = torch.rand(size, generator=generator) < 0.5 if self.horizontal_flip else None
            part = slice(*shard_bounds(size, self.rank, self.world))
            images = self.images[index[part]]
            if offsets is not None:
                images = crop_at(images, self.crop_padding, offsets[0][part], offsets[1][part])
            if flips is not None:
                images = flip_where(images, flips[part])
            yield images.float().div_(255.0), self.labels[index[part]]
