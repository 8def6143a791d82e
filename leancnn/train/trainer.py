"""The Trainer: SGD with Nesterov momentum, schedules, label smoothing, method
hooks, per-epoch atomic checkpoints and exact resume, in one process or data-parallel
over the ranks of a torchrun launch (leancnn.train.distributed)."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import TrainConfig
from ..data import BatchLoader, ImageDataset, shard_bounds
from ..errors import ConfigError, TrainingDiverged
from ..methods import Method
from .checkpoint import (load_checkpoint, load_optimizer_tensors, model_state, optimizer_tensors, save_checkpoint,
                         tensors_of_method)
from ..progress import progress_bar
from .distributed import (GlobalBatchNorm, Ranks, all_reduce_gradients, all_reduce_sum, broadcast_object,
                          broadcast_tensors, current_ranks, gather_objects, tensors_digest)
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
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is available to this torch build ({torch.__version__}); "
                          "use --device cpu or auto")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500,
             device: torch.device | None = None, channels_last: bool = False, ranks: Ranks | None = None) -> EvalResult:
    """Top-1, top-5 (None under 5 classes) and mean loss; uint8 or [0, 1] float images. With
    `ranks` of a distributed run, each rank evaluates its slice and the counts are summed."""
    device = device or next(model.parameters()).device
    full_count = len(labels)
    if ranks is not None and ranks.active:
        start, end = shard_bounds(full_count, ranks.rank, ranks.world)
        images, labels = images[start:end], labels[start:end]
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
    if ranks is not None and ranks.active:
        correct1, correct5, loss_sum = all_reduce_sum([correct1, correct5, loss_sum], device)
        count = full_count
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
                 progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 ranks: Ranks | None = None) -> None:
        self.config = config
        self.ranks = ranks or current_ranks()
        self.methods = methods or []
        # Training images a method keeps out of training to choose by (the dynamic method's search).
        self.dataset, self.holdout = hold_out(dataset, max((m.holdout_images(len(dataset.train_labels))
                                                            for m in self.methods), default=0), config.seed + 13)
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress and self.ranks.main
        self.on_epoch = on_epoch
        self.device = resolve_device(config.device)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision 'fp16' needs CUDA (loss scaling against fp16 underflow); on CPU use bf16 or fp32")
        if self.ranks.active and config.batch_size < self.ranks.world:
            raise ConfigError(f"batch_size {config.batch_size} is smaller than the {self.ranks.world} ranks: "
                              "each rank needs at least one image per step")
        if self.ranks.active:
            for method in self.methods:
                method.check_distributed(self.ranks.world)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        channels_last = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer()
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.loader = BatchLoader(
            dataset.train_images, dataset.train_labels, config.batch_size, shuffle=True,
            crop_padding=dataset.crop_padding if config.augment else 0,
            horizontal_flip=dataset.horizontal_flip and config.augment, seed=config.seed, drop_last=False,
            shard=(self.ranks.rank, self.ranks.world))
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
        if self.checkpoint_dir is None or not self.ranks.main:
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
        if self.ranks.active:   # every rank starts from rank 0's weights, whatever its initialisation did
            broadcast_tensors(self.model.state_dict().values())
        for method in self.methods:  # also on resume: methods set up what they need for the next steps
            method.before_training(self)
        for epoch in range(self.state.epoch, self.config.epochs):
            self._train_epoch(epoch)
        return self.state

    def step_context(self) -> contextlib.ExitStack:
        """Autocast at the configured precision, and global batch statistics across ranks."""
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self.ranks.active and self.config.sync_batchnorm:
            stack.enter_context(GlobalBatchNorm())
        return stack

    def _train_epoch(self, epoch: int) -> None:
        self.model.train()
        self.loader.set_epoch(epoch)
        started = time.perf_counter()
        loss_sum = 0.0
        seen = 0
        description = f"epoch {epoch + 1}/{self.config.epochs}"
        global_sizes = self.loader.global_batch_sizes()
        with progress_bar(len(self.loader), description, enabled=self.progress) as advance:
            for batch_number, (images, labels) in enumerate(self.loader):
                if self.device.type == "cuda":
                    images, labels = images.pin_memory(), labels.pin_memory()
                images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                labels = labels.to(self.device, non_blocking=True)
                lr = self.lr_at(self.state.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                # Random draws inside a step (attack starts, sampled sub-networks) come from a
                # generator seeded by the step: the same on every rank, and after a resume.
                torch.manual_seed(self.config.seed * 1_000_003 + self.state.step)
                with self.step_context():
                    loss = self.compute_loss(images, labels)
                # Each rank's mean loss weighted by its share of the global batch: the summed
                # gradients are then the global batch's mean-loss gradients.
                share = len(labels) / global_sizes[batch_number]
                self.optimizer.zero_grad(set_to_none=True)
                weighted = loss.float() * share
                (self.scaler.scale(weighted) if self.scaler else weighted).backward()
                loss_value = loss.item()
                if self.ranks.active:   # the global batch's mean loss comes with the gradients
                    loss_value, = all_reduce_gradients(self.params, [loss_value * share])
                if not math.isfinite(loss_value):
                    kept = f"the last good checkpoint (epoch {self.state.epoch}) is kept in {self.checkpoint_dir}" \
                        if self.checkpoint_dir and self.state.epoch else "no checkpoint was written yet"
                    raise TrainingDiverged(
                        f"loss became {loss_value} at epoch {epoch + 1}, step {self.state.step}; {kept}; "
                        f"try a lower lr (now {self.config.lr})")
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                for method in self.methods:
                    method.after_step(self)
                self.state.step += 1
                loss_sum += loss_value * global_sizes[batch_number]
                seen += global_sizes[batch_number]
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
                        channels_last=self.memory_format == torch.channels_last, ranks=self.ranks)
        entry.update(test_acc=test.top1, test_top5=test.top5, test_loss=test.loss)
        for index, method in enumerate(self.methods):
            alone = self.ranks.active and method.decides_on_rank_0(epoch, self.config.epochs)
            extra = method.after_epoch(self, epoch) if self.ranks.main or not alone else None
            if alone:
                self._take_rank_0s(index)
            if extra:
                entry.update(extra)
        if self.ranks.active:
            entry.update(self._agree_across_ranks())
        self.state.log.append(entry)
        self._save()
        if self.on_epoch:
            self.on_epoch(entry)

    def _state_digests(self) -> dict[str, str]:
        digests = {"model": tensors_digest(self.model.state_dict().values()),
                   "optimizer": tensors_digest(optimizer_tensors(self.optimizer, self.params).values())}
        for index, method in enumerate(self.methods):
            tensors = method.state_tensors()
            digests[f"method {index} ({method.name})"] = tensors_digest(tensors[k] for k in sorted(tensors)) + \
                repr(sorted(method.state_dict().items()))
        return digests

    def _agree_across_ranks(self) -> dict[str, Any]:
        """Checks that every rank holds the same weights, optimizer buffers and method state after
        an epoch. Where a part differs (a method deciding from something rank-local), rank 0's is
        broadcast to all, and the log names the part, so that the difference is seen, not hidden."""
        mine = self._state_digests()
        every = gather_objects(mine)
        differing = [part for part in mine if len({digests[part] for digests in every}) > 1]
        if not differing:
            return {}
        broadcast_tensors(self.model.state_dict().values())
        broadcast_tensors(optimizer_tensors(self.optimizer, self.params).values())
        for index in range(len(self.methods)):
            self._take_rank_0s(index, model=False)
        return {"ranks_disagreed": differing}

    def _take_rank_0s(self, index: int, model: bool = True) -> None:
        """Rank 0's state of method `index` (and, with `model`, its weights and buffers) on every rank."""
        if model:
            broadcast_tensors(self.model.state_dict().values())
        method = self.methods[index]
        state, tensors = broadcast_object((method.state_dict(), {k: v.cpu() for k, v in method.state_tensors().items()}))
        if not self.ranks.main:
            method.load_state_dict(state)
            method.load_state_tensors(tensors)
