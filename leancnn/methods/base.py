"""The method protocol and registry. A method acts at up to three moments:
prepare (before training), training hooks, finalize (after training)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import nn

from ..config import TrainConfig
from ..data import ImageDataset
from ..registry import Registry
from ..spec import build_options, format_spec, split_spec


class EpochState(Protocol):
    epoch: int  # the epoch being trained, from 0
    step: int   # optimizer steps completed


class TrainingContext(Protocol):
    """What a training hook may use. The engine's Trainer (leancnn.train) provides it;
    the protocol lives here so that methods know nothing of their callers."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    dataset: ImageDataset
    state: EpochState
    total_steps: int   # optimizer steps of the whole run
    holdout: tuple[torch.Tensor, torch.Tensor] | None   # training images (and labels) kept out of training
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CompressContext(Protocol):
    """What a post-training method may use: data, an accuracy probe and fine-tuning.
    `leancnn.compress` provides it for `leancnn compress`."""

    dataset: ImageDataset          # the training split, selection images held out
    config: TrainConfig
    selection_labels: torch.Tensor
    notes: dict[str, Any]          # figures the method reports into result.json's `compress`
    log: Callable[[str], None]

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 on the held-out selection images."""

    def finetune(self, model: nn.Module, epochs: int, lr: float | None = None) -> nn.Module:
        """The model trained `epochs` more epochs with the run's methods."""


@dataclasses.dataclass
class NoOptions:
    pass


class Method:
    """Base class: override what the method needs; every hook is optional.

    `prepare` must be deterministic given the options (and the model), because
    loading a saved run rebuilds the architecture by calling it again before the
    weights are loaded.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # Aliases users know from the papers: alias -> options, e.g. "PS4_P4".
    aliases: ClassVar[dict[str, dict[str, str]]] = {}
    # The strengths `leancnn bench` tries by default (specs); empty: not benched.
    bench_specs: ClassVar[list[str]] = []
    # Specs the method contract (tests/test_method_contract.py) checks on every test model:
    # cheap settings that still reach each code path (modes, attacks, relaxations).
    test_specs: ClassVar[list[str]] = []
    # True for methods that act on a trained run (`leancnn compress`), not before training.
    post_training: ClassVar[bool] = False
    # False for methods too slow to train for `leancnn bench --quick` (the full bench has them).
    in_quick_bench: ClassVar[bool] = True

    @classmethod
    def parse_alias(cls, name: str) -> dict[str, str] | None:
        """Options for a paper's name of a setting ('PS4_P4'), or None."""
        lowered = {alias.lower(): options for alias, options in cls.aliases.items()}
        return lowered.get(name.lower())

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def validate(self) -> None:
        """Raise ConfigError for options that cannot work, before anything is built."""

    def spec(self) -> str:
        return format_spec(self.name, self.options)

    # -- before training ---------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def holdout_images(self, training_images: int) -> int:
        """How many of the `training_images` to keep out of training for the method to choose by
        (the trainer's `holdout`); 0 by default."""
        return 0

    def check_training(self, config: TrainConfig) -> None:
        """Raise ConfigError if the method cannot train under `config`; called before anything
        of a run is written (and before `leancnn compress` fine-tunes)."""

    # -- training hooks ----------------------------------------------------
    def check_distributed(self, world: int) -> None:
        """Raise ConfigError, before training, if the method cannot train on `world` ranks. Every
        method here can: the trainer checks after each epoch that all ranks hold the same state."""

    def decides_on_rank_0(self, epoch: int, epochs: int) -> bool:
        """True where this epoch's `after_epoch` decides from something rank-local (a latency
        measurement): under torchrun rank 0 alone runs it and its model and state go to all ranks."""
        return False

    def before_training(self, trainer: TrainingContext) -> None:
        """Called when `fit` starts, on a resume too (after the checkpoint is restored)."""

    def loss(self, trainer: TrainingContext, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Return a replacement for the training loss of this batch, or None."""
        return None

    def after_step(self, trainer: TrainingContext) -> None:
        pass

    def after_epoch(self, trainer: TrainingContext, epoch: int) -> dict[str, Any] | None:
        """May return figures to log for this epoch."""
        return None

    # -- state that must survive a resume ------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that must survive a resume and are not the model's (ADMM's Z and U): saved in
        the checkpoint's safetensors file, never in JSON."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    # -- after training ----------------------------------------------------
    def robust_attacks(self, dataset: ImageDataset) -> tuple[list[str], int]:
        """Attack specs a finished run of this method is measured under (result.json's `robust`),
        and on how many test images; none by default."""
        return [], 0

    def finalize(self, model: nn.Module) -> nn.Module:
        return model

    def compress(self, model: nn.Module, context: CompressContext) -> tuple[nn.Module, "Method"] | None:
        """`leancnn compress`: act on a trained model with data. Returns the new
        model and the method whose spec rebuilds it on load (through `prepare`),
        or None when the method only reports (an analysis) and nothing is written."""
        return self.prepare(model), self


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    METHODS.register(cls.name)(cls)
    return cls


def _resolve_alias(name: str) -> tuple[str, dict[str, str]] | None:
    for method_name in METHODS:
        options = METHODS.get(method_name).parse_alias(name)
        if options is not None:
            return method_name, options
    return None


def parse_method(spec: str) -> Method:
    """'psconv:k=4,period=4' or a paper alias ('PS4_P4') -> a Method instance."""
    name, raw = split_spec(spec)
    alias = None if name in METHODS else _resolve_alias(name)
    if alias is not None:
        name, defaults = alias
        raw = {**defaults, **raw}
    cls = METHODS.get(name)
    method = cls(build_options(cls.Options, raw, f"method {name!r}"))
    method.validate()
    return method


def apply_methods(model: nn.Module, specs: list[str]) -> tuple[nn.Module, list[Method]]:
    methods = [parse_method(s) for s in specs]
    for method in methods:
        model = method.prepare(model)
    return model, methods
