"""`leancnn compress RUN --method SPEC`: apply post-training methods to a trained
run, fine-tune, and write a new run that loads like any other."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import TrainConfig, load_config, to_toml
from .data import ImageDataset
from .errors import LeancnnError
from .experiment import RunOutcome, measure_into, prepare_data, robust_figures
from .io import write_text
from .measure.latency import machine
from .methods import Method, parse_method
from .runs import RunResult, load_run_with_methods, read_result, save_result, versions, write_log, write_model
from .train import Trainer, evaluate, hold_out
from .train.distributed import Ranks, barrier, join_process_group, leave_process_group
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


def compress_run(run_dir: Path, specs: list[str], *, epochs: int, out: Path | None, lr: float | None = None,
                 progress: bool = True, latency: bool = True) -> RunOutcome | None:
    """The new run (its directory, result and model), or None when the methods only reported."""
    if not specs:
        raise LeancnnError("give at least one --method")
    new_methods = [parse_method(spec) for spec in specs]  # bad specs fail before anything is loaded
    if out is not None and (out / "result.json").exists():
        raise LeancnnError(f"{out}: a finished run is already there; choose another --out")
    model, architecture, existing = load_run_with_methods(run_dir)
    config = load_config(run_dir / "config.toml")
    for method in new_methods:
        method.check_training(config)   # fine-tuning trains with the run's config
    ranks, created_group = join_process_group(config.backend, resolve_device(config.device))
    try:
        return _compress(run_dir, new_methods, model, architecture, existing, config, ranks, epochs=epochs,
                         out=out, lr=lr, progress=progress, latency=latency)
    finally:
        leave_process_group(created_group)


def _compress(run_dir: Path, new_methods: list[Method], model: nn.Module, architecture: dict[str, Any],
              existing: list[Method], config: TrainConfig, ranks: Ranks, *, epochs: int, out: Path | None,
              lr: float | None, progress: bool, latency: bool) -> RunOutcome | None:
    """compress_run's work. Under torchrun every rank compresses the same way (the methods decide
    from the same data and weights) and fine-tunes its share; rank 0 alone writes."""
    dataset = prepare_data(config)
    train_split, selection_images, selection_labels = split_selection(dataset, config.seed)
    context = CompressSession(train_split, config, selection_images, selection_labels, existing, progress,
                              log=print if ranks.main else (lambda line: None))
    before = evaluate(model, dataset.test_images, dataset.test_labels, batch_size=config.eval_batch_size).top1
    resolved: list[str] = []
    for method in new_methods:
        outcome = method.compress(model, context)
        if outcome is None:
            return None
        model, applied = outcome
        resolved.append(applied.spec())
        context.methods = existing + [parse_method(s) for s in resolved]
    compressed = evaluate(model, dataset.test_images, dataset.test_labels, batch_size=config.eval_batch_size).top1
    if out is None:
        raise LeancnnError("give --out for the compressed run")
    barrier()   # every rank has checked --out before rank 0 writes there
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        new_config = replace(config, methods=config.methods + resolved, out=str(out))
        write_text(out / "config.toml", to_toml(new_config))
    model = context.finetune(model, epochs, lr).cpu()
    if not ranks.main:
        barrier()   # rank 0 finalises, measures and writes
        return RunOutcome(out, None, model)
    try:
        return _settle_and_write(run_dir, out, model, context, new_methods, existing, resolved, architecture,
                                 {"finetune_epochs": epochs, "test_acc_original": before,
                                  "test_acc_before_finetune": compressed}, latency)
    finally:
        barrier()


def _settle_and_write(run_dir: Path, out: Path, model: nn.Module, context: CompressSession, new_methods: list[Method],
                      existing: list[Method], resolved: list[str], architecture: dict[str, Any],
                      notes: dict[str, Any], latency: bool) -> RunOutcome:
    """The compressed, fine-tuned model settled by its new methods, measured, and written to `out`."""
    config, dataset = context.config, context.dataset
    for method in context.methods[len(existing):]:
        # The new methods settle as after training (ADMM projects if no epoch did; a run
        # fine-tuned for 0 epochs must still satisfy its constraints).
        model = method.finalize(model)
    test = evaluate(model, dataset.test_images, dataset.test_labels, batch_size=config.eval_batch_size)
    new_architecture = {**architecture, "methods": architecture.get("methods", []) + resolved,
                        "compressed_from": str(run_dir)}
    parent = read_result(run_dir)
    robust, settings = robust_figures(new_methods, model, dataset, config.eval_batch_size)
    result = RunResult(dataset=parent.dataset, model=parent.model, methods=new_architecture["methods"],
                       epochs=parent.epochs, seed=parent.seed, test_acc=test.top1, test_top5=test.top5, robust=robust,
                       train_seconds=parent.train_seconds, versions={**versions(), "machine": machine()},
                       extra=settings)
    result.extra["compress"] = {"from": str(run_dir), **notes, **context.notes}
    measure_into(result, model, dataset.input_shape, latency=latency)
    write_model(out, model, new_architecture)
    write_log(out, context.epochs_log)
    save_result(out, result)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return RunOutcome(out, result, model)
