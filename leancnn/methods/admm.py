"""ADMM-NN joint pruning and quantisation (Ren, Zhang, Wang, Lin, Wang, Zhang, Ma, Lin, Wang,
"ADMM-NN: An Algorithm-Hardware Co-Design Framework of DNNs Using Alternating Direction Method of
Multipliers", ASPLOS 2019).

Each pruned layer i has a constraint set: at most k_i non-zero weights (k_i = `density` x n_i, or
with `allocation=global` the layer's share of the `density` largest magnitudes of all pruned
layers, fixed from the starting weights) and, with
`bits` k > 0, every non-zero weight on a level +-j x s_i (j = 1 .. 2^(k-1) - 1, one scale s_i per
layer; with the zero of a pruned weight that is 2^k - 1 values, a k-bit code; k = 1: +-s_i).
Training runs in two phases:

1. ADMM (the first `prune_at` of the epochs): the loss gains rho/2 ||W_i - Z_i + U_i||^2 per
   layer; every `update_every` steps Z_i = Proj(W_i + U_i) (keep the largest magnitudes, then
   put the survivors on the nearest levels of the best-fitting scale: the joint projection) and
   U_i += W_i - Z_i; rho is multiplied by `growth` at each update, up to `rho_max`, so W is
   pulled ever closer to its constraint set (U, the scaled dual, is divided by the same factor).
   By default both follow the run's length: 32 updates in the phase, rho at rho_max from 3/4 of it.
2. Hard projection at the end of that epoch (W_i = Proj(W_i): mask and scale fixed), then
   retraining with both fixed: the optimizer moves a full-precision latent copy of the kept
   weights (the straight-through estimator) and the layer always holds the latent's nearest
   levels, so the saved model's weights are exactly zero or exactly on their levels. Each
   quantised layer keeps its scale in the buffer `admm_scale`: the saved file states its levels.

The first convolution stays dense and full precision (as in DNR and the paper's experiments:
it reads the image and holds little). Storage is counted by `leancnn.measure` from the weights
themselves: k-bit codes with a relative index (the format of Deep Compression and ADMM-NN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import register_method
from .masking import (PRUNE_MASK, FixedMaskMethod, check_density, densities, global_top_k, keep_count,
                      masked_layers, set_masks, top_k_mask, weight_layers)
from .selection import stem_conv

SCALE = "admm_scale"     # a layer's level spacing s (a 0-d buffer, saved with the weights)
ALLOCATIONS = ("layer", "global")
SCALE_FIT_ROUNDS = 20    # alternations of level assignment and least-squares scale (converges in a few)
UPDATES_PER_PHASE = 32   # Z/U updates in the ADMM phase when update_every is automatic


@dataclass
class ADMMOptions:
    density: float = 0.05      # fraction of the pruned layers' weights kept (0.05 = 20x)
    bits: int = 0              # 0: no quantisation; 1-16: k-bit levels for the kept weights
    rho: float = 1e-3          # initial penalty weight
    growth: float = 0.0        # rho's factor at each Z/U update; 0: the factor that brings rho to
                               # rho_max at 3/4 of the ADMM phase, whatever its length
    rho_max: float = 1.0       # rho stops growing here
    update_every: int = 0      # optimizer steps between Z/U updates; 0: the ADMM phase's steps / 32
    prune_at: float = 0.5      # fraction of the epochs trained with ADMM before the hard projection
    allocation: str = "layer"  # layer: every pruned layer keeps `density`; global: `density` of all pruned
                               # weights, split by one magnitude threshold over the starting weights


def level_count(bits: int) -> int:
    """The largest level index j (levels are +-j x scale): 2^(k-1) - 1, or 1 for k = 1."""
    return max(1, (1 << (bits - 1)) - 1)


def fit_scale(values: torch.Tensor, bits: int) -> float:
    """The scale s minimising sum (v - s q(v))^2 over `values`, q(v) the nearest level index
    (1 .. level_count, signed): alternate assignment and the least-squares s = <|v|, q> / <q, q>,
    starting from s = max|v| / level_count."""
    magnitude = values.abs().double()
    if magnitude.numel() == 0 or float(magnitude.max()) == 0:
        return 1.0
    top = level_count(bits)
    scale = float(magnitude.max()) / top
    for _ in range(SCALE_FIT_ROUNDS):
        q = (magnitude / scale).round().clamp(1, top)
        new_scale = float((magnitude * q).sum() / (q * q).sum())
        if new_scale == scale:
            break
        scale = new_scale
    return scale


def quantize(values: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """Each value on its nearest non-zero level +-j x scale (j = 1 .. level_count; never zero, so a
    kept weight stays kept). Computed as sign x j x scale in the values' dtype: the same
    expression always gives the same float."""
    q = (values.abs() / scale).round().clamp(1, level_count(bits))
    return torch.sign(values) * q * torch.tensor(scale, dtype=values.dtype)


def project(weight: torch.Tensor, keep: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The Euclidean projection onto {at most `keep` non-zeros} and then, with bits > 0, the
    survivors' nearest levels: (projected weight, mask, scale; scale 0 without quantisation)."""
    mask = top_k_mask(weight, keep)
    if not bits:
        return weight * mask, mask, 0.0
    scale = fit_scale(weight[mask], bits)
    projected = torch.zeros_like(weight)
    projected[mask] = quantize(weight[mask], scale, bits)
    return projected, mask, scale


@register_method
class ADMM(FixedMaskMethod):
    """ADMM-regularised pruning towards per-layer targets, jointly with k-bit quantisation
    (Ren et al., ADMM-NN, ASPLOS 2019)."""

    name = "admm"
    Options = ADMMOptions
    test_specs = ["admm:density=0.1,bits=4,update_every=2", "admm:density=0.2,update_every=3,prune_at=0.9"]
    bench_specs = ["admm:density=0.1,bits=8"]
    in_quick_bench = False   # trains from scratch like dense: the full bench has it

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.rho = self.options.rho
        self.projected = False           # phase 2 (mask and levels fixed) has begun
        self.z: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        self.latent: dict[str, torch.Tensor] = {}
        self.targets: dict[str, int] = {}   # weights each pruned layer keeps (allocate)

    def validate(self) -> None:
        o = self.options
        check_density(self.name, o.density)
        if not (o.bits == 0 or 1 <= o.bits <= 16):
            raise ConfigError(f"method 'admm': bits must be 0 (no quantisation) or 1-16, got {o.bits}")
        if not o.rho > 0 or not o.rho_max >= o.rho:
            raise ConfigError(f"method 'admm': need 0 < rho <= rho_max, got rho={o.rho}, rho_max={o.rho_max}")
        if not (o.growth == 0 or o.growth >= 1):
            raise ConfigError(f"method 'admm': growth must be >= 1 (rho only rises) or 0 (automatic), got {o.growth}")
        if o.update_every < 0:
            raise ConfigError(f"method 'admm': update_every must be a number of steps, or 0 (automatic), "
                              f"got {o.update_every}")
        if o.allocation not in ALLOCATIONS:
            raise ConfigError(f"method 'admm': allocation must be one of {', '.join(ALLOCATIONS)}, "
                              f"got {o.allocation!r}")
        if not 0 < o.prune_at <= 1:
            raise ConfigError(f"method 'admm': prune_at must be in (0, 1] (a fraction of the epochs), got {o.prune_at}")

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        stem = stem_conv(model)
        return [(n, m) for n, m in weight_layers(model) if n != stem]

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        if self.options.bits:
            for _, module in self.layers(model):
                module.register_buffer(SCALE, torch.zeros((), dtype=module.weight.dtype))
        return model

    def keep(self, name: str) -> int:
        return self.targets[name]

    @torch.no_grad()
    def allocate(self, model: nn.Module) -> None:
        """Each pruned layer's target (weights kept), fixed from the weights ADMM starts from.
        global: the `density` largest magnitudes of all pruned layers together say how many each
        keeps (at least one), so a small layer a trained model relies on keeps more than a big
        redundant one (lenet5 at 5%: 20% of conv2, 3.5% of the 400k hidden layer, 49% of the
        classifier); meant for a trained model (`leancnn compress`): at initialisation magnitudes
        only mirror fan-in, and a global cut can empty the classifier (magnitude-init's collapse)."""
        layers = masked_layers(model)
        if self.options.allocation == "layer":
            self.targets = {name: keep_count(m.weight.numel(), self.options.density) for name, m in layers}
            return
        total = sum(m.weight.numel() for _, m in layers)
        magnitudes = {name: m.weight.detach().abs() for name, m in layers}
        masks = global_top_k(magnitudes, keep_count(total, self.options.density))
        self.targets = {name: max(1, int(mask.sum())) for name, mask in masks.items()}

    def projection_epoch(self, epochs: int) -> int:
        """The epoch (from 0) at whose end the hard projection happens."""
        return max(0, min(epochs, math.ceil(self.options.prune_at * epochs)) - 1)

    # -- phase 1: ADMM ---------------------------------------------------------
    def schedule(self, steps_per_epoch: int, epochs: int) -> tuple[int, float]:
        """(steps between Z/U updates, rho's factor per update) for a run of `epochs`. Fixed
        values (50 steps, x1.3) suit only one length of training: over 3 epochs of 156 steps they
        left rho at 5e-3 when the projection came (resnet20 at 10%: 61.9%; 79.8% with this one), over 10
        epochs of 469 it sat at rho_max for most of the phase. Automatic: 32 updates in the phase,
        rho geometric from `rho` to `rho_max` over the first 3/4 of them."""
        o = self.options
        phase_steps = max(1, steps_per_epoch * (self.projection_epoch(epochs) + 1))
        every = o.update_every or max(1, phase_steps // UPDATES_PER_PHASE)
        rising = max(1, round(0.75 * (phase_steps // every)))
        return every, o.growth or (o.rho_max / o.rho) ** (1 / rising)

    @torch.no_grad()
    def update_z(self, model: nn.Module) -> None:
        for name, module in masked_layers(model):
            weight = module.weight.detach()
            u = self.u.get(name, torch.zeros_like(weight))
            self.z[name] = project(weight + u, self.keep(name), self.options.bits)[0]
            self.u[name] = u + weight - self.z[name]

    @torch.no_grad()
    def before_training(self, trainer) -> None:
        # The schedule follows from the run's length (also on resume, which calls this too).
        self.update_every, self.growth = self.schedule(len(trainer.loader), trainer.config.epochs)
        if not self.projected and not self.z:   # a fresh run (a resumed one loaded Z and U): Z = Proj(W), U = 0
            self.allocate(trainer.model)
            for name, module in masked_layers(trainer.model):
                self.z[name] = project(module.weight.detach(), self.keep(name), self.options.bits)[0]
                self.u[name] = torch.zeros_like(module.weight.detach())

    def loss(self, trainer, images, labels):
        if self.projected:
            return None
        penalty = sum((module.weight - self.z[name] + self.u[name]).pow(2).sum()
                      for name, module in masked_layers(trainer.model))
        return trainer.loss_fn(trainer.model(images), labels) + self.rho / 2 * penalty

    @torch.no_grad()
    def after_step(self, trainer) -> None:
        if not self.projected:
            if (trainer.state.step + 1) % self.update_every == 0:
                self.update_z(trainer.model)
                self.set_rho(min(self.options.rho_max, self.rho * self.growth))
            return
        for name, module in masked_layers(trainer.model):
            mask = getattr(module, PRUNE_MASK)
            if name in self.latent:  # the step moved the levels' values: move the latent the same way
                latent = self.latent[name]
                latent.add_(module.weight - self.levels(module, latent, mask)).mul_(mask)
                module.weight.copy_(self.levels(module, latent, mask))
            else:
                module.weight.mul_(mask)

    def set_rho(self, rho: float) -> None:
        """A new penalty weight. U is the scaled dual (the multiplier over rho), so it is rescaled by
        old/new rho to keep the multiplier itself unchanged (Boyd et al. 2011, section 3.4.1);
        left as it was, every rise of rho would multiply the dual's pull by the same factor."""
        for name in self.u:
            self.u[name].mul_(self.rho / rho)
        self.rho = rho

    def levels(self, module: nn.Module, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The layer's weight for this latent: its kept entries on their nearest levels."""
        weight = torch.zeros_like(latent)
        weight[mask] = quantize(latent[mask], float(getattr(module, SCALE)), self.options.bits)
        return weight

    # -- phase 2: hard projection, then retraining with mask and levels fixed ----
    @torch.no_grad()
    def hard_project(self, model: nn.Module) -> None:
        masks = {}
        if not self.targets:   # projected with no ADMM phase (`compress --epochs 0`)
            self.allocate(model)
        for name, module in masked_layers(model):
            projected, mask, scale = project(module.weight.detach(), self.keep(name), self.options.bits)
            masks[name] = mask
            if self.options.bits:
                getattr(module, SCALE).fill_(scale)
                # The latent starts at the trained weights (not their levels), so that small steps
                # accumulate until a weight crosses to the next level.
                self.latent[name] = module.weight.detach() * mask
                module.weight.copy_(projected)
        set_masks(model, masks)
        self.projected = True
        self.z, self.u = {}, {}

    def after_epoch(self, trainer, epoch: int):
        if not self.projected and epoch >= self.projection_epoch(trainer.config.epochs):
            self.hard_project(trainer.model)
        figures = {"mask_density": densities(trainer.model), "admm_phase": "retrain" if self.projected else "admm"}
        if not self.projected:
            figures["admm_rho"] = self.rho
            figures["admm_residual"] = round(self.residual(trainer.model), 6)
        return figures

    @torch.no_grad()
    def residual(self, model: nn.Module) -> float:
        """||W - Z|| / ||W|| over the pruned layers: how far the weights still are from their
        constraint sets (falls towards 0 as ADMM converges)."""
        distance = norm = 0.0
        for name, module in masked_layers(model):
            distance += float((module.weight - self.z[name]).pow(2).sum())
            norm += float(module.weight.pow(2).sum())
        return math.sqrt(distance / max(norm, 1e-30))

    def finalize(self, model: nn.Module) -> nn.Module:
        """A run stopped before its projection epoch (or `compress` with no training) is projected
        here: the saved model always satisfies the constraints."""
        if not self.projected and masked_layers(model):
            self.hard_project(model)
        return model

    # -- state that survives a resume -------------------------------------------
    def state_dict(self):
        return {"rho": self.rho, "projected": self.projected, "targets": self.targets}

    def load_state_dict(self, state) -> None:
        self.rho = float(state.get("rho", self.options.rho))
        self.projected = bool(state.get("projected", False))
        self.targets = {name: int(keep) for name, keep in state.get("targets", {}).items()}

    def state_tensors(self):
        tensors = {f"z.{k}": v for k, v in self.z.items()}
        tensors.update({f"u.{k}": v for k, v in self.u.items()})
        tensors.update({f"latent.{k}": v for k, v in self.latent.items()})
        return tensors

    def load_state_tensors(self, tensors) -> None:
        groups = {"z": {}, "u": {}, "latent": {}}
        for key, value in tensors.items():
            kind, name = key.split(".", 1)
            groups[kind][name] = value
        self.z, self.u, self.latent = groups["z"], groups["u"], groups["latent"]
