"""Parameters, MACs and storage, per layer and in total, counted by running the
model once on a real input shape.

MACs are multiply-accumulates per image (one MAC = 2 FLOPs in tools that say
FLOPs). Dense MACs come from shapes; effective MACs count only weights that
exist (non-zero, or declared by the layer's own structure).

A layer type added later is counted without touching this file: it defines
`leancnn_cost(inputs, output) -> LayerCost`, and its sub-modules are then not
counted again.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LeancnnError, first_line

FP32_BYTES = 4
INDEX_BYTES = 4  # CSR column indices and row pointers are 32-bit


@dataclass
class LayerCost:
    macs_dense: int = 0
    macs_effective: int = 0
    params: int = 0
    params_nonzero: int = 0
    storage_bytes: int = 0
    storage_format: str = "dense"


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: list[int]
    cost: LayerCost

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "output_shape": self.output_shape, **asdict(self.cost)}


@dataclass
class Profile:
    input_shape: tuple[int, ...]
    layers: list[LayerRow] = field(default_factory=list)
    params_total: int = 0
    params_nonzero: int = 0
    macs_dense: int = 0
    macs_effective: int = 0
    storage_bytes: int = 0

    def totals(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in TOTAL_KEYS}


# The whole-model figures a profile reports (result.json has them at its top level).
TOTAL_KEYS = ("params_total", "params_nonzero", "macs_dense", "macs_effective", "storage_bytes")


MAX_CODED_LEVELS = 1 << 16   # more distinct values than this: stored as raw fp32
MAX_GAP_BITS = 16


def _value_coding(nonzero_values: torch.Tensor) -> tuple[int, int]:
    """(bits per stored value, codebook bytes) for these non-zero values: raw fp32, or a code per
    distinct value (one code more for zero) plus the codebook of fp32 levels, whichever is smaller
    (a quantised weight takes few levels: 4-bit ADMM values are 15 levels and zero)."""
    # Trained fp32 weights rarely repeat a value: when a sample of 4,096 has no repeat, the layer
    # has more than MAX_CODED_LEVELS levels (at most 65,536 levels, 4,096 draws repeat ~128 times;
    # none repeating has probability ~e^-128), and the whole layer is never sorted (a dense
    # resnet18 took 3 s to count with a full torch.unique per weight).
    sample = nonzero_values[:: max(1, nonzero_values.numel() // 4096)][:4096]
    if sample.numel() == 4096 and int(torch.unique(sample).numel()) == 4096:
        return 32, 0
    levels = int(torch.unique(nonzero_values).numel()) if nonzero_values.numel() else 0
    if levels > MAX_CODED_LEVELS:
        return 32, 0
    code_bits = max(1, math.ceil(math.log2(levels + 1)))
    return (code_bits, levels * FP32_BYTES) if code_bits * nonzero_values.numel() + levels * 32 < \
        32 * nonzero_values.numel() else (32, 0)


def relative_index_bits(positions: torch.Tensor, value_bits: int) -> tuple[int, int]:
    """(entries, gap bits) of the cheapest relative index (Deep Compression, ADMM-NN) for these
    flat positions: each non-zero stores the gap to the previous one in b bits; a gap too long
    for b bits takes filler entries (a zero value every 2^b positions). b minimises
    entries x (value bits + b)."""
    gaps = torch.diff(positions, prepend=positions.new_tensor([-1])) - 1     # zeros skipped, >= 0
    best = None
    for bits in range(1, MAX_GAP_BITS + 1):
        entries = positions.numel() + int((gaps >> bits).sum())
        cost = entries * (value_bits + bits)
        if best is None or cost < best[0]:
            best = (cost, entries, bits)
    return best[1], best[2]


def tensor_storage(tensor: torch.Tensor) -> tuple[int, str]:
    """Bytes and format of the cheapest way to store a weight: dense (fp32, or a code per weight
    plus a codebook when it takes few values), CSR (fp32 values, 32-bit column indices and row
    pointers, the weight seen as a [rows, rest] matrix) or a relative index (see
    relative_index_bits; values fp32 or coded). Vectors are stored dense fp32."""
    dense = tensor.numel() * FP32_BYTES
    if tensor.dim() < 2:
        return dense, "dense"
    flat = tensor.detach().flatten()
    nonzero = int(torch.count_nonzero(flat))
    positions = torch.nonzero(flat).flatten() if nonzero < flat.numel() else None   # None: every entry
    value_bits, codebook = _value_coding(flat if positions is None else flat[positions])
    options = [(dense, "dense")]
    if value_bits < 32:
        dense_bits = max(value_bits, 1)
        options.append((math.ceil(flat.numel() * dense_bits / 8) + codebook, f"dense {dense_bits}-bit codes"))
    options.append((nonzero * (FP32_BYTES + INDEX_BYTES) + (tensor.shape[0] + 1) * INDEX_BYTES, "csr"))
    # A relative index costs at least (value bits + 1) per non-zero: skip it when that is no cheaper.
    if positions is not None and nonzero and nonzero * (value_bits + 1) < 8 * min(option[0] for option in options):
        entries, gap_bits = relative_index_bits(positions, value_bits)
        options.append((math.ceil(entries * (value_bits + gap_bits) / 8) + codebook,
                        f"relative index ({value_bits}-bit values, {gap_bits}-bit gaps)"))
    return min(options, key=lambda option: option[0])


def _weight_layer_cost(module: nn.Module, output: torch.Tensor) -> LayerCost:
    weight = module.weight.detach()
    nonzero = int(torch.count_nonzero(weight))
    if isinstance(module, nn.Conv2d):
        # Every weight is used once per output pixel, whatever the groups.
        uses = output.shape[-2] * output.shape[-1]
    else:  # Linear: once per output row (all leading dims but the batch)
        uses = output.numel() // output.shape[0] // module.out_features
    storage, fmt = tensor_storage(weight)
    params, params_nonzero = weight.numel(), nonzero
    if module.bias is not None:
        params += module.bias.numel()
        params_nonzero += int(torch.count_nonzero(module.bias))
        storage += module.bias.numel() * FP32_BYTES
    return LayerCost(weight.numel() * uses, nonzero * uses, params, params_nonzero, storage, fmt)


def _counted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that report a cost: the protocol's, then Conv2d/Linear, outermost first."""
    counted: dict[str, nn.Module] = {}
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if hasattr(module, "leancnn_cost"):
            counted[name] = module
            skip_prefixes.append(name + ".")
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            counted[name] = module
    return counted


def count(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> Profile:
    """Profile `model` on one image of `input_shape` (C, H, W)."""
    input_shape = tuple(int(s) for s in input_shape)
    counted = _counted_modules(model)
    rows: dict[str, LayerRow] = {}
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in rows:  # a module called twice (weight sharing) costs twice
                extra = _cost(mod, inputs, output)
                row = rows[name].cost
                row.macs_dense += extra.macs_dense
                row.macs_effective += extra.macs_effective
                return
            shape = list(output.shape[1:]) if isinstance(output, torch.Tensor) else []
            rows[name] = LayerRow(name, type(mod).__name__, shape, _cost(mod, inputs, output))
        return hook

    for name, module in counted.items():
        handles.append(module.register_forward_hook(make_hook(name, module)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    except RuntimeError as exc:
        first = first_line(exc)
        shape = "x".join(map(str, input_shape))
        raise LeancnnError(f"input shape {shape} does not fit the model ({first})") from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    profile = Profile(input_shape, [rows[n] for n in counted if n in rows])
    counted_params: set[int] = set()
    for name in rows:
        counted_params.update(id(p) for p in counted[name].parameters())
    for row in profile.layers:
        profile.macs_dense += row.cost.macs_dense
        profile.macs_effective += row.cost.macs_effective
        profile.storage_bytes += row.cost.storage_bytes
    for param in model.parameters():
        profile.params_total += param.numel()
        profile.params_nonzero += int(torch.count_nonzero(param.detach()))
        if id(param) not in counted_params:
            profile.storage_bytes += param.numel() * FP32_BYTES
    for name, buffer in model.named_buffers():
        # Inference needs float buffers (batch-norm statistics, masks are the layers' own business).
        if buffer.is_floating_point() and not any(name.startswith(n + ".") for n in rows if n):
            profile.storage_bytes += buffer.numel() * FP32_BYTES
    return profile


def _cost(module: nn.Module, inputs: tuple, output: Any) -> LayerCost:
    if hasattr(module, "leancnn_cost"):
        return module.leancnn_cost(inputs, output)
    return _weight_layer_cost(module, output)


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """'3x32x32' -> (3, 32, 32)."""
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise LeancnnError(f"--input {text!r}: expected CxHxW with positive integers, e.g. 3x32x32")
    return parts  # type: ignore[return-value]
