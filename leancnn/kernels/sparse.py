"""A sparse convolution for inference: any masked or pruned 3x3 (padding 1) or 1x1
(padding 0) convolution, stride 1 or 2, packed for the compiled kernel
(leancnn/kernels/psconv_kernel.cpp) with bias, ReLU and a residual add fused, and
run the way its deploy plan says (leancnn.kernels.plans): the kernel, or oneDNN's
dense convolution, whichever measured faster for this input shape, batch size,
memory format and thread count on this machine. So a deployed layer is never
slower than its dense convolution.

The kernel is a direct sparse convolution in the style of SkimCaffe (Park et al.,
"Faster CNNs with Direct Sparse Convolutions and Guided Pruning", ICLR 2017):
output pixels in vectors, each non-zero weight one broadcast and a few FMAs
against shifted input vectors, the zeros never touched. Filters that share a
support row (pSConv's periodic supports) share one list of (tap, channel) pairs
and are computed together; with irregular masks every filter is its own group.
A 1x1 convolution is the 3x3 one whose only tap is the centre (same output size
at stride 1 and 2; the kernel builds no planes for taps it never reads).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..measure.counting import FP32_BYTES, LayerCost
from . import plans, psconv_extension

TAPS = 9
# Filters per chunk: the kernel's register tile is chunk x pixel vectors (24 of AVX-512's 32 registers).
MAX_CHUNK = 6
# Input channels per segment. The kernel runs a chunk over several consecutive segments at a
# time, as many as keep a tile's plane vectors for those channels in L1 while every chunk uses
# them, and at least enough for ~128 pairs per pass (it decides per input shape; a plan may
# override it, see PASS_CHOICES).
CHANNEL_BLOCK = 16
# Kernel variants a plan times: (input-channel blocks per pass, 0 = the kernel's own rule; run in
# the calling thread only). One 16-channel block per pass keeps a tile's inputs in L1 at the cost
# of reloading its sums more often (it won for per-filter groups on an AVX2 EPYC); one thread
# spares a small layer at batch 1 the four thread wake-ups and joins of a call (there 2 threads
# ran a pruned resnet18 slower than 1).
PASS_CHOICES = {"kernel": (0, False), "kernel-pass1": (1, False), "kernel-pass1-serial": (1, True)}
# The kernel on the layer's dense packing (its zeros kept, one group of every filter), one block per
# pass: a candidate of every layer below density 1. Small pSConv layers split into groups of two or
# four filters, whose broadcasts feed too few FMAs: resnet20 w0.5 PS4_P4 at batch 64 (8-channel
# layers, 1 thread, AMD EPYC Zen 5) ran 0.71 / 0.93 ms a layer sparse against 0.65 / 0.75 ms for the
# same kernel on the dense model; without this candidate the pruned model was slower than dense.
DENSE_PACKED = "kernel-dense"


def chunk_sizes(filters: int, limit: int = MAX_CHUNK) -> list[int]:
    """`filters` cut into the fewest chunks of at most `limit`, as equal as possible (16 -> 6, 5, 5):
    a chunk's broadcasts feed as many FMAs as it has filters, so no chunk is left tiny."""
    count = -(-filters // limit)
    return [filters // count + (1 if i < filters % count else 0) for i in range(count)]


@torch.no_grad()
def pack(weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The layer as the kernel reads it: filters grouped by support row (the taps each input
    channel uses); per group the (tap, channel) pairs its filters use, channel by channel, in
    segments of CHANNEL_BLOCK input channels; each group cut into chunks of at most MAX_CHUNK
    filters, whose weights are listed per pair of their group.
    weight, mask: [C_out, C_in, 3, 3]. Vectorised per channel block (an irregular mask makes
    every filter its own group: resnet18's layers took seconds to pack one group at a time)."""
    out_channels, in_channels = weight.shape[:2]
    rows = mask.reshape(out_channels, -1)
    _, group_of = torch.unique(rows, dim=0, return_inverse=True)
    taps_weight = (weight * mask).reshape(out_channels, in_channels * TAPS).float()
    groups = int(group_of.max()) + 1 if out_channels else 0
    order = torch.sort(group_of, stable=True).indices           # filters, group by group
    sizes = torch.bincount(group_of, minlength=groups).tolist()
    members_by_group = order.split(sizes)
    used = rows[torch.stack([m[0] for m in members_by_group])].reshape(groups, in_channels, TAPS) if groups else \
        torch.zeros(0, in_channels, TAPS, dtype=torch.bool)     # every member has its group's support row
    chunks = [(chunk, group) for group, members in enumerate(members_by_group)
              for chunk in members.split(chunk_sizes(len(members)))]
    chunk_group = torch.tensor([group for _, group in chunks], dtype=torch.long)
    chunk_filters = torch.tensor([len(chunk) for chunk, _ in chunks], dtype=torch.long)
    padded = torch.zeros(len(chunks), MAX_CHUNK, dtype=torch.long)  # chunk -> its filters (padded)
    for k, (chunk, _) in enumerate(chunks):
        padded[k, :len(chunk)] = chunk
    # Channel block by channel block: each group's pairs in the block (shared by its chunks), and
    # each chunk's weights for them ([pairs, R], pair-major), so that a tile's passes read the
    # weights in one stream.
    pairs, channels, taps, weights = [torch.zeros(1, dtype=torch.long)], [], [], []
    for first_channel in range(0, in_channels, CHANNEL_BLOCK):
        group_index, channel_index, tap_index = torch.nonzero(
            used[:, first_channel:first_channel + CHANNEL_BLOCK], as_tuple=True)   # ordered by group, channel, tap
        channel_index = channel_index + first_channel
        channels.append(channel_index)
        taps.append(tap_index)
        per_group = torch.bincount(group_index, minlength=groups)
        group_start = torch.cumsum(per_group, 0) - per_group
        pairs.append(pairs[-1][-1] + torch.cumsum(per_group, 0))
        # Entry e of chunk k: pair e // R_k of its group, filter e % R_k of the chunk.
        counts = per_group[chunk_group] * chunk_filters
        entry_chunk = torch.repeat_interleave(torch.arange(len(chunks)), counts)
        within = torch.arange(int(counts.sum())) - (torch.cumsum(counts, 0) - counts)[entry_chunk]
        filters_of = chunk_filters[entry_chunk]
        pair = group_start[chunk_group[entry_chunk]] + within // filters_of
        column = channel_index[pair] * TAPS + tap_index[pair]
        weights.append(taps_weight[padded[entry_chunk, within % filters_of], column])
    slots = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(chunk_filters, 0)])

    def cat(parts: list[torch.Tensor], dtype) -> torch.Tensor:
        return (torch.cat(parts) if parts else torch.zeros(0)).to(dtype).contiguous()

    position = torch.zeros(out_channels, dtype=torch.int32)
    position[cat([chunk for chunk, _ in chunks], torch.long)] = torch.arange(out_channels, dtype=torch.int32)
    return {
        "weights": cat(weights, torch.float32),
        "channels": cat(channels, torch.int32),
        "taps": cat(taps, torch.int32),
        "chunk_slot": slots.to(torch.int32),
        "chunk_group": chunk_group.to(torch.int32),
        "segment_pair": cat(pairs, torch.int32),
        "bias": (torch.zeros(out_channels) if bias is None else bias.detach().float().cpu()).contiguous(),
        "position": position,
    }


# The packed tensors, in the order the kernel takes them.
PACKED_NAMES = ("weights", "channels", "taps", "chunk_slot", "chunk_group", "segment_pair", "bias", "position")


def conv_applies(conv: nn.Module) -> bool:
    """Convolutions the kernel computes: 3x3 with padding 1 or 1x1 with padding 0, stride 1 or 2
    (both directions alike), no groups or dilation, zero padding."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return False
    shape = (conv.kernel_size, conv.padding)
    return shape in ((( 3, 3), (1, 1)), ((1, 1), (0, 0))) and conv.stride in ((1, 1), (2, 2))


def as_3x3(tensor: torch.Tensor) -> torch.Tensor:
    """A 1x1 kernel as the 3x3 one whose only tap is the centre (3x3 kernels unchanged)."""
    if tensor.shape[-1] == 3:
        return tensor
    out = torch.zeros(*tensor.shape[:2], 3, 3, dtype=tensor.dtype)
    out[:, :, 1, 1] = tensor[:, :, 0, 0]
    return out


def capturing_graph() -> bool:
    """True while torch.compile / torch.export or TorchScript tracing runs the model."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class SparseConvInference(nn.Module):
    """A masked convolution (+ bias, + optional residual, + optional ReLU) for inference, run by
    its measured plan: the compiled kernel or the dense convolution. `weight` [C_out, C_in, k, k]
    with k = 1 or 3; `mask` (bool, same shape) defaults to the weight's non-zeros."""

    storage_format = "sparse_packed"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, *,
                 mask: torch.Tensor | None = None, relu: bool = False) -> None:
        super().__init__()
        weight = weight.detach().float().cpu()
        if weight.dim() != 4 or weight.shape[-2:] not in ((1, 1), (3, 3)) or stride not in (1, 2):
            raise ValueError(f"the sparse kernel computes 3x3 or 1x1 convolutions at stride 1 or 2, "
                             f"not a {tuple(weight.shape)} weight at stride {stride}")
        mask = (weight != 0) if mask is None else mask.detach().cpu().bool()
        self.out_channels, self.in_channels, self.kernel_size = weight.shape[0], weight.shape[1], weight.shape[-1]
        self.stride, self.relu = stride, relu
        # Parameters (frozen) so counting and state dicts see them as the layer's weights.
        self.weight = nn.Parameter(weight * mask, requires_grad=False)  # the dense path and the reference
        self.register_buffer("mask", mask.clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().cpu().clone(), requires_grad=False)
        extension = psconv_extension()
        self.isa = extension.isa() if extension is not None else "unavailable"
        for name, tensor in pack(as_3x3(weight), as_3x3(mask), self.bias).items():
            self.register_buffer(f"packed_{name}", tensor)
        self.density = float(mask.float().mean()) if mask.numel() else 0.0
        self.groups = int(self.packed_chunk_group.max()) + 1 if self.packed_chunk_group.numel() else 0
        self.planned = plans.PlannedChoices()   # per (shape, channels_last, no residual, threads)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, relu: bool = False) -> "SparseConvInference":
        if not conv_applies(conv):
            raise ValueError(f"the sparse kernel computes 3x3 padding-1 or 1x1 padding-0 convolutions at stride 1 "
                             f"or 2, not {conv}")
        mask = getattr(conv, "mask", None)
        return cls(conv.weight, conv.bias, conv.stride[0], relu=relu,
                   mask=mask if isinstance(mask, torch.Tensor) and mask.shape == conv.weight.shape else None)

    # -- the implementations a plan chooses from --------------------------------------------
    def dense(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """oneDNN's dense convolution (the zeros multiplied too), in x's memory format."""
        out = F.conv2d(x, self.weight.to(x), None if self.bias is None else self.bias.to(x), self.stride,
                       self.kernel_size // 2)
        if residual is not None:
            out = out + residual
        return F.relu(out) if self.relu else out

    def kernel(self, x: torch.Tensor, residual: torch.Tensor | None = None, pass_blocks: int = 0,
               serial: bool = False, packing: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The compiled kernel (channels_last inside; the output in x's memory format) on the layer's
        sparse packing, or on `packing` (dense_packing())."""
        # Eager calls go through pybind (about 5 us a call less than the dispatcher); graph tools
        # (torch.compile, torch.export) need the registered operator, leancnn::sparse_conv.
        call = torch.ops.leancnn.sparse_conv if capturing_graph() else psconv_extension().forward
        if packing is None:   # the attributes spelt out: this runs per layer per call
            out = call(x, self.packed_weights, self.packed_channels, self.packed_taps, self.packed_chunk_slot,
                       self.packed_chunk_group, self.packed_segment_pair, self.packed_bias, self.packed_position,
                       self.stride, self.relu, residual, pass_blocks, serial)
        else:
            out = call(x, *(packing[name] for name in PACKED_NAMES), self.stride, self.relu, residual, pass_blocks,
                       serial)
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()

    def dense_packing(self) -> dict[str, torch.Tensor]:
        """The layer packed with its zeros (every tap of every filter): made on first use, kept as
        non-persistent buffers (graphs see them; state dicts and saved files do not)."""
        if "dense_packed_weights" not in self._buffers:
            every_tap = torch.ones_like(self.mask)
            for name, tensor in pack(as_3x3(self.weight), as_3x3(every_tap), self.bias).items():
                self.register_buffer(f"dense_packed_{name}", tensor, persistent=False)
        return {name: getattr(self, f"dense_packed_{name}") for name in PACKED_NAMES}

    def drop_dense_packing(self) -> None:
        for name in PACKED_NAMES:
            self._buffers.pop(f"dense_packed_{name}", None)

    def kernel_plan(self, x: torch.Tensor, choice: str = "kernel") -> dict:
        """How the compiled kernel would run this layer on `x` (shape only) on this machine, for one
        of PASS_CHOICES: its instruction set, planes (rows or taps), tile width, image batches, work
        split, channel blocks per pass and plane buffer size. Made by the kernel's own planner."""
        if psconv_extension() is None:
            raise RuntimeError("the compiled kernel is unavailable on this machine")
        pass_blocks, serial = PASS_CHOICES[choice]
        return psconv_extension().plan(x.shape[0], x.shape[1], x.shape[2], x.shape[3], self.packed_channels,
                                       self.packed_taps, self.packed_chunk_slot, self.packed_chunk_group,
                                       self.packed_segment_pair, self.stride, pass_blocks, serial)

    def implementations(self, x: torch.Tensor, residual: torch.Tensor | None) -> dict:
        """Name -> a call on this input: what a plan for it times."""
        return {name: (lambda name=name: self.run(name, x, residual)) for name in self.choices()}

    def choices(self) -> list[str]:
        # oneDNN in the other memory format converts in and out: honest, rarely faster.
        names = ["dense", "dense-other-format"]
        # The kernel is a candidate at every density: at batch 1 it beat oneDNN even on dense
        # layers (resnet20 w1 dense, 1 thread, AMD EPYC Zen 3: 3.9 -> 2.5 ms; docs/deploy.md).
        if psconv_extension() is not None:
            names += list(PASS_CHOICES) + ([DENSE_PACKED] if self.density < 1 else [])
        return names

    def run(self, choice: str, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """One named implementation (plans, benchmarks and tests call them by name)."""
        if choice == "dense":
            return self.dense(x, residual)
        if choice in PASS_CHOICES:
            return self.kernel(x, residual, *PASS_CHOICES[choice])
        if choice == DENSE_PACKED:
            return self.kernel(x, residual, 1, False, packing=self.dense_packing())
        if choice == "dense-other-format":
            this = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            other = torch.contiguous_format if this is torch.channels_last else torch.channels_last
            out = self.dense(x.contiguous(memory_format=other),
                             None if residual is None else residual.contiguous(memory_format=other))
            return out.contiguous(memory_format=this)
        raise ValueError(f"unknown implementation {choice!r}; this layer has {', '.join(self.choices())}")

    def plan_key(self, x: torch.Tensor, residual: torch.Tensor | None) -> str:
        """The cache key: the layer's shape and density, the input, and how it runs."""
        fmt = "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "contiguous"
        return (f"conv{self.kernel_size}x{self.kernel_size} s{self.stride} {self.in_channels}->{self.out_channels} "
                f"{x.shape[2]}x{x.shape[3]} density={self.density:.3f} groups={self.groups} relu={int(self.relu)} "
                f"residual={int(residual is not None)} batch={x.shape[0]} threads={torch.get_num_threads()} {fmt}")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv(x) + bias [+ residual], then the ReLU if fused: a residual block's add and ReLU ride
        along in the kernel's last pass over the output."""
        # ONNX must see ordinary ops (the standard convolution this layer equals); torch.compile,
        # torch.export and TorchScript tracing see the operator leancnn::sparse_conv.
        if psconv_extension() is None or torch.onnx.is_in_onnx_export() or x.device.type != "cpu" \
                or x.dtype != torch.float32 \
                or x.dim() != 4 or (torch.is_grad_enabled() and x.requires_grad) \
                or (residual is not None and (residual.dtype != torch.float32 or residual.requires_grad)):
            return self.dense(x, residual)
        if residual is not None and residual.shape != self.output_shape(x):
            return self.dense(x, residual)   # a broadcasting add (fused from a graph): the kernel adds same-shaped
        if capturing_graph():
            # A graph is being captured (fake tensors, maybe a symbolic batch: nothing to time, and
            # no branching on the shape): what the last eager call ran (deploy(example_inputs=...) makes
            # one), else the kernel.
            return self.run(self.planned.last or ("kernel" if "kernel" in self.choices() else "dense"), x, residual)
        # The per-call lookup is a tuple (a string key and a tensor op per call cost ~20 us a layer).
        fast_key = (tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last), residual is None,
                    torch.get_num_threads())
        choice = self.planned.get(fast_key)
        if choice is None:
            choice = self.planned.plan(fast_key, self.plan_key(x, residual), self.implementations(x, residual))
            if DENSE_PACKED not in self.planned.by_key.values():
                self.drop_dense_packing()   # timed, not chosen: its memory back
        return self.run(choice, x, residual)

    def output_shape(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        n, _, h, w = x.shape
        return (n, self.out_channels, (h - 1) // self.stride + 1, (w - 1) // self.stride + 1)

    @property
    def plans(self) -> dict[str, dict]:
        """Plan cache key -> {"choice", "times_ms", "cached"}: the plans this layer made or read."""
        return self.planned.plans

    def plan_summary(self) -> list[dict]:
        """The plans this layer made or read: one dict per key (batch, threads, format)."""
        return self.planned.summary()

    def leancnn_cost(self, inputs: tuple, output: torch.Tensor) -> LayerCost:
        uses = output.shape[-2] * output.shape[-1]
        kept = int(self.mask.sum())
        bias = 0 if self.bias is None else self.bias.numel()
        nonzero = int(torch.count_nonzero(self.weight)) + (0 if self.bias is None else int(torch.count_nonzero(self.bias)))
        # Values of the kept weights (and bias); per pair of a group one index, (channel, tap) in
        # 16 bits when C_in x 9 fits, else 32; the segment and chunk tables (32 bits each).
        index_bytes = 2 if self.in_channels * TAPS <= 2 ** 16 else 4
        tables = self.packed_chunk_slot.numel() + self.packed_chunk_group.numel() + self.packed_segment_pair.numel()
        storage = self.packed_weights.numel() * FP32_BYTES + bias * FP32_BYTES \
            + self.packed_channels.numel() * index_bytes + tables * 4
        dense = (self.weight.numel() + bias) * FP32_BYTES
        # A dense (or nearly dense) layer ships its plain weights, smaller than values plus indices.
        return LayerCost(self.weight.numel() * uses, kept * uses, self.weight.numel() + bias, nonzero,
                         min(storage, dense), self.storage_format if storage < dense else "dense")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"relu={self.relu}, density={self.density:.3f}, chunks={self.packed_chunk_slot.numel() - 1}, "
                f"isa={self.isa}")
