"""The method protocol and registry. A method acts at up to three moments:
prepare (before training), training hooks, finalize (after training)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..registry import Registry
from ..spec import build_options, format_spec, split_spec

if TYPE_CHECKING:
    from ..compress import CompressContext
    from ..train.trainer import Trainer


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
    # True for methods that act on a trained run (`leancnn compress`), not before training.
    post_training: ClassVar[bool] = False

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

    # -- training hooks ----------------------------------------------------
    def before_training(self, trainer: "Trainer") -> None:
        """Called when `fit` starts, on a resume too (after the checkpoint is restored)."""

    def loss(self, trainer: "Trainer", images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Return a replacement for the training loss of this batch, or None."""
        return None

    def after_backward(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def after_epoch(self, trainer: "Trainer", epoch: int) -> dict[str, Any] | None:
        """May return figures to log for this epoch."""
        return None

    # -- state that must survive a resume ------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # -- after training ----------------------------------------------------
    def finalize(self, model: nn.Module) -> nn.Module:
        return model

    def compress(self, model: nn.Module, context: "CompressContext") -> tuple[nn.Module, "Method"] | None:
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
