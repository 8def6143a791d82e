"""The in-memory dataset every reader returns."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class ImageDataset:
    """Whole splits in memory as uint8 tensors [N, C, H, W] and int64 labels.

    Pixels stay uint8 until a batch is drawn (4x less memory than float32);
    `mean`/`std` are per-channel statistics in [0, 1] pixel units, used by the
    model's own first layer, so everything outside the model sees [0, 1] pixels.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    # Augmentation defaults for this kind of image: crop padding in pixels, flips.
    crop_padding: int = 0
    horizontal_flip: bool = False
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # The default attack budget (L-inf, [0, 1] pixel units) for robust accuracy on these
    # images: 8/255 for natural images, as the literature attacks CIFAR and ImageNet.
    attack_eps: float = 8 / 255

    def __post_init__(self) -> None:
        for split, images, labels in (
            ("train", self.train_images, self.train_labels),
            ("test", self.test_images, self.test_labels),
        ):
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(f"{self.name} {split} images must be uint8 [N, C, H, W]")
            if len(images) != len(labels):
                raise ValueError(f"{self.name} {split}: {len(images)} images but {len(labels)} labels")
        if not self.mean:
            self.mean, self.std = channel_stats(self.train_images)

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.image_size)

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> "ImageDataset":
        """A seeded random subset of each split (None keeps the whole split)."""
        generator = torch.Generator().manual_seed(seed)

        def pick(images: torch.Tensor, labels: torch.Tensor, count: int | None):
            if count is None or count >= len(images):
                return images, labels
            index = torch.randperm(len(images), generator=generator)[:count]
            return images[index], labels[index]

        train_images, train_labels = pick(self.train_images, self.train_labels, train)
        test_images, test_labels = pick(self.test_images, self.test_labels, test)
        return dataclasses.replace(self, train_images=train_images, train_labels=train_labels,
                                   test_images=test_images, test_labels=test_labels)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, in chunks to bound memory."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].to(torch.float64) / 255.0
        total += block.sum(dim=(0, 2, 3))
        total_sq += (block * block).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / max(count, 1)
    std = (total_sq / max(count, 1) - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)
