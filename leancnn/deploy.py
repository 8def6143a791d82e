"""Inference-only rewrites of a trained model: batch norm folded into the
convolution before it; every pSConv layer and every pruned or masked convolution
swapped for a sparse-kernel layer (leancnn.kernels.sparse) with the ReLU after it
fused, and residual adds and ReLUs fused into the kernel layer before them wherever a module's
traced graph shows one (leancnn.kernels.fusion); a ViP block's
interpolation back to full size as one compiled pass (leancnn.kernels.virtual_pool);
a block-circulant layer on the FFT or its expanded dense weight (leancnn.kernels.circulant).
A swapped layer runs the compiled kernel or the dense convolution, whichever its
measured plan found faster (leancnn.kernels.plans), so deploying never makes a
layer slower than dense. Latency
comparisons deploy every model the same way, so a method is not credited (or
blamed) for the batch norms it happens to keep. Training keeps the original
layers; deploy works on a copy.
"""
from __future__ import annotations

import warnings

import copy

import torch
from torch import nn

from .kernels.circulant import CirculantInference, swap_circulant_layers
from .kernels.fusion import fuse_kernel_epilogues
from .kernels.graph import install_graph_plans
from .kernels.psconv import PSConvInference, kernel_applies
from .kernels.sparse import SparseConvInference, conv_applies
from .kernels.virtual_pool import VirtualPoolInference
from .layers.psconv import PSConv2d
from .layers.vip import VirtualPool
from .surgery import replace_module


def _foldable(conv: nn.Module) -> bool:
    # Per-output-channel scaling commutes with these layers: their output is linear in
    # `weight` row by row (pSConv's mask is fixed per kernel). Other layers keep their norm.
    return type(conv) in (nn.Conv2d, PSConv2d)


@torch.no_grad()
def folded_weight_and_bias(conv: nn.Module, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of the convolution equal to `norm(conv(x))` with the norm's
    running statistics (eval mode): each output channel scaled by gamma / sqrt(var + eps)."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    return conv.weight * scale.view(-1, 1, 1, 1), (bias - norm.running_mean) * scale + norm.bias


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode where every Sequential's (conv, BatchNorm2d)
    pair is a conv with bias followed by nn.Identity. Outputs match the eval-mode
    original up to float rounding."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for index in range(len(module) - 1):
            conv, norm = module[index], module[index + 1]
            if not (isinstance(norm, nn.BatchNorm2d) and _foldable(conv) and norm.track_running_stats):
                continue
            new_weight, new_bias = folded_weight_and_bias(conv, norm)
            conv.weight.copy_(new_weight)
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias)
            else:
                conv.bias.copy_(new_bias)
            module[index + 1] = nn.Identity()
    return model


def _kernel_layer(layer: nn.Module, relu: bool) -> nn.Module | None:
    """The inference layer for `layer` if the sparse kernel may run it: a pSConv layer, or a
    plain 3x3 / 1x1 convolution, pruned, masked or dense (its plan may still pick oneDNN); else None."""
    if kernel_applies(layer):
        return PSConvInference(layer, relu=relu)
    if isinstance(layer, CirculantInference):
        return None if layer.linear or layer.kernel_ready else layer.use_kernel(relu)   # its dense route
    if type(layer) is nn.Conv2d and conv_applies(layer) and layer.weight.numel():
        return SparseConvInference.from_conv(layer, relu=relu)
    return None


def swap_kernel_layers(model: nn.Module) -> nn.Module:
    """Every convolution the sparse kernel can compute (pSConv, pruned or masked 3x3 / 1x1
    convolutions, a block-circulant layer's dense route) -> its inference layer, fusing a ReLU
    that follows it (directly, or after a folded batch norm) in the same Sequential. Each such layer runs what its plan measured faster."""
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for index, layer in enumerate(module):
            following = list(module)[index + 1:index + 3]
            while following and isinstance(following[0], nn.Identity):
                following.pop(0)
            relu = bool(following) and type(following[0]) is nn.ReLU
            swapped = _kernel_layer(layer, relu)
            if swapped is None:
                continue
            module[index] = swapped
            if relu:
                position = next(i for i in range(index + 1, len(module)) if module[i] is following[0])
                module[position] = nn.Identity()
    circulant = [name + "." for name, layer in model.named_modules() if isinstance(layer, CirculantInference)]
    for name, layer in list(model.named_modules()):  # outside a Sequential: no fusion
        if name and not any(name.startswith(prefix) for prefix in circulant):   # their dense route is theirs
            swapped = _kernel_layer(layer, relu=False)
            if swapped is not None:
                replace_module(model, name, swapped)
    return model


def swap_virtual_pools(model: nn.Module) -> nn.Module:
    """Every ViP block -> VirtualPoolInference (the same block, the upsample planned)."""
    for name, module in list(model.named_modules()):
        if name and isinstance(module, VirtualPool):
            replace_module(model, name, VirtualPoolInference(module))
    return model


def deploy(model: nn.Module, kernels: bool = True, example_inputs: list[torch.Tensor] | None = None,
           graph: str = "auto") -> nn.Module:
    """The model as it should run for inference on this CPU (a copy, eval mode):
    batch norm folded; block-circulant layers on their plans (the FFT or the expanded dense
    convolution, leancnn.kernels.circulant); with `kernels`, pSConv and pruned convolutions as
    sparse-kernel layers, each running what its deploy plan measured faster on this machine (the
    kernel or the dense convolution; plans are made the first time a layer sees an
    input shape, batch size, memory format and thread count, and cached on disk), and
    the whole model run eager or as a frozen TorchScript graph, whichever measured
    faster for the input (`graph`: auto, eager or torchscript; leancnn.kernels.graph).
    `example_inputs`: inputs to plan for now rather than at their first use."""
    if any(tensor.is_cuda for tensor in model.parameters()):
        # The kernels and their plans are CPU code: on a GPU the deployed model stays dense.
        warnings.warn("leancnn.deploy: the inference kernels are CPU-only; on CUDA the deployed model is the dense "
                      "one with batch norm folded (move the model to the CPU for the kernels)", stacklevel=2)
        return fold_batchnorm(model)
    model = swap_circulant_layers(fold_batchnorm(model))
    if not kernels:
        return model
    model = swap_virtual_pools(fuse_kernel_epilogues(swap_kernel_layers(model)))
    install_graph_plans(model, graph)
    with torch.no_grad():
        for example in example_inputs or []:
            model(example)
    return model


def deploy_plan(model: nn.Module) -> list[dict]:
    """What each sparse-kernel layer of a deployed model runs: one row per layer and plan key
    (batch, threads, memory format), with the choice and every candidate's measured time."""
    rows = []
    for name, layer in model.named_modules():
        if isinstance(layer, SparseConvInference):
            for plan in layer.plan_summary():
                rows.append({"layer": name, "density": round(layer.density, 4), **plan})
        elif isinstance(layer, VirtualPoolInference):
            for plan in layer.plan_summary():
                rows.append({"layer": name, "density": 1.0, **plan})
        elif isinstance(layer, CirculantInference):   # density: values stored over the dense weight's (1/k)
            for plan in layer.plan_summary():
                rows.append({"layer": name, "density": round(1.0 / layer.block, 4), **plan})
    return rows
