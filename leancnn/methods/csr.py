"""The `csr` method: swap dense convolutions for channel-split recurrent
convolutions before training (Wu et al., WACV 2023). See leancnn.layers.csrconv."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..layers.csrconv import CSRConv2d
from .base import Method, register_method
from .selection import chosen_layers, dense_convolutions
from ..surgery import replace_module


@dataclass
class CSROptions:
    T: int = 2              # recurrent steps: parameters fall to about 2 / T^2
    layers: str = "auto"    # auto: every dense conv but the first; 1x1 or 3x3: only that kernel size; or globs joined by '+'


@register_method
class CSR(Method):
    """Channel-split recurrent convolution (CSR-Conv), T steps."""

    name = "csr"
    Options = CSROptions
    test_specs = ["csr:T=2"]
    bench_specs = ["csr:T=2", "csr:T=4"]
    # Its T sequential convolutions train at half the dense model's speed: the quick bench
    # (make demo) would spend a third of its time on it. The full bench has it.
    in_quick_bench = False

    def validate(self) -> None:
        if self.options.T < 1:
            raise ConfigError(f"method 'csr': T must be >= 1, got {self.options.T}")

    def targets(self, model: nn.Module) -> list[str]:
        return chosen_layers(dense_convolutions(model), self.options.layers, "method 'csr'")

    def prepare(self, model: nn.Module) -> nn.Module:
        steps = self.options.T
        for name in self.targets(model):
            conv = model.get_submodule(name)
            if steps > min(conv.in_channels, conv.out_channels):
                raise ConfigError(f"method 'csr': T={steps} is larger than the channel count of layer {name} "
                                  f"({conv.in_channels} in, {conv.out_channels} out)")
            replace_module(model, name, CSRConv2d.from_conv(conv, steps))
        return model
