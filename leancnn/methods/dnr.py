"""The `dnr` method: robust pruning by dynamic network rewiring, in one training run.

Kundu, Nazemi, Beerel, Pedram, "DNR: A Tunable Robust Pruning Framework
Through Dynamic Network Rewiring of DNNs", ASP-DAC 2021.

Training starts from a random sparse mask at the target density. Each batch's
loss is beta * CE(clean) + (1 - beta) * CE(adversarial), the adversarial
examples made by PGD (or FGSM) in [0, 1] pixel space with the model in eval
mode and put back in train mode afterwards. Gradients stay dense, so every
weight keeps its momentum, masked ones too; the mask is re-applied after each
step. After each epoch, per layer, a fraction p of the smallest active weights
is pruned (p starts at `prune_fraction` and decays by a cosine); the pruned
total is regrown across layers in proportion to each layer's normalised
momentum (mean |momentum| of its active weights over the sum of those means),
capped at full density, at the zero positions with the largest |momentum|. The
number of active weights never changes, so the density stays the target.
Choices the paper leaves open (unconfirmed): beta = 0.5, regrown weights start
at zero, the first convolution stays dense, layers start at the same density.

mode=channel prunes whole channels of the removable channel groups of the traced
channel graph (leancnn.methods.channel_graph: any CNN; channels tied by residual
additions, depthwise layers or concatenations are one channel): a channel is masked
by zeroing its filters in every producer and the shifts and means of the batch norms
on it (leancnn.methods.channels.silence_channels), so it is exactly zero wherever it
flows. After each epoch every group prunes the smallest-norm fraction of its active
channels and regrows as many empty ones. Two departures from the weight mode, both
forced by channels: an empty channel's output is zero, and ReLU passes no gradient
at zero, so it has no momentum to rank it: regrowth picks empty channels at random
and initialises them like a fresh layer (zero weights would stay dead); and each
group keeps its channel count (moving channels between layers would move the MAC budget,
which channel mode exists to cut: density d leaves about d^2 of the MACs of
layers between two pruned ones). After training the empty channels are
removed, leaving a thinner dense model; `widths` records its shape so the
run reloads. `round_to=8` keeps each group's channel count a multiple of 8
(the nearest to density x channels, at least 8): CPU convolution kernels work
in vectors of 8 or 16 floats, and odd widths (11, 45, 90 of 16, 64, 128) ran
at half the FLOP rate of the dense model on this project's machine.

The loss and attack are leancnn.methods.adversarial's (shared with magprune,
RSR and SAT); schedule=prob|hessian ramps the budget with SAT's curriculum.

density=1 in weight mode adds no masks: plain dense adversarial training with
the same loss and attack (the baseline the DNR figures compare with).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .adversarial import AdversarialLoss, AdversarialMethod, check_adversarial_options, schedule_settings
from .base import register_method
from .selection import stem_conv
from .channel_graph import channel_graph
from .channels import filter_norms, keep_channels, rounded_width, shrink_to_widths, silence_channels
from .l1prune import parse_widths
from .masking import apply_masks, densities, keep_count, masked_layers

MASK = "dnr_mask"
CHANNEL_MASK = "dnr_channel_masks"   # root buffer: every group's channel mask, end to end in graph order
MODES = ("irregular", "channel")


@dataclass
class DNROptions:
    density: float = 0.05          # fraction of prunable weights kept (0.05 = 20x)
    beta: float = 0.5              # weight of the clean loss; 1 - beta goes to the adversarial loss
    attack: str = "pgd"            # pgd, fgsm or none
    eps: float | None = None       # attack budget in [0, 1] pixel units; None = the dataset's default
    steps: int = 7                 # PGD iterations during training
    prune_fraction: float = 0.5    # p at the first epoch, cosine-decayed towards 0
    seed: int = 0                  # initial random mask
    mode: str = "irregular"        # irregular (weights) or channel (whole output channels, then removed)
    widths: str = ""               # set after channel-mode training: the thinner model's shape
    round_to: int = 1              # channel mode: each group keeps a multiple of this many channels
    eval_images: int = 1000        # test images a finished adversarial run is attacked on (FGSM, PGD-10); 0 = none
    schedule: str = "constant"     # the attack's budget: constant, or SAT's curriculum (prob, hessian)


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution and linear layer but the first convolution."""
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    stem = stem_conv(model)
    return [(n, m) for n, m in layers if n != stem]


def distribute(total: int, shares: list[float], capacity: list[int]) -> list[int]:
    """Split `total` in proportion to `shares`, no part above its capacity, parts summing to total."""
    counts = [0] * len(shares)
    remaining = total
    open_layers = [i for i in range(len(shares)) if capacity[i] > 0]
    while remaining > 0 and open_layers:
        weight = sum(shares[i] for i in open_layers) or float(len(open_layers))
        proposal = {i: (shares[i] if sum(shares[j] for j in open_layers) else 1.0) / weight * remaining
                    for i in open_layers}
        given = 0
        for i in open_layers:
            add = min(int(proposal[i]), capacity[i] - counts[i])
            counts[i] += add
            given += add
        if given == 0:  # rounding left crumbs: hand them out one by one, largest share first
            for i in sorted(open_layers, key=lambda j: -proposal[j]):
                if remaining - given == 0:
                    break
                if counts[i] < capacity[i]:
                    counts[i] += 1
                    given += 1
        remaining -= given
        open_layers = [i for i in open_layers if counts[i] < capacity[i]]
    return counts


@register_method
class DNR(AdversarialMethod):
    """Dynamic network rewiring with a hybrid clean/adversarial loss."""

    name = "dnr"
    Options = DNROptions
    test_specs = ["dnr:density=0.1,attack=none", "dnr:density=0.2,attack=pgd,steps=2,eval_images=32",
                  "dnr:density=0.5,mode=channel,attack=none"]
    # The first (sparse training alone) is what --quick runs; the second trains against PGD (about 8x the cost).
    bench_specs = ["dnr:density=0.05,attack=none", "dnr:density=0.05"]

    def check_training(self, config) -> None:
        if config.momentum <= 0 and (self.options.prune_fraction > 0 or self.options.mode == "channel"):
            raise ConfigError("method 'dnr': rewiring regrows at the largest SGD momentum, so it needs "
                              f"momentum > 0 (the config has momentum={config.momentum}); set momentum=0.9 "
                              "or prune_fraction=0")

    def validate(self) -> None:
        o = self.options
        if not 0 < o.density <= 1:
            raise ConfigError(f"method 'dnr': density must be in (0, 1], got {o.density}")
        check_adversarial_options(f"method {self.name!r}", o.beta, o.attack, o.eps, o.steps, o.schedule)
        if not 0 <= o.prune_fraction < 1:
            raise ConfigError(f"method 'dnr': prune_fraction must be in [0, 1), got {o.prune_fraction}")
        if o.mode not in MODES:
            raise ConfigError(f"method 'dnr': mode must be one of {', '.join(MODES)}, got {o.mode!r}")
        if o.eval_images < 0:
            raise ConfigError(f"method 'dnr': eval_images must be >= 0 (0 = no attack after training), got {o.eval_images}")
        if o.round_to < 1:
            raise ConfigError(f"method 'dnr': round_to must be a whole number >= 1, got {o.round_to}")
        if o.round_to != 1 and o.mode != "channel":
            raise ConfigError("method 'dnr': round_to applies to mode=channel only")
        self.adversarial = AdversarialLoss(o.beta, o.attack, o.eps, o.steps, o.seed, schedule_settings(o.schedule))

    # -- architecture: a mask buffer per prunable layer (saved with the weights) ----
    def prepare(self, model: nn.Module) -> nn.Module:
        if self.options.mode == "channel":
            return self.prepare_channels(model)
        if self.options.density == 1:
            return model  # dense adversarial training: nothing to mask
        generator = torch.Generator().manual_seed(self.options.seed)
        for _, module in prunable(model):
            weight = module.weight
            keep = keep_count(weight.numel(), self.options.density)
            mask = torch.zeros(weight.numel(), dtype=torch.bool)
            mask[torch.randperm(weight.numel(), generator=generator)[:keep]] = True
            module.register_buffer(MASK, mask.view_as(weight).to(weight.device))
            with torch.no_grad():
                weight.mul_(getattr(module, MASK))
        return model

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return masked_layers(model, MASK)

    # -- training ------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, trainer) -> None:
        apply_masks(trainer.model, MASK)
        if self.options.mode == "channel" and not self.options.widths:
            self.apply_channel_masks(trainer.model)

    def prune_fraction_at(self, epoch: int, epochs: int) -> float:
        return self.options.prune_fraction * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))

    @torch.no_grad()
    def after_epoch(self, trainer, epoch: int) -> dict[str, Any]:
        if self.options.mode == "channel":
            if epoch + 1 < trainer.config.epochs:
                self.rewire_channels(trainer.model, trainer.optimizer,
                                     self.prune_fraction_at(epoch, trainer.config.epochs), epoch)
            return {"dnr_density": {group.name: round(float(mask.float().mean()), 6)
                                    for group, mask in self.channel_masks(trainer.model)},
                    **self.adversarial.figures()}
        layers = self.layers(trainer.model)
        if epoch + 1 < trainer.config.epochs:  # the last epoch ends with the trained mask, no rewiring
            self.rewire(layers, trainer.optimizer, self.prune_fraction_at(epoch, trainer.config.epochs))
        return {"dnr_density": densities(trainer.model, MASK), **self.adversarial.figures()}

    @torch.no_grad()
    def rewire(self, layers: list[tuple[str, nn.Module]], optimizer: torch.optim.Optimizer, fraction: float) -> None:
        momenta, shares = [], []
        pruned_total = 0
        for _, module in layers:
            weight, mask = module.weight, getattr(module, MASK)
            state = optimizer.state.get(weight, {})
            momentum = state.get("momentum_buffer")
            momenta.append(momentum.abs() if momentum is not None else torch.zeros_like(weight))
            # A layer's share of the regrowth: the mean |momentum| of the weights active before this
            # pruning step (the paper's normalised layer momentum), not of the survivors only.
            shares.append(float(momenta[-1][mask].mean()) if mask.any() else 0.0)
            active = int(mask.sum())
            count = int(fraction * active)
            if count == 0:
                continue
            magnitudes = weight.abs().masked_fill(~mask, float("inf")).flatten()
            drop = magnitudes.topk(count, largest=False).indices
            mask.view(-1)[drop] = False
            weight.view(-1)[drop] = 0.0
            pruned_total += count
        if pruned_total == 0:
            return
        capacity = [int((~getattr(mod, MASK)).sum()) for _, mod in layers]
        regrow = distribute(pruned_total, shares, capacity)
        for count, momentum, (_, module) in zip(regrow, momenta, layers):
            if count == 0:
                continue
            mask = getattr(module, MASK)
            scores = momentum.masked_fill(mask, float("-inf")).flatten()  # only zero positions may regrow
            grow = scores.topk(count).indices
            mask.view(-1)[grow] = True
            module.weight.view(-1)[grow] = 0.0  # regrown weights start at zero; their momentum moves them

    # -- channel mode ---------------------------------------------------------
    def prepare_channels(self, model: nn.Module) -> nn.Module:
        graph = channel_graph(model)   # an untraceable model fails here, before training
        if not graph.groups:
            raise ConfigError(f"method 'dnr': {type(model).__name__} has no removable channel group")
        if self.options.widths:  # a finished channel-mode run: the thinner dense model
            return shrink_to_widths(model, parse_widths(self.options.widths))
        self.graph = graph
        generator = torch.Generator().manual_seed(self.options.seed)
        masks = []
        for group in graph.groups:
            keep = rounded_width(group.width, self.options.density, self.options.round_to)
            mask = torch.zeros(group.width, dtype=torch.bool)
            mask[torch.randperm(group.width, generator=generator)[:keep]] = True
            masks.append(mask)
        device = next(model.parameters()).device
        model.register_buffer(CHANNEL_MASK, torch.cat(masks).to(device))
        self.apply_channel_masks(model)
        return model

    def channel_masks(self, model: nn.Module) -> list[tuple]:
        """(group, its mask: a view of the model's buffer) for every group, in graph order."""
        masks = getattr(model, CHANNEL_MASK)
        pieces = masks.split([group.width for group in self.graph.groups])
        return list(zip(self.graph.groups, pieces))

    @torch.no_grad()
    def apply_channel_masks(self, model: nn.Module) -> None:
        for group, mask in self.channel_masks(model):
            if not bool(mask.all()):
                silence_channels(model, group, torch.nonzero(~mask).flatten())

    @torch.no_grad()
    def rewire_channels(self, model: nn.Module, optimizer: torch.optim.Optimizer, fraction: float,
                        epoch: int = 0) -> None:
        """Per group: prune the `fraction` of active channels with the smallest filter norms
        (over every producer) and regrow as many empty channels, re-initialised. Each group
        keeps its channel count, so the MAC budget holds."""
        generator = torch.Generator().manual_seed(self.options.seed * 7919 + epoch)
        for group, mask in self.channel_masks(model):
            active = int(mask.sum())
            count = min(int(fraction * active), int((~mask).sum()))
            if count <= 0:
                continue
            empty = torch.nonzero(~mask).flatten()
            grow = empty[torch.randperm(len(empty), generator=generator)[:count].to(empty.device)]
            norms = filter_norms(model, group, 2).to(mask.device).masked_fill(~mask, float("inf"))
            mask[norms.topk(count, largest=False).indices] = False
            mask[grow] = True
            self.reinitialise(model, optimizer, group, grow.tolist(), generator)
        self.apply_channel_masks(model)

    @staticmethod
    def reinitialise(model: nn.Module, optimizer, group, channels: list[int], generator) -> None:
        """Grown channels start like a fresh layer (zero filters would stay dead behind a ReLU)."""
        for site in group.sites:
            module = model.get_submodule(site.module)
            positions = [p for c in channels for p in site.positions[c]]
            if site.role == "out":
                fresh = torch.empty_like(module.weight[positions])
                nn.init.kaiming_normal_(fresh, mode="fan_out", nonlinearity="relu", generator=generator)
                module.weight[positions] = fresh
                state = optimizer.state.get(module.weight, {})
                if state.get("momentum_buffer") is not None:
                    state["momentum_buffer"][positions] = 0.0
            elif site.role == "norm":
                module.weight[positions], module.bias[positions] = 1.0, 0.0
                module.running_mean[positions], module.running_var[positions] = 0.0, 1.0

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> nn.Module:
        """Channel mode: remove the empty channels; the spec records the widths."""
        if self.options.mode != "channel" or self.options.widths:
            return model
        masks = self.channel_masks(model)
        keep_channels(model, self.graph, {group.name: torch.nonzero(mask).flatten().cpu() for group, mask in masks})
        self.options.widths = "+".join(f"{group.name}:{int(mask.sum())}" for group, mask in masks)
        del model._buffers[CHANNEL_MASK]
        return model
