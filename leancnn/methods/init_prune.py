"""Pruning at initialisation: `synflow` and its baselines `snip`, `magnitude-init` and
`random-init`. Each scores every weight of every convolution and linear layer of the freshly
initialised model, keeps the globally highest-scoring `density` fraction (exactly that many
weights), and trains with the mask fixed.

- synflow: Tanaka, Kunin, Yamins, Ganguli, "Pruning neural networks without any data by
  iteratively conserving synaptic flow", NeurIPS 2020. No data: on a float64 copy in eval mode
  with every parameter replaced by its absolute value, R = the sum of the outputs for an input
  of ones; score = |dR/dw * w|. Pruned iteratively: at round k of n the top
  density^((k+1)/n) fraction is kept, the masked weights scored again. The paper's point: a
  single-shot score (magnitude, SNIP) at extreme densities empties whole layers (layer
  collapse), which synaptic flow avoids because a layer's score falls as it is pruned.
- snip: Lee, Ajanthan, Torr, "SNIP: Single-shot Network Pruning based on Connection
  Sensitivity", ICLR 2019: score = |dL/dw * w| on one batch of training images.
- magnitude-init: score = |w| at initialisation, globally (the baseline that collapses layers).
- random-init: a uniformly random score (every layer keeps about `density` of its weights).

The 1x1 projection shortcuts of residual networks stay dense unless `residual=true`, as in the
SynFlow authors' experiments (their `--prune-residual`, off by default): at an add, synaptic
flow splits between the two branches by their share of R, and a shortcut's one 1x1 layer carries
far less of it than the body's two 3x3 layers, so it empties first (resnet20 at density 0.01:
the stage-3 shortcut keeps 0 of its 2048 weights while every other layer keeps over 100). They
hold 0.95% of resnet20's weights (2,560 of 270,608).

After scoring, the run's log records the per-layer densities, the layers left without a
weight, and whether any path of kept weights still joins input and output.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from .base import register_method
from .masking import (PRUNE_MASK, FixedMaskMethod, check_density, densities, global_top_k,
                      has_input_output_path, keep_count, masked_layers, set_masks, weight_layers)


@dataclass
class InitPruneOptions:
    density: float = 0.1     # fraction of all convolution and linear weights kept
    seed: int = 0            # random-init's scores, snip's batch
    residual: bool = False   # prune the 1x1 projection shortcuts too (off: they stay dense, see below)


@dataclass
class SynFlowOptions(InitPruneOptions):
    rounds: int = 100        # pruning rounds (1 = single shot); the baselines score once


def synflow_scores(model: nn.Module, masks: dict[str, torch.Tensor],
                   input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """|dR/dw * w| per masked layer, R the summed output of the all-positive float64 copy on an
    input of ones (float64: R is a product over depth and overflows float32 in deep nets)."""
    probe = copy.deepcopy(model).cpu().double().eval()
    layers = dict(probe.named_modules())
    with torch.no_grad():
        for param in probe.parameters():
            param.abs_()
        for name, mask in masks.items():
            layers[name].weight.mul_(mask.cpu())
    probe.zero_grad(set_to_none=True)
    probe(torch.ones(1, *input_shape, dtype=torch.float64)).sum().backward()
    return {name: (layers[name].weight.grad * layers[name].weight).detach().abs() for name in masks}


def snip_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """|dL/dw * w| on one batch, on a copy (its batch-norm statistics are not the model's business)."""
    probe = copy.deepcopy(model).cpu().float().train()
    probe.zero_grad(set_to_none=True)
    F.cross_entropy(probe(images), labels).backward()
    return {name: (m.weight.grad * m.weight).detach().abs() for name, m in masked_layers(probe)}


def is_shortcut(name: str) -> bool:
    """A residual block's projection shortcut, by the names the model registry uses."""
    return any(part in ("shortcut", "downsample") for part in name.split("."))


class InitPrune(FixedMaskMethod):
    """Shared: score at the start of training, keep the global top `density`, report collapse."""

    Options = InitPruneOptions
    bench_specs: list[str] = []

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.report: dict = {}

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in weight_layers(model) if self.options.residual or not is_shortcut(n)]

    def validate(self) -> None:
        check_density(self.name, self.options.density)
        if self.rounds() < 1:
            raise ConfigError(f"method {self.name!r}: rounds must be at least 1, got {self.options.rounds}")

    def scores(self, model: nn.Module, masks: dict[str, torch.Tensor], trainer) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def rounds(self) -> int:
        return 1

    def prune(self, model: nn.Module, trainer) -> dict[str, torch.Tensor]:
        """The final masks: `rounds()` rounds of scoring, keeping density^((k+1)/n) at round k."""
        masks = {name: getattr(m, PRUNE_MASK).cpu().clone() for name, m in masked_layers(model)}
        total = sum(mask.numel() for mask in masks.values())
        n = self.rounds()
        for k in range(n):
            keep = keep_count(total, self.options.density ** ((k + 1) / n))
            scores = self.scores(model, masks, trainer)
            # A pruned weight never returns: its score is below every kept one's.
            scores = {name: torch.where(masks[name], s.double(), torch.tensor(-1.0, dtype=torch.float64))
                      for name, s in scores.items()}
            masks = global_top_k(scores, keep)
        return masks

    def before_training(self, trainer) -> None:
        model = trainer.model
        layers = masked_layers(model)
        if self.options.density >= 1 or not all(bool(getattr(m, PRUNE_MASK).all()) for _, m in layers):
            return   # nothing to prune, or masks already set (a resumed run)
        set_masks(model, self.prune(model, trainer))
        collapsed = [name for name, m in layers if not bool(getattr(m, PRUNE_MASK).any())]
        path = has_input_output_path(model, tuple(trainer.dataset.input_shape))
        self.report = {"collapsed_layers": collapsed, "input_output_path": path}
        if collapsed or not path:
            warnings.warn(f"method {self.spec()!r}: layer collapse: "
                          + (f"no weight left in {', '.join(collapsed)}" if collapsed else "")
                          + ("" if path else "; no path from input to output is left"), stacklevel=2)

    def after_epoch(self, trainer, epoch: int):
        return {"mask_density": densities(trainer.model), **self.report}

    def state_dict(self):
        return dict(self.report)

    def load_state_dict(self, state) -> None:
        self.report = dict(state)


@register_method
class SynFlow(InitPrune):
    """Iterative synaptic-flow pruning at initialisation, no data (Tanaka et al., NeurIPS 2020)."""

    name = "synflow"
    Options = SynFlowOptions
    test_specs = ["synflow:density=0.1,rounds=5"]
    bench_specs = ["synflow:density=0.1"]
    in_quick_bench = False   # trains from scratch like dense: the full bench has it

    def rounds(self) -> int:
        return self.options.rounds

    def scores(self, model, masks, trainer):
        return synflow_scores(model, masks, tuple(trainer.dataset.input_shape))


@register_method
class Snip(InitPrune):
    """Single-shot connection sensitivity on one batch (Lee et al., ICLR 2019)."""

    name = "snip"
    test_specs = ["snip:density=0.1"]

    def scores(self, model, masks, trainer):
        dataset = trainer.dataset
        count = min(trainer.config.batch_size, len(dataset.train_labels))
        generator = torch.Generator().manual_seed(self.options.seed)
        index = torch.randperm(len(dataset.train_labels), generator=generator)[:count]
        images = dataset.train_images[index].float() / 255.0   # uint8 -> [0, 1], as the loader feeds them
        return snip_scores(model, images, dataset.train_labels[index])


@register_method
class MagnitudeInit(InitPrune):
    """Global magnitude pruning at initialisation (the SynFlow paper's baseline)."""

    name = "magnitude-init"
    test_specs = ["magnitude-init:density=0.1"]

    def scores(self, model, masks, trainer):
        return {name: m.weight.detach().cpu().abs() for name, m in masked_layers(model)}


@register_method
class RandomInit(InitPrune):
    """Uniformly random pruning at initialisation (the SynFlow paper's baseline)."""

    name = "random-init"
    test_specs = ["random-init:density=0.1"]

    def scores(self, model, masks, trainer):
        generator = torch.Generator().manual_seed(self.options.seed)
        return {name: torch.rand(mask.shape, generator=generator) for name, mask in masks.items()}


