"""Physical channel surgery: remove output channels of a convolution, its batch
norm, and the matching input channels of the layers that read them, so the
result is an ordinary thinner dense model.

Channel groups are found from the structure of the registry's models: in
VGG-style chains every conv-bn block feeds the next block's convolution (or the
classifier, through max-pooling and global average pooling, which act per
channel); in residual blocks only the channels inside a block are removable
(conv1 -> conv2), so block outputs keep their width and the additions match.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..models.resnet import BasicBlock
from ..surgery import replace_module


@dataclass
class ChannelGroup:
    producer: str          # name of the conv-bn(-relu) Sequential whose output channels are removable
    consumer: str          # name of the Conv2d or Linear that reads them


def _is_conv_block(module: nn.Module) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) >= 2 and type(module[0]) is nn.Conv2d
            and isinstance(module[1], nn.BatchNorm2d) and module[0].groups == 1)


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ConfigError(f"channel surgery does not know the layout of {type(model).__name__}")
    groups: list[ChannelGroup] = []
    items = list(features.named_children())
    if all(_is_conv_block(m) or isinstance(m, nn.MaxPool2d) for _, m in items):  # a VGG-style chain
        blocks = [f"features.{name}" for name, m in items if _is_conv_block(m)]
        for producer, consumer in zip(blocks, blocks[1:]):
            groups.append(ChannelGroup(producer, f"{consumer}.0"))
        if blocks and isinstance(getattr(model, "classifier", None), nn.Linear):
            groups.append(ChannelGroup(blocks[-1], "classifier"))
        return groups
    for name, module in items:
        if isinstance(module, BasicBlock):
            groups.append(ChannelGroup(f"features.{name}.conv1", f"features.{name}.conv2.0"))
        elif not _is_conv_block(module):
            raise ConfigError(f"channel surgery does not know layer features.{name} ({type(module).__name__}); "
                              "it handles VGG-style chains and ResNets with basic blocks")
    if not groups:
        raise ConfigError(f"channel surgery found no removable channels in {type(model).__name__}")
    return groups


@torch.no_grad()
def keep_channels(model: nn.Module, group: ChannelGroup, keep: torch.Tensor) -> None:
    """Keep only output channels `keep` (indices) of the producer, and the matching inputs of the consumer."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    if keep.numel() == 0:
        raise ValueError(f"cannot remove every channel of {group.producer}")
    block = model.get_submodule(group.producer)
    conv, norm = block[0], block[1]
    new_conv = nn.Conv2d(conv.in_channels, len(keep), conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                         bias=conv.bias is not None).to(conv.weight.device)
    new_conv.weight.copy_(conv.weight[keep])
    if conv.bias is not None:
        new_conv.bias.copy_(conv.bias[keep])
    new_norm = nn.BatchNorm2d(len(keep), eps=norm.eps, momentum=norm.momentum).to(conv.weight.device)
    for attribute in ("weight", "bias", "running_mean", "running_var"):
        getattr(new_norm, attribute).copy_(getattr(norm, attribute)[keep])
    new_norm.num_batches_tracked.copy_(norm.num_batches_tracked)
    block[0], block[1] = new_conv.train(conv.training), new_norm.train(norm.training)
    consumer = model.get_submodule(group.consumer)
    if isinstance(consumer, nn.Linear):
        new = nn.Linear(len(keep), consumer.out_features, bias=consumer.bias is not None).to(consumer.weight.device)
        new.weight.copy_(consumer.weight[:, keep])
    else:
        new = nn.Conv2d(len(keep), consumer.out_channels, consumer.kernel_size, consumer.stride, consumer.padding,
                        consumer.dilation, bias=consumer.bias is not None).to(consumer.weight.device)
        new.weight.copy_(consumer.weight[:, keep])
    if consumer.bias is not None:
        new.bias.copy_(consumer.bias)
    replace_module(model, group.consumer, new.train(consumer.training))


def largest_fraction(fits: Callable[[float], bool], iterations: int = 14) -> float:
    """Bisection for the largest kept fraction in (0, 1] that still `fits` a budget
    (MACs rise with the fraction); 0.0 when none does."""
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def shrink_to_widths(model: nn.Module, widths: dict[str, int]) -> nn.Module:
    """Rebuild a thinner architecture from recorded widths (weights come from the saved run)."""
    for group in channel_groups(model):
        width = widths.get(group.producer)
        if width is not None and width != model.get_submodule(group.producer)[0].out_channels:
            keep_channels(model, group, torch.arange(width))
    return model
