"""Which channels of a network are tied together, found by tracing it (torch.fx), so that
channel surgery (leancnn.methods.channels) works on any CNN, not only on layouts known by name.

The model is traced, then run once on an example input while every tensor is shadowed by a
tensor of the same shape holding, per element, the id of the channel it carries. A
convolution (groups=1) or linear layer gives each of its output channels a fresh id and reads
the ids of its input; batch norms, activations, pooling and depthwise convolutions carry their
input's ids through; an element-wise add or multiply ties the ids it combines (a residual
connection couples every producer on it); a concatenation along channels lays ids side by side;
flattening into a classifier is followed feature by feature. Tied ids form one class: channels
that can only be removed together. Classes touched by anything whose result depends on the
channel count (channel splits, reshapes such as a channel shuffle, slicing, an operation the
graph does not know, a constant with a per-channel shape) or reaching the network's input or
output are fixed. The free classes, grouped by the layers they touch, are the channel groups.

Dependency graphs over traced models are also how Torch-Pruning (Fang et al., "DepGraph:
Towards Any Structural Pruning", CVPR 2023) finds coupled channels; this is a smaller
construction over the operations CNNs use, with unknown operations treated as fixed.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import ConfigError

FIXED = 0   # the id every fixed class is tied to

# Per-element operations: a channel stays a channel (its id is unchanged).
_UNARY = {F.relu, torch.relu, F.relu6, F.hardtanh, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
          F.elu, F.dropout, F.dropout2d, torch.sigmoid, torch.tanh, torch.clamp, torch.abs, operator.neg,
          torch.neg, F.sigmoid, F.tanh}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "contiguous", "clone",
                  "float", "abs", "neg", "hardtanh", "hardtanh_"}
# Element-wise operations of two tensors: what they combine is tied.
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
           operator.imul, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
# Operations over space that keep each channel apart: pools, interpolation, spatial means.
_SPATIAL = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate}
_REDUCTIONS = {torch.mean, torch.amax, torch.sum}   # kept only when they reduce space, not channels
_SPATIAL_METHODS = {"mean", "amax", "sum"}
# Operations that only move elements; allowed on channels only as the flatten into a classifier.
_MOVES = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.chunk, torch.split,
          torch.squeeze, torch.unsqueeze, operator.getitem}
_MOVES_METHODS = {"flatten", "view", "reshape", "transpose", "permute", "chunk", "split", "squeeze",
                  "unsqueeze", "expand", "repeat"}
_CAT = {torch.cat, torch.concat}
_SAME_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh,
                 nn.GELU, nn.ELU, nn.Hardtanh, nn.Dropout, nn.Dropout2d, nn.Identity)
_SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d)


@dataclass(frozen=True)
class Site:
    """Where a channel group lives in one layer. `role`: "out" (a convolution's filters or a
    linear layer's rows: a producer), "in" (a convolution's input channels or a linear layer's
    input features: a consumer), "norm" (a batch norm's channels), "pass" (a depthwise
    convolution's channels, in and out). `positions[c]`: the indices along that axis that hold
    class c of the group (one, or several for a linear layer reading a flattened map)."""
    module: str
    role: str
    positions: tuple[tuple[int, ...], ...]


@dataclass
class ChannelGroup:
    """Channels removed or projected together; `width` of them, in the first producer's order."""
    name: str
    sites: list[Site]
    width: int = field(init=False)

    def __post_init__(self) -> None:
        self.width = len(self.sites[0].positions)

    def role(self, role: str) -> list[Site]:
        return [site for site in self.sites if site.role == role]

    @property
    def producers(self) -> list[Site]:
        return self.role("out")

    @property
    def consumers(self) -> list[Site]:
        return self.role("in")

    @property
    def producer(self) -> str:
        """The first producer's name (the layer whose filters rank the group's channels)."""
        return self.producers[0].module


@dataclass
class ChannelGraph:
    groups: list[ChannelGroup]
    follows: dict[str, str]          # layer -> the layer whose output it reads directly (conv -> its batch norm)
    kinds: dict[str, str]            # layer -> "conv", "depthwise", "linear", "norm"
    axis_sizes: dict[tuple[str, str], int]   # (layer, role) -> the length of that axis

    def group(self, name: str) -> ChannelGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def norm_after(self, module: str) -> str | None:
        """The batch norm that reads `module`'s output directly, if any."""
        for norm, source in self.follows.items():
            if source == module and self.kinds.get(norm) == "norm":
                return norm
        return None

    def sliceable(self, group: ChannelGroup) -> bool:
        """One producer convolution, and every layer on the group holding it as its whole axis in
        the producer's order: a prefix of the producer's filters is a prefix of every layer's
        channels there (the dynamic sub-networks' slicing)."""
        producers = group.producers
        if len(producers) != 1 or self.kinds[producers[0].module] != "conv":
            return False
        identity = tuple((c,) for c in range(group.width))
        return all(site.positions == identity and self.axis_sizes[(site.module, site.role)] == group.width
                   for site in group.sites)

    def projectable(self, group: ChannelGroup) -> bool:
        """Sliceable, no depthwise layer on the way, at most the producer's own batch norm: a
        rotation of the channels merges into the producer and the consumers (cascaded projection)."""
        norms = group.role("norm")
        return (self.sliceable(group) and not group.role("pass") and len(norms) <= 1
                and all(self.norm_after(group.producer) == norm.module for norm in norms))


class _Tracer(fx.Tracer):
    """torch.nn layers and any module holding its own parameters are leaves (a method's layer is
    one operation to the graph, not its insides); a failure names the module it happened in."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return super().is_leaf_module(module, qualified_name) or bool(module._parameters)

    def call_module(self, module, forward, args, kwargs):
        try:
            return super().call_module(module, forward, args, kwargs)
        except _TraceFailure:
            raise
        except Exception as error:  # noqa: BLE001 - any failure inside user code is reported, not hidden
            name = self.path_of_module(module) or type(module).__name__
            raise _TraceFailure(name, type(module).__name__, error) from None


class _TraceFailure(Exception):
    def __init__(self, name: str, kind: str, error: Exception) -> None:
        super().__init__(name)
        self.name, self.kind, self.error = name, kind, error


def trace(model: nn.Module) -> fx.GraphModule:
    """The model as an fx graph, or one line naming the module where tracing fails."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except _TraceFailure as failure:
        raise ConfigError(f"channel surgery cannot trace module {failure.name} ({failure.kind}) of "
                          f"{type(model).__name__} with torch.fx: {_first_line(failure.error)}") from None
    except Exception as error:  # noqa: BLE001
        raise ConfigError(f"channel surgery cannot trace {type(model).__name__}'s forward with torch.fx: "
                          f"{_first_line(error)}") from None
    return fx.GraphModule(model, graph)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, item: int) -> int:
        parent = self.parent.setdefault(item, item)
        if parent != item:
            parent = self.parent[item] = self.find(parent)
        return parent

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller root wins, so FIXED (0) stays the root of everything fixed
            self.parent[max(ra, rb)] = min(ra, rb)


class _Shadow(fx.Interpreter):
    """Runs the graph on real values and, beside each tensor, the ids of the channels it carries."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.ids: dict[fx.Node, Any] = {}
        self.sets = _UnionFind()
        self.sets.find(FIXED)
        self.next_id = FIXED + 1
        self.produced: dict[tuple[str, int], int] = {}
        self.seen: dict[tuple[str, str, int], int] = {}   # (layer, role, position) -> an id seen there
        self.axes: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)  # per call: ids along the axis
        self.follows: dict[str, str] = {}
        self.kinds: dict[str, str] = {}

    # -- helpers ------------------------------------------------------------------------------
    def fix(self, ids: Any) -> None:
        for tensor in _tensors(ids):
            for item in torch.unique(tensor).tolist():
                self.sets.union(int(item), FIXED)

    def fresh(self, module: str, channels: int) -> torch.Tensor:
        values = []
        for channel in range(channels):
            key = (module, channel)
            if key not in self.produced:
                self.produced[key] = self.next_id
                self.next_id += 1
            values.append(self.produced[key])
        return torch.tensor(values, dtype=torch.float64)

    def record(self, module: str, role: str, vector: torch.Tensor) -> None:
        """The ids along one axis of a layer in this call; a layer called twice (shared weights)
        ties what it saw at each position."""
        self.axes[(module, role)].append(vector)
        for position, item in enumerate(vector.tolist()):
            key = (module, role, position)
            if key in self.seen:
                self.sets.union(self.seen[key], int(item))
            else:
                self.seen[key] = int(item)

    @staticmethod
    def channel_vector(ids: torch.Tensor) -> torch.Tensor | None:
        """The id of each channel (dim 1), if every element of a channel carries the same one."""
        if ids.dim() < 2:
            return None
        vector = ids[(0, slice(None)) + (0,) * (ids.dim() - 2)]
        if not bool((ids == vector.view(1, -1, *[1] * (ids.dim() - 2))).all()):
            return None
        return vector.clone()

    @staticmethod
    def spread(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return vector.view(1, -1, *[1] * (like.dim() - 2)).expand(like.shape)

    def unknown(self, inputs: list, value: Any) -> Any:
        self.fix(inputs)
        return _map_tensors(value, lambda t: torch.zeros(t.shape, dtype=torch.float64))

    # -- the interpreter ------------------------------------------------------------------------
    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        self.ids[node] = self.shadow(node, value)
        return value

    def shadow(self, node: fx.Node, value: Any) -> Any:
        if node.op == "placeholder":
            return _map_tensors(value, lambda t: torch.zeros(t.shape, dtype=torch.float64))
        if node.op == "get_attr":
            return None
        if node.op == "output":
            self.fix([self.ids.get(a) for a in node.all_input_nodes])
            return None
        inputs = [self.ids.get(a) for a in node.all_input_nodes]
        if not isinstance(value, torch.Tensor) and not (isinstance(value, (tuple, list))
                                                         and any(isinstance(v, torch.Tensor) for v in value)):
            return None   # sizes, shapes, numbers
        if node.op == "call_module":
            return self.shadow_module(node, value, inputs)
        target = node.target
        is_method = node.op == "call_method"
        first = self.ids.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if (target in _UNARY or (is_method and target in _UNARY_METHODS)) and isinstance(first, torch.Tensor):
            return first if first.shape == value.shape else self.unknown(inputs, value)
        if target in _BINARY or (is_method and target in _BINARY_METHODS):
            return self.shadow_binary(node, value, inputs)
        if target in _REDUCTIONS or (is_method and target in _SPATIAL_METHODS):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            rank = first.dim() if isinstance(first, torch.Tensor) else 0
            if not dims or any(d % max(rank, 1) in (0, 1) for d in dims):
                return self.unknown(inputs, value)   # a reduction over channels (or everything)
            return self.shadow_spatial(node, first, value, inputs)
        if target in _SPATIAL:
            return self.shadow_spatial(node, first, value, inputs)
        if target in _CAT:
            return self.shadow_cat(node, value, inputs)
        if target in _MOVES or (is_method and target in _MOVES_METHODS):
            return self.shadow_move(node, value, inputs)
        return self.unknown(inputs, value)

    def shadow_module(self, node: fx.Node, value: Any, inputs: list) -> Any:
        name = str(node.target)
        module = self.module.get_submodule(name)
        source = node.args[0] if node.args else None
        if isinstance(source, fx.Node) and source.op == "call_module":
            self.follows[name] = str(source.target)
        given = inputs[0] if inputs else None
        if not isinstance(value, torch.Tensor) or not isinstance(given, torch.Tensor):
            return self.unknown(inputs, value)
        kind = type(module)
        if kind is nn.Conv2d:
            vector = self.channel_vector(given)
            if vector is None:
                return self.unknown(inputs, value)
            if module.groups == 1:
                self.kinds[name] = "conv"
                self.record(name, "in", vector)
                out = self.fresh(name, module.out_channels)
                self.record(name, "out", out)
                return self.spread(out, value)
            if module.groups == module.in_channels == module.out_channels:
                self.kinds[name] = "depthwise"
                self.record(name, "pass", vector)
                return self.spread(vector, value)
            return self.unknown(inputs, value)   # grouped convolutions: their groups fix the channel counts
        if kind is nn.Linear:
            if given.dim() != 2:
                return self.unknown(inputs, value)
            self.kinds[name] = "linear"
            self.record(name, "in", given[0].clone())
            out = self.fresh(name, module.out_features)
            self.record(name, "out", out)
            return out.view(1, -1).expand(value.shape)
        if kind in _NORMS:
            vector = self.channel_vector(given)
            if vector is None or not module.affine or not module.track_running_stats:
                return self.unknown(inputs, value)
            self.kinds[name] = "norm"
            self.record(name, "norm", vector)
            return given
        if type(module) in _SAME_MODULES:
            return given if given.shape == value.shape else self.unknown(inputs, value)
        if type(module) in _SPATIAL_MODULES:
            return self.shadow_spatial(node, given, value, inputs)
        if kind is nn.Flatten:
            return self.shadow_move(node, value, inputs, call=lambda ids: module(ids))
        return self.unknown(inputs, value)

    def shadow_binary(self, node: fx.Node, value: torch.Tensor, inputs: list) -> Any:
        shadows = [self.ids.get(a) for a in node.args if isinstance(a, fx.Node)]
        constants = [self.env[a] for a in node.args if isinstance(a, fx.Node) and self.ids.get(a) is None]
        if any(isinstance(c, torch.Tensor) and c.numel() > 1 for c in constants):
            return self.unknown(inputs, value)   # a per-channel constant: its shape fixes the channel count
        shadows = [s for s in shadows if isinstance(s, torch.Tensor)]
        if not shadows:
            return None
        spread = [s.expand(value.shape) if s.shape != value.shape else s for s in shadows]
        if len(spread) == 2:
            vectors = [self.channel_vector(s) for s in spread]
            if all(v is not None for v in vectors):
                pairs = torch.stack(vectors, dim=1)   # channel by channel: the usual residual add
            else:
                pairs = torch.stack([spread[0].flatten(), spread[1].flatten()], dim=1)
            codes = torch.unique(pairs[:, 0].long() * (1 << 31) + pairs[:, 1].long())
            for code in codes.tolist():
                self.sets.union(code >> 31, code & ((1 << 31) - 1))
        return spread[0]

    def shadow_spatial(self, node: fx.Node, given: Any, value: Any, inputs: list) -> Any:
        if not isinstance(given, torch.Tensor) or not isinstance(value, torch.Tensor) or value.dim() < 2:
            return self.unknown(inputs, value)
        vector = self.channel_vector(given)
        if vector is None or value.shape[0] != given.shape[0] or value.shape[1] != given.shape[1]:
            return self.unknown(inputs, value)
        return self.spread(vector, value)

    def shadow_cat(self, node: fx.Node, value: torch.Tensor, inputs: list) -> Any:
        pieces = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shadows = [self.ids.get(p) if isinstance(p, fx.Node) else None for p in pieces]
        if any(not isinstance(s, torch.Tensor) for s in shadows):
            return self.unknown(inputs, value)
        joined = torch.cat(shadows, dim=dim)
        if dim % value.dim() != 1:
            self.fix(joined)
        return joined

    def shadow_move(self, node: fx.Node, value: Any, inputs: list, call=None) -> Any:
        given = self.ids.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if isinstance(given, (tuple, list)) and node.target is operator.getitem:
            return given[node.args[1]]   # a piece of a split: fixed already
        if not isinstance(given, torch.Tensor):
            return self.unknown(inputs, value)
        dense = given.contiguous()
        if call is not None:
            moved = call(dense)
        else:
            args = fx.node.map_arg(node.args[1:], lambda a: self.env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: self.env[a])
            moved = (getattr(dense, node.target)(*args, **kwargs) if node.op == "call_method"
                     else node.target(dense, *args, **kwargs))
        unchanged = isinstance(moved, torch.Tensor) and moved.shape == given.shape and bool((moved == given).all())
        flatten = (isinstance(moved, torch.Tensor) and moved.dim() == 2 and given.dim() > 2
                   and moved.shape == dense.flatten(1).shape and bool((moved == dense.flatten(1)).all()))
        if not (unchanged or flatten):
            self.fix(given)   # the result depends on the channel count (a split, shuffle or slice)
        return moved


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _map_tensors(value: Any, function) -> Any:
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, function) for v in value)
    return None


def example_input(model: nn.Module) -> torch.Tensor:
    """A batch of one image the model accepts: its first convolution's channels at the sizes
    small-image models take (32, 28, 64, 224); pass `example` where none of them fits."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    channels = convs[0].in_channels if convs else 3
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        for size in (32, 28, 64, 224):
            candidate = torch.zeros(1, channels, size, size, device=device)
            try:
                with torch.no_grad():
                    model(candidate)
                return candidate
            except Exception:  # noqa: BLE001 - a size the model does not take; try the next
                continue
    finally:
        model.train(was_training)
    raise ConfigError(f"channel surgery: {type(model).__name__} takes none of the image sizes tried "
                      f"(32, 28, 64, 224 with {channels} channels); pass example_input=")


@torch.no_grad()
def channel_graph(model: nn.Module, example: torch.Tensor | None = None) -> ChannelGraph:
    """The channel groups of `model` (see the module's docstring). Nothing in the model changes."""
    graph_module = trace(model)
    example = example_input(model) if example is None else example[:1]
    shadow = _Shadow(graph_module)
    was_training = model.training
    graph_module.eval()
    try:
        shadow.run(example)
    finally:
        model.train(was_training)
    find = shadow.sets.find
    # class -> {(layer, role): [positions of the class along that axis]}
    members: dict[int, dict[tuple[str, str], list[int]]] = defaultdict(lambda: defaultdict(list))
    for (module, role), calls in shadow.axes.items():
        for position, item in enumerate(calls[0].tolist()):
            members[find(int(item))][(module, role)].append(position)
    free = {root: sites for root, sites in members.items() if root != FIXED}
    # Classes with the same layers form a group; a group's classes follow its first producer's order.
    order = {name: index for index, name in enumerate(dict.fromkeys(m for m, _ in shadow.axes))}
    by_signature: dict[tuple, list[int]] = defaultdict(list)
    for root, sites in free.items():
        by_signature[tuple(sorted((order[m], r, len(p)) for (m, r), p in sites.items()))].append(root)
    groups = []
    used_names: dict[str, int] = defaultdict(int)
    for signature, roots in by_signature.items():
        layers = sorted({key for root in roots for key in free[root]}, key=lambda key: (order[key[0]], key[1]))
        lead = next((key for key in layers if key[1] == "out"), None)
        if lead is None or any(set(free[root]) != set(layers) for root in roots):
            continue   # no producer to remove channels from (cannot happen for a traced conv net)
        roots.sort(key=lambda root: free[root][lead][0])
        sites = [Site(module, role, tuple(tuple(free[root][(module, role)]) for root in roots))
                 for module, role in layers]
        groups.append((free[roots[0]][lead][0], lead[0], sites))
    groups.sort(key=lambda item: (order[item[1]], item[0]))
    result = []
    for _, lead, sites in groups:
        suffix = used_names[lead]
        used_names[lead] += 1
        result.append(ChannelGroup(lead if suffix == 0 else f"{lead}#{suffix}", sites))
    sizes = {key: len(calls[0]) for key, calls in shadow.axes.items()}
    return ChannelGraph(result, shadow.follows, shadow.kinds, sizes)
