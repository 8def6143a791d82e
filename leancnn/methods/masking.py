"""Fixed pruning masks: the part every mask-holding method shares (pruning at initialisation,
ADMM, BCR). A mask is a bool buffer `prune_mask` on the layer, the shape of its weight; the
weight is multiplied by it after every optimizer step, so pruned weights stay exactly zero
(their gradients and momentum are computed but never land). The deployed model needs no mask:
the sparse kernel reads the zeros of the weight.

Also here: global top-k selection of scores (what SynFlow, SNIP and magnitude pruning share)
and the checks for layer collapse (a layer with no weight left, or no path from input to output).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError
from .base import Method

PRUNE_MASK = "prune_mask"


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution and linear layer, in order (pruning at initialisation prunes them all,
    as the SynFlow paper does: layer collapse is about the whole network)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# Every helper takes the buffer's name: DNR and magprune keep theirs as `dnr_mask`, the name
# their saved runs have.
def masked_layers(model: nn.Module, buffer: str = PRUNE_MASK) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, buffer, None), torch.Tensor)]


def add_full_masks(layers: list[tuple[str, nn.Module]], buffer: str = PRUNE_MASK) -> None:
    """All-true masks to load a saved run's masks into (and to start from)."""
    for _, module in layers:
        module.register_buffer(buffer, torch.ones_like(module.weight, dtype=torch.bool))


@torch.no_grad()
def set_masks(model: nn.Module, masks: dict[str, torch.Tensor], buffer: str = PRUNE_MASK) -> None:
    """Install `masks` (layer name -> bool tensor) and zero the pruned weights."""
    for name, module in masked_layers(model, buffer):
        if name in masks:
            getattr(module, buffer).copy_(masks[name])
        module.weight.mul_(getattr(module, buffer))


@torch.no_grad()
def apply_masks(model: nn.Module, buffer: str = PRUNE_MASK) -> None:
    """Zero every masked weight again (after an optimizer step moved them)."""
    for _, module in masked_layers(model, buffer):
        module.weight.mul_(getattr(module, buffer))


def check_density(method: str, density: float) -> None:
    if not 0 < density <= 1:
        raise ConfigError(f"method {method!r}: density must be in (0, 1] (the fraction of weights kept), "
                          f"got {density}")


def keep_count(total: int, density: float) -> int:
    """Weights kept of `total` at `density`: the nearest whole number, at least one."""
    return max(1, round(density * total))


def global_top_k(scores: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """Masks keeping the `keep` highest scores over all layers together (ties broken by position,
    so exactly `keep` weights survive)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = chosen[start:start + score.numel()].view_as(score)
        start += score.numel()
    return masks


def top_k_mask(weight: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` largest magnitudes of one layer (ties by position: exactly `keep` true)."""
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[weight.detach().abs().flatten().topk(keep, sorted=False).indices] = True
    return mask.view_as(weight)


def densities(model: nn.Module, buffer: str = PRUNE_MASK) -> dict[str, float]:
    """Each masked layer's fraction of kept weights (what the runs' logs record per epoch)."""
    return {name: round(float(getattr(m, buffer).float().mean()), 6) for name, m in masked_layers(model, buffer)}


@torch.no_grad()
def has_input_output_path(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether any path of kept weights joins the input to the output: every weight set to its
    mask (0 or 1), every other parameter to its absolute value, biases and shifts to zero, float64,
    an input of ones; the output is non-zero exactly when such a path exists (all terms >= 0)."""
    probe = copy.deepcopy(model).double().eval()
    for name, module in probe.named_modules():
        mask = getattr(module, PRUNE_MASK, None)
        for param_name, param in module.named_parameters(recurse=False):
            if param_name == "bias":
                param.zero_()
            elif param_name == "weight" and isinstance(mask, torch.Tensor):
                param.copy_(mask.double())
            else:
                param.abs_()
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.zero_()   # (x - 0) / sqrt(var) * |gamma|: a positive scale
    out = probe(torch.ones(1, *input_shape, dtype=torch.float64))
    return bool(out.abs().sum() > 0)


class FixedMaskMethod(Method):
    """A method whose masks are fixed once set: prepare adds all-true masks to `layers(model)`;
    the weights are re-masked after every step; every epoch logs the per-layer densities."""

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return weight_layers(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        add_full_masks(self.layers(model))
        return model

    def after_step(self, trainer) -> None:
        apply_masks(trainer.model)

    def after_epoch(self, trainer, epoch: int):
        return {"mask_density": densities(trainer.model)}
