"""Readers for the real on-disk formats. Every failure names the file and what
was wrong with it (DataError)."""
from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm"}


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        return raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


# IDX (MNIST, Fashion-MNIST): magic 0x0000 <dtype> <ndim>, big-endian uint32 dims.
_IDX_UBYTE = 0x08


def read_idx(path: Path) -> torch.Tensor:
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != _IDX_UBYTE:
        raise DataError(f"{path}: IDX element type 0x{data[2]:02x} unsupported; expected unsigned bytes (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims)) if dims else 0
    payload = len(data) - header
    if payload != expected:
        raise DataError(f"{path}: truncated or corrupt: header says {dims} = {expected} bytes, file holds {payload}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dim() != 3:
        raise DataError(f"{images_path}: expected 3 dimensions [N, H, W], found {list(images.shape)}")
    if labels.dim() != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    return images.unsqueeze(1), labels.long()


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they contain (dicts, lists,
    bytes and numpy arrays), never arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    raw = _read_bytes(path)
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types on corrupt input
        raise DataError(f"{path}: not a CIFAR python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR python batch (top level is {type(batch).__name__})")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: missing 'data' or {label_key!r} entry; found {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' has shape {data.shape}; expected [N, 3072]")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def read_image(path: Path, channels: int | None = None) -> torch.Tensor:
    """One image file -> uint8 [C, H, W] (C = 1 or 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if image.mode in ("L", "1", "I;16") else "RGB")
            array = np.asarray(image.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def stack_images(paths: list[Path], channels: int | None, size: tuple[int, int] | None) -> torch.Tensor:
    images = []
    for path in paths:
        image = read_image(path, channels)
        channels = channels or image.shape[0]
        if size is None:
            size = (image.shape[1], image.shape[2])
        if tuple(image.shape[1:]) != tuple(size):
            raise DataError(f"{path}: image is {image.shape[2]}x{image.shape[1]}, others are {size[1]}x{size[0]}; resize the folder to one size")
        images.append(image)
    if not images:
        return torch.zeros(0, channels or 3, *(size or (1, 1)), dtype=torch.uint8)
    return torch.stack(images)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
