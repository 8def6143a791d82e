"""Clean accuracy and accuracy under attack, batched, with a progress bar."""
from __future__ import annotations

import torch
from torch import nn

from ..progress import progress_bar
from .attacks import Attack


def robust_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: Attack, *,
                    batch_size: int = 250, seed: int = 0, progress: bool = True) -> float:
    """Fraction of images still classified correctly after `attack`.
    `images` are uint8 [N, C, H, W] or floats in [0, 1]."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    batches = range(0, len(images), batch_size)
    was_training = model.training
    model.eval()
    with progress_bar(len(batches), f"attack {attack.spec}", enabled=progress) as advance:
        for start in batches:
            batch = images[start:start + batch_size]
            batch = (batch.float() / 255.0 if batch.dtype == torch.uint8 else batch).to(device)
            target = labels[start:start + batch_size].to(device)
            adversarial = attack(model, batch, target, generator)
            with torch.no_grad():
                correct += (model(adversarial).argmax(1) == target).sum().item()
            advance()
    model.train(was_training)
    return correct / max(len(images), 1)
