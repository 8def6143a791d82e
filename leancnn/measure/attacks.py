"""Adversarial attacks in [0, 1] pixel space: FGSM (Goodfellow et al., ICLR 2015)
and PGD (Madry et al., ICLR 2018), L-infinity or L2.

The model is put in eval mode while attacking and its mode is restored after,
so attacks can be used inside training (DNR) without touching batch-norm
statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from ..spec import build_options, format_spec, split_spec

# Default budgets: grey 28x28 digits and clothes are attacked with eps 0.1 in
# the literature, natural RGB images with 8/255.
GREY_DATASETS = {"fashion-mnist", "mnist"}


def default_eps(dataset: str | None) -> float:
    return 0.1 if dataset in GREY_DATASETS else 8 / 255


@dataclass
class AttackOptions:
    eps: float | None = None       # budget in [0, 1] pixel units; None = the dataset's default
    step: float | None = None      # PGD step size; None = eps / 4
    steps: int = 10                # PGD iterations
    random_start: bool = True      # PGD: start from a uniform point in the ball
    norm: Literal["linf", "l2"] = "linf"

    def check(self, name: str) -> None:
        if self.eps is not None and self.eps < 0:
            raise ConfigError(f"attack {name!r}: eps must be >= 0, got {self.eps}")
        if self.step is not None and self.step <= 0:
            raise ConfigError(f"attack {name!r}: step must be > 0, got {self.step}")
        if self.steps < 1:
            raise ConfigError(f"attack {name!r}: steps must be >= 1, got {self.steps}")


# The options each attack reads: FGSM is one step of size eps, so step, steps and random_start
# would be recorded in its spec without meaning anything.
ATTACK_OPTIONS = {"fgsm": ("eps", "norm"), "pgd": ("eps", "step", "steps", "random_start", "norm")}

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, AttackOptions, torch.Generator | None], torch.Tensor]
ATTACKS: Registry[AttackFn] = Registry("attack")


def _normalise_grad(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    flat = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / flat.view(-1, *([1] * (grad.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def _input_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    images = images.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(model(images), labels)
        (grad,) = torch.autograd.grad(loss, images)
    return grad


@ATTACKS.register("fgsm")
def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, options: AttackOptions,
         generator: torch.Generator | None = None) -> torch.Tensor:
    eps = float(options.eps or 0.0)
    if eps == 0:
        return images.clone()
    step = _normalise_grad(_input_gradient(model, images, labels), options.norm) * eps
    return (images + step).clamp(0, 1).detach()


@ATTACKS.register("pgd")
def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, options: AttackOptions,
        generator: torch.Generator | None = None) -> torch.Tensor:
    eps = float(options.eps or 0.0)
    if eps == 0:
        return images.clone()
    step = options.step if options.step is not None else eps / 4
    delta = torch.zeros_like(images)
    if options.random_start:
        noise = torch.rand(images.shape, generator=generator, device="cpu").to(images.device)
        delta = _project((noise * 2 - 1) * eps, eps, options.norm)
    adversarial = (images + delta).clamp(0, 1)
    for _ in range(options.steps):
        grad = _input_gradient(model, adversarial, labels)
        adversarial = adversarial + step * _normalise_grad(grad, options.norm)
        adversarial = (images + _project(adversarial - images, eps, options.norm)).clamp(0, 1).detach()
    return adversarial


@dataclass
class Attack:
    name: str
    options: AttackOptions

    @property
    def spec(self) -> str:
        """The attack as recorded in results: only the options it reads."""
        return format_spec(self.name, self.options, ATTACK_OPTIONS.get(self.name))

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Adversarial images; the model is attacked in eval mode and its mode restored."""
        was_training = model.training
        model.eval()
        try:
            return ATTACKS.get(self.name)(model, images, labels, self.options, generator)
        finally:
            model.train(was_training)


def parse_attack(spec: str, dataset: str | None = None) -> Attack:
    """'pgd:eps=0.1,steps=20' -> Attack; eps defaults by dataset."""
    name, raw = split_spec(spec)
    ATTACKS.get(name)  # unknown name -> ConfigError listing the choices
    allowed = ATTACK_OPTIONS.get(name)
    for key in raw:
        if allowed is not None and key not in allowed:
            raise ConfigError(f"attack {name!r}: unknown option {key!r}; allowed: {', '.join(allowed)}")
    options = build_options(AttackOptions, raw, f"attack {name!r}")
    options.check(name)
    if options.eps is None:
        options.eps = default_eps(dataset)
    return Attack(name, options)
