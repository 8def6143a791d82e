"""One training run, end to end: config -> data + model -> methods -> Trainer
-> finalize -> measure -> run directory + runs database."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import TrainConfig, to_toml
from .data import DATASETS, ImageDataset, load_dataset
from .errors import LeancnnError
from .io import write_text
from .deploy import deploy, deploy_plan
from .measure import count, latency_table, parse_attack, robust_accuracy
from .measure.latency import machine
from .methods import Method, apply_methods, parse_method
from .models import check_model_name, create_model, is_user_model, user_model_source
from .runs import RunResult, read_result, save_result, versions, write_log, write_model
from .train import Trainer, evaluate
from .train.distributed import Ranks, barrier, join_process_group, leave_process_group
from .train.trainer import resolve_device


@dataclass
class RunOutcome:
    run_dir: Path
    result: RunResult | None   # None on the ranks of a distributed run other than rank 0
    model: nn.Module


def prepare_data(config: TrainConfig) -> ImageDataset:
    dataset = load_dataset(config.data, config.data_dir)
    if config.train_subset or config.test_subset:
        dataset = dataset.subset(config.train_subset, config.test_subset, seed=config.seed)
    return dataset


def model_kwargs(config: TrainConfig, dataset: ImageDataset) -> dict[str, Any]:
    return {"num_classes": dataset.num_classes, "in_channels": dataset.in_channels, "width": config.width,
            "mean": list(dataset.mean), "std": list(dataset.std)}


def build_model(config: TrainConfig, dataset: ImageDataset) -> tuple[nn.Module, list[Method], dict[str, Any]]:
    torch.manual_seed(config.seed)
    kwargs = model_kwargs(config, dataset)
    model = create_model(config.model, **kwargs)
    model, methods = apply_methods(model, config.methods)
    architecture = {"model": config.model, "model_kwargs": kwargs, "methods": [m.spec() for m in methods],
                    "input_shape": list(dataset.input_shape)}
    if is_user_model(config.model):   # a run reloads only with the code that trained it
        architecture["model_source"] = user_model_source(config.model)
    return model, methods, architecture


def measure_into(result: RunResult, model: nn.Module, input_shape: tuple[int, ...],
                 latency: bool = True) -> None:
    """Counts always (cheap); CPU latency only when asked (seconds), of the deployed model
    (what inference runs: batch norm folded, sparse layers on their measured plans, which
    result.json records as `deploy_plan`)."""
    for key, value in count(model, input_shape).totals().items():
        setattr(result, key, value)
    if latency and next(model.parameters()).device.type == "cpu":
        deployed = deploy(model)
        result.latency_ms = latency_table(deployed, input_shape)
        result.extra["deploy_plan"] = deploy_plan(deployed)


def robust_figures(methods: list[Method], model: nn.Module, dataset: ImageDataset,
                   batch_size: int) -> tuple[dict[str, float] | None, dict[str, Any]]:
    """Accuracy under the attacks the methods ask for (Method.robust_attacks) on the first test
    images they name, and what was measured (the specs and the image count)."""
    specs, images = [], 0
    for method in methods:
        asked, count = method.robust_attacks(dataset)
        specs += [spec for spec in asked if spec not in specs]
        images = max(images, count)
    if not specs:
        return None, {}
    attacks = [parse_attack(spec, dataset.attack_eps) for spec in specs]
    test_images, test_labels = dataset.test_images[:images], dataset.test_labels[:images]
    robust = {attack.name: robust_accuracy(model, test_images, test_labels, attack, batch_size=batch_size,
                                           progress=False) for attack in attacks}
    return robust, {"robust_settings": {a.name: a.spec for a in attacks}, "robust_images": len(test_labels)}


def train_run(config: TrainConfig, *, resume: bool = False, progress: bool = True,
              on_epoch: Callable[[dict[str, Any]], None] | None = None) -> RunOutcome:
    """Train `config` into its run directory. Under torchrun every rank trains its share and only
    rank 0 writes (the directory, checkpoints, log, model, result, runs.db) and measures;
    `on_epoch` is called on every rank (a caller that prints checks `current_ranks().main`)."""
    check_model_name(config.model), DATASETS.get(config.data)  # unknown names fail before any work
    for spec in config.methods:
        parse_method(spec).check_training(config)
    ranks, created_group = join_process_group(config.backend, resolve_device(config.device))
    try:
        return _train_run(config, ranks, resume, progress, on_epoch)
    finally:
        leave_process_group(created_group)


def _train_run(config: TrainConfig, ranks: Ranks, resume: bool, progress: bool,
               on_epoch: Callable[[dict[str, Any]], None] | None) -> RunOutcome:
    run_dir = config.run_dir()
    if run_dir.exists() and (run_dir / "result.json").exists() and not resume:
        raise LeancnnError(f"{run_dir}: a finished run is already there; choose another --out or delete it")
    if resume and (run_dir / "result.json").exists():
        raise LeancnnError(f"{run_dir}: this run already finished; nothing to resume")
    if run_dir.exists() and not resume and (run_dir / "checkpoint").exists():
        raise LeancnnError(f"{run_dir}: holds an unfinished run; continue it with --resume or choose another --out")
    barrier()   # every rank has checked the directory before rank 0 writes into it
    dataset = prepare_data(config)
    model, methods, architecture = build_model(config, dataset)
    if ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.toml", to_toml(config))

    def epoch_done(entry: dict[str, Any]) -> None:   # on every rank, after rank 0's checkpoint
        if ranks.main:
            write_log(run_dir, trainer.state.log)
        if on_epoch:
            on_epoch(entry)

    trainer = Trainer(model, dataset, config, methods=methods, checkpoint_dir=run_dir / "checkpoint",
                      progress=progress, on_epoch=epoch_done, ranks=ranks)
    state = trainer.fit(resume=resume)
    model = trainer.model
    if not ranks.main:
        barrier()   # rank 0 finalises, measures and writes; the others wait for it, then leave
        return RunOutcome(run_dir, None, model)
    try:
        return _finish_run(config, run_dir, dataset, model, methods, architecture, state)
    finally:
        barrier()


def _finish_run(config: TrainConfig, run_dir: Path, dataset: ImageDataset, model: nn.Module, methods: list[Method],
                architecture: dict[str, Any], state) -> RunOutcome:
    for method in methods:
        model = method.finalize(model)
    # A method may settle its options at the end (dnr's channel mode records the widths it left).
    architecture["methods"] = [m.spec() for m in methods]
    model = model.to(memory_format=torch.contiguous_format)
    test = evaluate(model, dataset.test_images, dataset.test_labels, batch_size=config.eval_batch_size)
    robust, settings = robust_figures(methods, model, dataset, config.eval_batch_size)
    result = RunResult(dataset=config.data, model=config.model, methods=architecture["methods"], epochs=config.epochs,
                       seed=config.seed, test_acc=test.top1, test_top5=test.top5, robust=robust,
                       train_seconds=round(state.seconds, 3), versions={**versions(), "machine": machine()},
                       extra=settings)
    model_cpu = model.cpu()
    measure_into(result, model_cpu, dataset.input_shape, latency=config.latency)
    write_model(run_dir, model_cpu, architecture)
    write_log(run_dir, state.log)
    save_result(run_dir, result)
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    return RunOutcome(run_dir, result, model_cpu)


def ensure_run(config: TrainConfig, *, progress: bool = True,
               on_epoch: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """The result of the run in config.run_dir(): read when finished, resumed
    when a checkpoint is there, trained otherwise. Lets long benchmarks be
    killed and started again without losing work."""
    run_dir = config.run_dir()
    if (run_dir / "result.json").is_file():
        return read_result(run_dir)
    resume = (run_dir / "checkpoint").is_dir()
    return train_run(config, resume=resume, progress=progress, on_epoch=on_epoch).result
