"""Residual adds and ReLUs fused into kernel layers from each module's traced graph
(leancnn.kernels.fusion): what is fused in blocks written in different ways, that the fused
model computes what the model does, and what is left alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import leancnn
from leancnn.deploy import deploy
from leancnn.kernels.fusion import fusions
from leancnn.kernels.sparse import SparseConvInference


class FunctionalBlock(nn.Module):
    """A user's block: no Sequential, torch.add and F.relu, the residual first."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(torch.add(x, self.conv2(F.relu(self.conv1(x)))))


class TwoUsers(nn.Module):
    """conv's output is added and also returned: the add cannot go into the kernel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        y = self.conv(x)
        return y + x, y


class Broadcast(nn.Module):
    """A per-channel offset added to the conv's output: a broadcasting add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.offset = nn.Parameter(torch.randn(1, channels, 1, 1))

    def forward(self, x):
        return torch.relu(self.conv(x) + self.offset)


class Branchy(nn.Module):
    """Data-dependent control flow: does not trace, keeps its forward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x if x.sum() > 0 else x


def test_fusions_in_blocks_written_in_different_ways_match_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(FunctionalBlock(8), Broadcast(8), Branchy(8)).eval()
    x = torch.rand(2, 8, 6, 7)
    deployed = deploy(model, graph="eager")
    assert fusions(deployed) == {"0": ["conv1: relu", "conv2: add+relu"], "1": ["conv: add+relu"]}
    assert type(deployed[0]).__name__ == "FunctionalBlock" and set(model.state_dict()) <= set(deployed.state_dict())
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(deployed(x), expected, atol=1e-5)
        for choice in ("dense", "kernel"):   # the fused call on each implementation
            for layer in deployed.modules():
                if isinstance(layer, SparseConvInference):
                    layer.planned.by_key = {key: choice for key in layer.planned.by_key}
            assert torch.allclose(deployed(x), expected, atol=1e-5), choice
        assert torch.allclose(deploy(model, graph="torchscript")(x), expected, atol=1e-5)


def test_mobilenetv2_inverted_residuals_fuse_their_add_into_the_projection():
    """x + body(x): the body's last layer is a 1x1 kernel layer (batch norm folded); no ReLU after."""
    torch.manual_seed(2)
    model = leancnn.create_model("mobilenetv2", in_channels=1, width=0.25).eval()
    residual_blocks = [name for name, m in model.named_modules() if getattr(m, "use_residual", False)]
    deployed = deploy(model, graph="eager")
    found = fusions(deployed)
    assert set(found) == set(residual_blocks) and len(residual_blocks) >= 5
    # The body's last conv-bn Sequential is the 1x1 projection.
    last = {name: len(model.get_submodule(name).body) - 1 for name in residual_blocks}
    assert found == {name: [f"body.{last[name]}.0: add"] for name in residual_blocks}
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-4, rtol=1e-4)


class CalledTwice(nn.Module):
    """One layer called twice: fusing its ReLU into the first call would change the second."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.relu(self.conv(x)))


@pytest.mark.parametrize("block", [TwoUsers, CalledTwice])
def test_what_cannot_be_fused_is_left_alone(block):
    """An add whose kernel output has another user; a layer called twice (fusing its ReLU into the
    first call would change the second)."""
    torch.manual_seed(4)
    model = block(4).eval()
    deployed = deploy(model, graph="eager")
    assert fusions(deployed) == {}
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        got, want = deployed(x), model(x)
    for a, b in zip(*((g,) if isinstance(g, torch.Tensor) else g for g in (got, want))):
        assert torch.allclose(a, b, atol=1e-5)
