"""The attacks of AutoAttack (Croce & Hein, ICML 2020), in [0, 1] pixel space:
APGD with the cross-entropy or DLR loss, its targeted DLR version APGD-T, and
the score-based Square Attack (Andriushchenko et al., ECCV 2020), which needs
no gradient and so shows gradient masking when it beats the white-box attacks.
`autoattack` is their worst case per image (measure/robustness.py runs the
components in turn on the images still classified correctly, as AutoAttack
does). FAB-T, AutoAttack's fourth attack, is not here; in the published
evaluations it rarely lowers the worst case after APGD-T.

Settings default to the standard version: APGD 100 iterations, momentum 0.75,
step size from 2 eps halved at the checkpoints when the loss stalls; APGD-T
over the 9 most likely wrong classes; Square 5000 queries from p = 0.8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from .attacks import ATTACKS, _check_eps, _normalise_grad, _project, register_attack

MOMENTUM = 0.75     # APGD's weight of the new step against the last one
RHO = 0.75          # a checkpoint halves the step when the loss rose in fewer than this share of steps


def _check_positive(name: str, **values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ConfigError(f"attack {name!r}: {key} must be >= 1, got {value}")


@dataclass
class APGDOptions:
    eps: float | None = None       # budget in [0, 1] pixel units; None = the dataset's default
    steps: int = 100
    norm: Literal["linf", "l2"] = "linf"
    loss: Literal["ce", "dlr"] = "ce"
    restarts: int = 1

    def check(self, name: str) -> None:
        _check_eps(name, self.eps)
        _check_positive(name, steps=self.steps, restarts=self.restarts)


@dataclass
class APGDTargetedOptions:
    eps: float | None = None
    steps: int = 100
    norm: Literal["linf", "l2"] = "linf"
    targets: int = 9               # the most likely wrong classes tried, one APGD run each
    restarts: int = 1

    def check(self, name: str) -> None:
        _check_eps(name, self.eps)
        _check_positive(name, steps=self.steps, targets=self.targets, restarts=self.restarts)


@dataclass
class SquareOptions:
    eps: float | None = None
    queries: int = 5000            # forward passes per image at most
    p_init: float = 0.8            # first square's share of the image's pixels

    def check(self, name: str) -> None:
        _check_eps(name, self.eps)
        _check_positive(name, queries=self.queries)
        if not 0 < self.p_init <= 1:
            raise ConfigError(f"attack {name!r}: p_init must be in (0, 1], got {self.p_init}")


@dataclass
class AutoAttackOptions:
    eps: float | None = None
    steps: int = 100               # APGD-CE and APGD-T iterations
    targets: int = 9               # APGD-T target classes
    queries: int = 5000            # Square's queries

    def check(self, name: str) -> None:
        _check_eps(name, self.eps)
        _check_positive(name, steps=self.steps, targets=self.targets, queries=self.queries)

    def components(self) -> list[tuple[str, str, object]]:
        """The attacks whose worst case per image this is, in the order they run (Linf):
        (label, registered attack, its options)."""
        return [("apgd-ce", "apgd", APGDOptions(self.eps, self.steps, "linf", "ce")),
                ("apgd-t", "apgd-t", APGDTargetedOptions(self.eps, self.steps, "linf", self.targets)),
                ("square", "square", SquareOptions(self.eps, self.queries))]


# -- losses, per image -----------------------------------------------------------------------------
def dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of logits ratio: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3); targeted:
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2). Invariant to shifting and scaling the logits."""
    ordered, _ = logits.sort(dim=1, descending=True)
    true = logits.gather(1, labels[:, None])[:, 0]
    if targets is None:
        others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
        return -(true - others) / (ordered[:, 0] - ordered[:, 2] + 1e-12)
    target = logits.gather(1, targets[:, None])[:, 0]
    return -(true - target) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12)


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i: negative once the image is misclassified."""
    true = logits.gather(1, labels[:, None])[:, 0]
    return true - logits.scatter(1, labels[:, None], float("-inf")).amax(1)


# -- APGD ------------------------------------------------------------------------------------------
def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations where APGD may halve its step: windows of 0.22 N, then each 0.03 N shorter,
    down to 0.06 N (at least one iteration each). For N = 100: 22, 41, 57, 70, 80, 87, 93, 99."""
    window, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, at = [], window
    while at <= steps:
        points.append(at)
        window = max(window - shrink, shortest)
        at += window
    return points


def _in_ball(images: torch.Tensor, point: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    return (images + _project(point - images, eps, norm)).clamp(0, 1)


def _random_start(images: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.rand(images.shape, generator=generator).to(images.device) * 2 - 1
    if norm == "linf":   # scaled so its largest entry is eps, as the reference does
        scale = noise.flatten(1).abs().amax(1).clamp_min(1e-12)
    else:
        scale = noise.flatten(1).norm(dim=1).clamp_min(1e-12)
    return (images + eps * noise / scale.view(-1, *([1] * (images.dim() - 1)))).clamp(0, 1)


def _loss_and_grad(model: nn.Module, points: torch.Tensor, labels: torch.Tensor, loss: str,
                   targets: torch.Tensor | None):
    points = points.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(points)
        if loss == "ce":
            values = nn.functional.cross_entropy(logits, labels, reduction="none")
        else:
            values = dlr_loss(logits, labels, targets)
        (grad,) = torch.autograd.grad(values.sum(), points)
    return logits.detach(), values.detach(), grad.detach()


def apgd_run(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int, norm: str,
             loss: str, targets: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """One APGD run from a random start; per image, a misclassified point if one was met, else
    the point of highest loss."""
    n = len(images)
    view = (-1, *([1] * (images.dim() - 1)))
    x = _random_start(images, eps, norm, generator)
    logits, values, grad = _loss_and_grad(model, x, labels, loss, targets)
    adversarial = x.clone()
    best, best_loss, best_grad = x.clone(), values.clone(), grad.clone()
    step = torch.full((n,), 2.0 * eps, device=images.device)
    previous = x.clone()
    rises = torch.zeros(n, device=images.device)
    last_loss = values.clone()
    loss_at_check = best_loss.clone()
    halved_at_check = torch.zeros(n, dtype=torch.bool, device=images.device)
    checkpoints, since = set(apgd_checkpoints(steps)), 0
    for iteration in range(1, steps + 1):
        z = _in_ball(images, x + step.view(view) * _normalise_grad(grad, norm), eps, norm)
        weight = MOMENTUM if iteration > 1 else 1.0
        x, previous = _in_ball(images, x + weight * (z - x) + (1 - weight) * (x - previous), eps, norm), x
        logits, values, grad = _loss_and_grad(model, x, labels, loss, targets)
        fooled = logits.argmax(1) != labels
        adversarial[fooled] = x[fooled]
        rises += values > last_loss
        last_loss = values
        better = values > best_loss
        best[better], best_loss[better], best_grad[better] = x[better], values[better], grad[better]
        since += 1
        if iteration in checkpoints:
            stalled = rises < RHO * since
            unchanged = ~halved_at_check & (loss_at_check >= best_loss)
            halve = stalled | unchanged
            step[halve] /= 2
            x[halve], grad[halve] = best[halve], best_grad[halve]   # the momentum keeps the last point
            halved_at_check, loss_at_check = halve, best_loss.clone()
            rises.zero_()
            since = 0
    still_right = _still_correct(model, adversarial, labels)
    adversarial[still_right] = best[still_right]
    return adversarial.detach()


def _still_correct(model: nn.Module, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(points).argmax(1) == labels


def attack_in_turn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   runs: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each `run(images, labels, index)` attacks the images every earlier run left correctly
    classified (`index`: their positions in `images`), as APGD's restarts, APGD-T's target classes
    and AutoAttack's components do: (the adversarial images, and after each run which are still right)."""
    adversarial = images.clone()
    right = _still_correct(model, images, labels)
    after = []
    for run in runs:
        remaining = right.nonzero()[:, 0]
        if len(remaining):
            adversarial[remaining] = run(images[remaining], labels[remaining], remaining)
            right[remaining] = _still_correct(model, adversarial[remaining], labels[remaining])
        after.append(right.clone())
    return adversarial, after


@register_attack("apgd", APGDOptions)
def apgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, options: APGDOptions,
         generator: torch.Generator | None = None) -> torch.Tensor:
    eps = float(options.eps)

    def run(x, y, _):
        return apgd_run(model, x, y, eps, options.steps, options.norm, options.loss, generator=generator)

    return attack_in_turn(model, images, labels, [run] * options.restarts)[0]


@register_attack("apgd-t", APGDTargetedOptions)
def apgd_targeted(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, options: APGDTargetedOptions,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Targeted DLR towards each of the `targets` classes the clean image scores highest after its
    own (the k-th most likely class, k = 2 .. targets + 1), `restarts` runs each."""
    eps = float(options.eps)
    with torch.no_grad():
        ranked = model(images).argsort(dim=1, descending=True)
    classes = ranked.shape[1]
    if classes < 4:
        raise ConfigError(f"attack 'apgd-t' needs at least 4 classes (its DLR loss uses the 4th logit), got {classes}")

    def toward(rank: int):
        def run(x, y, index):
            return apgd_run(model, x, y, eps, options.steps, options.norm, "dlr", ranked[index, rank], generator)
        return run

    runs = [toward(rank) for rank in range(1, min(options.targets, classes - 1) + 1) for _ in range(options.restarts)]
    return attack_in_turn(model, images, labels, runs)[0]


# -- Square ----------------------------------------------------------------------------------------
def square_share(p_init: float, query: int, queries: int) -> float:
    """The share of pixels the square covers at `query` (Square Attack's schedule, written for
    10,000 queries and rescaled): halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000."""
    scaled = int(query / queries * 10000)
    halvings = sum(scaled > bound for bound in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2 ** halvings


@register_attack("square", SquareOptions)
def square(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, options: SquareOptions,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Linf Square Attack with the margin loss: random +-eps vertical stripes, then at each query a
    random square of random +-eps per channel, kept where it lowers the margin."""
    eps = float(options.eps)

    def signs(*shape: int) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=generator).to(images) * 2 - 1) * eps

    n, channels, height, width = images.shape
    with torch.no_grad():
        best = (images + signs(n, channels, 1, width)).clamp(0, 1)
        best_margin = margin(model(best), labels)
        for query in range(1, options.queries):
            active = (best_margin > 0).nonzero()[:, 0]
            if len(active) == 0:
                break
            side = int(round(math.sqrt(square_share(options.p_init, query, options.queries) * height * width)))
            side = min(max(side, 1), min(height, width) - 1)
            top = int(torch.randint(0, height - side, (1,), generator=generator))
            left = int(torch.randint(0, width - side, (1,), generator=generator))
            clean, current = images[active], best[active]
            delta = current - clean
            window = (slice(None), slice(None), slice(top, top + side), slice(left, left + side))
            proposal = signs(len(active), channels, 1, 1)
            for _ in range(5):   # a square that changes nothing wastes a query: draw again
                same = ((clean[window] + proposal).clamp(0, 1) - current[window]).abs().flatten(1).amax(1) < 1e-7
                if not same.any():
                    break
                proposal[same] = signs(int(same.sum()), channels, 1, 1)
            delta[window] = proposal
            candidate = (clean + delta.clamp(-eps, eps)).clamp(0, 1)
            candidate_margin = margin(model(candidate), labels[active])
            better = candidate_margin < best_margin[active]
            best[active[better]] = candidate[better]
            best_margin[active[better]] = candidate_margin[better]
    return best


@register_attack("autoattack", AutoAttackOptions)
def autoattack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, options: AutoAttackOptions,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Worst case per image over the components (worst_case)."""
    return worst_case(model, images, labels, options.components(), generator)[0]


def worst_case(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               components: list[tuple[str, str, object]],
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each component (label, registered attack name, its options) attacks the images the earlier ones
    left correct: (the adversarial images, and after each component which images are still right)."""
    def component_run(name: str, options):
        return lambda x, y, _: ATTACKS.get(name).run(model, x, y, options, generator)

    return attack_in_turn(model, images, labels, [component_run(name, options) for _, name, options in components])
