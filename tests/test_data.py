"""Dataset readers on small files written here in the real formats."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from leancnn.data import BatchLoader, load_dataset
from leancnn.data.loader import random_crop, random_flip
from leancnn.data.readers import read_idx
from leancnn.errors import DataError


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_idx_dataset(folder, train=20, test=10, size=28):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, size, size)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (count,)))
    return folder


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b", array, compress=False)
    assert torch.equal(read_idx(tmp_path / "a.gz"), torch.from_numpy(array))
    assert torch.equal(read_idx(tmp_path / "b"), torch.from_numpy(array))


def test_fashion_mnist_reader_from_env(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "fashion-mnist")
    monkeypatch.setenv("LEANCNN_DATA", str(tmp_path))
    dataset = load_dataset("fashion-mnist")
    assert dataset.train_images.shape == (20, 1, 28, 28) and dataset.train_images.dtype == torch.uint8
    assert dataset.test_labels.shape == (10,) and dataset.num_classes == 10
    assert len(dataset.mean) == 1 and 0 < dataset.std[0] < 1


def test_truncated_idx_names_file(tmp_path):
    folder = write_idx_dataset(tmp_path / "mnist")
    broken = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: truncated or corrupt"):
        load_dataset("mnist", folder)


def test_corrupt_gzip_and_bad_magic(tmp_path):
    (tmp_path / "x.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DataError, match="x.gz: cannot read"):
        read_idx(tmp_path / "x.gz")
    (tmp_path / "y").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "y")


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path / "nothing-here")
    message = str(error.value)
    assert "mnist" in message and str(tmp_path / "nothing-here") in message   # what, and where it looked
    assert "put the four IDX files" in message and "train-images-idx3-ubyte.gz" in message   # how to get it
    assert len(message.splitlines()) == 1


def write_cifar_batch(path, count, label_key=b"labels", seed=0):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"x", label_key: rng.integers(0, 10, count).tolist(),
             b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), b"filenames": [b"a"] * count}
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)


def test_cifar10_reader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for index in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{index}", 4, seed=index)
    write_cifar_batch(folder / "test_batch", 3)
    dataset = load_dataset("cifar10", tmp_path)
    assert dataset.train_images.shape == (20, 3, 32, 32)
    assert dataset.test_images.shape == (3, 3, 32, 32)
    # Channel planes: the first 1024 bytes of a row are the red plane.
    with open(folder / "test_batch", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    assert torch.equal(dataset.test_images[0, 0].flatten(), torch.from_numpy(raw[b"data"][0, :1024]))


def test_cifar100_reader_and_refuses_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "train", 5, b"fine_labels")
    write_cifar_batch(folder / "test", 2, b"fine_labels")
    assert load_dataset("cifar100", tmp_path).num_classes == 100

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test", "wb") as handle:
        pickle.dump({b"data": Evil()}, handle)
    with pytest.raises(DataError, match="test: not a CIFAR python batch"):
        load_dataset("cifar100", tmp_path)


def write_png(path, size=(8, 8), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for i, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i + j, np.uint8)).save(folder / f"{wnid}_{j}.JPEG", "JPEG")
        write_png(root / "val" / "images" / f"val_{i}.JPEG", seed=i)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    dataset = load_dataset("tiny-imagenet", tmp_path)
    assert dataset.train_images.shape == (6, 3, 8, 8)
    assert dataset.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dataset.test_labels.tolist() == [0, 1] and dataset.num_classes == 2
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n")
    with pytest.raises(DataError, match="val_annotations.txt:1"):
        load_dataset("tiny-imagenet", tmp_path)


def test_imagefolder_and_broken_image(tmp_path):
    for split, count in (("train", 4), ("test", 2)):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                write_png(folder / f"{i}.png", seed=i)
    dataset = load_dataset("imagefolder", tmp_path)
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.train_images.shape == (8, 3, 8, 8) and dataset.test_images.shape == (4, 3, 8, 8)
    (tmp_path / "test" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        load_dataset("imagefolder", tmp_path)


def test_random_crop_is_a_shift_of_the_padded_image():
    images = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).view(2, 1, 5, 5)
    generator = torch.Generator().manual_seed(3)
    cropped = random_crop(images, 2, generator)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for b in range(2):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[b, :, dy:dy + 5, dx:dx + 5], cropped[b])]
        assert matches, "every crop must be a window of the padded image"
    # And the windows move: over 60 distinct images many of the 25 offsets occur, not only the centre.
    many = torch.randint(0, 256, (60, 1, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    crops = random_crop(many, 2, torch.Generator().manual_seed(4))
    big = torch.nn.functional.pad(many, (2, 2, 2, 2))
    offsets = {(dy, dx) for b in range(60) for dy in range(5) for dx in range(5)
               if torch.equal(big[b, :, dy:dy + 5, dx:dx + 5], crops[b])}
    assert len(offsets) >= 12 and (2, 2) in offsets


def test_flip_and_loader_determinism():
    images = torch.randint(0, 255, (50, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(50)
    flipped = random_flip(images, torch.Generator().manual_seed(0))
    assert all(torch.equal(f, i) or torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images))
    turned = sum(not torch.equal(f, i) for f, i in zip(flipped, images))
    assert 10 <= turned <= 40, "about half of the 50 images are flipped, not none and not all"
    loader = BatchLoader(images, labels, 16, shuffle=True, crop_padding=1, horizontal_flip=True, seed=7)
    loader.set_epoch(2)
    first = [(x.clone(), y.clone()) for x, y in loader]
    second = list(loader)
    assert len(first) == 4 and first[-1][0].shape[0] == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert sorted(torch.cat([y for _, y in first]).tolist()) == list(range(50))
    # Every sample is its own image, shifted by at most the padding (zeros coming in) and maybe
    # flipped, in [0, 1] pixel units.
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for x, y in zip(first[0][0], first[0][1]):
        pixels = x * 255
        assert torch.equal(pixels, pixels.round())
        shifts = [padded[y, :, dy:dy + 6, dx:dx + 6].float() for dy in range(3) for dx in range(3)]
        assert any(torch.equal(pixels, s) or torch.equal(pixels, s.flip(-1)) for s in shifts)


def test_random_crop_returns_plain_contiguous_strides_for_one_channel():
    """With one channel a permuted batch has strides (HW, 1, W, 1): contiguous and channels_last at
    once. oneDNN's convolution backward corrupted the heap on such input (AMD EPYC, AVX2), so the
    crop must hand out the ordinary contiguous strides."""
    images = torch.randint(0, 256, (5, 1, 16, 12), dtype=torch.uint8)
    out = random_crop(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.stride() == (192, 192, 12, 1)
    three = random_crop(torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8), 1, torch.Generator().manual_seed(0))
    assert three.stride() == (48, 16, 4, 1)
