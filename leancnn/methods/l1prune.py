"""The `l1prune` method: L1-norm filter pruning to a MAC budget, the usual
baseline for channel pruning (Li, Kadav, Durdanovic, Samet, Graf, "Pruning
Filters for Efficient ConvNets", ICLR 2017).

Every removable channel group of the traced channel graph (leancnn.methods.channel_graph:
on any CNN, with the channels tied by residual additions, depthwise layers and
concatenations removed together) keeps the same fraction of its channels, those
whose filters have the largest L1 norms (summed over the group's producers); the
fraction is the largest that meets `macs` (a fraction of the model's dense MACs),
each group's count rounded to a multiple of `round_to`; then each group, widest
first, grows while the budget holds (so the MACs land near the target, not a
rounding step below it). The result is a thinner
dense model; `leancnn compress` fine-tunes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import Method, register_method
from .channel_graph import ChannelGraph, channel_graph
from .channels import (fill_to_budget, filter_norms, group_widths, keep_channels, largest_fraction, rounded_width,
                       shrink_to_widths, width_macs)


@dataclass
class L1PruneOptions:
    macs: float = 0.5   # target fraction of the dense MACs, in (0, 1]
    round_to: int = 1   # each group keeps a multiple of this many channels (8 suits CPU kernels)
    widths: str = ""    # set by compress: group:channels joined by '+', to rebuild the architecture


def parse_widths(text: str) -> dict[str, int]:
    widths = {}
    for item in filter(None, text.split("+")):
        name, _, value = item.rpartition(":")
        widths[name] = int(value)
    return widths


def l1_order(model: nn.Module, graph: ChannelGraph) -> list[torch.Tensor]:
    """Per group, its channels by falling L1 norm of their filters (ranked once, cut many times)."""
    return [filter_norms(model, group, 1).argsort(descending=True, stable=True) for group in graph.groups]


def l1_keep(graph: ChannelGraph, order: list[torch.Tensor], counts: list[int]) -> dict[str, torch.Tensor]:
    """Per group, the `counts` channels whose filters have the largest L1 norms."""
    return {group.name: ranked[:kept] for group, ranked, kept in zip(graph.groups, order, counts)}


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
        if self.options.round_to < 1:
            raise ConfigError(f"method 'l1prune': round_to must be a whole number >= 1, got {self.options.round_to}")

    def prepare(self, model: nn.Module) -> nn.Module:
        if not self.options.widths:
            raise ConfigError("method 'l1prune' needs a trained model: use `leancnn compress RUN --method l1prune:macs=0.5`")
        return shrink_to_widths(model, parse_widths(self.options.widths))

    def compress(self, model, context):
        shape = context.dataset.input_shape
        example = torch.zeros(1, *shape)
        graph = channel_graph(model, example)   # an untraceable model fails here, before anything changes
        if not graph.groups:
            raise ConfigError(f"method 'l1prune': {type(model).__name__} has no removable channel group")
        round_to = self.options.round_to

        widths = [group.width for group in graph.groups]
        order = l1_order(model, graph)

        def counts_at(fraction: float) -> list[int]:
            return [rounded_width(width, fraction, round_to) for width in widths]

        thin_macs = width_macs(model, graph, shape)
        target = self.options.macs * thin_macs({})   # {}: every group whole, the model's own MACs

        def fits(counts: list[int]) -> bool:
            return thin_macs({group.name: n for group, n in zip(graph.groups, counts)}) <= target

        low = largest_fraction(lambda fraction: fits(counts_at(fraction)))
        if low == 0.0:
            raise ConfigError(f"method 'l1prune': macs={self.options.macs} is below what removing channels can reach")
        counts = fill_to_budget(counts_at(low), widths, fits, step=round_to)
        pruned = keep_channels(model, graph, l1_keep(graph, order, counts))
        context.notes["l1prune_keep_fraction"] = round(low, 4)
        return pruned, L1Prune(L1PruneOptions(macs=self.options.macs, round_to=round_to,
                                              widths=group_widths(pruned, example)))
