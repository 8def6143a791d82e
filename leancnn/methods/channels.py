"""Physical channel surgery on any traced CNN: remove, reorder or project the channels of a
channel group (leancnn.methods.channel_graph) in every layer it lives in, so the result is an
ordinary thinner dense model of the same layer types.

One operation does it all: `transform_channels` maps each group's `width` channels to `r` new
ones by a [width, r] matrix (a projection, CaP's) or by the indices kept (a selection: pruning,
exact, no arithmetic). Producers' filters become T^T W, consumers' inputs W T, batch norms and
depthwise convolutions keep the selected channels. Positions are taken from the graph of the
unchanged model, so every group is transformed at once.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..measure import count
from ..surgery import replace_module
from .channel_graph import ChannelGraph, ChannelGroup, Site, channel_graph

Transform = torch.Tensor   # 1-D long: the kept channels, in their new order; 2-D float: [width, r]


def channel_groups(model: nn.Module, example: torch.Tensor | None = None) -> list[ChannelGroup]:
    """Every channel group of `model` whose channels can be removed; fails with one line when
    the model cannot be traced or has none."""
    groups = channel_graph(model, example).groups
    if not groups:
        raise ConfigError(f"channel surgery found no removable channels in {type(model).__name__}")
    return groups


def _axis(role: str) -> str:
    return {"out": "out", "in": "in", "norm": "channels", "pass": "channels"}[role]


def _axis_map(size: int, entries: list[tuple[Site, Transform]]) -> torch.Tensor:
    """The map of one layer axis from `size` old positions to the new ones: a long tensor of
    sources when every transform there is a selection, else a [size, new] matrix."""
    deleted = set()
    for site, transform in entries:
        rank = transform.numel() if transform.dim() == 1 else transform.shape[1]
        deleted.update(p for positions in site.positions[rank:] for p in positions)
    kept = [p for p in range(size) if p not in deleted]
    new_index = {p: i for i, p in enumerate(kept)}
    if all(t.dim() == 1 for _, t in entries):
        source = torch.tensor(kept, dtype=torch.long)
        for site, transform in entries:
            for j, chosen in enumerate(transform.tolist()):
                for slot, position in enumerate(site.positions[j]):
                    source[new_index[position]] = site.positions[chosen][slot]
        return source
    kept_positions = torch.tensor(kept, dtype=torch.long)
    matrix = torch.zeros(size, len(kept), dtype=torch.float64)
    matrix[kept_positions, torch.arange(len(kept))] = 1.0
    column_of = torch.full((size,), -1, dtype=torch.long)
    column_of[kept_positions] = torch.arange(len(kept))
    for site, transform in entries:
        if transform.dim() == 1:
            transform = torch.eye(len(site.positions), dtype=torch.float64)[:, transform]
        # New channel j of the group, slot s (a linear layer reads a channel at several positions),
        # is the column of old position positions[j][s]: sum over c of transform[c, j] x old
        # position positions[c][s]. Vectorised: per element, it was 29 s of CaP on mobilenetv2.
        positions = torch.tensor(site.positions, dtype=torch.long)   # [width, slots]
        width, rank, slots = positions.shape[0], transform.shape[1], positions.shape[1]
        columns = column_of[positions[:rank]]                        # [rank, slots]
        matrix[:, columns.flatten()] = 0.0
        matrix[positions[:, None, :].expand(width, rank, slots), columns[None].expand(width, rank, slots)] = \
            transform.double()[:, :, None].expand(width, rank, slots)
    return matrix


def _apply(tensor: torch.Tensor, dim: int, mapping: torch.Tensor) -> torch.Tensor:
    if mapping.dtype == torch.long:
        return tensor.index_select(dim, mapping.to(tensor.device))
    moved = tensor.movedim(dim, -1).double() @ mapping.to(tensor.device)
    return moved.to(tensor.dtype).movedim(-1, dim).contiguous()


def _is_identity(norm: nn.Module) -> bool:
    """A batch norm folded away: (x - 0) / sqrt(1 - eps + eps) * 1 + 0."""
    return bool((norm.weight == 1).all() and (norm.bias == 0).all() and (norm.running_mean == 0).all()
                and torch.allclose(norm.running_var, torch.full_like(norm.running_var, 1.0 - norm.eps)))


@torch.no_grad()
def _rebuilt(module: nn.Module, kind: str, maps: dict[str, torch.Tensor]) -> nn.Module:
    def size(axis: str, old: int) -> int:
        mapping = maps.get(axis)
        return old if mapping is None else (len(mapping) if mapping.dtype == torch.long else mapping.shape[1])

    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    if kind == "norm":
        new = type(module)(size("channels", module.num_features), eps=module.eps, momentum=module.momentum,
                           **factory)
        if "channels" in maps and maps["channels"].dtype != torch.long:
            if not _is_identity(module):
                raise ValueError("a batch norm's channels can only be selected, not projected (fold it first)")
            new.running_var.fill_(1.0 - module.eps)   # the identity stays the identity at any width
            return new.train(module.training)
        for attribute in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(module, attribute)
            getattr(new, attribute).copy_(_apply(value, 0, maps["channels"]) if "channels" in maps else value)
        new.num_batches_tracked.copy_(module.num_batches_tracked)
        return new.train(module.training)
    weight, bias = module.weight, module.bias
    if kind == "depthwise":
        if maps["channels"].dtype != torch.long:
            raise ValueError("a depthwise convolution's channels can only be selected, not projected")
        channels = size("channels", module.out_channels)
        new = nn.Conv2d(channels, channels, module.kernel_size, module.stride, module.padding, module.dilation,
                        groups=channels, bias=bias is not None, padding_mode=module.padding_mode, **factory)
        new.weight.copy_(_apply(weight, 0, maps["channels"]))
        if bias is not None:
            new.bias.copy_(_apply(bias, 0, maps["channels"]))
        return new.train(module.training)
    if "out" in maps:
        weight = _apply(weight, 0, maps["out"])
        bias = None if bias is None else _apply(bias, 0, maps["out"])
    if "in" in maps:
        weight = _apply(weight, 1, maps["in"])
    if kind == "linear":
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, **factory)
    else:
        new = nn.Conv2d(weight.shape[1], weight.shape[0], module.kernel_size, module.stride, module.padding,
                        module.dilation, bias=bias is not None, padding_mode=module.padding_mode, **factory)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new.train(module.training)


@torch.no_grad()
def transform_channels(model: nn.Module, graph: ChannelGraph, transforms: dict[str, Transform]) -> nn.Module:
    """Apply each group's transform (see the module's docstring) in place; `graph` is the
    graph of `model` as it is now. Returns the model."""
    per_axis: dict[tuple[str, str], list[tuple[Site, Transform]]] = {}
    for name, transform in transforms.items():
        group = graph.group(name)
        transform = torch.as_tensor(transform)
        rank = transform.numel() if transform.dim() == 1 else transform.shape[1]
        if transform.dim() == 2 and transform.shape[0] != group.width:
            raise ValueError(f"group {name}: a transform of {transform.shape[0]} rows for {group.width} channels")
        if rank < 1:
            raise ValueError(f"cannot remove every channel of group {name}")
        for site in group.sites:
            per_axis.setdefault((site.module, _axis(site.role)), []).append((site, transform))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for (module, axis), entries in per_axis.items():
        role = entries[0][0].role
        layers.setdefault(module, {})[axis] = _axis_map(graph.axis_sizes[(module, role)], entries)
    for module, maps in layers.items():
        replace_module(model, module, _rebuilt(model.get_submodule(module), graph.kinds[module], maps))
    return model


def keep_channels(model: nn.Module, graph: ChannelGraph, keep: dict[str, torch.Tensor]) -> nn.Module:
    """Keep only channels `keep[group]` (indices, in their original order) of each group named."""
    return transform_channels(model, graph, {name: torch.as_tensor(indices, dtype=torch.long).sort().values
                                             for name, indices in keep.items()})


def width_macs(model: nn.Module, graph: ChannelGraph, input_shape: tuple[int, ...]) -> Callable[[dict[str, int]], int]:
    """A function of the channels each group keeps (`{group: count}`, unnamed groups whole) to the
    dense MACs of `model` thinned to them, as `keep_channels` would build it and `count` count it.

    From one count of the full model: a convolution's or linear layer's MACs scale with the
    fraction of its output and of its input positions kept, a depthwise convolution's with the
    fraction of its channels (the positions removed are those `keep_channels` removes: which
    channels are kept does not change how many). A search over widths calls this hundreds of
    times; building and counting each trial model took 0.12 s on mobilenetv2 (CaP's search: 350
    s). A layer the formula does not cover (inside a layer that counts its own cost) makes every
    call build and count the thinner model instead."""
    rows = {row.name: row.cost.macs_dense for row in count(model, input_shape).layers}
    axes: dict[tuple[str, str], list[tuple[str, tuple[int, ...]]]] = {}   # (layer, axis) -> (group, positions per channel)
    for group in graph.groups:
        for site in group.sites:
            if site.role != "norm":
                axes.setdefault((site.module, _axis(site.role)), []).append(
                    (group.name, tuple(len(positions) for positions in site.positions)))
    layers = {module for module, _ in axes}
    if any(module not in rows for module in layers):
        def built(kept: dict[str, int]) -> int:
            thin = keep_channels(copy.deepcopy(model), graph, {name: torch.arange(n) for name, n in kept.items()})
            return count(thin, input_shape).macs_dense
        return built
    fixed = sum(macs for name, macs in rows.items() if name not in layers)

    def macs(kept: dict[str, int]) -> int:
        total = fixed
        for module in layers:
            numerator, denominator = rows[module], 1
            for axis in ("out", "in", "channels"):
                entries = axes.get((module, axis))
                if entries is None:
                    continue
                size = graph.axis_sizes[(module, "pass" if axis == "channels" else axis)]
                removed = sum(sum(counts[kept[name]:]) for name, counts in entries if name in kept)
                numerator, denominator = numerator * (size - removed), denominator * size
            total += numerator // denominator   # exact: a layer's MACs are a multiple of its axes' sizes
        return total
    return macs


def shrink_to_widths(model: nn.Module, widths: dict[str, int], example: torch.Tensor | None = None) -> nn.Module:
    """Keep the first `widths[group]` channels of each group named (to rebuild a thinner
    architecture from recorded widths; the weights come from the saved run)."""
    graph = channel_graph(model, example)
    names = {group.name: group for group in graph.groups}
    unknown = sorted(set(widths) - set(names))
    if unknown:
        raise ConfigError(f"recorded widths name channel groups this model does not have: {', '.join(unknown)} "
                          f"(its groups: {', '.join(names) or 'none'}); was the run made by an older leancnn?")
    keep = {name: torch.arange(width) for name, width in widths.items() if width != names[name].width}
    for name, width in widths.items():
        if not 1 <= width <= names[name].width:
            raise ConfigError(f"recorded width {width} of channel group {name} is outside 1..{names[name].width}")
    return keep_channels(model, graph, keep) if keep else model


def group_widths(model: nn.Module, example: torch.Tensor | None = None) -> str:
    """The model's widths as the methods record them: `group:channels` joined by '+'."""
    return "+".join(f"{group.name}:{group.width}" for group in channel_graph(model, example).groups)


@torch.no_grad()
def filter_norms(model: nn.Module, group: ChannelGroup, p: int = 1) -> torch.Tensor:
    """Per channel of the group: the p-norm of its filters over every producer (summed p-th powers)."""
    total = torch.zeros(group.width, dtype=torch.float64)
    for site in group.producers:
        weight = model.get_submodule(site.module).weight.detach().flatten(1).double().abs().cpu()
        for c, positions in enumerate(site.positions):
            total[c] += weight[list(positions)].pow(p).sum()
    return total.pow(1.0 / p)


@torch.no_grad()
def silence_channels(model: nn.Module, group: ChannelGroup, channels: torch.Tensor) -> None:
    """Make channels of a group exactly zero wherever they flow: their producers' filters and
    biases zeroed, every batch norm on them given zero shift and mean (it maps 0 to 0), depthwise
    biases zeroed. Removing them afterwards changes no output."""
    chosen = [int(c) for c in torch.as_tensor(channels).flatten().tolist()]
    for site in group.sites:
        module = model.get_submodule(site.module)
        positions = [p for c in chosen for p in site.positions[c]]
        if site.role == "out" or site.role == "pass":
            if site.role == "out":
                module.weight[positions] = 0.0
            if module.bias is not None:
                module.bias[positions] = 0.0
        elif site.role == "norm":
            module.bias[positions] = 0.0
            module.running_mean[positions] = 0.0


def largest_fraction(fits: Callable[[float], bool], iterations: int = 14) -> float:
    """Bisection for the largest kept fraction in (0, 1] that still `fits` a budget
    (MACs rise with the fraction); 0.0 when none does."""
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def fill_to_budget(counts: list[int], widths: list[int], fits: Callable[[list[int]], bool],
                   step: int = 1) -> list[int]:
    """Grow each group's count by `step` while the whole still `fits` the budget, widest group
    first: a uniform fraction alone lands a coarse step below the target on narrow networks
    (resnet20 at width 0.5: 0.44 of the MACs for a target of 0.5), since MACs rise with each
    group's count, one pass reaches a point where no single group can grow."""
    counts = list(counts)
    for index in sorted(range(len(counts)), key=lambda i: -widths[i]):
        while counts[index] < widths[index]:
            trial = counts[:index] + [min(widths[index], counts[index] + step)] + counts[index + 1:]
            if not fits(trial):
                break
            counts = trial
    return counts


def rounded_width(channels: int, fraction: float, round_to: int = 1) -> int:
    """Channels a group keeps: fraction x channels, rounded to the nearest multiple of `round_to`
    (at least one multiple, at most all channels; a group no wider than `round_to` just rounds).
    CPU convolution kernels work in vectors of 8 or 16 floats: odd widths (11, 45, 90 of 16, 64,
    128) ran at half the FLOP rate of the dense model on this project's machine."""
    if channels <= round_to:
        return min(channels, max(1, round(fraction * channels)))
    return min(channels, max(round_to, round_to * round(fraction * channels / round_to)))
