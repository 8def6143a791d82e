"""Which layers a method acts on: the stem rule and `layers=` glob patterns, shared by
every method that takes a `layers` option."""
from __future__ import annotations

import fnmatch

from torch import nn


def stem_conv(model: nn.Module) -> str | None:
    """The name of the model's first convolution (the stem), which methods leave dense by
    default, as their papers do: it reads the raw image, has few input channels (so little to
    gain) and its errors reach every later layer."""
    return next((name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)), None)


def matching(names: list[str], patterns: str) -> list[str]:
    """The names matching any of the glob `patterns` joined by '+' ('layer1.*+layer2.0.conv1'), in order."""
    globs = [p for p in patterns.split("+") if p]
    return [name for name in names if any(fnmatch.fnmatchcase(name, glob) for glob in globs)]
