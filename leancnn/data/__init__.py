"""Datasets: in-memory uint8 tensors, a registry of readers, batched augmentation."""
from .base import ImageDataset
from .loader import BatchLoader, shard_bounds
from .registry import DATASETS, load_dataset

__all__ = ["DATASETS", "BatchLoader", "ImageDataset", "load_dataset", "shard_bounds"]
