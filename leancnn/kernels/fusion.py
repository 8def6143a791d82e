"""Residual adds and ReLUs fused into the kernel layer that produces their input, wherever a
module's traced graph shows it: `relu(conv(x) + r)`, `conv(x) + r`, `relu(conv(x))`, in any
module (a ResNet block, a MobileNetV2 inverted residual, a user's own block), not a list of
known classes. The kernel adds the residual and applies the ReLU as it writes the output, which
saves a pass over the block's output for each (about 5% of a deployed resnet18 at batch 64).

How: each module that is not a Sequential is traced with torch.fx, its submodules as leaves
except Sequentials (traced through, so a conv-bn-relu Sequential's layers are nodes); folded batch
norms (nn.Identity) are dropped from the graph; a kernel layer whose only user is an add (and
then, optionally, a ReLU that is the add's only user) becomes one call with `residual=` and its
ReLU on. A module with a fusion gets a class of its own whose forward is the rewritten graph's
code, so its name, submodules and state dict stay as they were, and TorchScript, torch.export and
copies see an ordinary module. A module that does not trace (data-dependent control flow) keeps
its forward. A residual that turns out not to match the output's shape (a broadcasting add) runs
the layer's dense path, which broadcasts (SparseConvInference.forward).
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from .sparse import SparseConvInference

ADDS = {operator.add, operator.iadd, torch.add}
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}


class _BlockTracer(fx.Tracer):
    """Every submodule a leaf except Sequentials (their layers become nodes of the block's graph)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return not isinstance(module, nn.Sequential)


def _called_module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    return root.get_submodule(node.target) if node.op == "call_module" else None


def _is_add(node: fx.Node) -> bool:
    plain = len(node.args) == 2 and not node.kwargs
    return plain and ((node.op == "call_function" and node.target in ADDS)
                      or (node.op == "call_method" and node.target in ("add", "add_", "__add__")))


def _is_relu(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(_called_module(root, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _drop_identities(root: nn.Module, graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op == "call_module" and type(_called_module(root, node)) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _fuse_graph(root: nn.Module, graph: fx.Graph, call_counts: dict[int, int]) -> list[str]:
    """Rewrite `graph` in place; returns what was fused ("conv2.0: add+relu", ...)."""
    fused = []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        layer = _called_module(root, node)
        if (not isinstance(layer, SparseConvInference) or layer.relu or len(node.args) != 1 or node.kwargs
                or len(node.users) != 1 or call_counts.get(id(layer), 0) != 1 or calls[node.target] != 1):
            continue   # the layer must be in one place and called once, on one input, the add or ReLU its only user
        user = next(iter(node.users))
        if _is_add(user):
            residual = user.args[1] if user.args[0] is node else user.args[0]
            if residual is node or not isinstance(residual, fx.Node):
                continue
            relu = len(user.users) == 1 and _is_relu(root, next(iter(user.users)))
            last = next(iter(user.users)) if relu else user
            with graph.inserting_before(last):
                call = graph.call_module(node.target, (node.args[0],), {"residual": residual})
            last.replace_all_uses_with(call)
            for dead in ([last, user] if relu else [user]) + [node]:
                graph.erase_node(dead)
            layer.relu = relu
            fused.append(f"{node.target}: add{'+relu' if relu else ''}")
        elif _is_relu(root, user):
            user.replace_all_uses_with(node)
            graph.erase_node(user)
            layer.relu = True
            fused.append(f"{node.target}: relu")
    return fused


def fuse_kernel_epilogues(model: nn.Module) -> nn.Module:
    """Fuse residual adds and ReLUs into kernel layers throughout `model` (in place); each module
    rewritten records what it fused in `leancnn_fusions` (listed by `fusions(model)`)."""
    call_counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        call_counts[id(module)] = call_counts.get(id(module), 0) + 1
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Sequential, SparseConvInference)) or not any(
                isinstance(m, SparseConvInference) for m in module.modules()):
            continue
        try:
            graph = _BlockTracer().trace(module)
        except Exception:  # noqa: BLE001  (data-dependent control flow and the like: not fused)
            continue
        _drop_identities(module, graph)
        fused = _fuse_graph(module, graph, call_counts)
        if not fused:
            continue
        graph.lint()
        code = fx.GraphModule(module, graph)
        cls = type(module)
        # A class per module (two blocks of one class may fuse differently); the original's name.
        module.__class__ = type(cls.__name__, (cls,), {"forward": type(code).forward, "__module__": cls.__module__,
                                                        "leancnn_unfused_class": cls})
        module.leancnn_fusions = fused
    return model


def fusions(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> what was fused into its kernel layers (names relative to that module)."""
    return {name: list(m.leancnn_fusions) for name, m in model.named_modules() if getattr(m, "leancnn_fusions", None)}
