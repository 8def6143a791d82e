"""pSConv: supports, the periodic rule, zero drift, save/load, effective MACs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from leancnn.errors import ConfigError
from leancnn.experiment import train_run
from leancnn.layers.psconv import CORNER_SUPPORTS, PSConv2d
from leancnn.measure import count
from leancnn.methods import apply_methods, parse_method
from leancnn.models import create_model
from leancnn.runs import load_run

from .conftest import tiny_config


def taps_of(layer: PSConv2d) -> torch.Tensor:
    return layer.mask.flatten(2).sum(-1)  # [C_out, C_in] taps per kernel


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("assign", ["periodic", "random"])
def test_every_kernel_has_exactly_k_taps(k, assign):
    layer = PSConv2d(12, 20, k=k, period=4, assign=assign)
    assert (taps_of(layer) == k).all()


def test_periodic_rule_and_corner_supports():
    period = 4
    layer = PSConv2d(8, 8, k=4, period=period)
    mask = layer.mask.flatten(2)
    for i in range(8):
        for j in range(8):
            residue = (i + j + 1) % period
            expected = torch.zeros(9, dtype=torch.bool)
            expected[list(CORNER_SUPPORTS[residue])] = True
            assert torch.equal(mask[i, j], expected), (i, j)
    assert len(layer.support_patterns) == period


def test_psd_makes_one_kernel_in_p_dense():
    layer = PSConv2d(16, 16, k=1, period=16, dense_every=True)
    taps = taps_of(layer)
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    dense = (rows + cols + 1) % 16 == 0
    assert (taps[dense] == 9).all() and (taps[~dense] == 1).all()
    assert dense.float().mean() == pytest.approx(1 / 16)


@pytest.mark.parametrize("alias, options", [
    ("PS4_P4", (4, 4, False)), ("PSD4_P8", (4, 8, True)), ("PSD2_P8", (2, 8, True)),
    ("PSD1_P16", (1, 16, True)), ("PS1_P9", (1, 9, False)), ("psconv:k=2,period=6", (2, 6, False)),
])
def test_paper_names_resolve(alias, options):
    method = parse_method(alias)
    assert (method.options.k, method.options.period, method.options.dense_every) == options


def test_conversion_keeps_first_conv_1x1_and_classifier_dense():
    model, _ = apply_methods(create_model("resnet20"), ["PS4_P4"])
    converted = [n for n, m in model.named_modules() if isinstance(m, PSConv2d)]
    assert len(converted) == 18  # 19 3x3 convs minus the first
    assert type(model.get_submodule("features.0.0")) is nn.Conv2d
    assert all(type(m) is nn.Conv2d and m.kernel_size == (1, 1)
               for n, m in model.named_modules() if "shortcut.0" in n and isinstance(m, nn.Conv2d))


def test_effective_macs_of_the_layer_are_exact():
    layer = PSConv2d(16, 32, k=4, period=4, stride=2)
    profile = count(nn.Sequential(layer), (16, 9, 9))
    out_pixels = 5 * 5
    assert profile.macs_effective == int(layer.mask.sum()) * out_pixels == 16 * 32 * 4 * out_pixels
    assert profile.macs_dense == 16 * 32 * 9 * out_pixels
    # Compact storage: values of existing taps + 4 patterns, no per-weight index.
    assert profile.layers[0].cost.storage_bytes == 16 * 32 * 4 * 4 + 4 * 2 + 32 * 4


def _train_plain(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images = torch.rand(8, 1, 12, 12, generator=generator)
        labels = torch.randint(0, 10, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_masked_weights_stay_exactly_zero(optimizer_name):
    torch.manual_seed(0)
    model, _ = apply_methods(create_model("resnet20", in_channels=1, width=0.25), ["PS4_P4"])
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    _train_plain(model, optimizer, steps=60)  # no re-masking: the layer alone must hold the zeros
    layers = [m for m in model.modules() if isinstance(m, PSConv2d)]
    for layer in layers:
        assert torch.count_nonzero(layer.weight[~layer.mask]) == 0
        assert torch.count_nonzero(layer.weight[layer.mask]) > 0.99 * layer.mask.sum()


def test_saved_run_reloads_with_identical_outputs(tmp_path):
    outcome = train_run(tiny_config(tmp_path, methods=["PSD2_P8"], epochs=1), progress=False)
    model, architecture = load_run(outcome.run_dir)
    assert architecture["methods"][0].startswith("psconv:k=2,period=8,dense_every=True")
    x = torch.rand(5, 1, 16, 16)
    assert torch.equal(model(x), outcome.model.eval()(x))
    for original, loaded in zip(outcome.model.modules(), model.modules()):
        if isinstance(original, PSConv2d):
            assert torch.equal(original.mask, loaded.mask)
            assert torch.count_nonzero(loaded.weight[~loaded.mask]) == 0
    assert outcome.result.macs_effective < outcome.result.macs_dense


@pytest.mark.parametrize("spec, model_name, message", [
    ("psconv:k=0", "resnet20", "k must be in 1..9"),
    ("psconv:k=10", "resnet20", "k must be in 1..9"),
    ("psconv:period=0", "resnet20", "period must be >= 1"),
    ("psconv:k=4,period=4", "mobilenetv2", "no 3x3 convolution to convert"),
    ("psconv:kk=4", "resnet20", "unknown option 'kk'; allowed: k, period"),
])
def test_misfit_options_fail_clearly(spec, model_name, message):
    with pytest.raises(ConfigError, match=message):
        apply_methods(create_model(model_name), [spec])


def test_inference_cache_follows_weight_updates():
    torch.manual_seed(0)
    layer = PSConv2d(4, 6, k=2, period=3)
    x = torch.rand(2, 4, 7, 7)
    reference = lambda: nn.functional.conv2d(x, layer.weight * layer.mask, layer.bias, padding=1)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(layer(x), reference())
        layer.weight.add_(1.0)  # an in-place change must invalidate the cached masked weight
        assert torch.equal(layer(x), reference())
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    other = PSConv2d(4, 6, k=2, period=3)
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other(x), reference())


def test_periodic_layer_saves_only_its_patterns():
    periodic = PSConv2d(8, 8, k=4, period=4).state_dict()
    assert "support_patterns" in periodic and "support_index" not in periodic
    assert "support_index" in PSConv2d(8, 8, k=4, period=4, assign="random").state_dict()
