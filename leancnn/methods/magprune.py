"""The `magprune` method: magnitude pruning of a trained model to a density,
then (through `leancnn compress --epochs N`) fine-tuning with the same hybrid
clean/adversarial loss as DNR and the mask held fixed. The baseline DNR must
beat (DNR, METHODS.md: "magnitude pruning followed by adversarial
fine-tuning"; the pruning itself: Han, Pool, Tran, Dally, "Learning both
Weights and Connections for Efficient Neural Networks", NeurIPS 2015).

Every layer DNR prunes (all convolutions and linear layers but the first
convolution) keeps its `density` fraction of largest-magnitude weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import register_method
from .dnr import DNR, MASK, DNROptions, prunable


@dataclass
class MagPruneOptions(DNROptions):
    """DNR's options (density, beta, attack, eps, steps); the mask never changes, so DNR's
    rewiring options have no effect."""


@register_method
class MagPrune(DNR):
    """Magnitude pruning to a density, fine-tuned adversarially with a fixed mask."""

    name = "magprune"
    Options = MagPruneOptions
    test_specs = ["magprune:density=0.2,attack=fgsm,eval_images=32"]
    post_training = True
    bench_specs: list[str] = []

    def check_training(self, config) -> None:
        """The mask never changes: no momentum needed (DNR's rewiring needs it)."""

    def validate(self) -> None:
        super().validate()
        if self.options.mode != "irregular":
            raise ConfigError("method 'magprune': only mode=irregular")

    def prepare(self, model: nn.Module) -> nn.Module:
        # Rebuilding a saved run: mask buffers to load into (their values come from the file).
        for _, module in prunable(model):
            module.register_buffer(MASK, torch.ones_like(module.weight, dtype=torch.bool))
        return model

    @torch.no_grad()
    def compress(self, model, context):
        for _, module in prunable(model):
            weight = module.weight
            keep = max(1, round(self.options.density * weight.numel()))
            mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
            mask[weight.abs().flatten().topk(keep).indices] = True
            module.register_buffer(MASK, mask.view_as(weight))
            weight.mul_(module.dnr_mask)
        return model, self

    def after_epoch(self, trainer, epoch: int):
        return {"dnr_density": {name: round(float(getattr(m, MASK).float().mean()), 6)
                                for name, m in self.layers(trainer.model)}}
