"""Clean accuracy and accuracy under attack, batched, with a progress bar.

An ensemble attack (`autoattack`) is measured as AutoAttack reports it: its
components run in turn, each on the images the earlier ones left correct, and
the robust accuracy after each is recorded (`autoattack/apgd-ce`, ...); the
last is the worst case per image, `autoattack` itself.
"""
from __future__ import annotations

import torch
from torch import nn

from ..progress import progress_bar
from .attacks import Attack
from .autoattack import worst_case


def unit_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images as floats in [0, 1] (as the loader feeds them); float images as they are."""
    return batch.float() / 255.0 if batch.dtype == torch.uint8 else batch


@torch.no_grad()
def clean_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500) -> float:
    """Top-1 of `model` in eval mode (its mode restored after). `images`: uint8 or floats in [0, 1]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(images), batch_size):
            batch = unit_float(images[start:start + batch_size]).to(device)
            correct += int((model(batch).argmax(1) == labels[start:start + batch_size].to(device)).sum())
    finally:
        model.train(was_training)
    return correct / max(len(images), 1)


def robust_accuracies(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: Attack, *,
                      batch_size: int = 250, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """{attack name: fraction of images still classified correctly}, plus, for an ensemble, the
    fraction left after each component ('NAME/COMPONENT'). `images`: uint8 [N, C, H, W] or floats in [0, 1]."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    components = attack.options.components() if hasattr(attack.options, "components") else []
    correct = dict.fromkeys([f"{attack.name}/{label}" for label, _, _ in components] + [attack.name], 0)
    batches = range(0, len(images), batch_size)
    was_training = model.training
    model.eval()
    try:
        with progress_bar(len(batches), f"attack {attack.spec}", enabled=progress) as advance:
            for start in batches:
                batch = images[start:start + batch_size]
                batch = unit_float(batch).to(device)
                target = labels[start:start + batch_size].to(device)
                if components:
                    _, after = worst_case(model, batch, target, components, generator)
                    for (label, _, _), right in zip(components, after):
                        correct[f"{attack.name}/{label}"] += int(right.sum())
                    correct[attack.name] += int(after[-1].sum())
                else:
                    adversarial = attack(model, batch, target, generator)
                    with torch.no_grad():
                        correct[attack.name] += int((model(adversarial).argmax(1) == target).sum())
                advance()
    finally:
        model.train(was_training)
    return {name: count / max(len(images), 1) for name, count in correct.items()}


def robust_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: Attack, *,
                    batch_size: int = 250, seed: int = 0, progress: bool = True) -> float:
    """Fraction of images still classified correctly after `attack` (the worst case, for an ensemble)."""
    return robust_accuracies(model, images, labels, attack, batch_size=batch_size, seed=seed,
                             progress=progress)[attack.name]
