"""Pruning at initialisation: SynFlow's scores against the hand-computed synaptic flow, exact
mask sizes, layer collapse, and bad options."""
from __future__ import annotations

import re
import types
import warnings

import pytest
import torch
from torch import nn

from leancnn.errors import ConfigError
from leancnn.methods import parse_method
from leancnn.methods.init_prune import synflow_scores
from leancnn.methods.masking import PRUNE_MASK, has_input_output_path, masked_layers
from leancnn.models import create_model

INIT_METHODS = ["synflow", "snip", "magnitude-init", "random-init"]


def fake_trainer(model, input_shape=(1, 28, 28), images=64):
    generator = torch.Generator().manual_seed(3)
    dataset = types.SimpleNamespace(
        input_shape=input_shape,
        train_images=torch.randint(0, 256, (images, *input_shape), dtype=torch.uint8, generator=generator),
        train_labels=torch.randint(0, 10, (images,), generator=generator))
    return types.SimpleNamespace(model=model, dataset=dataset, config=types.SimpleNamespace(batch_size=32))


def pruned(spec: str, model_name: str = "resnet20", seed: int = 0):
    torch.manual_seed(seed)
    method = parse_method(spec)
    model = method.prepare(create_model(model_name, num_classes=10, in_channels=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method.before_training(fake_trainer(model))
    return method, model


def test_synflow_scores_equal_the_hand_computed_flow_of_a_two_layer_linear_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[0].weight.normal_()
        net[1].weight.normal_()
    masks = {"0": torch.ones(4, 3, dtype=torch.bool), "1": torch.ones(2, 4, dtype=torch.bool)}
    masks["0"][1, 2] = False   # a pruned weight takes no flow
    scores = synflow_scores(net, masks, (3,))
    w1 = net[0].weight.detach().double().abs() * masks["0"]
    w2 = net[1].weight.detach().double().abs()
    # R = 1^T |W2| |W1| 1: dR/dW1[i, j] = sum_k |W2[k, i]|, dR/dW2[k, i] = sum_j |W1[i, j]|.
    expected1 = w1 * w2.sum(dim=0)[:, None]
    expected2 = w2 * w1.sum(dim=1)[None, :]
    torch.testing.assert_close(scores["0"], expected1)
    torch.testing.assert_close(scores["1"], expected2)
    assert scores["0"][1, 2] == 0
    # Conservation: each layer's total score is R.
    total = float(w2.sum(dim=0) @ w1.sum(dim=1))
    assert float(scores["0"].sum()) == pytest.approx(total) and float(scores["1"].sum()) == pytest.approx(total)


@pytest.mark.parametrize("name", INIT_METHODS)
def test_masks_keep_exactly_the_requested_number_of_weights(name):
    spec = f"{name}:density=0.03" + (",rounds=10" if name == "synflow" else "")
    _, model = pruned(spec)
    layers = masked_layers(model)
    total = sum(getattr(m, PRUNE_MASK).numel() for _, m in layers)
    kept = sum(int(getattr(m, PRUNE_MASK).sum()) for _, m in layers)
    assert kept == round(0.03 * total)
    # The weights follow their masks; the shortcuts are not masked (residual=false).
    assert all(torch.equal(m.weight != 0, getattr(m, PRUNE_MASK)) for _, m in layers)
    assert not any("shortcut" in n for n, _ in layers)
    assert any("shortcut" in n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def test_random_and_magnitude_scores_are_what_they_say():
    _, model = pruned("magnitude-init:density=0.1")
    kept = torch.cat([m.weight.detach().abs()[getattr(m, PRUNE_MASK)] for _, m in masked_layers(model)])
    torch.manual_seed(0)
    fresh = dict(create_model("resnet20", num_classes=10, in_channels=1).named_modules())  # the same init
    dropped = torch.cat([fresh[n].weight.detach().abs()[~getattr(m, PRUNE_MASK)] for n, m in masked_layers(model)])
    assert float(kept.min()) >= float(dropped.max())   # the global magnitude threshold
    _, random_model = pruned("random-init:density=0.1")
    per_layer = [float(getattr(m, PRUNE_MASK).float().mean()) for _, m in masked_layers(random_model)
                 if getattr(m, PRUNE_MASK).numel() > 10000]
    assert all(0.09 < d < 0.11 for d in per_layer)     # uniform: every large layer near the density


def test_synflow_avoids_the_collapse_that_magnitude_at_init_suffers():
    # The SynFlow paper's central observation, on resnet20 at init.
    magnitude, _ = pruned("magnitude-init:density=0.002")
    assert "classifier" in magnitude.report["collapsed_layers"] and not magnitude.report["input_output_path"]
    synflow, model = pruned("synflow:density=0.002,rounds=20")
    assert synflow.report["input_output_path"]
    assert has_input_output_path(model, (1, 28, 28))
    # Every layer every path must cross keeps weights (stem, classifier); at 0.01 no layer empties.
    for name in ("features.0.0", "classifier"):
        assert int(getattr(model.get_submodule(name), PRUNE_MASK).sum()) > 0
    synflow, _ = pruned("synflow:density=0.01,rounds=20")
    assert synflow.report["collapsed_layers"] == []


def test_path_check_sees_a_cut_chain():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    for _, m in [("0", net[0]), ("2", net[2])]:
        m.register_buffer(PRUNE_MASK, torch.ones_like(m.weight, dtype=torch.bool))
    assert has_input_output_path(net, (3,))
    net[2].prune_mask[:, 1:] = False
    net[0].prune_mask[0] = False       # unit 0 is the only one layer 2 still reads, and it lost its inputs
    assert not has_input_output_path(net, (3,))


def test_a_resumed_run_keeps_its_masks():
    method, model = pruned("random-init:density=0.1")
    before = {n: getattr(m, PRUNE_MASK).clone() for n, m in masked_layers(model)}
    again = parse_method("random-init:density=0.1,seed=5")
    again.before_training(fake_trainer(model))   # masks already set: nothing re-scored
    assert all(torch.equal(before[n], getattr(m, PRUNE_MASK)) for n, m in masked_layers(model))


@pytest.mark.parametrize("spec, message", [
    ("synflow:density=0", "density must be in (0, 1]"),
    ("snip:density=1.5", "density must be in (0, 1]"),
    ("synflow:rounds=0", "rounds must be at least 1"),
    ("snip:rounds=5", "unknown option 'rounds'; allowed: density, seed, residual"),
])
def test_bad_options_fail_before_training(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_method(spec)
