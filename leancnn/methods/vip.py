"""The `vip` method: virtual pooling on chosen convolution blocks of a trained
model (Chen, Zhang, Ding, Marculescu, WACV 2020). See leancnn.layers.vip.

`vip:sensitivity` wraps one block at a time, without fine-tuning, and reports
each block's accuracy drop on held-out training images. `vip:layers=auto`
applies ViP to the least sensitive blocks in rounds, fine-tuning after each
round, and stops before the accuracy drop passes `max_drop`. `vip:layers=A+B`
names the blocks (glob patterns joined by '+'); that is also how a saved run
records its choice.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.vip import VirtualPool
from .base import Method, register_method
from .selection import matching
from ..surgery import replace_module


@dataclass
class ViPOptions:
    layers: str = "auto"        # auto, or block names (globs) joined by '+'
    sensitivity: bool = False   # only report each block's accuracy drop
    max_drop: float = 0.01      # largest accuracy loss (fraction) auto may spend
    per_round: int = 2          # blocks added per round (auto)
    rounds: int = 4             # at most this many rounds (auto)
    finetune_epochs: int = 1    # fine-tuning after each round (auto)


def eligible_blocks(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[str]:
    """conv-bn(-relu) blocks that start with a stride-1 3x3 dense convolution, on maps of at least 2x2."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Sequential) and len(module) >= 1 and type(module[0]) is nn.Conv2d
             and module[0].kernel_size == (3, 3) and module[0].stride == (1, 1) and module[0].groups == 1]
    if input_shape is None:
        return names
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: sizes.__setitem__(n, tuple(args[0].shape[-2:]))) for n in names]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    return [n for n in names if min(sizes.get(n, (0, 0))) >= 2]


@register_method
class ViP(Method):
    """Virtual pooling: stride-2 convolution, interpolated back to full size."""

    name = "vip"
    Options = ViPOptions
    test_specs = ["vip:layers=auto,rounds=1,per_round=1,finetune_epochs=0,max_drop=0.9"]
    post_training = True

    def validate(self) -> None:
        o = self.options
        if not 0 <= o.max_drop < 1:
            raise ConfigError(f"method 'vip': max_drop must be in [0, 1), got {o.max_drop}")
        if o.per_round < 1 or o.rounds < 1 or o.finetune_epochs < 0:
            raise ConfigError("method 'vip': per_round and rounds must be >= 1, finetune_epochs >= 0")

    def named_blocks(self, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[str]:
        everything = eligible_blocks(model)
        usable = eligible_blocks(model, input_shape) if input_shape else everything
        chosen = matching(everything, self.options.layers)
        if not chosen:
            raise ConfigError(f"method 'vip': no block matches layers={self.options.layers!r}; "
                              f"blocks that can take ViP: {', '.join(everything) or '(none)'}")
        too_small = [n for n in chosen if n not in usable]
        if too_small:
            raise ConfigError(f"method 'vip': cannot apply to {too_small[0]}: its feature map is smaller than 2x2")
        return chosen

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.options.sensitivity or self.options.layers == "auto":
            raise ConfigError("method 'vip': sensitivity and layers=auto need a trained model: "
                              "use `leancnn compress RUN --method vip:...`")
        return wrap(model, self.named_blocks(model))

    def compress(self, model, context):
        shape = context.dataset.input_shape
        if not self.options.sensitivity and self.options.layers != "auto":
            return wrap(model, self.named_blocks(model, shape)), self
        candidates = eligible_blocks(model, shape)
        if not candidates:
            raise ConfigError("method 'vip': the model has no block that can take ViP")
        base = context.accuracy(model)
        drops = {}
        for name in candidates:
            drops[name] = base - context.accuracy(wrap(copy.deepcopy(model), [name]))
        ranked = sorted(candidates, key=lambda n: drops[n])
        context.notes["vip_sensitivity"] = {n: round(drops[n], 4) for n in ranked}
        context.notes["vip_base_accuracy"] = base
        context.log(f"ViP sensitivity (accuracy drop on {len(context.selection_labels)} held-out training images, "
                    f"base {100 * base:.2f}%):")
        for name in ranked:
            context.log(f"  {name:40s} {100 * drops[name]:+.2f} points")
        if self.options.sensitivity:
            return None
        chosen: list[str] = []
        rounds: list[dict] = []   # what each round tried, its accuracy, and whether it was kept
        context.notes["vip_rounds"] = rounds
        current = model
        for round_number in range(self.options.rounds):
            batch = [n for n in ranked if n not in chosen][:self.options.per_round]
            if not batch:
                break
            trial = context.finetune(wrap(copy.deepcopy(current), batch), self.options.finetune_epochs)
            accuracy = context.accuracy(trial)
            context.log(f"round {round_number + 1}: + {', '.join(batch)} -> {100 * accuracy:.2f}% "
                        f"(drop {100 * (base - accuracy):.2f} points)")
            kept = base - accuracy <= self.options.max_drop
            rounds.append({"added": batch, "accuracy": accuracy, "kept": kept})
            if not kept:
                break
            chosen += batch
            current = trial
        if not chosen:
            raise ConfigError(f"method 'vip': even the least sensitive blocks cost more than max_drop="
                              f"{self.options.max_drop}; nothing applied")
        context.notes["vip_layers"] = chosen
        return current, ViP(ViPOptions(layers="+".join(chosen)))


def wrap(model: nn.Module, names: list[str]) -> nn.Module:
    for name in names:
        block = model.get_submodule(name)
        if not isinstance(block, VirtualPool):
            replace_module(model, name, VirtualPool(block))
    return model
