"""Honest CPU latency: pinned threads, warm-up, many timed runs, median and p90,
with the machine recorded next to every figure."""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import LeancnnError


# AMD's x86 families by (family, first model, last model): a VM often reports only "AMD EPYC", and
# Zen 3, Zen 4 and Zen 5 differ in what pays (AVX-512 or not, 256- or 512-bit units).
AMD_CORES = [(23, 0x00, 0x2F, "Zen/Zen+"), (23, 0x30, 0xFF, "Zen 2"), (25, 0x00, 0x0F, "Zen 3"),
             (25, 0x10, 0x1F, "Zen 4"), (25, 0x20, 0x5F, "Zen 3"), (25, 0x60, 0xAF, "Zen 4"), (26, 0x00, 0xFF, "Zen 5")]


def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers (and AMD's core generation), e.g.
    "AMD EPYC (Zen 5, family 26 model 2)": the name alone does not tell which machine a table came from."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "vendor_id") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break   # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if not (fields.get("cpu family", "").isdigit() and fields.get("model", "").isdigit()):
        return name
    family, model = int(fields["cpu family"]), int(fields["model"])
    core = next((c for f, lo, hi, c in AMD_CORES if f == family and lo <= model <= hi), None) \
        if fields.get("vendor_id") == "AuthenticAMD" else None
    return f"{name} ({core + ', ' if core else ''}family {family} model {model})"


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads_default": torch.get_num_threads()}


@contextlib.contextmanager
def num_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Latency:
    batch_size: int
    threads: int
    memory_format: str
    median_ms: float
    p90_ms: float
    runs: int
    backend: str = "torch"


def parse_quantile(text: str, flag: str) -> float:
    """'median' -> 0.5, 'p90' -> 0.9, '0.99' -> 0.99: how a quantile is written on every command line."""
    lowered = text.strip().lower()
    try:
        value = 0.5 if lowered == "median" else float(lowered[1:]) / 100 if lowered.startswith("p") else float(lowered)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise LeancnnError(f"{flag} must be median, pNN (p90, p99) or a fraction in (0, 1], got {text!r}")
    return value


def quantile(values: list[float], q: float) -> float:
    """The q-quantile, interpolated linearly between order statistics (numpy's default): the one
    definition the latency figures, the zoo's manifest and the serving runtime all use."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 1, threads: int | None = None,
                    channels_last: bool = True, warmup: int = 5, runs: int = 20,
                    min_seconds: float = 0.0, warmup_seconds: float = 0.3) -> Latency:
    """Time model(x) for a batch: warm up for `warmup` runs and at least
    `warmup_seconds` (caches, oneDNN primitive creation, CPU clocks), then at
    least `runs` timed runs (and `min_seconds`)."""
    threads = threads or torch.get_num_threads()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    model_in_format = model.to(memory_format=memory_format)
    x = torch.rand(batch_size, *input_shape, device=device).contiguous(memory_format=memory_format)
    times = []
    with num_threads(threads):
        warm_start = time.perf_counter()
        done = 0
        while done < warmup or time.perf_counter() - warm_start < warmup_seconds:
            model_in_format(x)
            done += 1
        started = time.perf_counter()
        while len(times) < runs or time.perf_counter() - started < min_seconds:
            if device.type == "cuda":
                torch.cuda.synchronize()
            begin = time.perf_counter()
            model_in_format(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - begin) * 1000.0)
    model.train(was_training)
    return Latency(batch_size, threads, "channels_last" if channels_last else "contiguous",
                   statistics.median(times), quantile(times, 0.9), len(times))


def fastest_format_latency(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int,
                           threads: int | None = None, runs: int = 20) -> Latency:
    """The latency in the faster of the two memory formats (channels-last and contiguous):
    the one a user would deploy with, so neither format's weakness is charged to a model."""
    return min((measure_latency(model, input_shape, batch_size=batch_size, threads=threads, channels_last=fmt,
                                runs=runs) for fmt in (True, False)), key=lambda latency: latency.median_ms)


def latency_key(batch_size: int, threads: int) -> str:
    return f"batch{batch_size}_threads{threads}"


def latency_table(model: nn.Module, input_shape: tuple[int, ...], batch_sizes=(1, 64), threads_list=None,
                  runs: int = 20) -> dict[str, float]:
    """result.json's latency_ms: 'batch{B}_threads{T}' -> median ms, the faster memory format."""
    threads_list = threads_list or sorted({1, torch.get_num_threads()})
    table = {}
    for threads in threads_list:
        for batch_size in batch_sizes:
            best = fastest_format_latency(model, input_shape, batch_size=batch_size, threads=threads, runs=runs)
            table[latency_key(batch_size, threads)] = round(best.median_ms, 4)
    return table


@torch.no_grad()
def layer_times(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 1, threads: int | None = None,
                runs: int = 10) -> list[dict[str, Any]]:
    """Where the time of one forward pass goes: per leaf module (one without children),
    the median wall time in ms over `runs` passes after a warm-up, by forward hooks. The hooks
    add a little to every layer; the shares, not the sum, are the figure to read. Rows in
    the order the layers ran."""
    threads = threads or torch.get_num_threads()
    model.eval()
    x = torch.rand(batch_size, *input_shape)
    started: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()) and not isinstance(module, nn.Identity):
            def before(mod, args, name=name):
                started[name] = time.perf_counter()

            def after(mod, args, out, name=name):
                if name not in times:
                    times[name] = []
                    order.append(name)
                times[name].append((time.perf_counter() - started[name]) * 1000.0)
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with num_threads(threads):
            model(x)   # warm-up: plans, oneDNN primitives, caches
            times.clear()
            order.clear()
            for _ in range(runs):
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    return [{"layer": name, "type": type(modules[name]).__name__, "ms": round(statistics.median(times[name]), 4)}
            for name in order]
