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

from torch import nn

from ..errors import ConfigError
from .base import register_method
from .dnr import DNR, MASK, DNROptions, prunable
from .masking import add_full_masks, densities, keep_count, set_masks, top_k_mask


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
    bench_specs = ["magprune:density=0.1,attack=none"]   # BCR's irregular counterpart

    def check_training(self, config) -> None:
        """The mask never changes: no momentum needed (DNR's rewiring needs it)."""

    def validate(self) -> None:
        super().validate()
        if self.options.mode != "irregular":
            raise ConfigError("method 'magprune': only mode=irregular")

    def prepare(self, model: nn.Module) -> nn.Module:
        # Rebuilding a saved run: mask buffers to load into (their values come from the file).
        add_full_masks(prunable(model), MASK)
        return model

    def compress(self, model, context):
        layers = prunable(model)
        add_full_masks(layers, MASK)
        set_masks(model, {name: top_k_mask(m.weight, keep_count(m.weight.numel(), self.options.density))
                          for name, m in layers}, MASK)
        return model, self

    def after_epoch(self, trainer, epoch: int):
        return {"dnr_density": densities(trainer.model, MASK)}
