"""Which layers a method acts on: the stem rule and `layers=` glob patterns, shared by
every method that takes a `layers` option."""
from __future__ import annotations

import fnmatch

from torch import nn

from ..errors import ConfigError


def stem_conv(model: nn.Module) -> str | None:
    """The name of the model's first convolution (the stem), which methods leave dense by
    default, as their papers do: it reads the raw image, has few input channels (so little to
    gain) and its errors reach every later layer."""
    return next((name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)), None)


def matching(names: list[str], patterns: str) -> list[str]:
    """The names matching any of the glob `patterns` joined by '+' ('layer1.*+layer2.0.conv1'), in order."""
    globs = [p for p in patterns.split("+") if p]
    return [name for name in names if any(fnmatch.fnmatchcase(name, glob) for glob in globs)]


def dense_convolutions(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Plain dense convolutions (nn.Conv2d itself, groups 1), the stem left out."""
    stem = stem_conv(model)
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups == 1 and n != stem]


def chosen_layers(candidates: list[tuple[str, nn.Module]], layers: str, owner: str) -> list[str]:
    """The candidates a `layers=` option picks: auto (all), 1x1 or 3x3 (convolutions of that
    kernel size), or glob patterns joined by '+'. None picked is a ConfigError."""
    if layers == "auto":
        chosen = [n for n, _ in candidates]
    elif layers in ("1x1", "3x3"):
        size = int(layers[0])
        chosen = [n for n, m in candidates if isinstance(m, nn.Conv2d) and m.kernel_size == (size, size)]
    else:
        chosen = matching([n for n, _ in candidates], layers)
    if not chosen:
        raise ConfigError(f"{owner}: no layer it can convert matches layers={layers!r}")
    return chosen
