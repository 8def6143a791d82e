"""The `l1prune` method: L1-norm filter pruning to a MAC budget, the usual
baseline for channel pruning (Li, Kadav, Durdanovic, Samet, Graf, "Pruning
Filters for Efficient ConvNets", ICLR 2017).

Every removable channel group (see leancnn.methods.channels) keeps the same
fraction of its filters, those with the largest L1 norms; the fraction is the
largest that meets `macs` (a fraction of the model's dense MACs). The result is
a thinner dense model; `leancnn compress` fine-tunes it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..measure import count
from .base import Method, register_method
from .channels import channel_groups, keep_channels, largest_fraction, shrink_to_widths


@dataclass
class L1PruneOptions:
    macs: float = 0.5   # target fraction of the dense MACs, in (0, 1]
    widths: str = ""    # set by compress: producer:channels joined by '+', to rebuild the architecture


def parse_widths(text: str) -> dict[str, int]:
    widths = {}
    for item in filter(None, text.split("+")):
        name, _, value = item.rpartition(":")
        widths[name] = int(value)
    return widths


def l1_keep(model: nn.Module, fraction: float) -> dict[str, torch.Tensor]:
    """Per group, the indices of the filters with the largest L1 norms."""
    keep = {}
    for group in channel_groups(model):
        weight = model.get_submodule(group.producer)[0].weight
        count_kept = max(1, math.ceil(fraction * weight.shape[0]))
        keep[group.producer] = weight.abs().sum(dim=(1, 2, 3)).topk(count_kept).indices
    return keep


def apply_keep(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    for group in channel_groups(model):
        keep_channels(model, group, keep[group.producer])
    return model


@register_method
class L1Prune(Method):
    """L1-norm filter pruning to a MAC budget (a post-training baseline)."""

    name = "l1prune"
    Options = L1PruneOptions
    test_specs = ["l1prune:macs=0.5"]
    post_training = True

    def validate(self) -> None:
        if not 0 < self.options.macs <= 1:
            raise ConfigError(f"method 'l1prune': macs must be in (0, 1] (a fraction of the dense MACs), got {self.options.macs}")

    def prepare(self, model: nn.Module) -> nn.Module:
        if not self.options.widths:
            raise ConfigError("method 'l1prune' needs a trained model: use `leancnn compress RUN --method l1prune:macs=0.5`")
        return shrink_to_widths(model, parse_widths(self.options.widths))

    def compress(self, model, context):
        shape = context.dataset.input_shape
        target = self.options.macs * count(model, shape).macs_dense
        low = largest_fraction(
            lambda fraction: count(apply_keep(copy.deepcopy(model), l1_keep(model, fraction)), shape).macs_dense <= target)
        if low == 0.0:
            raise ConfigError(f"method 'l1prune': macs={self.options.macs} is below what removing channels can reach")
        pruned = apply_keep(model, l1_keep(model, low))
        widths = "+".join(f"{g.producer}:{pruned.get_submodule(g.producer)[0].out_channels}"
                          for g in channel_groups(pruned))
        context.notes["l1prune_keep_fraction"] = round(low, 4)
        return pruned, L1Prune(L1PruneOptions(macs=self.options.macs, widths=widths))
