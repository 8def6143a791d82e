"""Whole-model plans: a deployed model runs each input key (shape, memory format, threads) as
eager PyTorch or as a frozen TorchScript graph of itself, whichever measured faster on this
machine the first time the model saw that key, as each sparse layer chooses its kernel.

Why: at batch 1 a small CNN spends most of its time in Python, dispatching one module after
another (resnet20 at width 0.5, one thread, AMD EPYC Zen 3: eager 3.3 ms, the frozen graph
1.8 ms; with PS4_P4, 2.6 ms and 0.9 ms). The graph is traced after the layers' own plans are
made for the key, so it runs the same implementations, minus the interpreter between them.
A model that cannot be traced runs eager, with one warning saying why.

In auto mode each of the two also runs with the input entering as channels_last (one conversion
at the model's entry), where it does not already: the kernel layers compute in channels_last, and a
model fed NCHW converts in and out at every one of them. A one-channel image (Fashion-MNIST's) is
NCHW-strided even after `.contiguous(memory_format=torch.channels_last)` (PyTorch leaves a size-1
channel dimension's strides alone), so oneDNN's first convolution wrote NCHW and the whole model
ran NCHW: resnet20 w0.5 with ViP at batch 1 spent 17 us a block in upsampling NCHW maps that take
5 us channels_last (AMD EPYC Zen 5). The entry view restrides such an input explicitly.

A batch of 32 or more that takes CHUNK_MIN_MS or longer may also run in chunks of 8 or 16
images, one after the other, each chunk on its own plan, where that measured faster and gives the
same output: at batch 64 every layer's activations go through DRAM, in chunks they stay in cache
(_chunk_candidates).

The choice lives in the process (a traced graph cannot be cached on disk across torch builds
cheaply); tracing and timing take about a second per new key.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import first_line
from . import plans
from .sparse import capturing_graph

GRAPH_MODES = ("auto", "eager", "torchscript")
CHANNELS_LAST_ENTRY = " + channels_last entry"   # suffix of a choice that converts the input first
CHUNKS = (16, 8)   # images per chunk a large batch may run in (leancnn.kernels.graph.GraphPlans._chunk_candidates)
# Chunks are tried only for a batch whose whole run takes this long (ms): below it the activations
# fit in cache anyway (resnet20 w0.5 at batch 64, 8 ms: chunks within noise) and planning them
# (each chunk size's own layer plans and graph) costs more than it can win.
CHUNK_MIN_MS = 10.0


def channels_last_entry(x: torch.Tensor) -> torch.Tensor:
    """`x` with channels_last strides, a view when it has one channel (whose strides PyTorch's
    .contiguous(memory_format=...) leaves as NCHW), so that the layers after it see channels_last."""
    if x.shape[1] == 1:
        n, c, h, w = x.shape
        return x.contiguous().as_strided(x.shape, (c * h * w, 1, w * c, c))
    return x.contiguous(memory_format=torch.channels_last)


def plan_name(x: torch.Tensor) -> str:
    """How graph_plan names the plan for input `x` at the current thread count."""
    fmt = "channels_last" if strictly_channels_last(x) else "contiguous"
    return f"batch={x.shape[0]} input={'x'.join(map(str, x.shape[1:]))} {fmt} threads={torch.get_num_threads()}"


def strictly_channels_last(x: torch.Tensor) -> bool:
    """Strides say channels_last, channel stride 1 (what layers downstream go by), not only 'could be'."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) == 1


class GraphPlans:
    """What a deployed model's forward calls: chooses, per input key, eager or the frozen graph."""

    def __init__(self, model: nn.Module, mode: str = "auto") -> None:
        if mode not in GRAPH_MODES:
            raise ValueError(f"graph must be one of {', '.join(GRAPH_MODES)}, not {mode!r}")
        self.model = model
        self.mode = mode
        self.runs: dict[tuple, Any] = {}
        self.plans: dict[str, dict] = {}
        self._modules: list[nn.Module] | None = None

    def eager(self, *args, **kwargs):
        return type(self.model).eager_forward(self.model, *args, **kwargs)   # the model class's own forward

    def __call__(self, *args, **kwargs):
        x = args[0] if len(args) == 1 and not kwargs else None
        if (self.mode == "eager" or not isinstance(x, torch.Tensor) or capturing_graph() or x.requires_grad
                or x.device.type != "cpu" or torch.onnx.is_in_onnx_export() or self.hooked()):
            return self.eager(*args, **kwargs)
        key = (tuple(x.shape), x.stride(), torch.get_num_threads())
        run = self.runs.get(key)
        if run is None:
            run = self.runs[key] = self._plan(x)
        with torch.no_grad():
            return run(x)

    def hooked(self) -> bool:
        """Forward hooks on any module (counting, per-layer timing) only fire in eager (~10 us a call
        for resnet20's 200 modules, against a millisecond of inference)."""
        if self._modules is None:
            self._modules = list(self.model.modules())
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._modules)

    def _plan(self, x: torch.Tensor):
        name = plan_name(x)
        entries = {"": None}
        if self.mode == "auto" and x.dim() == 4 and not strictly_channels_last(x):
            entries[CHANNELS_LAST_ENTRY] = channels_last_entry
        candidates: dict[str, Any] = {}
        with torch.no_grad():
            for suffix, convert in entries.items():
                given = x if convert is None else convert(x)
                self.eager(given)   # the layers' plans for this input first: the graph bakes in their choices
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")   # TorchScript's deprecation and tracer notes
                        graph = torch.jit.freeze(torch.jit.trace(self.model, (given,), check_trace=False).eval())
                        graph(given)  # the profiling executor specialises on its first calls
                except Exception as error:  # noqa: BLE001  (any tracing failure: run eager, say why)
                    first = first_line(error)
                    warnings.warn(f"leancnn: {type(self.model).__name__} runs eager: TorchScript cannot trace it "
                                  f"({type(error).__name__}: {first[:200]})", RuntimeWarning, stacklevel=3)
                    self.plans[name] = {"choice": "eager", "times_ms": {}, "reason": first[:200]}
                    return self.eager
                if self.mode == "torchscript":
                    self.plans[name] = {"choice": "torchscript", "times_ms": {}}
                    return graph
                candidates["eager" + suffix] = _entered(self.eager, convert)
                candidates["torchscript" + suffix] = _entered(graph, convert)
            times = plans.time_candidates({label: (lambda run=run: run(x)) for label, run in candidates.items()})
            choice = min(times, key=times.get)
            entry = choice.endswith(CHANNELS_LAST_ENTRY)
            worth = self.mode == "auto" and times[choice] >= CHUNK_MIN_MS
            chunked = self._chunk_candidates(x, candidates[choice]) if worth else {}
            if chunked:   # the whole batch against the same in chunks (each chunk its own plan)
                times.update(plans.time_candidates({choice: (lambda: candidates[choice](x)),
                                                    **{label: (lambda run=run: run(x)) for label, run in chunked.items()}}))
                candidates.update(chunked)
                choice = min(times, key=times.get)
        self.plans[name] = {"choice": choice, "times_ms": times, "entry": entry}
        return candidates[choice]

    def _chunk_candidates(self, x: torch.Tensor, whole) -> dict[str, Any]:
        """The batch run in chunks of CHUNKS images, one after the other, where it divides: a batch of
        64 moves every layer's activations through DRAM (16 MB at resnet18's first stage), chunks of 8
        keep them in cache (resnet18 PS1_P9 at batch 64: 121 -> 82 ms, AMD EPYC Zen 5, 1 thread).
        Offered only where the chunks give the whole batch's output (a model that mixes images across
        the batch, or returns anything but one tensor, is not chunked)."""
        batch = x.shape[0] if x.dim() else 0
        sizes = [k for k in CHUNKS if batch >= 4 * k and batch % k == 0]   # a chunk is not chunked again
        if not sizes:
            return {}
        expected = whole(x)
        if not isinstance(expected, torch.Tensor) or expected.dim() == 0 or expected.shape[0] != batch:
            return {}
        chunked = {}
        for k in sizes:
            run = (lambda k: lambda images: torch.cat([self(part) for part in images.split(k)]))(k)
            if torch.allclose(run(x), expected, rtol=1e-4, atol=1e-4):   # also plans each chunk's key
                chunked[f"chunks of {k}"] = run
        return chunked

    def __deepcopy__(self, memo):
        # A copy re-plans: traced graphs hold the original's frozen weights.
        return GraphPlans(copy.deepcopy(self.model, memo), self.mode)


class ChannelsLastEntry(nn.Module):
    """`model` with its input entering as channels_last (channels_last_entry): what an exported
    program runs when the deployed model's plan chose the entry (leancnn.export)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(channels_last_entry(x))


def plan_for(model: nn.Module, x: torch.Tensor) -> dict | None:
    """The deployed model's whole-model plan for input `x` (once it has run on such an input), else None."""
    runner = getattr(model, "leancnn_graph_plans", None)
    return runner.plans.get(plan_name(x)) if isinstance(runner, GraphPlans) else None


def chose_channels_last_entry(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the deployed model's plan for input `x` (already planned) converts it to channels_last
    first (a batch run in chunks: whether its whole-batch form did)."""
    return bool((plan_for(model, x) or {}).get("entry"))


def _entered(run, convert):
    """`run` on the input as it comes, or converted first."""
    return run if convert is None else (lambda x: run(convert(x)))


_DEPLOYED_CLASSES: dict[type, type] = {}


def _deployed_class(cls: type) -> type:
    """`cls` with a forward that goes through the model's GraphPlans: same name, modules and state
    dict, and a real method, so torch.export and TorchScript see an ordinary module."""
    if cls not in _DEPLOYED_CLASSES:
        def forward(self, x):
            return self.leancnn_graph_plans(x)

        _DEPLOYED_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                              "eager_forward": cls.forward})
    return _DEPLOYED_CLASSES[cls]


def install_graph_plans(model: nn.Module, mode: str = "auto") -> nn.Module:
    """Make `model(x)` run through GraphPlans; module names and state dicts are unchanged."""
    if type(model) not in _DEPLOYED_CLASSES.values():   # installed twice: the class is swapped once
        model.__class__ = _deployed_class(type(model))
    model.leancnn_graph_plans = GraphPlans(model, mode)
    return model


def graph_plan(model: nn.Module) -> list[dict]:
    """What the whole model ran for each input key it has seen: eager or torchscript, with the times."""
    runner = getattr(model, "leancnn_graph_plans", None)
    return [{"key": key, **plan} for key, plan in runner.plans.items()] if isinstance(runner, GraphPlans) else []
