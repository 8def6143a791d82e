"""The `circulant` method: block-circulant convolutions and linear layers (CirCNN,
Ding et al., MICRO 2017; see leancnn.layers.circulant).

Before training it swaps the chosen layers for freshly initialised block-circulant
ones, trained from scratch; `leancnn compress RUN --method circulant:block=8` instead
projects a trained run's layers onto the nearest block-circulant ones (the mean along
each block's circulant diagonals), to be fine-tuned.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..layers.circulant import COMPUTE_MODES, BlockCirculantConv2d, BlockCirculantLinear
from ..surgery import replace_module
from .base import Method, register_method
from .selection import chosen_layers, dense_convolutions


@dataclass
class CirculantOptions:
    block: int = 8          # k: each k x k block of a channel matrix is defined by k values (k^2 / k = k x fewer)
    layers: str = "auto"    # auto: every dense conv but the stem, and every linear layer, whose channels k divides;
    #                         1x1 or 3x3: only convolutions of that size; or globs joined by '+' (each must divide)
    # How training computes the layer, the same function either way: dense multiplies by the expanded
    # matrix (2.1-2.4x faster per resnet20 training step than fft at k = 4 and 8 on a Zen 3, 1 thread);
    # fft: the FFT route. Deployment chooses between the two per layer by measuring.
    compute: str = "dense"


@register_method
class Circulant(Method):
    """Block-circulant weights, k x k blocks (CirCNN)."""

    name = "circulant"
    Options = CirculantOptions
    test_specs = ["circulant:block=4,compute=fft"]   # the dense route: tests/test_circulant.py
    bench_specs = ["circulant:block=4", "circulant:block=8"]

    def validate(self) -> None:
        o = self.options
        if o.block < 2:
            raise ConfigError(f"method 'circulant': block must be >= 2 (a k x k block is stored as k values), got {o.block}")
        if o.compute not in COMPUTE_MODES:
            raise ConfigError(f"method 'circulant': compute must be one of {', '.join(COMPUTE_MODES)}, got {o.compute!r}")

    def targets(self, model: nn.Module) -> list[str]:
        owner = f"method 'circulant' (block {self.options.block})"
        linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
        candidates = dense_convolutions(model) + linears
        k = self.options.block

        def divides(module: nn.Module) -> bool:
            shape = module.weight.shape
            return shape[0] % k == 0 and shape[1] % k == 0

        if self.options.layers == "auto":
            fitting = [(n, m) for n, m in candidates if divides(m)]
            if not fitting:
                raise ConfigError(f"{owner}: the block divides the channels of no convolution or linear layer of "
                                  f"this model; choose a block that divides some")
            return chosen_layers(fitting, "auto", owner)
        chosen = chosen_layers(candidates, self.options.layers, owner)
        for name in chosen:
            weight = model.get_submodule(name).weight
            if not divides(model.get_submodule(name)):
                raise ConfigError(f"{owner}: the block does not divide the channels of layer {name} "
                                  f"({weight.shape[1]} in, {weight.shape[0]} out)")
        return chosen

    def _convert(self, model: nn.Module, project: bool) -> nn.Module:
        k, compute = self.options.block, self.options.compute
        for name in self.targets(model):
            layer = model.get_submodule(name)
            if isinstance(layer, nn.Conv2d):
                replace_module(model, name, BlockCirculantConv2d.from_conv(layer, k, compute, project=project))
            else:
                replace_module(model, name, BlockCirculantLinear.from_linear(layer, k, compute, project=project))
        return model

    def prepare(self, model: nn.Module) -> nn.Module:
        return self._convert(model, project=False)

    def compress(self, model: nn.Module, context):
        """A trained model's layers projected onto the nearest block-circulant ones."""
        model = self._convert(model, project=True)
        context.log(f"circulant: {len(self.targets_of(model))} layers projected onto {self.options.block}x"
                    f"{self.options.block} circulant blocks")
        return model, self

    @staticmethod
    def targets_of(model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, (BlockCirculantConv2d, BlockCirculantLinear))]
