"""Data-parallel training over processes started by torchrun (gloo on CPU, NCCL on CUDA).

The ranks train one network: every rank holds the whole in-memory dataset and takes its slice
of each global batch (the order of one process), gradients are summed across ranks after every
backward pass, and batch norm in training normalises with the global batch's statistics, so
that N steps on W ranks give the weights one process gives (float tolerance).

Why the gradients are summed here and not by `DistributedDataParallel`: methods call the model
more than once per step (the sandwich rule of `dynamic` runs four sub-networks before one
backward pass; adversarial losses run attack steps in training mode), which DDP's reducer
rejects or reduces at the wrong time. One flat all-reduce after the method's whole loss has
been differentiated is correct for any of them (resnet20's 0.27 M gradients: one 1 MB message).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, get_args

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..config import Backend
from ..errors import ConfigError

BACKENDS: tuple[str, ...] = get_args(Backend)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank `rank` of `world` (one process: 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def resolve_backend(name: str, device: torch.device) -> str:
    """The process-group backend for `name` ("auto": NCCL on CUDA, gloo on CPU), checked to exist
    in this build of torch."""
    if name not in BACKENDS:
        raise ConfigError(f"config key 'backend' must be one of {', '.join(BACKENDS)}, got {name!r}")
    chosen = name if name != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_available() or not dist.is_backend_available(chosen):
        here = [b for b in BACKENDS[1:] if dist.is_available() and dist.is_backend_available(b)]
        raise ConfigError(f"backend {chosen!r} is not available in this torch build (available here: "
                          f"{', '.join(here) or 'none'})")
    if chosen == "nccl" and device.type != "cuda":
        raise ConfigError("backend 'nccl' needs CUDA tensors; with --device cpu use --backend gloo")
    return chosen


def current_ranks() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def join_process_group(backend: str, device: torch.device) -> tuple[Ranks, bool]:
    """(this process's ranks, whether this call created the group). Outside torchrun: one rank."""
    if dist.is_available() and dist.is_initialized():
        return current_ranks(), False
    if not launched_by_torchrun():
        if backend != "auto":   # a backend named on one process: still a setting to check
            resolve_backend(backend, device)
        return SINGLE, False
    chosen = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(chosen)
    return current_ranks(), True


def launch(nproc: int, argv: list[str], backend: str, device: torch.device) -> int:
    """Run `python -m leancnn ARGV` on `nproc` processes under torchrun (standalone: one machine,
    a free port); returns its exit status. Each process gets cores/nproc threads unless
    OMP_NUM_THREADS says otherwise."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (processes on this machine), got {nproc}")
    if launched_by_torchrun():
        raise ConfigError("--nproc: this process was started by torchrun already; drop --nproc")
    resolve_backend(backend, device)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "leancnn", *argv]
    return subprocess.run(command, env=env, check=False).returncode


def without_flag(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` and `flag=VALUE`."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        elif not item.startswith(flag + "="):
            kept.append(item)
    return kept


def leave_process_group(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_gradients(params: Iterable[nn.Parameter], extra: list[float]) -> list[float]:
    """Sum the gradients of `params` (those that have one: the same on every rank, which runs the
    same graph) and the few numbers `extra` across ranks, in one message per gradient dtype
    (a gloo collective costs ~1 ms on loopback whatever its size, so messages are few)."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for param in params:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param)
    summed = extra
    for index, group in enumerate(by_dtype.values()):
        pieces = [p.grad.reshape(-1) for p in group]
        if index == 0:   # the numbers ride with the first message
            pieces.append(torch.tensor(extra, dtype=group[0].grad.dtype, device=group[0].grad.device))
        flat = torch.cat(pieces)
        dist.all_reduce(flat)
        offset = 0
        for param in group:
            size = param.grad.numel()
            param.grad.copy_(flat[offset:offset + size].view_as(param.grad))
            offset += size
        if index == 0:
            summed = flat[offset:].tolist()
    if not by_dtype:
        summed = all_reduce_sum(extra, torch.device("cpu"))
    return summed


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class _GatherRows(torch.autograd.Function):
    """[K] on each rank -> [world, K] on every rank; the backward pass sums the incoming
    gradients over ranks and returns this rank's row (each rank's loss depends on every row)."""

    @staticmethod
    def forward(ctx: Any, row: torch.Tensor) -> torch.Tensor:
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, row.contiguous())
        return torch.stack(rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def global_batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                      weight: torch.Tensor | None, bias: torch.Tensor | None, momentum: float,
                      eps: float) -> torch.Tensor:
    """Training-mode batch norm over the union of every rank's batch: each rank's count, mean and
    sum of squared deviations are gathered and combined exactly (Chan et al.'s parallel variance),
    which is what one process computes on the global batch up to rounding."""
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    count = x.numel() // max(channels, 1)
    if count:
        var, mean = torch.var_mean(x, dim=dims, correction=0)
    else:
        mean = var = x.new_zeros(channels)
    local = torch.cat([x.new_tensor([float(count)]), mean, var * count])
    rows = _GatherRows.apply(local)                      # [world, 1 + 2C]
    counts, means, squares = rows[:, :1], rows[:, 1:1 + channels], rows[:, 1 + channels:]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total
    global_var = (squares + counts * (means - global_mean) ** 2).sum(0) / total   # biased, as normalising uses
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(global_mean.detach(), alpha=momentum)
            unbiased = global_var.detach() * (total / max(float(total) - 1, 1.0))
            running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    shape = [1, channels] + [1] * (x.dim() - 2)
    out = (x - global_mean.view(shape)) * torch.rsqrt(global_var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class GlobalBatchNorm(TorchFunctionMode):
    """While active, every training-mode `F.batch_norm` (nn.BatchNorm*, and any layer built on it,
    such as the dynamic method's per-sub-network batch norm) uses the global batch's statistics.
    A mode rather than swapped modules, so that the methods' class checks and swaps see the
    model's own layers."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _batch_norm_arguments(*args, **kwargs)
            if bound["training"]:
                return global_batch_norm(bound["input"], bound["running_mean"], bound["running_var"],
                                         bound["weight"], bound["bias"], bound["momentum"], bound["eps"])
        return func(*args, **kwargs)


def _batch_norm_arguments(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                          weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                          training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> dict[str, Any]:
    return {"input": input, "running_mean": running_mean, "running_var": running_var, "weight": weight,
            "bias": bias, "training": training, "momentum": momentum, "eps": eps}


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """A short hash of the tensors' bytes (bit-identical tensors, equal digests)."""
    digest = hashlib.blake2b(digest_size=12)
    for tensor in tensors:
        value = tensor.detach().cpu().contiguous()
        digest.update(str((value.dtype, tuple(value.shape))).encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def gather_objects(value: Any) -> list[Any]:
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value: Any) -> Any:
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    for tensor in tensors:
        dist.broadcast(tensor, src=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
