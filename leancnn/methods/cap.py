"""The `cap` method: cascaded projection (Minnehan, Savakis, "Cascaded
Projection: End-to-End Network Compression and Acceleration", CVPR 2019).

For each removable channel group (see leancnn.methods.channels), batch norm is
folded into the producing convolution, and an orthonormal projection P (C x r)
compresses its output: the producer keeps r filters, P^T W, and the consumer
reads r channels, W' P. The result is an ordinary thinner dense model.

1. P starts from the top-r principal directions of the producer's outputs on
   a sample of training data, rotated within that subspace to lie closest to r
   of the layer's own channels (a rotation across the ReLU otherwise breaks the
   network before any optimisation; at full rank the start is the identity).
2. All P are optimised jointly, the rest of the network frozen, on
   cross-entropy plus `gamma` times the squared error of every consumer's
   output against the same consumer in the unprojected network with its batch
   norms folded (next-layer feature reconstruction; each layer's error relative
   to its target's mean square, so gamma weighs every layer the same).
   P stays on the Stiefel manifold: the gradient is projected onto the tangent
   space, the step taken, and P retracted by the SVD (P = U V^T).
   With `relax=true` (the paper's full method, "projection & kernel relax") the
   producers' and consumers' kernels are optimised with the projections, by plain
   gradient steps (`relax_lr`, by default a tenth of the projections' step: at the same
   size resnet20's kernels diverged within 100 steps); otherwise only the projections move.
   A step size whose loss turns non-finite is abandoned and scored as failed.
3. Ranks meet the MAC target either uniformly (the same kept fraction for every
   group) or by energy (each group keeps the smallest rank holding a fraction
   of its feature energy, the fraction chosen to meet the target).
Residual networks: only channels inside a block are compressed; block outputs
keep their width. Details the paper leaves open (unconfirmed): the step size
(lr=0 tries LR_CHOICES and keeps the best on held-out training images), the
number of optimisation steps, gamma, and the ReLU/pooling between producer
and consumer acting on the r projected channels.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..data import BatchLoader
from ..deploy import folded_weight_and_bias
from ..errors import ConfigError
from ..measure import count
from ..surgery import replace_module
from .base import Method, register_method
from .channels import ChannelGroup, channel_groups, largest_fraction, shrink_to_widths
from .l1prune import parse_widths


# Step sizes tried when lr=0, kept by accuracy on held-out training images: a size that
# suits residual networks (0.01) diverged on a 13-layer VGG chain, whose best was 0.001.
LR_CHOICES = (0.01, 0.003, 0.001)


@dataclass
class CaPOptions:
    macs: float = 0.5                               # target fraction of the dense MACs, in (0, 1]
    ranks: Literal["uniform", "energy"] = "uniform"
    steps: int = 100                                # joint projection-optimisation steps
    lr: float = 0.0                                 # step size on the manifold; 0 = choose from LR_CHOICES
    gamma: float = 1.0                              # weight of next-layer feature reconstruction
    relax: bool = False                             # also update the compressed kernels (projection & kernel relax)
    relax_lr: float = 0.0                           # kernels' step size with relax; 0 = a tenth of the projections'
    sample_batches: int = 8                         # batches of 128 images for the principal directions
    widths: str = ""                                # set by compress, to rebuild the architecture


@torch.no_grad()
def fold_batchnorm(block: nn.Sequential) -> None:
    """conv-bn -> conv with bias, bn set to the identity (eval statistics)."""
    conv, norm = block[0], block[1]
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, bias=True).to(conv.weight.device)
    weight, bias = folded_weight_and_bias(conv, norm)
    folded.weight.copy_(weight)
    folded.bias.copy_(bias)
    block[0] = folded.train(conv.training)
    identity_norm(norm)


@torch.no_grad()
def identity_norm(norm: nn.BatchNorm2d) -> None:
    norm.weight.fill_(1.0)
    norm.bias.zero_()
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0 - norm.eps)  # (x - 0) / sqrt(1 - eps + eps) = x


class Compress(nn.Module):
    def __init__(self, projection: nn.Parameter) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, r, H, W]
        return torch.einsum("nchw,cr->nrhw", x, self.projection)


class Expand(nn.Module):
    def __init__(self, projection: nn.Parameter) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, r, ...] -> [N, C, ...]
        if x.dim() == 2:
            return x @ self.projection.T
        return torch.einsum("nrhw,cr->nchw", x, self.projection)


def retract(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns: U V^T of the SVD."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def stiefel_step(projection: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """Project the gradient onto the tangent space at P, step, retract."""
    inner = projection.T @ grad
    tangent = grad - projection @ ((inner + inner.T) / 2)
    return retract(projection - lr * tangent)


def insert_projections(model: nn.Module, groups: list[ChannelGroup], projections: list[nn.Parameter]) -> nn.Module:
    """The projected network, unmerged: producer conv -> Compress; Expand -> consumer."""
    for group, projection in zip(groups, projections):
        block = model.get_submodule(group.producer)
        block[0] = nn.Sequential(block[0], Compress(projection))
        block[1] = nn.Identity()  # folded: the identity
        replace_module(model, group.consumer, nn.Sequential(Expand(projection), model.get_submodule(group.consumer)))
    return model


@torch.no_grad()
def merge_projections(model: nn.Module, groups: list[ChannelGroup], projections: list[torch.Tensor]) -> nn.Module:
    """Producer keeps P^T W (and P^T b); the consumer reads W' P. `model` has folded batch norms."""
    for group, projection in zip(groups, projections):
        block = model.get_submodule(group.producer)
        conv = block[0]
        rank = projection.shape[1]
        # The same layer types as before (bias-free conv + batch norm), so the saved run rebuilds
        # from its widths alone: the folded bias lives in the identity batch norm's shift.
        merged = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                           bias=False).to(conv.weight.device)
        merged.weight.copy_(torch.einsum("cr,cikl->rikl", projection, conv.weight))
        norm = nn.BatchNorm2d(rank, eps=block[1].eps, momentum=block[1].momentum).to(conv.weight.device)
        identity_norm(norm)
        if conv.bias is not None:
            norm.bias.copy_(projection.T @ conv.bias)
        block[0], block[1] = merged.train(conv.training), norm.train(block[1].training)
        consumer = model.get_submodule(group.consumer)
        if isinstance(consumer, nn.Linear):
            new = nn.Linear(rank, consumer.out_features, bias=consumer.bias is not None).to(conv.weight.device)
            new.weight.copy_(consumer.weight @ projection)
        else:
            new = nn.Conv2d(rank, consumer.out_channels, consumer.kernel_size, consumer.stride, consumer.padding,
                            consumer.dilation, bias=consumer.bias is not None).to(conv.weight.device)
            new.weight.copy_(torch.einsum("oikl,ir->orkl", consumer.weight, projection))
        if consumer.bias is not None:
            new.bias.copy_(consumer.bias)
        replace_module(model, group.consumer, new.train(consumer.training))
    return model


@torch.no_grad()
def principal_directions(model: nn.Module, groups: list[ChannelGroup], batches: list[torch.Tensor]):
    """Per group: eigenvectors (columns, by falling eigenvalue) and eigenvalues of the producer outputs' covariance."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for group in groups:
        conv = model.get_submodule(group.producer)[0]

        def hook(mod, args, out, name=group.producer):
            flat = out.transpose(0, 1).reshape(out.shape[1], -1).double()
            sums[name] = sums.get(name, 0) + flat @ flat.T  # uncentred: the projection must keep the mean too
        hooks.append(conv.register_forward_hook(hook))
    model.eval()
    for images in batches:
        model(images)
    for h in hooks:
        h.remove()
    result = []
    for group in groups:
        values, vectors = torch.linalg.eigh(sums[group.producer])
        result.append((vectors.flip(1).float(), values.flip(0).clamp_min(0).float()))
    return result


def aligned_basis(directions: torch.Tensor, rank: int) -> torch.Tensor:
    """An orthonormal basis of the top-`rank` principal subspace, rotated (orthogonal
    Procrustes) to lie as close as possible to `rank` of the layer's own channels:
    those the subspace holds best (largest leverage). ReLU and max-pooling commute
    with channel selections, not with arbitrary rotations, so this basis keeps the
    network working before the joint optimisation; at full rank it is the identity."""
    basis = directions[:, :rank]
    leverage = (basis * basis).sum(dim=1)
    channels = leverage.topk(rank).indices.sort().values
    selection = torch.zeros_like(basis)
    selection[channels, torch.arange(rank)] = 1.0
    return basis @ retract(basis.T @ selection)


def choose_ranks(model: nn.Module, groups: list[ChannelGroup], spectra, options: CaPOptions,
                 input_shape: tuple[int, ...]) -> list[int]:
    widths = [model.get_submodule(g.producer)[0].out_channels for g in groups]
    target = options.macs * count(model, input_shape).macs_dense

    def ranks_for(level: float) -> list[int]:
        if options.ranks == "uniform":
            return [max(1, math.ceil(level * w)) for w in widths]
        ranks = []
        for (_, values), width in zip(spectra, widths):
            energy = values.cumsum(0) / values.sum().clamp_min(1e-12)
            ranks.append(min(width, max(1, int((energy < level).sum()) + 1)))
        return ranks

    def macs(ranks: list[int]) -> int:
        thin = copy.deepcopy(model)
        shrink_to_widths(thin, {g.producer: r for g, r in zip(groups, ranks)})
        return count(thin, input_shape).macs_dense

    ranks = ranks_for(largest_fraction(lambda level: macs(ranks_for(level)) <= target))
    if macs(ranks) > target:
        raise ConfigError(f"method 'cap': macs={options.macs} is below what compressing channels can reach")
    return ranks


@register_method
class CaP(Method):
    """Cascaded projection to a MAC budget: a thinner dense network."""

    name = "cap"
    Options = CaPOptions
    test_specs = ["cap:macs=0.5,steps=3,lr=0.01", "cap:macs=0.5,ranks=energy,steps=3,lr=0.01,relax=true"]
    post_training = True

    def validate(self) -> None:
        o = self.options
        if not 0 < o.macs <= 1:
            raise ConfigError(f"method 'cap': macs must be in (0, 1] (a fraction of the dense MACs), got {o.macs}")
        if o.steps < 0 or o.lr < 0 or o.gamma < 0 or o.sample_batches < 1 or o.relax_lr < 0:
            raise ConfigError("method 'cap': steps >= 0, lr >= 0 (0 = chosen), relax_lr >= 0, gamma >= 0 and "
                              "sample_batches >= 1 are required")

    def prepare(self, model: nn.Module) -> nn.Module:
        if not self.options.widths:
            raise ConfigError("method 'cap' needs a trained model: use `leancnn compress RUN --method cap:macs=0.5`")
        return shrink_to_widths(model, parse_widths(self.options.widths))

    def compress(self, model, context):

        groups = channel_groups(model)  # unknown layouts fail here, before anything changes
        shape = context.dataset.input_shape
        folded = copy.deepcopy(model).eval()
        for group in groups:
            fold_batchnorm(folded.get_submodule(group.producer))
        loader = BatchLoader(context.dataset.train_images, context.dataset.train_labels, 128, shuffle=True,
                             seed=context.config.seed)
        sample = []
        for images, labels in loader:
            sample.append((images, labels))
            if len(sample) >= max(self.options.sample_batches, 1):
                break
        spectra = principal_directions(folded, groups, [images for images, _ in sample])
        ranks = choose_ranks(model, groups, spectra, self.options, shape)
        best = None
        for lr in ([self.options.lr] if self.options.lr > 0 else LR_CHOICES):
            projections = [nn.Parameter(aligned_basis(vectors, rank)) for (vectors, _), rank in zip(spectra, ranks)]
            optimised = self.optimise(folded, groups, projections, loader, lr)
            if optimised is None:   # the loss turned non-finite at this step size
                context.log(f"cap: step size {lr}: diverged")
                continue
            merged = merge_projections(optimised, groups, [p.detach() for p in projections])
            accuracy = context.accuracy(merged) if self.options.lr == 0 else 0.0
            if best is None or accuracy > best[0]:
                best = (accuracy, lr, merged)
            if self.options.lr == 0:
                context.log(f"cap: step size {lr}: {100 * accuracy:.2f}% on held-out training images")
        if best is None:
            raise ConfigError(f"method 'cap': the projection optimisation diverged at every step size tried "
                              f"({', '.join(map(str, [self.options.lr] if self.options.lr > 0 else LR_CHOICES))}); "
                              f"give a smaller lr= (or relax_lr=)")
        _, lr, merged = best
        widths = "+".join(f"{g.producer}:{r}" for g, r in zip(groups, ranks))
        context.notes["cap_ranks"] = dict(zip([g.producer for g in groups], ranks))
        context.notes["cap_lr"] = lr
        return merged, CaP(CaPOptions(**{**self.options.__dict__, "lr": lr, "widths": widths}))

    def optimise(self, folded: nn.Module, groups: list[ChannelGroup], projections: list[nn.Parameter],
                 loader, lr: float) -> nn.Module | None:
        """Optimise `projections` in place; returns the folded network the projections are merged
        into (a copy, with the relaxed kernels when `relax`), or None if the loss turned non-finite."""
        if self.options.steps == 0:
            return copy.deepcopy(folded)
        for projection in projections:
            projection.requires_grad_(True)
        objective = Reconstruction(folded, groups, projections, relax=self.options.relax)
        trained = projections + objective.kernels
        kernel_lr = self.options.relax_lr or lr / 10
        step = 0
        epoch = 0
        try:
            while step < self.options.steps:
                loader.set_epoch(epoch)
                for images, labels in loader:
                    logits, reconstruction = objective(images)
                    loss = nn.functional.cross_entropy(logits, labels) + self.options.gamma * reconstruction
                    if not torch.isfinite(loss):
                        return None
                    grads = torch.autograd.grad(loss, trained)
                    with torch.no_grad():
                        for projection, grad in zip(projections, grads):
                            projection.copy_(stiefel_step(projection, grad, lr))
                        for kernel, grad in zip(objective.kernels, grads[len(projections):]):
                            kernel.sub_(kernel_lr * grad)
                    step += 1
                    if step >= self.options.steps:
                        break
                epoch += 1
        finally:
            objective.close()
        return objective.relaxed()


class Reconstruction:
    """CaP's next-layer feature reconstruction: the projected network's logits, and the sum over
    groups of each consumer's squared output error against the same consumer in the folded
    network (the function the original computes, with its batch norms folded as the projected
    side has them), divided by that target's mean square so that every layer weighs the same
    whatever its size and scale. At full-rank identity projections it is exactly 0.
    With `relax`, the producers' and consumers' kernels (`kernels`) are trained too."""

    def __init__(self, folded: nn.Module, groups: list[ChannelGroup], projections: list[torch.Tensor],
                 relax: bool = False) -> None:
        self.reference = folded
        self.projected = copy.deepcopy(folded)
        # The producers' and consumers' own layers, found before the projections wrap them (in a
        # chain a consumer is also the next producer, whose wrapped output is already compressed).
        consumers = [self.projected.get_submodule(g.consumer) for g in groups]
        self.layers = {g.consumer: module for g, module in zip(groups, consumers)}
        self.layers.update({f"{g.producer}.0": self.projected.get_submodule(g.producer)[0] for g in groups})
        insert_projections(self.projected, groups, projections).eval()
        kept = {id(p) for p in projections}
        self.kernels: list[nn.Parameter] = []
        if relax:
            unique = {id(p): p for layer in self.layers.values() for p in layer.parameters()}
            self.kernels = list(unique.values())
            kept |= set(unique)
        for parameter in self.projected.parameters():
            if id(parameter) not in kept:
                parameter.requires_grad_(False)
        self.targets: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.hooks = [folded.get_submodule(g.consumer).register_forward_hook(
            lambda m, a, out, n=g.consumer: self.targets.__setitem__(n, out.detach())) for g in groups]
        self.hooks += [module.register_forward_hook(lambda m, a, out, n=g.consumer: self.outputs.__setitem__(n, out))
                       for g, module in zip(groups, consumers)]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            self.reference.eval()(images)
        logits = self.projected(images)
        terms = [((self.outputs[n] - target) ** 2).mean() / (target ** 2).mean().clamp_min(1e-12)
                 for n, target in self.targets.items()]
        return logits, sum(terms)

    def relaxed(self) -> nn.Module:
        """A copy of the folded network holding the (possibly relaxed) kernels of the projected side."""
        model = copy.deepcopy(self.reference)
        for name, layer in self.layers.items():
            model.get_submodule(name).load_state_dict(layer.state_dict())
        return model

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
