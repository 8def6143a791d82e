"""Inference-only rewrites of a trained model: batch norm folded into the
convolution before it, and every pSConv layer swapped for the compiled
kernel (leancnn.kernels.psconv) with the ReLU after it fused, and a residual
block's add and ReLU fused into its second convolution when that runs on the
kernel. Latency
comparisons deploy every model the same way, so a method is not credited (or
blamed) for the batch norms it happens to keep. Training keeps the original
layers; deploy works on a copy.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def _foldable(conv: nn.Module) -> bool:
    # Per-output-channel scaling commutes with these layers: their output is linear in
    # `weight` row by row (pSConv's mask is fixed per kernel). Other layers keep their norm.
    from .layers.psconv import PSConv2d

    return type(conv) in (nn.Conv2d, PSConv2d)


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
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            new_bias = (bias - norm.running_mean) * scale + norm.bias
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias)
            else:
                conv.bias.copy_(new_bias)
            module[index + 1] = nn.Identity()
    return model


def swap_psconv(model: nn.Module) -> nn.Module:
    """Every PSConv2d the kernel can compute -> PSConvInference, fusing a ReLU that
    follows it (directly, or after a folded batch norm) in the same Sequential."""
    from .kernels.psconv import PSConvInference, kernel_applies
    from .methods.surgery import replace_module

    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for index, layer in enumerate(module):
            if not kernel_applies(layer):
                continue
            following = list(module)[index + 1:index + 3]
            while following and isinstance(following[0], nn.Identity):
                following.pop(0)
            relu = bool(following) and type(following[0]) is nn.ReLU
            module[index] = PSConvInference(layer, relu=relu)
            if relu:
                position = next(i for i in range(index + 1, len(module)) if module[i] is following[0])
                module[position] = nn.Identity()
    for name, layer in list(model.named_modules()):  # a pSConv layer outside a Sequential: no fusion
        if kernel_applies(layer):
            replace_module(model, name, PSConvInference(layer))
    return model


class KernelResidualBlock(nn.Module):
    """A residual block (models.resnet.BasicBlock) whose second convolution runs on
    the pSConv kernel: relu(conv2(conv1(x)) + shortcut(x)) with the add and the ReLU
    done by the kernel as it writes conv2's output (two passes over the block's
    output saved: about 5% of a deployed resnet18 at batch 64)."""

    def __init__(self, conv1: nn.Module, conv2: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2, self.shortcut = conv1, conv2, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x), residual=self.shortcut(x))


def fuse_residuals(model: nn.Module) -> nn.Module:
    """Every BasicBlock whose conv2 is a kernel layer (then identities) and whose ReLU
    is a plain ReLU -> KernelResidualBlock."""
    from .kernels.psconv import PSConvInference
    from .methods.surgery import replace_module
    from .models.resnet import BasicBlock

    for name, block in list(model.named_modules()):
        if not name or not (isinstance(block, BasicBlock) and type(block.relu) is nn.ReLU
                and isinstance(block.conv2, nn.Sequential) and len(block.conv2)
                and isinstance(block.conv2[0], PSConvInference) and not block.conv2[0].relu
                and all(isinstance(m, nn.Identity) for m in list(block.conv2)[1:])):
            continue
        kernel = block.conv2[0]
        kernel.relu = True   # now after the residual add
        replace_module(model, name, KernelResidualBlock(block.conv1, kernel, block.shortcut))
    return model


def deploy(model: nn.Module, kernels: bool = True) -> nn.Module:
    """The model as it should run for inference on this CPU (a copy, eval mode):
    batch norm folded; with `kernels`, pSConv layers on the compiled kernel
    (the masked dense convolution where no compiler was found)."""
    model = fold_batchnorm(model)
    return fuse_residuals(swap_psconv(model)) if kernels else model
