"""Dataset registry: name -> loader(data_dir) -> ImageDataset."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import DataError
from ..registry import Registry
from .base import ImageDataset
from .readers import list_images, read_cifar_batch, read_idx_pair, stack_images

DatasetLoader = Callable[[Path | None], ImageDataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset")

DEBIAN_DATA_ROOT = Path("/usr/share/datasets")
FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot"]
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "leancnn"


def search_roots(name: str) -> list[Path]:
    """Where a named dataset is looked for, in order."""
    roots = []
    if os.environ.get("LEANCNN_DATA"):
        roots.append(Path(os.environ["LEANCNN_DATA"]) / name)
    roots += [DEBIAN_DATA_ROOT / name, cache_root() / name]
    return roots


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_folder(name: str, data_dir: Path | None, how_to_get: str) -> Path:
    folders = [data_dir] if data_dir else search_roots(name)
    for folder in folders:
        if folder and all(_idx_path(folder, stem) for stem in IDX_FILES):
            return folder
    looked = ", ".join(str(f) for f in folders)
    raise DataError(f"{name} not found (looked in {looked}); {how_to_get}")


def _load_idx_dataset(name: str, data_dir: Path | None, how_to_get: str, **kwargs) -> ImageDataset:
    folder = _find_idx_folder(name, data_dir, how_to_get)
    train = read_idx_pair(_idx_path(folder, IDX_FILES[0]), _idx_path(folder, IDX_FILES[1]))
    test = read_idx_pair(_idx_path(folder, IDX_FILES[2]), _idx_path(folder, IDX_FILES[3]))
    return ImageDataset(name, train[0], train[1], test[0], test[1], num_classes=10, **kwargs)


# Grey 28x28 digits and clothes are attacked with eps 0.1 in the literature (Madry et al. use
# 0.3 for MNIST; 0.1 is the common Fashion-MNIST budget).
GREY_ATTACK_EPS = 0.1


@DATASETS.register("fashion-mnist")
def fashion_mnist(data_dir: Path | None = None) -> ImageDataset:
    """Zalando's Fashion-MNIST: 60k/10k grey 28x28 images, 10 classes (IDX files)."""
    how = ("install it with `apt-get install dataset-fashion-mnist` (Debian), or put the four IDX files "
           f"({', '.join(s + '.gz' for s in IDX_FILES)}) in $LEANCNN_DATA/fashion-mnist or {cache_root() / 'fashion-mnist'}")
    return _load_idx_dataset("fashion-mnist", data_dir, how, class_names=FASHION_CLASSES,
                             crop_padding=2, horizontal_flip=True, attack_eps=GREY_ATTACK_EPS)


@DATASETS.register("mnist")
def mnist(data_dir: Path | None = None) -> ImageDataset:
    """LeCun's MNIST digits: 60k/10k grey 28x28 images (IDX files). No flips: digits are not symmetric."""
    how = (f"put the four IDX files ({', '.join(s + '.gz' for s in IDX_FILES)}) in $LEANCNN_DATA/mnist "
           f"or {cache_root() / 'mnist'}, or pass --data-dir")
    return _load_idx_dataset("mnist", data_dir, how, class_names=[str(i) for i in range(10)],
                             crop_padding=2, horizontal_flip=False, attack_eps=GREY_ATTACK_EPS)


def _cifar(name: str, data_dir: Path | None, folder_name: str, train_files: list[str],
           test_file: str, label_key: str, num_classes: int) -> ImageDataset:
    candidates = [data_dir] if data_dir else search_roots(name)
    candidates = [c for base in candidates for c in (base, base / folder_name)]
    folder = next((c for c in candidates if (c / test_file).is_file()), None)
    if folder is None:
        raise DataError(
            f"{name} not found (looked for {test_file} in {', '.join(map(str, candidates))}); "
            f"extract the 'python version' archive ({folder_name}/) into $LEANCNN_DATA/{name} or pass --data-dir")
    parts = [read_cifar_batch(folder / f, label_key) for f in train_files]
    test_images, test_labels = read_cifar_batch(folder / test_file, label_key)
    return ImageDataset(name, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                        test_images, test_labels, num_classes, crop_padding=4, horizontal_flip=True)


@DATASETS.register("cifar10")
def cifar10(data_dir: Path | None = None) -> ImageDataset:
    """CIFAR-10, python pickle batches (data_batch_1..5, test_batch)."""
    return _cifar("cifar10", data_dir, "cifar-10-batches-py",
                  [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", 10)


@DATASETS.register("cifar100")
def cifar100(data_dir: Path | None = None) -> ImageDataset:
    """CIFAR-100 (fine labels), python pickle files 'train' and 'test'."""
    return _cifar("cifar100", data_dir, "cifar-100-python", ["train"], "test", "fine_labels", 100)


def _require_dir(name: str, data_dir: Path | None) -> Path:
    folders = [data_dir] if data_dir else search_roots(name)
    for folder in folders:
        if folder and folder.is_dir():
            return folder
    raise DataError(f"{name}: no folder found (looked in {', '.join(map(str, folders))}); pass --data-dir")


@DATASETS.register("tiny-imagenet")
def tiny_imagenet(data_dir: Path | None = None) -> ImageDataset:
    """Tiny ImageNet-200: train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt.
    Its validation split serves as the test split (the real test labels are not public)."""
    root = _require_dir("tiny-imagenet", data_dir)
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    train_root, annotations = root / "train", root / "val" / "val_annotations.txt"
    if not train_root.is_dir():
        raise DataError(f"{train_root}: missing; expected the Tiny ImageNet layout train/<wnid>/images/")
    wnids_file = root / "wnids.txt"
    wnids = (wnids_file.read_text().split() if wnids_file.is_file()
             else sorted(p.name for p in train_root.iterdir() if p.is_dir()))
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for wnid in wnids:
        folder = train_root / wnid / "images"
        if not folder.is_dir():
            raise DataError(f"{folder}: missing; every class in wnids.txt needs train/<wnid>/images/")
        found = list_images(folder)
        paths += found
        labels += [index[wnid]] * len(found)
    train_images = stack_images(paths, 3, None)
    if not annotations.is_file():
        raise DataError(f"{annotations}: missing; it maps validation images to classes")
    val_paths, val_labels = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"{annotations}:{number}: expected '<file>\\t<wnid>\\t...' with a known wnid, got {line!r}")
        val_paths.append(root / "val" / "images" / fields[0])
        val_labels.append(index[fields[1]])
    test_images = stack_images(val_paths, 3, tuple(train_images.shape[2:]))
    return ImageDataset("tiny-imagenet", train_images, torch.tensor(labels), test_images,
                        torch.tensor(val_labels), len(wnids), wnids, crop_padding=4, horizontal_flip=True)


@DATASETS.register("imagefolder")
def imagefolder(data_dir: Path | None = None) -> ImageDataset:
    """A folder with train/<class>/*.png and test/<class>/ (or val/<class>/);
    without those, <class>/*.png split 90/10 by a fixed seed. All images one size."""
    if data_dir is None:
        raise DataError("imagefolder needs --data-dir (a folder with train/<class>/ and test/<class>/)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    test_name = next((n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_name:
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        train = _read_class_folders(root / "train", classes, None, None)
        test = _read_class_folders(root / test_name, classes, train[0].shape[1], tuple(train[0].shape[2:]))
    else:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        images, labels = _read_class_folders(root, classes, None, None)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        cut = max(1, len(images) // 10)
        train = images[order[cut:]], labels[order[cut:]]
        test = images[order[:cut]], labels[order[:cut]]
    if not classes:
        raise DataError(f"{root}: no class folders found")
    return ImageDataset("imagefolder", train[0], train[1], test[0], test[1], len(classes), classes,
                        crop_padding=max(1, train[0].shape[-1] // 8), horizontal_flip=True)


def _read_class_folders(root: Path, classes: list[str], channels: int | None,
                        size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = list_images(root / name) if (root / name).is_dir() else []
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise DataError(f"{root}: no images found in its class folders")
    if channels is None and all(p.suffix.lower() == ".pgm" for p in paths):
        channels = 1
    images = stack_images(paths, channels, size)
    return images, torch.tensor(labels)


@DATASETS.register("synthetic")
def synthetic(data_dir: Path | None = None, *, train_size: int = 2000, test_size: int = 500,
              channels: int = 1, size: int = 16, num_classes: int = 4, seed: int = 0) -> ImageDataset:
    """Learnable random data for tests: each class is a fixed random pattern
    plus noise, so a working pipeline scores far above chance in seconds."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, channels, size, size, generator=generator)

    def draw(count: int):
        labels = torch.randint(0, num_classes, (count,), generator=generator)
        noise = torch.rand(count, channels, size, size, generator=generator)
        images = (0.6 * prototypes[labels] + 0.4 * noise) * 255
        return images.round().to(torch.uint8), labels

    train, test = draw(train_size), draw(test_size)
    return ImageDataset("synthetic", train[0], train[1], test[0], test[1], num_classes,
                        [f"class{i}" for i in range(num_classes)], crop_padding=1, horizontal_flip=False)


def load_dataset(name: str, data_dir: str | Path | None = None) -> ImageDataset:
    loader = DATASETS.get(name)
    return loader(Path(data_dir) if data_dir else None)
