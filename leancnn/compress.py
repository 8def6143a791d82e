"""`leancnn compress RUN --method SPEC`: apply post-training methods to a trained
run, fine-tune, and write a new run that loads like any other."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .config import TrainConfig, load_config, to_toml
from .data import ImageDataset
from .errors import ConfigError, LeancnnError
from .experiment import RunOutcome, measure_into, prepare_data, robust_figures
from .io import write_text
from .measure.latency import machine
from .methods import Method, parse_method
from .runs import RunResult, load_run_with_methods, read_result, save_result, versions, write_log, write_model
from .train import Trainer, evaluate, hold_out
from .train.distributed import barrier, join_process_group, leave_process_group
from .train.trainer import resolve_device

SELECTION_IMAGES = 2000  # held out of the training set to choose layers, so the test set stays unseen


@dataclass
class CompressSession:
    """The methods' CompressContext for one `leancnn compress`: the run's training split
    with selection images held out, its config, and fine-tuning with its methods."""

    dataset: ImageDataset
    config: TrainConfig
    selection_images: torch.Tensor
    selection_labels: torch.Tensor
    methods: list[Method]
    progress: bool = True
    log: Callable[[str], None] = print
    notes: dict[str, Any] = field(default_factory=dict)
    epochs_log: list[dict] = field(default_factory=list)   # every fine-tuning epoch's entry, for the run's log.jsonl

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 on the held-out selection images."""
        return evaluate(model, self.selection_images, self.selection_labels,
                        batch_size=self.config.eval_batch_size).top1

    def finetune(self, model: nn.Module, epochs: int, lr: float | None = None) -> nn.Module:
        if epochs <= 0:
            return model
        config = replace(self.config, epochs=epochs, lr=lr or self.config.lr * 0.1, out=None, warmup_fraction=0.0,
                         schedule="cosine")
        trainer = Trainer(model, self.dataset, config, methods=self.methods, progress=self.progress)
        trainer.fit()
        self.epochs_log.extend(trainer.state.log)
        return trainer.model.to(memory_format=torch.contiguous_format).eval()


def split_selection(dataset: ImageDataset, seed: int) -> tuple[ImageDataset, torch.Tensor, torch.Tensor]:
    train, held = hold_out(dataset, min(SELECTION_IMAGES, len(dataset.train_labels) // 5), seed + 7)
    return (train, *held) if held is not None else (train, dataset.train_images[:0], dataset.train_labels[:0])


@dataclass
class CompressRecord:
    """What `compress` did: the method specs as applied (resolved, as model.json records them),
    what the methods reported, the fine-tuning epochs' log, and accuracies (top-1) on the held-out
    selection images and, when test data was given, on it: before, compressed, after fine-tuning."""

    methods: list[str]
    notes: dict[str, Any]
    finetune_log: list[dict]
    selection_accuracy: dict[str, float]
    test_accuracy: dict[str, float]
    reported_only: bool = False   # a method only analysed (vip:sensitivity): the model is unchanged


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def as_uint8_images(images: torch.Tensor, what: str) -> torch.Tensor:
    """uint8 images as they are; float images in [0, 1] at 1/255 steps (how every dataset here is
    held); anything else is refused."""
    if images.dim() != 4:
        raise ConfigError(f"{what}: images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point() or images.numel() and (images.min() < 0 or images.max() > 1):
        raise ConfigError(f"{what}: images must be uint8, or floats in [0, 1] pixel units (got {images.dtype}"
                          + (f" in [{images.min().item():.3g}, {images.max().item():.3g}])" if images.numel() else ")"))
    return (images.detach().cpu() * 255).round().to(torch.uint8)


def gather_pairs(data: tuple[torch.Tensor, torch.Tensor] | Batches, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
    else:
        batches = list(data)
        if not batches:
            raise ConfigError(f"{what}: no batches")
        images = torch.cat([as_uint8_images(b[0], what) for b in batches])
        labels = torch.cat([b[1] for b in batches])
    images = as_uint8_images(images, what)
    if len(images) != len(labels):
        raise ConfigError(f"{what}: {len(images)} images but {len(labels)} labels")
    return images, labels.long().cpu()


def user_dataset(data: tuple[torch.Tensor, torch.Tensor] | Batches,
                 test_data: tuple[torch.Tensor, torch.Tensor] | Batches | None) -> ImageDataset:
    """The user's data as the in-memory dataset the methods and fine-tuning use (no augmentation)."""
    images, labels = gather_pairs(data, "data")
    test_images, test_labels = gather_pairs(test_data, "test_data") if test_data is not None \
        else (images[:0], labels[:0])
    if test_images.shape[1:] != images.shape[1:]:
        raise ConfigError(f"test_data: images of shape {tuple(test_images.shape[1:])}, data has {tuple(images.shape[1:])}")
    classes = int(max(labels.max().item(), test_labels.max().item() if len(test_labels) else 0)) + 1
    return ImageDataset("data", images, labels, test_images, test_labels, classes)


def compress(model: nn.Module, specs: str | list[str], *, data: ImageDataset | tuple[torch.Tensor, torch.Tensor] | Batches,
             example_input: torch.Tensor | None = None, epochs: int = 0, lr: float | None = None,
             config: TrainConfig | None = None, methods: list[Method] | None = None,
             test_data: tuple[torch.Tensor, torch.Tensor] | Batches | None = None, progress: bool = False,
             log: Callable[[str], None] | None = None) -> tuple[nn.Module, CompressRecord]:
    """Post-training methods ("cap:macs=0.5", "l1prune:macs=0.5", "vip:layers=auto", ...) on a
    model you hold: `data` is a (images, labels) pair, any iterable of such batches (uint8, or
    floats in [0, 1]), or an ImageDataset. The methods choose on images held out of `data`, then
    the model is fine-tuned `epochs` epochs with `config`'s settings (default TrainConfig()) and the
    training-time `methods` it already carries. Returns (the compressed model, what was done);
    `leancnn compress RUN` is this call on the run's model, data and config. Under torchrun the
    fine-tuning is data-parallel (every rank must make the same call)."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ConfigError("give at least one method spec")
    new_methods = [parse_method(spec) for spec in specs]  # bad specs fail before any work
    config = (config or TrainConfig()).validate()
    for method in new_methods:
        method.check_training(config)   # fine-tuning trains with this config
    dataset = data if isinstance(data, ImageDataset) else user_dataset(data, test_data)
    if example_input is not None and tuple(example_input.shape[1:]) != tuple(dataset.input_shape):
        raise ConfigError(f"example_input of shape {tuple(example_input.shape)} does not fit the data's images "
                          f"{tuple(dataset.input_shape)}")
    existing = list(methods or [])
    train_split, selection_images, selection_labels = split_selection(dataset, config.seed)
    context = CompressSession(train_split, config, selection_images, selection_labels, existing, progress,
                              log=log or (lambda line: None))
    has_test = len(dataset.test_labels) > 0

    def accuracies(stage: str) -> None:
        selection[stage] = context.accuracy(model) if len(selection_labels) else float("nan")
        if has_test:
            test[stage] = evaluate(model, dataset.test_images, dataset.test_labels,
                                   batch_size=config.eval_batch_size).top1

    selection: dict[str, float] = {}
    test: dict[str, float] = {}
    accuracies("original")
    resolved: list[str] = []
    for method in new_methods:
        outcome = method.compress(model, context)
        if outcome is None:
            return model, CompressRecord(resolved, context.notes, [], selection, test, reported_only=True)
        model, applied = outcome
        resolved.append(applied.spec())
        context.methods = existing + [parse_method(s) for s in resolved]
    accuracies("compressed")
    model = context.finetune(model, epochs, lr).cpu()
    for method in context.methods[len(existing):]:
        # The new methods settle as after training (ADMM projects if no epoch did; a model
        # fine-tuned for 0 epochs must still satisfy its constraints).
        model = method.finalize(model)
    accuracies("finetuned")
    return model, CompressRecord(resolved, context.notes, context.epochs_log, selection, test)


def finetune_seconds(record: CompressRecord) -> float:
    """Seconds the fine-tuning epochs took; a compressed run's training time is its parent's plus
    these (what the model cost to make, which the bench's trade-off compares)."""
    return sum(float(entry.get("seconds", 0.0)) for entry in record.finetune_log)


def compress_run(run_dir: Path, specs: list[str], *, epochs: int, out: Path | None, lr: float | None = None,
                 progress: bool = True, latency: bool = True) -> RunOutcome | None:
    """`compress` on a trained run (its model, methods, data and config) into the new run `out`:
    its directory, result and model; None when the methods only reported. Under torchrun every
    rank compresses the same way and fine-tunes its share; rank 0 alone writes."""
    if not specs:
        raise LeancnnError("give at least one --method")
    for spec in specs:
        parse_method(spec)   # bad specs fail before anything is loaded
    if out is not None and (out / "result.json").exists():
        raise LeancnnError(f"{out}: a finished run is already there; choose another --out")
    model, architecture, existing = load_run_with_methods(run_dir)
    config = load_config(run_dir / "config.toml")
    ranks, created_group = join_process_group(config.backend, resolve_device(config.device))
    try:
        dataset = prepare_data(config)
        barrier()   # every rank has checked --out before rank 0 writes there
        model, record = compress(model, specs, data=dataset, epochs=epochs if out is not None else 0, lr=lr,
                                 config=config, methods=existing, progress=progress and ranks.main,
                                 log=print if ranks.main else None)
        if record.reported_only:
            return None
        if out is None:
            raise LeancnnError("give --out for the compressed run")
        if not ranks.main:
            barrier()   # rank 0 measures and writes
            return RunOutcome(out, None, model)
        try:
            return _write_compressed_run(run_dir, out, model, record, specs, architecture, config, dataset, epochs,
                                         latency)
        finally:
            barrier()
    finally:
        leave_process_group(created_group)


def _write_compressed_run(run_dir: Path, out: Path, model: nn.Module, record: CompressRecord, specs: list[str],
                          architecture: dict[str, Any], config: TrainConfig, dataset: ImageDataset, epochs: int,
                          latency: bool) -> RunOutcome:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.toml", to_toml(replace(config, methods=config.methods + record.methods, out=str(out))))
    test = evaluate(model, dataset.test_images, dataset.test_labels, batch_size=config.eval_batch_size)
    new_architecture = {**architecture, "methods": architecture.get("methods", []) + record.methods,
                        "compressed_from": str(run_dir)}
    parent = read_result(run_dir)
    robust, settings = robust_figures([parse_method(s) for s in specs], model, dataset, config.eval_batch_size)
    result = RunResult(dataset=parent.dataset, model=parent.model, methods=new_architecture["methods"],
                       epochs=parent.epochs, seed=parent.seed, test_acc=test.top1, test_top5=test.top5, robust=robust,
                       train_seconds=round((parent.train_seconds or 0.0) + finetune_seconds(record), 3),
                       versions={**versions(), "machine": machine()}, extra=settings)
    result.extra["compress"] = {"from": str(run_dir), "finetune_epochs": epochs,
                                "test_acc_original": record.test_accuracy["original"],
                                "test_acc_before_finetune": record.test_accuracy["compressed"], **record.notes}
    measure_into(result, model, dataset.input_shape, latency=latency)
    write_model(out, model, new_architecture)
    write_log(out, record.finetune_log)
    save_result(out, result)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return RunOutcome(out, result, model)
