"""The Trainer: SGD with Nesterov momentum, schedules, label smoothing, method
hooks, per-epoch atomic checkpoints and exact resume."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import TrainConfig
from ..data import BatchLoader, ImageDataset
from ..errors import TrainingDiverged
from ..methods import Method
from .checkpoint import (load_checkpoint, load_optimizer_tensors, model_state, save_checkpoint,
                         tensors_of_method)
from ..progress import progress_bar
from .schedules import learning_rate


@dataclass
class EvalResult:
    top1: float
    top5: float | None
    loss: float
    count: int


@dataclass
class TrainState:
    epoch: int = 0        # epochs completed
    step: int = 0         # optimizer steps completed
    seconds: float = 0.0  # training wall time so far, across resumes
    log: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500,
             device: torch.device | None = None, channels_last: bool = False) -> EvalResult:
    """Top-1, top-5 (None under 5 classes) and mean loss; uint8 or [0, 1] float images."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    loader = BatchLoader(images, labels, batch_size) if images.dtype == torch.uint8 else None
    batches = loader if loader is not None else (
        (images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size))
    num_classes = None
    for batch, target in batches:
        batch, target = batch.to(device), target.to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        logits = model(batch)
        num_classes = logits.shape[1]
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        top = logits.topk(min(5, num_classes), dim=1).indices
        correct1 += (top[:, 0] == target).sum().item()
        correct5 += (top == target[:, None]).any(dim=1).sum().item()
    model.train(was_training)
    count = len(labels)
    return EvalResult(correct1 / max(count, 1), correct5 / max(count, 1) if (num_classes or 0) >= 5 else None,
                      loss_sum / max(count, 1), count)


def hold_out(dataset: ImageDataset, count: int, seed: int) -> tuple[ImageDataset, tuple[torch.Tensor, torch.Tensor] | None]:
    """(the dataset without `count` training images drawn by a permutation seeded with `seed`,
    those images and labels); (dataset, None) when count is 0."""
    if count <= 0:
        return dataset, None
    order = torch.randperm(len(dataset.train_labels), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:count], order[count:]
    kept_set = replace(dataset, train_images=dataset.train_images[kept], train_labels=dataset.train_labels[kept])
    return kept_set, (dataset.train_images[held], dataset.train_labels[held])


class Trainer:
    """Trains `model` on `dataset` under `config`, calling each method's hooks.

    With `checkpoint_dir`, every epoch ends with an atomic checkpoint, and
    `fit(resume=True)` continues from it with the same result as an
    uninterrupted run (batches are drawn from generators seeded by epoch).
    """

    def __init__(self, model: nn.Module, dataset: ImageDataset, config: TrainConfig, *,
                 methods: list[Method] | None = None, checkpoint_dir: Path | None = None,
                 progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.methods = methods or []
        # Training images a method keeps out of training to choose by (the dynamic method's search).
        self.dataset, self.holdout = hold_out(dataset, max((m.holdout_images(len(dataset.train_labels))
                                                            for m in self.methods), default=0), config.seed + 13)
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
        self.on_epoch = on_epoch
        self.device = resolve_device(config.device)
        channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer()
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.loader = BatchLoader(
            dataset.train_images, dataset.train_labels, config.batch_size, shuffle=True,
            crop_padding=dataset.crop_padding if config.augment else 0,
            horizontal_flip=dataset.horizontal_flip and config.augment, seed=config.seed, drop_last=False)
        self.state = TrainState()
        self.total_steps = len(self.loader) * config.epochs

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # No weight decay on biases and batch-norm scales: decaying them only hurts.
        decay = [p for p in self.params if p.dim() > 1]
        no_decay = [p for p in self.params if p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=self.config.lr, momentum=self.config.momentum,
                               nesterov=self.config.nesterov and self.config.momentum > 0)

    def lr_at(self, step: int) -> float:
        c = self.config
        return learning_rate(c.schedule, step, self.total_steps, c.lr, warmup_fraction=c.warmup_fraction,
                             steps_per_epoch=len(self.loader), milestones=c.step_milestones, gamma=c.step_gamma)

    # -- checkpoints ---------------------------------------------------------
    def _save(self) -> None:
        if self.checkpoint_dir is None:
            return
        info = {"step": self.state.step, "seconds": self.state.seconds, "log": self.state.log,
                "methods": [m.state_dict() for m in self.methods]}
        save_checkpoint(self.checkpoint_dir, self.state.epoch, self.model, self.optimizer, self.params, info,
                        [m.state_tensors() for m in self.methods])

    def _restore(self) -> bool:
        if self.checkpoint_dir is None:
            return False
        loaded = load_checkpoint(self.checkpoint_dir)
        if loaded is None:
            return False
        info, tensors = loaded
        self.model.load_state_dict(model_state(tensors))
        load_optimizer_tensors(self.optimizer, self.params, tensors)
        for index, (method, method_state) in enumerate(zip(self.methods, info.get("methods", []))):
            method.load_state_dict(method_state)
            method.load_state_tensors(tensors_of_method(tensors, index))
        self.state = TrainState(info["epoch"], info["step"], info["seconds"], info["log"])
        return True

    # -- training ------------------------------------------------------------
    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        for method in self.methods:
            loss = method.loss(self, images, labels)
            if loss is not None:
                return loss
        return self.loss_fn(self.model(images), labels)

    def fit(self, resume: bool = False) -> TrainState:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        torch.manual_seed(self.config.seed)
        if resume:
            self._restore()
        for method in self.methods:  # also on resume: methods set up what they need for the next steps
            method.before_training(self)
        for epoch in range(self.state.epoch, self.config.epochs):
            self._train_epoch(epoch)
        return self.state

    def _train_epoch(self, epoch: int) -> None:
        self.model.train()
        self.loader.set_epoch(epoch)
        started = time.perf_counter()
        loss_sum = 0.0
        seen = 0
        description = f"epoch {epoch + 1}/{self.config.epochs}"
        with progress_bar(len(self.loader), description, enabled=self.progress) as advance:
            for images, labels in self.loader:
                images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                labels = labels.to(self.device, non_blocking=True)
                lr = self.lr_at(self.state.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss = self.compute_loss(images, labels)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    kept = f"the last good checkpoint (epoch {self.state.epoch}) is kept in {self.checkpoint_dir}" \
                        if self.checkpoint_dir and self.state.epoch else "no checkpoint was written yet"
                    raise TrainingDiverged(
                        f"loss became {loss_value} at epoch {epoch + 1}, step {self.state.step}; {kept}; "
                        f"try a lower lr (now {self.config.lr})")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                for method in self.methods:
                    method.after_step(self)
                self.state.step += 1
                loss_sum += loss_value * len(labels)
                seen += len(labels)
                elapsed = time.perf_counter() - started
                advance(f"loss {loss_value:.3f}  {seen / max(elapsed, 1e-9):.0f} img/s")
        seconds = time.perf_counter() - started
        self.state.seconds += seconds
        self.state.epoch = epoch + 1
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                                 "lr": self.lr_at(self.state.step - 1), "seconds": round(seconds, 3),
                                 "images_per_second": round(seen / max(seconds, 1e-9), 1)}
        test = evaluate(self.model, self.dataset.test_images, self.dataset.test_labels,
                        batch_size=self.config.eval_batch_size, device=self.device,
                        channels_last=self.memory_format == torch.channels_last)
        entry.update(test_acc=test.top1, test_top5=test.top5, test_loss=test.loss)
        for method in self.methods:
            extra = method.after_epoch(self, epoch)
            if extra:
                entry.update(extra)
        self.state.log.append(entry)
        self._save()
        if self.on_epoch:
            self.on_epoch(entry)
