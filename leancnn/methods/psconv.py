"""The `psconv` method: convert a model's 3x3 convolutions to pre-defined sparse
kernels before training (Kundu et al., Allerton 2019; IEEE Trans. Computers
2020). See leancnn.layers.psconv for the layer."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..errors import ConfigError
from ..layers.psconv import TAPS, PSConv2d
from .base import Method, register_method
from .selection import matching, stem_conv
from ..surgery import replace_module

PAPER_NAME = re.compile(r"^ps(d?)(\d)_p(\d+)$", re.IGNORECASE)


@dataclass
class PSConvOptions:
    k: int = 4                      # taps kept per 3x3 kernel (1..9)
    period: int = 4                 # P: distinct supports per layer
    dense_every: bool = False       # PSD: one kernel in every P stays dense
    assign: Literal["periodic", "random"] = "periodic"
    layers: str = "auto"            # auto: every 3x3 conv but the first; all; or glob patterns joined by '+'
    seed: int = 0                   # for random supports (k not in 1, 2, 4) and random assignment


@register_method
class PSConv(Method):
    """Pre-defined sparse kernels (pSConv). Paper names resolve too: PS4_P4,
    PSD4_P8, PSD2_P8, PSD1_P16, PS1_P9 (PSk_Pp: k taps, period p; D: dense every p)."""

    name = "psconv"
    Options = PSConvOptions
    test_specs = ["PS4_P4", "PSD2_P8"]
    bench_specs = ["PS4_P4", "PSD2_P8", "PS1_P9"]

    @classmethod
    def parse_alias(cls, name: str) -> dict[str, str] | None:
        match = PAPER_NAME.match(name)
        if not match:
            return None
        return {"k": match.group(2), "period": match.group(3), "dense_every": "true" if match.group(1) else "false"}

    def validate(self) -> None:
        o = self.options
        if not 1 <= o.k <= TAPS:
            raise ConfigError(f"method 'psconv': k must be in 1..9 (taps of a 3x3 kernel), got {o.k}")
        if o.period < 1:
            raise ConfigError(f"method 'psconv': period must be >= 1, got {o.period}")
        if o.dense_every and o.period < 2:
            raise ConfigError("method 'psconv': dense_every needs period >= 2 (period 1 would make every kernel dense)")

    def targets(self, model: nn.Module) -> list[str]:
        convs = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and not isinstance(m, PSConv2d)]
        eligible = [name for name, m in convs if m.kernel_size == (3, 3) and m.groups == 1]
        if self.options.layers == "auto":
            stem = stem_conv(model)
            chosen = [name for name in eligible if name != stem]
        elif self.options.layers == "all":
            chosen = eligible
        else:
            chosen = matching(eligible, self.options.layers)
        if not chosen:
            raise ConfigError(f"method 'psconv': no 3x3 convolution to convert (layers={self.options.layers!r}; "
                              f"pSConv applies to dense 3x3 convolutions, groups=1, other than the first)")
        return chosen

    def prepare(self, model: nn.Module) -> nn.Module:
        o = self.options
        for name in self.targets(model):
            conv = model.get_submodule(name)
            replace_module(model, name, PSConv2d.from_conv(conv, k=o.k, period=o.period, dense_every=o.dense_every,
                                                           assign=o.assign, seed=o.seed))
        return model

    def after_step(self, trainer) -> None:
        for module in trainer.model.modules():
            if isinstance(module, PSConv2d):
                module.apply_mask_()
