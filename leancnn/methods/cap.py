"""The `cap` method: cascaded projection (Minnehan, Savakis, "Cascaded
Projection: End-to-End Network Compression and Acceleration", CVPR 2019).

For each channel group of the traced channel graph (leancnn.methods.channel_graph) that a
projection can merge into (`ChannelGraph.projectable`: one producing convolution, its batch
norm, and consumers that read the group whole), batch norm is folded into the producing
convolution, and an orthonormal projection P (C x r) compresses its output: the producer keeps
r filters, P^T W, and the consumers read r channels, W' P. The result is an ordinary thinner
dense model. Groups a rotation cannot cross (channels tied by residual additions, or passing a
depthwise layer) are, with `coupled=select` (or `auto`, when the projectable groups alone cannot
meet the target), reduced by choosing r of their channels: those the group's principal subspace
holds best (the same leverage that starts the projections), not optimised further.

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
   of its feature energy, the fraction chosen to meet the target); then each
   group, widest first, grows by one while the target holds.
Residual networks: the graph finds that only channels inside a block are projectable (a block's
output is tied to its shortcut by the addition). Details the paper leaves open (unconfirmed): the step size
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
from ..surgery import replace_module
from .base import Method, register_method
from .channel_graph import ChannelGraph, ChannelGroup, channel_graph
from .channels import (fill_to_budget, group_widths, keep_channels, largest_fraction, shrink_to_widths,
                       transform_channels, width_macs)
from .l1prune import parse_widths

COUPLED = ("auto", "keep", "select")


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
    coupled: str = "auto"                           # groups no projection merges into: keep, select, or auto
                                                    # (select only if the projectable ones miss the target)
    widths: str = ""                                # set by compress, to rebuild the architecture


@torch.no_grad()
def fold_batchnorm(model: nn.Module, conv_name: str, norm_name: str | None) -> None:
    """conv-bn -> conv with bias, bn set to the identity (eval statistics); a conv with no batch
    norm after it gains a (zero) bias if it has none, so every folded producer has one."""
    conv = model.get_submodule(conv_name)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, bias=True).to(conv.weight.device)
    if norm_name is None:
        folded.weight.copy_(conv.weight)
        folded.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(folded.bias))
    else:
        norm = model.get_submodule(norm_name)
        weight, bias = folded_weight_and_bias(conv, norm)
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
        identity_norm(norm)
    replace_module(model, conv_name, folded.train(conv.training))


def fold_groups(model: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup]) -> nn.Module:
    for group in groups:
        fold_batchnorm(model, group.producer, graph.norm_after(group.producer) if group.role("norm") else None)
    return model


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
    """The nearest matrix with orthonormal columns: U V^T of the SVD (in float64 where float32's
    divide-and-conquer SVD does not converge: repeated singular values, as the principal
    directions of an untrained or dead layer give)."""
    try:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return (u @ vh).to(matrix.dtype)
    return u @ vh


def stiefel_step(projection: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """Project the gradient onto the tangent space at P, step, retract."""
    inner = projection.T @ grad
    tangent = grad - projection @ ((inner + inner.T) / 2)
    return retract(projection - lr * tangent)


def insert_projections(model: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup],
                       projections: list[nn.Parameter]) -> nn.Module:
    """The projected network, unmerged: producer conv -> Compress; Expand -> each consumer."""
    for group, projection in zip(groups, projections):
        replace_module(model, group.producer, nn.Sequential(model.get_submodule(group.producer), Compress(projection)))
        for norm in group.role("norm"):
            replace_module(model, norm.module, nn.Identity())  # folded: the identity
        for consumer in group.consumers:
            replace_module(model, consumer.module,
                           nn.Sequential(Expand(projection), model.get_submodule(consumer.module)))
    return model


@torch.no_grad()
def merge_projections(model: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup],
                      projections: list[torch.Tensor], original: nn.Module) -> nn.Module:
    """Producers keep P^T W (and P^T b), consumers read W' P (leancnn.methods.channels'
    transform, so a layer that consumes one group and produces the next gets both). `model` has
    folded batch norms; `original` (unfolded, the same graph) gives the layer types to keep: a
    bias-free convolution and its batch norm stay so (the folded bias moves to the identity
    norm's shift), so the saved run rebuilds from its widths alone."""
    transform_channels(model, graph, {g.name: p for g, p in zip(groups, projections)})
    for group in groups:
        conv = model.get_submodule(group.producer)
        if original.get_submodule(group.producer).bias is not None:
            continue
        if group.role("norm"):
            model.get_submodule(graph.norm_after(group.producer)).bias.copy_(conv.bias)
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, bias=False).to(conv.weight.device)
        plain.weight.copy_(conv.weight)
        replace_module(model, group.producer, plain.train(conv.training))
    return model


@torch.no_grad()
def principal_directions(model: nn.Module, groups: list[ChannelGroup], batches: list[torch.Tensor]):
    """Per group: eigenvectors (columns, by falling eigenvalue) and eigenvalues of the covariance
    of what flows on the group's channels: the output of its first batch norm, or of its first
    producer where it has none."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for group in groups:
        site = (group.role("norm") or group.producers)[0]
        index = torch.tensor([positions[0] for positions in site.positions])

        def hook(mod, args, out, name=group.name, index=index):
            picked = out.index_select(1, index.to(out.device))
            flat = picked.transpose(0, 1).reshape(picked.shape[1], -1).double()
            sums[name] = sums.get(name, 0) + flat @ flat.T  # uncentred: the projection must keep the mean too
        hooks.append(model.get_submodule(site.module).register_forward_hook(hook))
    model.eval()
    for images in batches:
        model(images)
    for h in hooks:
        h.remove()
    result = []
    for group in groups:
        values, vectors = torch.linalg.eigh(sums[group.name])
        result.append((vectors.flip(1).float(), values.flip(0).clamp_min(0).float()))
    return result


def leverage_channels(directions: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank` channels the top-`rank` principal subspace holds best (largest leverage), in order."""
    basis = directions[:, :rank]
    return (basis * basis).sum(dim=1).topk(rank).indices.sort().values


def aligned_basis(directions: torch.Tensor, rank: int) -> torch.Tensor:
    """An orthonormal basis of the top-`rank` principal subspace, rotated (orthogonal
    Procrustes) to lie as close as possible to `rank` of the layer's own channels:
    those the subspace holds best (largest leverage). ReLU and max-pooling commute
    with channel selections, not with arbitrary rotations, so this basis keeps the
    network working before the joint optimisation; at full rank it is the identity."""
    basis = directions[:, :rank]
    channels = leverage_channels(directions, rank)
    selection = torch.zeros_like(basis)
    selection[channels, torch.arange(rank)] = 1.0
    return basis @ retract(basis.T @ selection)


def choose_ranks(model: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup], spectra,
                 options: CaPOptions, input_shape: tuple[int, ...]) -> list[int] | None:
    """Ranks of `groups` meeting the MAC target (None if none do)."""
    widths = [g.width for g in groups]

    def ranks_for(level: float) -> list[int]:
        if options.ranks == "uniform":
            return [max(1, math.ceil(level * w)) for w in widths]
        ranks = []
        for (_, values), width in zip(spectra, widths):
            energy = values.cumsum(0) / values.sum().clamp_min(1e-12)
            ranks.append(min(width, max(1, int((energy < level).sum()) + 1)))
        return ranks

    thin_macs = width_macs(model, graph, input_shape)
    target = options.macs * thin_macs({})   # {}: every group whole, the model's own MACs

    def macs(ranks: list[int]) -> int:
        return thin_macs({g.name: r for g, r in zip(groups, ranks)})

    if not groups:
        return [] if thin_macs({}) <= target else None
    ranks = ranks_for(largest_fraction(lambda level: macs(ranks_for(level)) <= target))
    if macs(ranks) > target:
        return None
    return fill_to_budget(ranks, widths, lambda trial: macs(trial) <= target)


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
        if o.coupled not in COUPLED:
            raise ConfigError(f"method 'cap': coupled must be one of {', '.join(COUPLED)}, got {o.coupled!r}")
        if o.steps < 0 or o.lr < 0 or o.gamma < 0 or o.sample_batches < 1 or o.relax_lr < 0:
            raise ConfigError("method 'cap': steps >= 0, lr >= 0 (0 = chosen), relax_lr >= 0, gamma >= 0 and "
                              "sample_batches >= 1 are required")

    def prepare(self, model: nn.Module) -> nn.Module:
        if not self.options.widths:
            raise ConfigError("method 'cap' needs a trained model: use `leancnn compress RUN --method cap:macs=0.5`")
        return shrink_to_widths(model, parse_widths(self.options.widths))

    def compress(self, model, context):
        shape = context.dataset.input_shape
        example = torch.zeros(1, *shape)
        graph = channel_graph(model, example)   # an untraceable model fails here, before anything changes
        projectable = [g for g in graph.groups if graph.projectable(g)]
        coupled = [g for g in graph.groups if not graph.projectable(g)]
        loader = BatchLoader(context.dataset.train_images, context.dataset.train_labels, 128, shuffle=True,
                             seed=context.config.seed)
        sample = []
        for images, labels in loader:
            sample.append((images, labels))
            if len(sample) >= max(self.options.sample_batches, 1):
                break
        folded = fold_groups(copy.deepcopy(model).eval(), graph, projectable)
        sample_images = [images for images, _ in sample]
        measured = projectable + ([] if self.options.coupled == "keep" else coupled)
        spectrum_of = {g.name: s for g, s in zip(measured, principal_directions(folded, measured, sample_images))}
        chosen = projectable + (coupled if self.options.coupled == "select" else [])
        ranks = choose_ranks(model, graph, chosen, [spectrum_of[g.name] for g in chosen], self.options, shape)
        if ranks is None and self.options.coupled == "auto" and coupled:
            context.log(f"cap: the {len(projectable)} projectable channel groups cannot reach macs="
                        f"{self.options.macs} alone; also selecting channels in {len(coupled)} coupled groups")
            chosen = projectable + coupled
            ranks = choose_ranks(model, graph, chosen, [spectrum_of[g.name] for g in chosen], self.options, shape)
        if ranks is None:
            raise ConfigError(f"method 'cap': macs={self.options.macs} is below what compressing channels can reach"
                              + ("" if self.options.coupled != "keep" or not coupled else
                                 f" with coupled=keep ({len(coupled)} coupled groups keep their width)"))
        rank_of = {g.name: r for g, r in zip(chosen, ranks)}
        selections = {g.name: leverage_channels(spectrum_of[g.name][0], rank_of[g.name])
                      for g in chosen if not graph.projectable(g) and rank_of[g.name] < g.width}
        if selections:   # coupled groups: keep the chosen channels; the projections act on what is left
            model = keep_channels(model, graph, selections)
            graph = channel_graph(model, example)
            projectable = [g for g in graph.groups if graph.projectable(g)]
            folded = fold_groups(copy.deepcopy(model).eval(), graph, projectable)
            spectra = principal_directions(folded, projectable, sample_images)
        else:
            spectra = [spectrum_of[g.name] for g in projectable]
        ranks = [rank_of.get(g.name, g.width) for g in projectable]
        best = None if projectable else (0.0, 0.0, model)   # nothing to project: the selection is all
        for lr in ([self.options.lr] if self.options.lr > 0 else LR_CHOICES) if projectable else ():
            projections = [nn.Parameter(aligned_basis(vectors, rank)) for (vectors, _), rank in zip(spectra, ranks)]
            optimised = self.optimise(folded, graph, projectable, projections, loader, lr)
            if optimised is None:   # the loss turned non-finite at this step size
                context.log(f"cap: step size {lr}: diverged")
                continue
            merged = merge_projections(optimised, graph, projectable, [p.detach() for p in projections], model)
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
        context.notes["cap_ranks"] = rank_of
        context.notes["cap_selected_groups"] = sorted(selections)
        context.notes["cap_lr"] = lr
        return merged, CaP(CaPOptions(**{**self.options.__dict__, "lr": lr,
                                         "widths": group_widths(merged, example)}))

    def optimise(self, folded: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup],
                 projections: list[nn.Parameter], loader, lr: float) -> nn.Module | None:
        """Optimise `projections` in place; returns the folded network the projections are merged
        into (a copy, with the relaxed kernels when `relax`), or None if the loss turned non-finite."""
        if self.options.steps == 0:
            return copy.deepcopy(folded)
        for projection in projections:
            projection.requires_grad_(True)
        objective = Reconstruction(folded, graph, groups, projections, relax=self.options.relax)
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

    def __init__(self, folded: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup],
                 projections: list[torch.Tensor], relax: bool = False) -> None:
        self.reference = folded
        self.projected = copy.deepcopy(folded)
        # The producers' and consumers' own layers, found before the projections wrap them (in a
        # chain a consumer is also the next producer, whose wrapped output is already compressed).
        consumer_names = list(dict.fromkeys(site.module for g in groups for site in g.consumers))
        consumers = [self.projected.get_submodule(name) for name in consumer_names]
        self.layers = dict(zip(consumer_names, consumers))
        self.layers.update({g.producer: self.projected.get_submodule(g.producer) for g in groups})
        insert_projections(self.projected, graph, groups, projections).eval()
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
        self.hooks = [folded.get_submodule(name).register_forward_hook(
            lambda m, a, out, n=name: self.targets.__setitem__(n, out.detach())) for name in consumer_names]
        self.hooks += [module.register_forward_hook(lambda m, a, out, n=name: self.outputs.__setitem__(n, out))
                       for name, module in zip(consumer_names, consumers)]

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
