"""Clean and robust accuracy of a run directory, recorded in its result.json (`robust`)."""
from __future__ import annotations

from pathlib import Path

from .config import load_config
from .data import ImageDataset, load_dataset
from .measure import parse_attack, robust_accuracies
from .runs import RunResult, load_run, read_result, save_result
from .train import EvalResult, evaluate


def run_test_split(run_dir: Path, result: RunResult, data_dir: str | None,
                   test_subset: int | None) -> ImageDataset:
    """The run's dataset, cut to the run's (or the given) test subset."""
    config = load_config(run_dir / "config.toml") if (run_dir / "config.toml").is_file() else None
    dataset = load_dataset(result.dataset, data_dir or (config.data_dir if config else None))
    subset = test_subset or (config.test_subset if config else None)
    if subset:
        dataset = dataset.subset(None, subset, seed=config.seed if config else 0)
    return dataset


def attack_run(run_dir: Path, attack_specs: list[str], *, test_subset: int | None = None, data_dir: str | None = None,
               batch_size: int = 250, progress: bool = True) -> dict[str, float]:
    """Accuracy under each attack, recorded in the run's result.json (`robust`)."""
    return evaluate_run(run_dir, attack_specs, test_subset=test_subset, data_dir=data_dir,
                        batch_size=batch_size, progress=progress)[1]


def evaluate_run(run_dir: Path, attack_specs: list[str], *, test_subset: int | None = None,
                 data_dir: str | None = None, batch_size: int = 250,
                 progress: bool = True) -> tuple[EvalResult, dict[str, float]]:
    result = read_result(run_dir)
    for spec in attack_specs:
        parse_attack(spec)  # a bad spec fails before any work
    model, _ = load_run(run_dir)
    dataset = run_test_split(run_dir, result, data_dir, test_subset)
    attacks = [parse_attack(spec, dataset.attack_eps) for spec in attack_specs]
    images, labels = dataset.test_images, dataset.test_labels
    clean = evaluate(model, images, labels, batch_size=batch_size)
    robust = dict(result.robust or {})
    for attack in attacks:
        robust.update(robust_accuracies(model, images, labels, attack, batch_size=batch_size, progress=progress))
    if attacks:
        result.robust = robust
        result.extra.setdefault("robust_settings", {}).update({a.name: a.spec for a in attacks})
        save_result(run_dir, result)
    return clean, robust
