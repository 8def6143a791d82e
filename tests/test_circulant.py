"""Block-circulant layers (CirCNN): against a dense layer whose weight is the explicit
block-circulant matrix (built entry by entry here), forward and backward, both routes;
the projection; the MAC count by hand; the method's layers, bad options and compress."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from leancnn.cli import main
from leancnn.errors import ConfigError
from leancnn.experiment import train_run
from leancnn.kernels.circulant import CIRCULANT_CHOICES, CirculantInference
from leancnn.kernels.sparse import SparseConvInference
from leancnn.layers.circulant import (BlockCirculantConv2d, BlockCirculantLinear, circulant_project, fft_macs)
from leancnn.measure.counting import count
from leancnn.methods import apply_methods, parse_method
from leancnn.models import create_model
from leancnn.runs import load_run

from .conftest import tiny_config


def explicit_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """The dense weight, entry by entry: W[p k + a, q k + b] = c_pq[(a - b) mod k] (autograd flows to `vectors`)."""
    blocks, inputs, k = vectors.shape[:3]
    rows = [torch.cat([torch.stack([vectors[p, q, (a - b) % k] for b in range(k)], dim=0) for q in range(inputs)], dim=0)
            for p in range(blocks) for a in range(k)]
    return torch.stack(rows, dim=0)


CONV_CASES = [  # (k, in, out, kernel, stride, padding)
    (2, 4, 6, 3, 1, 1), (3, 6, 9, 3, 2, 1), (4, 8, 12, 3, 1, 1), (4, 16, 8, 1, 2, 0), (8, 16, 16, 3, 1, 1),
]


@pytest.mark.parametrize("compute", ["fft", "dense"])
@pytest.mark.parametrize("k, cin, cout, kernel, stride, padding", CONV_CASES)
def test_circulant_conv_equals_the_explicit_block_circulant_convolution(compute, k, cin, cout, kernel, stride, padding):
    generator = torch.Generator().manual_seed(k * 100 + cin + cout)
    layer = BlockCirculantConv2d(cin, cout, kernel, stride, padding, bias=True, block=k, compute=compute)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(cout, generator=generator))
    x = torch.randn(3, cin, 9, 7, generator=generator, requires_grad=True)
    reference_vectors = layer.weight.detach().clone().requires_grad_(True)
    reference_x = x.detach().clone().requires_grad_(True)
    expected = F.conv2d(reference_x, explicit_matrix(reference_vectors), layer.bias.detach(), stride, padding)
    got = layer(x)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    upstream = torch.randn(expected.shape, generator=generator)
    (got * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert torch.allclose(x.grad, reference_x.grad, atol=1e-5)
    # The vectors' gradient is the dense weight's gradient summed along each block's diagonals.
    assert torch.allclose(layer.weight.grad, reference_vectors.grad, atol=1e-4)


@pytest.mark.parametrize("compute", ["fft", "dense"])
@pytest.mark.parametrize("k, fin, fout", [(2, 6, 4), (5, 10, 15), (8, 32, 16)])
def test_circulant_linear_equals_the_explicit_matrix(compute, k, fin, fout):
    generator = torch.Generator().manual_seed(k + fin)
    layer = BlockCirculantLinear(fin, fout, block=k, compute=compute)
    x = torch.randn(2, 3, fin, generator=generator, requires_grad=True)   # leading dimensions kept
    reference_vectors = layer.weight.detach().clone().requires_grad_(True)
    expected = F.linear(x, explicit_matrix(reference_vectors), layer.bias.detach())
    got = layer(x)
    assert got.shape == (2, 3, fout) and torch.allclose(got, expected, atol=1e-5)
    got.sum().backward()
    expected.sum().backward()
    assert torch.allclose(layer.weight.grad, reference_vectors.grad, atol=1e-4)


def test_projection_is_the_mean_along_the_diagonals_and_exact_on_a_circulant_weight():
    # k = 2, one block: c0 = mean(1, 4) = 2.5 (the diagonal), c1 = mean(5, 2) = 3.5 (a - b = 1 mod 2).
    weight = torch.tensor([[1.0, 2.0], [5.0, 4.0]])
    assert torch.equal(circulant_project(weight, 2), torch.tensor([[[2.5, 3.5]]]))
    vectors = torch.randn(3, 2, 4, 3, 3)
    assert torch.allclose(circulant_project(explicit_matrix(vectors), 4), vectors, atol=1e-6)
    # The projection is orthogonal: what it leaves is orthogonal to every block-circulant matrix.
    dense = torch.randn(8, 12, 3, 3)
    residual = dense - explicit_matrix(circulant_project(dense, 4))
    assert abs(float((residual * explicit_matrix(torch.randn(2, 3, 4, 3, 3))).sum())) < 1e-4


def test_counting_by_hand():
    # 8 -> 16 channels, k = 4, 3x3, padding 1, on 6x6: P = 4 output blocks, Q = 2 input blocks, F = 3 frequencies.
    layer = BlockCirculantConv2d(8, 16, 3, 1, 1, bias=False, block=4)
    profile = count(nn.Sequential(layer), (8, 6, 6))
    products = 4 * 3 * 4 * 2 * 9 * 36            # 4 real MACs x F x P x Q x taps x output pixels
    transforms = (2 * 36 + 4 * 36) * math.ceil(1.25 * 4 * 2)   # RFFTs in, inverses out, 10 MACs each
    assert fft_macs(4) == 10
    assert profile.macs_dense == 16 * 8 * 9 * 36
    assert profile.macs_effective == products + transforms
    assert profile.params_total == 4 * 2 * 4 * 9 == 16 * 8 * 9 // 4
    # k = 2: the FFT route (8 MACs per block and tap) costs more than dense (4): the dense one counts.
    small = count(nn.Sequential(BlockCirculantConv2d(4, 4, 3, 1, 1, bias=False, block=2)), (4, 6, 6))
    assert small.macs_effective == small.macs_dense == 4 * 4 * 9 * 36


@pytest.mark.parametrize("choice", CIRCULANT_CHOICES)
def test_deployed_layer_folds_the_batch_norm_on_either_route(choice):
    generator = torch.Generator().manual_seed(3)
    layer = BlockCirculantConv2d(8, 16, 3, 2, 1, bias=False, block=4)
    norm = nn.BatchNorm2d(16)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(16, generator=generator))
        norm.running_var.copy_(torch.rand(16, generator=generator) + 0.5)
        norm.weight.copy_(torch.randn(16, generator=generator))
        norm.bias.copy_(torch.randn(16, generator=generator))
    x = torch.randn(2, 8, 10, 10, generator=generator)
    with torch.no_grad():
        expected = norm.eval()(layer(x))
        deployed = CirculantInference(layer, norm)
        got = deployed.run(choice, x)
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
        deployed.use_kernel(relu=True)      # the dense route on the sparse-kernel layer, a ReLU fused in both
        assert isinstance(deployed.dense_layer, SparseConvInference)
        assert torch.allclose(deployed.run(choice, x), torch.relu(expected), atol=1e-4)
    linear = BlockCirculantLinear(12, 8, block=4)
    features = torch.randn(5, 12, generator=generator)
    with torch.no_grad():
        assert torch.allclose(CirculantInference(linear).run(choice, features), linear(features), atol=1e-5)


def converted(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (BlockCirculantConv2d, BlockCirculantLinear))}


def test_auto_converts_every_divisible_layer_but_the_stem_and_cuts_their_parameters_k_times():
    dense = create_model("resnet20", in_channels=1, width=0.25)        # stages of 4, 8 and 16 channels
    shapes = {n: m.weight.shape for n, m in dense.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    model, _ = apply_methods(create_model("resnet20", in_channels=1, width=0.25), ["circulant:block=8"])
    layers = converted(model)
    stem = next(n for n, m in dense.named_modules() if isinstance(m, nn.Conv2d))
    expected = {n for n, s in shapes.items() if n != stem and s[0] % 8 == 0 and s[1] % 8 == 0}
    assert set(layers) == expected and len(expected) > 5
    assert "classifier" not in layers                                   # 10 classes: 8 does not divide them
    for name, layer in layers.items():
        assert layer.weight.numel() * 8 == math.prod(shapes[name]), name


@pytest.mark.parametrize("spec, message", [
    ("circulant:block=1", "block must be >= 2"),
    ("circulant:block=4,compute=winograd", "compute must be one of fft, dense"),
])
def test_bad_options_fail_in_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_method(spec)


@pytest.mark.parametrize("spec, message", [
    ("circulant:block=3", "the block divides the channels of no convolution"),
    ("circulant:block=8,layers=features.1.*", r"does not divide the channels of layer features\.1\.conv1\.0 \(4 in, 4 out\)"),
    ("circulant:block=4,layers=nothing.here", "no layer it can convert matches"),
])
def test_a_block_that_does_not_divide_fails_before_training(tmp_path, capsys, spec, message):
    code = main(["train", "--data", "synthetic", "--model", "resnet20", "--width", "0.25", "--epochs", "1",
                 "--method", spec, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_compress_projects_a_trained_run_and_the_result_reloads(tmp_path):
    trained = train_run(tiny_config(tmp_path, out=str(tmp_path / "dense")), progress=False)
    originals = {n: m.weight.detach().clone() for n, m in trained.model.named_modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[0] % 4 == 0 and m.weight.shape[1] % 4 == 0}
    code = main(["compress", str(trained.run_dir), "--method", "circulant:block=4", "--epochs", "0",
                 "--out", str(tmp_path / "circulant"), "--no-progress", "--no-latency"])
    assert code == 0
    model, _ = load_run(tmp_path / "circulant")
    layers = converted(model)
    assert layers and set(layers) <= set(originals)
    for name, layer in layers.items():
        assert torch.allclose(layer.weight, circulant_project(originals[name], 4), atol=1e-6), name
