"""The `sat` method: smooth adversarial training, adversarial training whose perturbation
budget follows a curriculum: it starts easy and rises as the model copes, measured by the
softmax probability of the true class on the adversarial examples (P-SAT, metric=prob) or by
the largest eigenvalue of the adversarial loss's Hessian (H-SAT, metric=hessian).

"Smooth Adversarial Training" (seed page, METHODS.md): a curriculum over the attack's
difficulty smooths the adversarial loss landscape (smaller Hessian eigenvalues), which lets
training reach large perturbations where plain adversarial training fails; reported +6 clean
and +1 robust points on CIFAR-100 over plain adversarial training.

The loss is the same hybrid as DNR's dense baseline (beta x clean + (1 - beta) x adversarial
CE; leancnn.methods.adversarial), so `sat:eps=E` and `dnr:density=1,eps=E` differ only in the
schedule. The schedule itself (stages, deadline, checks) is leancnn.methods.curriculum's, which
DNR and RSR use through `schedule=prob|hessian`. The model is dense and unchanged: SAT is a
training method only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .adversarial import AdversarialLoss, AdversarialMethod, check_adversarial_options
from .base import register_method
from .curriculum import CurriculumSettings


@dataclass
class SATOptions:
    metric: str = "prob"           # prob (P-SAT) or hessian (H-SAT)
    eps: float | None = None       # the target budget in [0, 1] pixel units; None = the dataset's default
    stages: int = 8                # the budget rises in this many equal steps
    ramp: float = 0.6              # fraction of training by which the budget reaches eps at the latest
    threshold: float | None = None  # prob: coping probability (default 0.5); hessian: eigenvalue ratio (1.0)
    check_every: int = 25          # optimizer steps between difficulty checks
    beta: float = 0.5              # weight of the clean loss
    attack: str = "pgd"            # the training attack
    steps: int = 7                 # PGD iterations during training
    seed: int = 0
    eval_images: int = 1000        # test images the finished run is attacked on (FGSM, PGD-10 at eps); 0 = none


@register_method
class SAT(AdversarialMethod):
    """Adversarial training on a curriculum of perturbation budgets."""

    name = "sat"
    Options = SATOptions
    test_specs = ["sat:metric=hessian,steps=2,stages=3,check_every=2,eval_images=16"]
    bench_specs: list[str] = []   # a robust-training method: benchmarks/robust_table.py compares it

    def validate(self) -> None:
        o = self.options
        owner = f"method {self.name!r}"
        if o.attack == "none":
            raise ConfigError(f"{owner}: SAT schedules an attack's budget; attack=none leaves nothing to schedule")
        if o.beta >= 1:
            raise ConfigError(f"{owner}: beta must be < 1 (beta=1 trains on clean images only), got {o.beta}")
        check_adversarial_options(owner, o.beta, o.attack, o.eps, o.steps)
        if o.eval_images < 0:
            raise ConfigError(f"{owner}: eval_images must be >= 0 (0 = no attack after training), got {o.eval_images}")
        settings = CurriculumSettings(o.metric, o.stages, o.ramp, o.threshold, o.check_every)
        settings.check(owner)
        self.adversarial = AdversarialLoss(o.beta, o.attack, o.eps, o.steps, o.seed, settings)

    def after_epoch(self, trainer, epoch: int) -> dict[str, Any]:
        return self.adversarial.figures()
