"""The `dynamic` method: one network trained so that its sub-networks, each keeping a prefix
of every layer's channels (a non-uniform number per layer), are accurate; after training a
search picks the sub-networks to switch among at run time.

"Run-time dynamic DNN structure via non-uniform channel selection" (the seed page); the
training recipe of slimmable and universally slimmable networks (Yu et al., ICLR 2019 and
ICCV 2019): per step the largest sub-network on the labels, the smallest and `random`
random non-uniform ones on the largest one's soft outputs (the sandwich rule and in-place
distillation); the narrower losses join the largest one's as their mean (`narrower=mean`,
the default: the published rule sums them, `narrower=sum`, which in 5-epoch trainings left
every sub-network 1.4-1.7 points below the same widths trained alone); batch-norm statistics
re-estimated per chosen sub-network after training.

The channels that may narrow are the channel groups of the traced channel graph
(leancnn.methods.channel_graph) that one convolution produces and every layer on them holds
whole, in its order (`ChannelGraph.sliceable`: VGG chains' convolutions, the inside of residual
blocks, MobileNetV2's expansions through their depthwise layers; not the channels residual
additions tie): the same prefix slicing that `shrink_to_widths` does, so a sub-network equals
the plain thinner model built from the sliced weights (`subnet_model`).

After the last epoch, `candidates` sub-networks (uniform widths and random non-uniform ones)
are measured: MACs, latency at batch 64 on this machine, and top-1 on `holdout` training images
kept out of training (each after its own batch-norm re-estimation). For each MAC target, of the
candidates within 10% below it (and 2% above), the most accurate one on their accuracy/latency
front is kept (`front=macs`: against MACs instead). The chosen widths and their statistics are buffers of the model (saved with it).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..layers.dynamic import DynamicBatchNorm2d, DynamicConv2d, make_dynamic, make_plain
from ..measure import count
from ..measure.latency import measure_latency
from ..measure.pareto import pareto_front
from ..measure.robustness import clean_accuracy, unit_float
from .base import Method, register_method
from .channel_graph import channel_graph
from .channels import shrink_to_widths

WIDTHS = "dynamic_widths"      # root buffer [sub-networks, groups]: the chosen widths (0: not chosen yet)
MACS_SLACK = 0.02              # a candidate may exceed its MAC target by this fraction
MACS_BAND = 0.1                # ... and fall below it by this much (a fraction of the full network's MACs)
SEARCH_BATCH = 64              # the batch latency is measured at (what a server batches)
FRONTS = {"latency": "latency_ms", "macs": "macs"}
NARROWER = ("sum", "mean")


def parse_fractions(text: str, owner: str) -> list[float]:
    try:
        values = [float(item) for item in text.split("+") if item]
    except ValueError:
        raise ConfigError(f"{owner}: targets are MAC fractions joined by '+' (1+0.7+0.5), got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise ConfigError(f"{owner}: every target must be in (0, 1], got {text!r}")
    return sorted(set(values), reverse=True)


@dataclass
class DynamicOptions:
    targets: str = "1+0.7+0.5+0.35"   # MAC fractions (of the full network) of the sub-networks kept
    smallest: float = 0.25            # the narrowest width fraction a layer trains at
    random: int = 2                   # random sub-networks per step beside the largest and the smallest
    distill: bool = True              # the narrower ones learn the largest one's soft outputs
    narrower: str = "mean"            # how the narrower passes' losses join the largest one's: their
    #                                   mean (measured better in short trainings: docs/methods/dynamic.md)
    #                                   or their sum (the sandwich rule as published)
    candidates: int = 48              # sub-networks the search measures
    holdout: int = 2000               # training images kept out of training for the search
    recalibrate: int = 2000           # images batch-norm statistics are re-estimated on, per sub-network
    seed: int = 0                     # the random sub-networks (per step) and the search's candidates
    front: str = "latency"            # the front the search keeps: accuracy against measured latency, or
    #                                   against MACs (reproducible: a timing does not repeat exactly)


@register_method
class Dynamic(Method):
    """Run-time dynamic sub-networks by non-uniform channel prefixes (sandwich rule, in-place distillation)."""

    name = "dynamic"
    Options = DynamicOptions
    # front=macs: the contract compares a resumed run with a straight one, and measured latencies differ.
    test_specs = ["dynamic:targets=1+0.5,random=1,candidates=4,holdout=32,recalibrate=32,front=macs"]
    bench_specs = ["dynamic"]
    in_quick_bench = False   # 4 passes a step, and a search after training

    def validate(self) -> None:
        o, owner = self.options, "method 'dynamic'"
        self.targets = parse_fractions(o.targets, owner)
        if not 0 < o.smallest <= 1:
            raise ConfigError(f"{owner}: smallest (a width fraction) must be in (0, 1], got {o.smallest}")
        for field_name in ("random", "holdout", "recalibrate"):
            if getattr(o, field_name) < 0:
                raise ConfigError(f"{owner}: {field_name} must be >= 0, got {getattr(o, field_name)}")
        if o.candidates < 1:
            raise ConfigError(f"{owner}: candidates must be >= 1, got {o.candidates}")
        if o.narrower not in NARROWER:
            raise ConfigError(f"{owner}: narrower must be one of {', '.join(NARROWER)}, got {o.narrower!r}")
        if o.front not in FRONTS:
            raise ConfigError(f"{owner}: front must be one of {', '.join(FRONTS)}, got {o.front!r}")

    # -- architecture ------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        try:
            graph = channel_graph(model)
        except ConfigError as error:
            raise ConfigError(f"method 'dynamic': {error}") from None
        groups = [group for group in graph.groups if graph.sliceable(group)]
        if not groups:
            raise ConfigError(f"method 'dynamic': {type(model).__name__} has no channel group that one convolution "
                              "produces and its readers hold whole (the channels a sub-network narrows)")
        for group in groups:   # a VGG block is one group's consumer and the next one's producer
            for site in group.sites:
                layer = model.get_submodule(site.module)
                if not type(layer).__name__.startswith("Dynamic"):
                    make_dynamic(layer, len(self.targets))
            model.get_submodule(group.producer).chooses_width = True
        # Every batch norm, not only the narrowing ones: the statistics of a block's full-width
        # output differ per sub-network too (each keeps its own rows).
        for module in model.modules():
            if type(module) is nn.BatchNorm2d:
                make_dynamic(module, len(self.targets))
        model.register_buffer(WIDTHS, torch.zeros(len(self.targets), len(groups), dtype=torch.long))
        return model

    def holdout_images(self, training_images: int) -> int:
        return min(self.options.holdout, training_images // 4)

    # -- training: the sandwich rule -----------------------------------------------------------
    def loss(self, trainer, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model = trainer.model
        full = full_widths(model)
        set_widths(model, full)
        logits = model(images)
        loss = trainer.loss_fn(logits, labels)
        soft = logits.detach().softmax(dim=1)
        generator = torch.Generator().manual_seed(self.options.seed * 1_000_003 + trainer.state.step)
        narrower = [[max(1, round(self.options.smallest * w)) for w in full]]
        narrower += [random_widths(full, self.options.smallest, generator) for _ in range(self.options.random)]
        weight = 1.0 if self.options.narrower == "sum" else 1.0 / len(narrower)
        freeze_statistics(model, True)   # the running statistics stay the largest sub-network's
        try:
            for widths in narrower:
                set_widths(model, widths)
                out = model(images)
                if self.options.distill:
                    narrow_loss = torch.sum(-soft * F.log_softmax(out, dim=1), dim=1).mean()
                else:
                    narrow_loss = trainer.loss_fn(out, labels)
                loss = loss + weight * narrow_loss
        finally:
            freeze_statistics(model, False)
            set_widths(model, full)
        return loss

    # -- after training: the search ------------------------------------------------------------
    def decides_on_rank_0(self, epoch: int, epochs: int) -> bool:
        return epoch + 1 == epochs   # the search times latency: one rank measures, alone on the machine

    def after_epoch(self, trainer, epoch: int) -> dict[str, Any] | None:
        if epoch + 1 != trainer.config.epochs:
            return None
        chosen = self.search(trainer.model, trainer.dataset.train_images, trainer.holdout,
                             tuple(trainer.dataset.input_shape))
        for index, record in enumerate(chosen):   # reported, not chosen by: the choice used held-out images
            record["test_acc"] = clean_accuracy(select_subnet(trainer.model, index), trainer.dataset.test_images,
                                                trainer.dataset.test_labels)
        select_subnet(trainer.model, None)
        return {"dynamic_subnets": chosen}

    @torch.no_grad()
    def search(self, model: nn.Module, train_images: torch.Tensor,
               holdout: tuple[torch.Tensor, torch.Tensor] | None, input_shape: tuple[int, ...]) -> list[dict]:
        if holdout is None or not len(holdout[1]):
            raise ConfigError("method 'dynamic': the search needs held-out training images (holdout > 0)")
        full = full_widths(model)
        generator = torch.Generator().manual_seed(self.options.seed + 101)
        # A third of the candidates uniform (every group at one fraction, evenly spaced down to
        # `smallest`), the rest random non-uniform; the full network always.
        steps = max(1, self.options.candidates // 3)
        fractions = [1 - (1 - self.options.smallest) * i / steps for i in range(1, steps + 1)]
        uniform = [[max(1, round(f * w)) for w in full] for f in fractions]
        candidates = [full] + [u for u in uniform if u != full]
        candidates = candidates[:self.options.candidates]
        while len(candidates) < self.options.candidates:
            candidates.append(random_widths(full, self.options.smallest, generator))
        recalibration = train_images[:self.options.recalibrate]
        set_widths(model, full)
        full_macs = count(model, input_shape).macs_effective
        measured = []
        was_training = model.training
        saved = statistics(model)
        try:
            for widths in candidates:
                set_widths(model, widths)
                re_estimate(model, recalibration)
                measured.append({"widths": widths, "macs": count(model, input_shape).macs_effective,
                                 "holdout_acc": clean_accuracy(model, *holdout),
                                 "latency_ms": round(measure_latency(model, input_shape, batch_size=SEARCH_BATCH,
                                                                     runs=5, warmup=1, warmup_seconds=0.0,
                                                                     channels_last=False).median_ms, 3)})
                restore_statistics(model, saved)
            cost = FRONTS[self.options.front]
            chosen = []
            for index, target in enumerate(self.targets):
                best = choose(measured, target, full_macs, cost)
                set_widths(model, best["widths"])
                re_estimate(model, recalibration)
                store_subnet(model, index, best["widths"])
                restore_statistics(model, saved)
                chosen.append({"target": target, "mac_fraction": round(best["macs"] / full_macs, 4), **best})
        finally:
            set_widths(model, full)
            model.train(was_training)
        return chosen


def choose(measured: list[dict], target: float, full_macs: int, cost: str) -> dict:
    """The sub-network for a MAC target: among the candidates whose MACs lie in the band
    [target - MACS_BAND, target + MACS_SLACK] (of the full network's), the most accurate on that
    band's accuracy/`cost` front; when the band is empty, the largest candidate within the target,
    else the smallest of all. A band, not only a ceiling: a noisy accuracy must not let a 50%
    network stand in for the 70% one."""
    fraction = {id(c): c["macs"] / full_macs for c in measured}
    band = [c for c in measured if target - MACS_BAND <= fraction[id(c)] <= target * (1 + MACS_SLACK)]
    if not band:
        within = [c for c in measured if fraction[id(c)] <= target * (1 + MACS_SLACK)]
        return max(within, key=lambda c: c["macs"]) if within else min(measured, key=lambda c: c["macs"])
    front = [band[i] for i in pareto_front([c[cost] for c in band], [c["holdout_acc"] for c in band])]
    return max(front, key=lambda c: (c["holdout_acc"], -c[cost]))


# -- widths ------------------------------------------------------------------------------------
def _is_producer(module: nn.Module) -> bool:
    """A channel group's producing convolution (marked by prepare)."""
    return isinstance(module, DynamicConv2d) and module.chooses_width


def producers(model: nn.Module) -> list[DynamicConv2d]:
    """The dynamic convolutions whose output width is chosen, in module order."""
    return [m for m in model.modules() if _is_producer(m)]


def full_widths(model: nn.Module) -> list[int]:
    return [conv.out_channels for conv in producers(model)]


def set_widths(model: nn.Module, widths: list[int] | None) -> None:
    """Every channel group at its width (None: all full)."""
    layers = producers(model)
    widths = widths if widths is not None else [conv.out_channels for conv in layers]
    if len(widths) != len(layers):
        raise ValueError(f"{len(widths)} widths for {len(layers)} channel groups")
    for conv, width in zip(layers, widths):
        if not 1 <= width <= conv.out_channels:
            raise ValueError(f"width {width} outside 1..{conv.out_channels}")
        conv.active_out = int(width)


def random_widths(full: list[int], smallest: float, generator: torch.Generator) -> list[int]:
    """Each group's width drawn uniformly between `smallest` of it and all of it."""
    fractions = smallest + (1 - smallest) * torch.rand(len(full), generator=generator, dtype=torch.float64)
    return [max(1, round(float(f) * w)) for f, w in zip(fractions, full)]


def subnet_count(model: nn.Module) -> int:
    return int(getattr(model, WIDTHS).shape[0])


def subnet_widths(model: nn.Module, index: int) -> list[int]:
    table = getattr(model, WIDTHS, None)
    if table is None:
        raise ValueError("not a dynamic model (no dynamic_widths buffer)")
    if not 0 <= index < table.shape[0]:
        raise ValueError(f"sub-network {index} does not exist; the model has {table.shape[0]} (0..{table.shape[0] - 1})")
    widths = [int(w) for w in table[index]]
    if not all(widths):
        raise ValueError(f"sub-network {index} was never chosen (the search runs after the last epoch)")
    return widths


def is_dynamic(model: nn.Module) -> bool:
    """A dynamic model whose search has chosen its sub-networks."""
    table = getattr(model, WIDTHS, None)
    return isinstance(table, torch.Tensor) and bool(table.numel()) and bool((table > 0).all())


def select_subnet(model: nn.Module, index: int | None) -> nn.Module:
    """Switch `model` (in place, no weight allocated) to sub-network `index`, with its batch-norm
    statistics; None: the full network with its running statistics."""
    set_widths(model, None if index is None else subnet_widths(model, index))
    for module in model.modules():
        if isinstance(module, DynamicBatchNorm2d):
            module.subnet = index
    model.dynamic_selected = index
    return model


class SubnetView(nn.Module):
    """Sub-network `index` of a dynamic model shared with other views: a call switches the model
    to it (when another was selected) and runs it, so one copy of the weights serves every view."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        subnet_widths(model, index)   # exists and was chosen
        self.model, self.index = model, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.model, "dynamic_selected", None) != self.index:
            select_subnet(self.model, self.index)
        return self.model(x)


def traced_subnet(model: nn.Module, index: int, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Sub-network `index` as a TorchScript graph over the model's own tensors: its widths and
    batch-norm row are constants of the graph, the weights are shared, not copied (the graph is
    not frozen; freezing would copy them). 2.3x faster than the eager view at batch 1 (resnet20
    w0.5, Zen 3, 1 thread: 1.67 ms against 3.78 ms)."""
    model.eval()
    select_subnet(model, index)   # before tracing: the trace sees no switch, only the sliced layers
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # TorchScript's deprecation notes
        return torch.jit.trace(SubnetView(model, index), (example,), check_trace=False)


def subnet_model(model: nn.Module, index: int) -> nn.Module:
    """Sub-network `index` as an ordinary thinner model (a copy): the sliced weights and its
    batch-norm statistics, plain layers only."""
    widths = subnet_widths(model, index)
    producer_names = [name for name, m in model.named_modules() if _is_producer(m)]
    thin = copy.deepcopy(model)
    for module in list(thin.modules()):
        if isinstance(module, DynamicBatchNorm2d):
            module.running_mean.copy_(module.subnet_mean[index])
            module.running_var.copy_(module.subnet_var[index])
        if type(module).__name__.startswith("Dynamic"):
            make_plain(module)
    del thin._buffers[WIDTHS]
    return shrink_to_widths(thin, dict(zip(producer_names, widths)))


# -- batch-norm statistics -----------------------------------------------------------------------
def norms(model: nn.Module) -> list[DynamicBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, DynamicBatchNorm2d)]


def freeze_statistics(model: nn.Module, frozen: bool) -> None:
    for norm in norms(model):
        norm.frozen = frozen


def statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(n.running_mean.clone(), n.running_var.clone(), n.num_batches_tracked.clone()) for n in norms(model)]


def restore_statistics(model: nn.Module, saved) -> None:
    for norm, (mean, var, tracked) in zip(norms(model), saved):
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.num_batches_tracked.copy_(tracked)


@torch.no_grad()
def re_estimate(model: nn.Module, images: torch.Tensor, batch: int = 250) -> None:
    """The running statistics of every batch norm re-estimated at the current widths: a plain
    average over `images` in train mode (no gradient); the model is left in eval mode."""
    layers = norms(model)
    momenta = [n.momentum for n in layers]
    for n in layers:
        n.reset_running_stats()
        n.momentum = None
        n.subnet = None
    model.train()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(images), batch):
            model(unit_float(images[start:start + batch]).to(device))
    finally:
        for n, momentum in zip(layers, momenta):
            n.momentum = momentum
        model.eval()


def store_subnet(model: nn.Module, index: int, widths: list[int]) -> None:
    """Record sub-network `index`: its widths, and the current running statistics as its rows."""
    getattr(model, WIDTHS)[index] = torch.tensor(widths)
    for n in norms(model):
        n.subnet_mean[index].copy_(n.running_mean)
        n.subnet_var[index].copy_(n.running_var)


