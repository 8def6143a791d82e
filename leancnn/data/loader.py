"""Batches from in-memory uint8 tensors, augmented as whole-batch tensor ops
(no per-sample Python, no worker processes)."""
from __future__ import annotations

from typing import Iterator

import torch


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` pixels and crop back at a random offset per image."""
    if padding <= 0:
        return images
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
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
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class BatchLoader:
    """Iterates (float images in [0, 1], labels) batches.

    Shuffling and augmentation draw from a generator seeded by (seed, epoch), so
    an epoch's batches are the same whether or not the run was resumed.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, crop_padding: int = 0, horizontal_flip: bool = False,
                 seed: int = 0, drop_last: bool = False) -> None:
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.shuffle, self.crop_padding, self.horizontal_flip = shuffle, crop_padding, horizontal_flip
        self.seed, self.drop_last = seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(len(self.images), self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        count = len(self.images)
        order = torch.randperm(count, generator=generator) if self.shuffle else None
        for batch_number in range(len(self)):
            start = batch_number * self.batch_size
            index = slice(start, start + self.batch_size) if order is None else order[start:start + self.batch_size]
            images = self.images[index]
            if self.crop_padding:
                images = random_crop(images, self.crop_padding, generator)
            if self.horizontal_flip:
                images = random_flip(images, generator)
            yield images.float().div_(255.0), self.labels[index]
