"""Shared fixtures. Tests that need the real Fashion-MNIST skip with the reason
when it is absent (CI installs it with `make setup`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from leancnn.config import TrainConfig
from leancnn.data import load_dataset
from leancnn.errors import DataError


@dataclass
class SharedRun:
    run_dir: Path
    result: object


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread, and one thread keeps the
    # suite's time steady when something else is using the other core.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session", autouse=True)
def _plan_cache(tmp_path_factory):
    # Deploy plans go to a file of this session's: the user's cache is neither read nor written.
    from leancnn.kernels import plans

    path = tmp_path_factory.mktemp("plans") / "plans.json"
    patch = pytest.MonkeyPatch()
    patch.setenv("LEANCNN_PLAN_CACHE", str(path))
    plans.forget_loaded()
    yield path
    patch.undo()
    plans.forget_loaded()


@pytest.fixture
def register_test_method():
    """Register throw-away methods for one test; they are unregistered after it, so that the
    registry's contract tests (collected from METHODS) never see them."""
    from leancnn.methods.base import METHODS, register_method

    names: list[str] = []

    def register(cls):
        register_method(cls)
        names.append(cls.name)
        return cls

    yield register
    for name in names:
        METHODS.unregister(name)


@pytest.fixture(scope="session")
def fashion_mnist():
    try:
        return load_dataset("fashion-mnist")
    except DataError as exc:
        pytest.skip(str(exc))


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    """A config that trains in about a second on the synthetic dataset."""
    values = dict(data="synthetic", model="resnet20", width=0.25, epochs=1, batch_size=32, lr=0.05,
                  train_subset=600, test_subset=300, threads=1, latency=False, out=str(tmp_path / "run"))
    values.update(overrides)
    return TrainConfig(**values).validate()


@pytest.fixture(scope="session")
def trained_fmnist(tmp_path_factory, fashion_mnist):
    """A small model trained on a Fashion-MNIST subset, shared by the measurement tests.

    Trained once per test session, not once per xdist worker (36 s on one thread): the first
    worker to need it trains it under a file lock in the directory all workers share, the
    others read the finished run."""
    from filelock import FileLock

    from leancnn.experiment import train_run
    from leancnn.runs import read_result

    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's base is popen-gwN inside the session's; alone, the base is the session's.
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "fmnist-shared" / "run"
    with FileLock(str(shared / "fmnist-shared.lock")):
        if not (out / "result.json").is_file():
            config = TrainConfig(data="fashion-mnist", model="resnet20", width=0.5, epochs=2, train_subset=8000,
                                 test_subset=1000, latency=False, out=str(out)).validate()
            train_run(config, progress=False)
    return SharedRun(out, read_result(out))


@pytest.fixture(scope="session")
def synthetic_vgg(tmp_path_factory):
    """A small vgg11 trained on synthetic data, shared by the post-training method tests."""
    from leancnn.experiment import train_run

    tmp = tmp_path_factory.mktemp("vgg")
    return train_run(tiny_config(tmp, model="vgg11", width=0.25, epochs=2, train_subset=1200, lr=0.05), progress=False)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """Two runs on 1x16x16 synthetic data (resnet20 at two widths) -> a zoo."""
    from leancnn.experiment import train_run
    from leancnn.zoo.build import build_zoo

    root = tmp_path_factory.mktemp("zoo")
    runs = []
    for width in (0.25, 0.5):
        config = tiny_config(root, width=width, out=str(root / f"runs/w{width}"))
        train_run(config, progress=False)
        runs.append(str(root / f"runs/w{width}"))
    manifest = build_zoo(runs, root / "zoo", epsilon=0.0, runs=10, log=lambda _: None)
    return root / "zoo", manifest
