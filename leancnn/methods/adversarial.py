"""Adversarial training's loss, shared by DNR, magprune's fine-tuning, RSR and SAT:
beta x CE(clean) + (1 - beta) x CE(adversarial), the adversarial images made by the attack
(PGD by default; Madry et al., ICLR 2018) in [0, 1] pixel space with the model in eval mode.
The budget is constant, or follows SAT's curriculum (leancnn.methods.curriculum).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..measure.attacks import ATTACKS, Attack, PGDOptions
from ..measure.sharpness import hessian_top_eigenvalue
from .base import Method
from .curriculum import METRICS, Curriculum, CurriculumSettings

SCHEDULES = ("constant",) + METRICS
HESSIAN_IMAGES = 32        # images of the batch H-SAT's eigenvalue is measured on
HESSIAN_ITERATIONS = 8     # power iterations per measurement


def check_adversarial_options(owner: str, beta: float, attack: str, eps: float | None, steps: int,
                              schedule: str = "constant") -> None:
    """One line naming the bad option, before anything is built."""
    if not 0 <= beta <= 1:
        raise ConfigError(f"{owner}: beta must be in [0, 1], got {beta}")
    if attack != "none" and attack not in ATTACKS:
        raise ConfigError(f"{owner}: unknown attack {attack!r}; choose one of: none, {', '.join(ATTACKS.names())}")
    if eps is not None and eps < 0:
        raise ConfigError(f"{owner}: eps must be >= 0, got {eps}")
    if steps < 1:
        raise ConfigError(f"{owner}: steps must be a whole number >= 1, got {steps}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"{owner}: schedule must be one of {', '.join(SCHEDULES)} (prob and hessian: SAT's "
                          f"curriculum with its default settings), got {schedule!r}")
    if schedule != "constant" and (attack == "none" or beta >= 1):
        raise ConfigError(f"{owner}: schedule={schedule} ramps the attack's budget, so it needs an attack "
                          f"(attack={attack}) and beta < 1 (beta={beta})")


def schedule_settings(schedule: str) -> CurriculumSettings | None:
    """`schedule=` of DNR and RSR: constant (None), or SAT's curriculum on that metric."""
    return None if schedule == "constant" else CurriculumSettings(metric=schedule)


@dataclass
class AdversarialLoss:
    """The hybrid loss of one method's run. `curriculum` settings make the budget SAT's schedule."""

    beta: float
    attack: str                  # an ATTACKS name, or none
    eps: float | None            # None = the dataset's default
    steps: int                   # PGD iterations
    seed: int
    curriculum_settings: CurriculumSettings | None = None
    curriculum: Curriculum | None = field(default=None, init=False)
    target_eps: float = field(default=0.0, init=False)
    last_eps: float = field(default=0.0, init=False)   # the budget of the last step trained

    @property
    def active(self) -> bool:
        return self.attack != "none" and self.beta < 1

    def budget(self, dataset) -> float:
        return self.eps if self.eps is not None else dataset.attack_eps

    def start(self, trainer) -> None:
        """At `fit`'s start; on a resume the trainer has restored the curriculum's state already."""
        self.target_eps = self.budget(trainer.dataset)
        self.generator_epoch = -1
        if self.active and self.curriculum_settings is not None:
            if self.curriculum is None:
                self.curriculum = Curriculum(self.curriculum_settings, self.target_eps)
            self.curriculum.target_eps = self.target_eps

    def current_eps(self) -> float:
        return self.curriculum.eps if self.curriculum is not None else self.target_eps

    def make_attack(self, eps: float) -> Attack:
        options = PGDOptions(eps=eps, steps=self.steps) if self.attack == "pgd" else \
            ATTACKS.get(self.attack).Options(eps=eps)
        return Attack(self.attack, options)

    def loss(self, trainer, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        if not self.active:
            return None
        if self.generator_epoch != trainer.state.epoch:
            # The attack's random starts are seeded by (seed, epoch): a resumed run draws the same ones.
            self.generator = torch.Generator().manual_seed(self.seed * 1009 + trainer.state.epoch)
            self.generator_epoch = trainer.state.epoch
        model = trainer.model
        if self.curriculum is not None:
            self.last_eps = self.curriculum.budget_at(trainer.state.step, trainer.total_steps)
        adversarial = self.make_attack(self.current_eps())(model, images, labels, self.generator)
        clean_loss = trainer.loss_fn(model(images), labels)
        adversarial_logits = model(adversarial)
        adversarial_loss = trainer.loss_fn(adversarial_logits, labels)
        if self.curriculum is not None:
            self.curriculum.observe(trainer.state.step,
                                    lambda: self.difficulty(trainer, adversarial, adversarial_logits, labels))
        return self.beta * clean_loss + (1 - self.beta) * adversarial_loss

    def difficulty(self, trainer, adversarial: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> float:
        if self.curriculum.settings.metric == "prob":
            return float(logits.detach().softmax(1).gather(1, labels[:, None]).mean())
        return adversarial_sharpness(trainer.model, trainer.loss_fn, adversarial[:HESSIAN_IMAGES],
                                     labels[:HESSIAN_IMAGES], self.generator)

    def robust_attacks(self, dataset, eval_images: int) -> tuple[list[str], int]:
        """A run trained against an attack is measured under FGSM and PGD-10 at its own (target)
        eps, so that its run directory says what the robustness cost or bought."""
        if not self.active or eval_images <= 0:
            return [], 0
        eps = self.budget(dataset)
        return [f"fgsm:eps={eps}", f"pgd:eps={eps},steps=10"], eval_images

    def state_dict(self) -> dict:
        if self.curriculum is None:
            return {}
        return {"curriculum": self.curriculum.state_dict(), "last_eps": self.last_eps}

    def load_state_dict(self, state: dict) -> None:
        if "curriculum" in state:
            # Restored before `start` (the trainer restores, then calls before_training), which sets the target.
            self.curriculum = Curriculum(self.curriculum_settings, 0.0)
            self.curriculum.load_state_dict(state["curriculum"])
            self.last_eps = state.get("last_eps", 0.0)

    def figures(self) -> dict:
        """What each epoch logs: the budget its last step trained at, and the curriculum's last measurement."""
        if self.curriculum is None:
            return {}
        return {"sat_eps": round(self.last_eps, 6), "sat_stage": self.curriculum.stage,
                "sat_difficulty": self.curriculum.last_difficulty}


def adversarial_sharpness(model: nn.Module, loss_fn, images: torch.Tensor, labels: torch.Tensor,
                          generator: torch.Generator) -> float:
    """H-SAT's metric: the top Hessian eigenvalue of the loss on adversarial images, in eval mode
    (the probe's forward passes must not move batch-norm statistics)."""
    was_training = model.training
    model.eval()
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        return hessian_top_eigenvalue(lambda: loss_fn(model(images), labels), params,
                                      iterations=HESSIAN_ITERATIONS, generator=generator)
    finally:
        model.train(was_training)


class AdversarialMethod(Method):
    """A method that trains on `self.adversarial`'s loss (set by its `validate`): the hooks that
    hand the loss, its resume state and its evaluation over."""

    adversarial: AdversarialLoss

    def before_training(self, trainer) -> None:
        self.adversarial.start(trainer)

    def loss(self, trainer, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        return self.adversarial.loss(trainer, images, labels)

    def state_dict(self) -> dict[str, Any]:
        return self.adversarial.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adversarial.load_state_dict(state)

    def robust_attacks(self, dataset) -> tuple[list[str], int]:
        return self.adversarial.robust_attacks(dataset, self.options.eval_images)
