"""Counting: MACs dense and effective, parameters, storage, the layer protocol."""
from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from leancnn.cli import main
from leancnn.errors import LeancnnError
from leancnn.measure import LayerCost, count, latency
from leancnn.measure.counting import tensor_storage
from leancnn.models import MODELS, create_model


@pytest.mark.parametrize("name, expected", [("resnet18", 0.556e9), ("vgg16", 0.313e9)])
def test_dense_macs_match_the_papers(name, expected):
    profile = count(create_model(name, num_classes=10), (3, 32, 32))
    assert abs(profile.macs_dense - expected) / expected < 0.01


@pytest.mark.parametrize("name", MODELS.names())
def test_agrees_with_torch_flop_counter(name):
    model = create_model(name, num_classes=10, in_channels=3, width=0.5).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    profile = count(model, (3, 32, 32))
    assert 2 * profile.macs_dense == counter.get_total_flops()  # FlopCounterMode reports 2 x MACs
    # A fresh dense model: effective equals dense but for weights that happened to be drawn as exact zeros.
    assert profile.macs_dense * 0.9999 <= profile.macs_effective <= profile.macs_dense
    assert profile.params_total == sum(p.numel() for p in model.parameters())


def test_masked_convolution_effective_macs_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
    mask = torch.rand_like(conv.weight) < 0.3
    with torch.no_grad():
        conv.weight.mul_(mask)
    profile = count(nn.Sequential(conv), (8, 15, 15))
    out_h = out_w = 8
    nonzero = int(mask.sum())
    assert profile.macs_effective == nonzero * out_h * out_w
    assert profile.macs_dense == conv.weight.numel() * out_h * out_w
    assert profile.params_nonzero == nonzero


def test_storage_is_the_cheapest_honest_format_hand_computed():
    # 50 distinct fp32 values in a 10x100 weight, 5 per row at columns 0-4: flat positions
    # 0-4, 100-104, ...; gaps (zeros skipped) 0,0,0,0,0 then 95,0,0,0,0 per row.
    weight = torch.zeros(10, 100)
    weight[:, :5] = torch.arange(1, 51, dtype=torch.float32).view(10, 5)
    csr = 50 * (4 + 4) + 11 * 4                                   # 444 bytes
    # Relative index, fp32 values: b = 7 bits holds every gap (95 < 128): 50 entries x 39 bits.
    # (b = 6: 95 >> 6 = 1 filler per row, 60 x 38 = 2280 bits > 1950.)
    relative = -(-50 * (32 + 7) // 8)                            # 244 bytes
    assert tensor_storage(weight) == (relative, "relative index (32-bit values, 7-bit gaps)")
    assert relative < csr < 4000
    # The same positions with 3 values (a quantised layer): 2-bit codes (3 levels and zero) and a
    # 12-byte codebook; gaps 7 bits -> 50 x 9 bits = 57 bytes, against dense codes 1000 x 2 / 8 = 250.
    weight[:, :5] = torch.tensor([0.5, -0.5, 0.25, 0.5, -0.5])
    assert tensor_storage(weight) == (-(-50 * 9 // 8) + 12, "relative index (2-bit values, 7-bit gaps)")
    # Dense values that take two levels: a 2-bit code each (two levels and zero) and an 8-byte codebook.
    levels = torch.tensor([1.0, -1.0]).repeat(500).view(10, 100)
    assert tensor_storage(levels) == (1000 * 2 // 8 + 8, "dense 2-bit codes")
    random = torch.randn(10, 100)
    assert tensor_storage(random) == (4000, "dense")
    # A long gap takes fillers: one non-zero at flat position 0 and one at 999 (gap 998).
    far = torch.zeros(10, 100)
    far[0, 0], far[9, 99] = 1.5, 2.5
    # Two values: a codebook (8 bytes) costs more than it saves, so fp32 values. b = 10 holds the gap
    # (998 < 1024): 2 x 42 bits = 11 bytes; b = 9 needs a filler (998 >> 9 = 1): 3 x 41 = 123 bits.
    assert tensor_storage(far) == (11, "relative index (32-bit values, 10-bit gaps)")


class DeclaredCostLayer(nn.Module):
    """A custom layer that reports its own cost; its inner conv must not count twice."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.inner(x)

    def leancnn_cost(self, inputs, output):
        return LayerCost(macs_dense=1000, macs_effective=123, params=7, params_nonzero=7, storage_bytes=28,
                         storage_format="custom")


def test_layer_protocol_counts_custom_layers_once():
    model = nn.Sequential(DeclaredCostLayer(), nn.Conv2d(4, 2, 1, bias=False))
    profile = count(model, (4, 5, 5))
    kinds = [row.kind for row in profile.layers]
    assert kinds == ["DeclaredCostLayer", "Conv2d"]
    assert profile.macs_effective == 123 + 4 * 2 * 25
    assert profile.macs_dense == 1000 + 4 * 2 * 25


def test_input_shape_that_does_not_fit():
    with pytest.raises(LeancnnError, match="input shape 3x32x32 does not fit the model"):
        count(create_model("resnet20", in_channels=1), (3, 32, 32))


def test_profile_cli_json(capsys):
    assert main(["profile", "--model", "resnet18", "--input", "3x32x32", "--json"]) == 0
    output = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_nonzero", "macs_dense", "macs_effective", "storage_bytes"):
        assert isinstance(output[key], int) and output[key] > 0
    assert abs(output["macs_dense"] - 0.556e9) / 0.556e9 < 0.01
    assert output["layers"][0]["name"] == "features.0.0"
    assert main(["profile", "--model", "resnet18", "--input", "3x32"]) == 2
    assert "expected CxHxW" in capsys.readouterr().err


@pytest.mark.parametrize("cpuinfo, expected", [
    ("vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\n"
     "vendor_id\t: AuthenticAMD\ncpu family\t: 25\n", "AMD EPYC (Zen 5, family 26 model 2)"),
    ("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9654\n", "AMD EPYC 9654 (Zen 4, family 25 model 17)"),
    ("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n", "AMD EPYC (Zen 3, family 25 model 1)"),
    ("vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Processor @ 2.80GHz\n",
     "Intel(R) Xeon(R) Processor @ 2.80GHz (family 6 model 143)"),
    ("processor\t: 0\nmodel name\t: Some ARM core\n", "Some ARM core"),
])
def test_cpu_model_names_the_core_generation_from_cpuinfo(monkeypatch, cpuinfo, expected):
    """The machine line of every table: a VM's bare "AMD EPYC" made Zen 3 and Zen 5 tables look alike."""
    monkeypatch.setattr(latency, "open", lambda *args, **kwargs: io.StringIO(cpuinfo), raising=False)
    assert latency.cpu_model() == expected
