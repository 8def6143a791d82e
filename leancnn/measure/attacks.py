"""Adversarial attacks in [0, 1] pixel space: FGSM (Goodfellow et al., ICLR 2015)
and PGD (Madry et al., ICLR 2018), L-infinity or L2.

The model is put in eval mode while attacking and its mode is restored after,
so attacks can be used inside training (DNR) without touching batch-norm
statistics.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from ..spec import build_options, format_spec, split_spec

# The budget when a spec gives none and the caller knows no dataset: natural RGB images
# are attacked with 8/255 in the literature. Each dataset carries its own (ImageDataset.attack_eps:
# 0.1 for grey 28x28 digits and clothes).
DEFAULT_EPS = 8 / 255


def _check_eps(name: str, eps: float | None) -> None:
    if eps is not None and eps < 0:
        raise ConfigError(f"attack {name!r}: eps must be >= 0, got {eps}")


@dataclass
class FGSMOptions:
    """FGSM is one step of size eps: it has no step, steps or random start."""

    eps: float | None = None       # budget in [0, 1] pixel units; None = the dataset's default
    norm: Literal["linf", "l2"] = "linf"

    def check(self, name: str) -> None:
        _check_eps(name, self.eps)


@dataclass
class PGDOptions:
    eps: float | None = None       # budget in [0, 1] pixel units; None = the dataset's default
    step: float | None = None      # step size; None = eps / 4
    steps: int = 10                # iterations
    random_start: bool = True      # start from a uniform point in the ball
    norm: Literal["linf", "l2"] = "linf"

    def check(self, name: str) -> None:
        _check_eps(name, self.eps)
        if self.step is not None and self.step <= 0:
            raise ConfigError(f"attack {name!r}: step must be > 0, got {self.step}")
        if self.steps < 1:
            raise ConfigError(f"attack {name!r}: steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class AttackKind:
    """A registered attack: its typed options and the function that makes adversarial images."""

    Options: type
    run: Callable[..., torch.Tensor]   # (model, images, labels, options, generator) -> images


ATTACKS: Registry[AttackKind] = Registry("attack")


def register_attack(name: str, options: type) -> Callable:
    """Register `run`; with a zero budget it is not called and the images come back as they are."""
    def decorator(run: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(run)
        def attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, options,
                   generator: torch.Generator | None = None) -> torch.Tensor:
            if not options.eps:
                return images.clone()
            return run(model, images, labels, options, generator)

        ATTACKS.register(name)(AttackKind(options, attack))
        return attack

    return decorator


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


@register_attack("fgsm", FGSMOptions)
def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, options: FGSMOptions,
         generator: torch.Generator | None = None) -> torch.Tensor:
    eps = float(options.eps)
    step = _normalise_grad(_input_gradient(model, images, labels), options.norm) * eps
    return (images + step).clamp(0, 1).detach()


@register_attack("pgd", PGDOptions)
def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, options: PGDOptions,
        generator: torch.Generator | None = None) -> torch.Tensor:
    eps = float(options.eps)
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
    options: object   # the registered attack's own options class (FGSMOptions, PGDOptions, APGDOptions, ...)

    @property
    def spec(self) -> str:
        """The attack as recorded in results: name and every option."""
        return format_spec(self.name, self.options)

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Adversarial images; the model is attacked in eval mode and its mode restored."""
        was_training = model.training
        model.eval()
        try:
            return ATTACKS.get(self.name).run(model, images, labels, self.options, generator)
        finally:
            model.train(was_training)


def parse_attack(spec: str, default_eps: float | None = None) -> Attack:
    """'pgd:eps=0.1,steps=20' -> Attack. Without eps in the spec, `default_eps` (the dataset's
    ImageDataset.attack_eps), else DEFAULT_EPS."""
    name, raw = split_spec(spec)
    kind = ATTACKS.get(name)  # unknown name -> ConfigError listing the choices
    options = build_options(kind.Options, raw, f"attack {name!r}")
    options.check(name)
    if options.eps is None:
        options.eps = default_eps if default_eps is not None else DEFAULT_EPS
    return Attack(name, options)
