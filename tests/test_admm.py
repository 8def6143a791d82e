"""ADMM-NN pruning and quantisation: the projections against hand-computed cases and a
brute-force nearest level, the penalty, the straight-through retraining step, a trained run's
saved weights (exactly zero or exactly on their levels) and its storage, and bad options."""
from __future__ import annotations

import itertools
import json
import re
import types

import pytest
import torch
from torch import nn

from leancnn.compress import compress_run
from leancnn.errors import ConfigError
from leancnn.experiment import train_run
from leancnn.measure import count
from leancnn.methods import parse_method
from leancnn.methods.admm import SCALE, fit_scale, level_count, project, quantize
from leancnn.methods.masking import PRUNE_MASK, masked_layers
from leancnn.runs import load_run, read_result

from .conftest import tiny_config


def test_level_counts():
    # k bits: +-1 .. +-(2^(k-1) - 1) and the zero of a pruned weight = 2^k - 1 codes; k = 1: +-1.
    assert [level_count(k) for k in (1, 2, 3, 4, 8)] == [1, 1, 3, 7, 127]


def test_projection_keeps_the_largest_magnitudes_and_fits_one_level():
    weight = torch.tensor([0.1, -0.5, 0.9, 0.05, -1.2])
    pruned, mask, scale = project(weight, keep=3, bits=0)
    assert pruned.tolist() == pytest.approx([0, -0.5, 0.9, 0, -1.2])
    assert mask.tolist() == [False, True, True, False, True] and scale == 0
    # 2 bits: levels +-s only; the least-squares s is the mean magnitude of the survivors.
    quantised, mask, scale = project(weight, keep=3, bits=2)
    assert scale == pytest.approx((0.5 + 0.9 + 1.2) / 3)
    assert quantised.tolist() == pytest.approx([0, -scale, scale, 0, -scale])


def test_scale_fit_by_hand_with_three_bit_levels():
    # Levels +-1, 2, 3 x s. Start s = 3.2 / 3: indices 1, 2, 3, 1 (0.2 rounds to 0, clamped to 1
    # so a kept weight stays kept); least squares s = (0.9 + 4.2 + 9.6 + 0.2) / (1 + 4 + 9 + 1);
    # the indices do not change again.
    values = torch.tensor([0.9, 2.1, -3.2, 0.2])
    scale = fit_scale(values, bits=3)
    assert scale == pytest.approx(14.9 / 15)
    assert quantize(values, scale, bits=3).tolist() == pytest.approx([scale, 2 * scale, -3 * scale, scale])


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_quantize_picks_the_nearest_level_on_random_values(bits):
    generator = torch.Generator().manual_seed(bits)
    values = torch.randn(500, generator=generator)
    scale = 0.37
    top = level_count(bits)
    levels = torch.tensor([sign * j * scale for sign, j in itertools.product((-1, 1), range(1, top + 1))])
    nearest = levels[(values[:, None] - levels[None, :]).abs().argmin(dim=1)]
    torch.testing.assert_close(quantize(values, scale, bits), nearest)


def admm_trainer(model):
    return types.SimpleNamespace(model=model, loss_fn=nn.functional.cross_entropy, loader=range(10),
                                 state=types.SimpleNamespace(step=0), config=types.SimpleNamespace(epochs=4))


def test_the_loss_adds_the_augmented_lagrangian_penalty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    method = parse_method("admm:density=0.25,rho=0.01")
    model = method.prepare(model)
    assert [name for name, _ in masked_layers(model)] == ["2"]   # the stem stays dense
    trainer = admm_trainer(model)
    method.before_training(trainer)
    weight = model[2].weight.detach()
    z = method.z["2"]
    assert int(torch.count_nonzero(z)) == 24 and not method.u["2"].any()   # 25% of 96; U starts at 0
    assert torch.equal(z, weight * (weight.abs() >= weight.abs().flatten().topk(24).values[-1]))
    images, labels = torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    clean = nn.functional.cross_entropy(model(images), labels)
    penalty = (weight - z + method.u["2"]).pow(2).sum()
    loss = method.loss(trainer, images, labels).detach()
    assert float(loss) == pytest.approx(float((clean + 0.005 * penalty).detach()), rel=1e-6)
    # After an update the dual is the residual, U = W - Z (it started at 0), and the loss carries it.
    with torch.no_grad():
        model[2].weight.mul_(1.5)
    method.update_z(model)
    u = method.u["2"]
    assert u.any() and torch.equal(u, model[2].weight.detach() - method.z["2"])
    penalty = (model[2].weight - method.z["2"] + u).pow(2).sum()
    loss = method.loss(trainer, images, labels).detach()
    clean = nn.functional.cross_entropy(model(images), labels)
    assert float(loss) == pytest.approx(float((clean + 0.005 * penalty).detach()), rel=1e-6)



def test_a_rise_of_rho_keeps_the_multiplier_and_rescales_the_scaled_dual():
    # U is the multiplier over rho: when rho rises by `growth` at an update, rho x U must not change.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    method = parse_method("admm:density=0.5,rho=0.01,growth=2,update_every=1")
    model = method.prepare(model)
    trainer = admm_trainer(model)
    method.before_training(trainer)
    with torch.no_grad():
        model[2].weight.mul_(1.5)   # so that the update leaves a non-zero dual
    method.after_step(trainer)     # step 0: Z/U update, then rho 0.01 -> 0.02
    z = method.z["2"]
    residual = model[2].weight.detach() - z
    assert method.rho == pytest.approx(0.02)
    torch.testing.assert_close(method.u["2"], residual * 0.5)   # the multiplier 0.01 x residual, over 0.02

@pytest.mark.parametrize("steps, epochs, every, rising", [
    (156, 3, 9, 26),     # resnet20's bench budget: the phase is 2 epochs, 312 steps -> every 9 steps, 34 updates
    (469, 20, 146, 24),  # lenet5 compressed 20 epochs: 10 of 469 steps, every 146 steps, 32 updates
    (4, 2, 1, 3),        # fewer steps than updates: every step, rho at its maximum after 3 of the 4
])
def test_the_automatic_schedule_brings_rho_to_its_maximum_at_three_quarters_of_the_phase(steps, epochs, every, rising):
    method = parse_method("admm:rho=0.001,rho_max=1")
    chosen_every, growth = method.schedule(steps, epochs)
    assert chosen_every == every
    assert 0.001 * growth ** rising == pytest.approx(1.0)
    fixed = parse_method("admm:update_every=50,growth=1.3").schedule(steps, epochs)
    assert fixed == (50, 1.3)


def test_global_allocation_splits_the_largest_magnitudes_of_all_layers():
    # 12 pruned weights at density 0.25: the 3 largest of all (6, 5, 4) lie 1 in the first
    # linear layer, 2 in the second; each layer then keeps its own largest that many.
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten(), nn.Linear(4, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[4.0, 3.0, 0.1, 0.2], [0.3, 0.4, 0.5, 0.6]]))
        model[3].weight.copy_(torch.tensor([[5.0, 6.0], [0.01, -0.02]]))
    method = parse_method("admm:density=0.25,allocation=global")
    model = method.prepare(model)
    method.before_training(admm_trainer(model))
    assert method.targets == {"2": 1, "3": 2}
    assert method.z["2"].tolist() == [[4.0, 0, 0, 0], [0, 0, 0, 0]]
    assert method.z["3"].tolist() == [[5.0, 6.0], [0, 0]]
    restored = parse_method("admm:density=0.25,allocation=global")
    restored.load_state_dict(method.state_dict())   # a resumed run keeps the targets it started with
    assert restored.targets == {"2": 1, "3": 2}
    layered = parse_method("admm:density=0.25")
    layered.prepare(model)
    layered.before_training(admm_trainer(model))
    assert layered.targets == {"2": 2, "3": 1}


def test_retraining_moves_the_latent_and_keeps_weights_on_their_levels():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 20))
    method = parse_method("admm:density=0.5,bits=3")
    model = method.prepare(model)
    method.hard_project(model)
    layer, scale = model[2], float(model[2].admm_scale)
    mask = getattr(layer, PRUNE_MASK)
    assert int(mask.sum()) == 80 and method.projected
    latent_before = method.latent["2"].clone()
    step = torch.full_like(layer.weight, 0.3 * scale)   # what an optimizer step would move
    with torch.no_grad():
        layer.weight.sub_(step)
    method.after_step(admm_trainer(model))
    torch.testing.assert_close(method.latent["2"], (latent_before - step) * mask)
    assert torch.equal(layer.weight[mask], quantize(method.latent["2"][mask], scale, 3))
    assert not layer.weight[~mask].any()


def test_a_trained_run_saves_weights_exactly_on_levels_and_counts_their_storage(tmp_path):
    config = tiny_config(tmp_path, model="lenet5", width=1.0, epochs=2,
                         methods=["admm:density=0.05,bits=4,update_every=5"])
    outcome = train_run(config)
    model, _ = load_run(outcome.run_dir)
    stem = "features.0"
    assert not hasattr(model.get_submodule(stem), PRUNE_MASK)
    for name, module in masked_layers(model):
        weight = module.weight.detach()
        kept = weight != 0
        assert int(kept.sum()) == max(1, round(0.05 * weight.numel())), name    # exactly the target
        scale = float(getattr(module, SCALE))
        assert scale > 0 and torch.equal(weight[kept], quantize(weight[kept], scale, 4)), name
        assert int(torch.unique(weight[kept].abs()).numel()) <= 7
    profile = count(model, (1, 28, 28))
    # The 400,000-weight hidden layer at 5%: 4-bit codes (<= 14 levels + zero) with a relative index.
    hidden = next(layer for layer in profile.layers if layer.name == "hidden.0")
    assert hidden.cost.storage_format.startswith("relative index (4-bit values")
    assert read_result(outcome.run_dir).storage_bytes == profile.storage_bytes


@pytest.mark.parametrize("spec, message", [
    ("admm:density=0", "density must be in (0, 1]"),
    ("admm:density=1.5", "density must be in (0, 1]"),
    ("admm:bits=17", "bits must be 0 (no quantisation) or 1-16"),
    ("admm:bits=-1", "bits must be 0 (no quantisation) or 1-16"),
    ("admm:rho=0", "need 0 < rho <= rho_max"),
    ("admm:growth=0.5", "growth must be >= 1 (rho only rises) or 0 (automatic)"),
    ("admm:update_every=-1", "update_every must be a number of steps, or 0 (automatic)"),
    ("admm:prune_at=0", "prune_at must be in (0, 1]"),
    ("admm:levels=4", "unknown option 'levels'"),
    ("admm:allocation=random", "allocation must be one of layer, global"),
])
def test_bad_options_fail_before_training(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_method(spec)


def test_compress_with_no_epochs_still_projects(tmp_path):
    # `leancnn compress RUN --method admm:... --epochs 0`: no epoch ends, so no projection epoch
    # comes; the saved model must still hold exactly the target count, on levels.
    parent = train_run(tiny_config(tmp_path, model="lenet5", width=1.0)).run_dir
    out = compress_run(parent, ["admm:density=0.1,bits=3"], epochs=0, out=tmp_path / "admm", progress=False,
                       latency=False)
    model, _ = load_run(out.run_dir)
    for name, module in masked_layers(model):
        weight = module.weight.detach()
        kept = weight != 0
        assert int(kept.sum()) == max(1, round(0.1 * weight.numel())), name
        assert torch.equal(weight[kept], quantize(weight[kept], float(getattr(module, SCALE)), 3)), name


def test_a_compress_run_logs_its_epochs_with_the_admm_phase(tmp_path):
    # 4 epochs, projection at the end of the third (prune_at 0.75): two ADMM epochs with rho
    # rising, then the entries say retrain. The run's log.jsonl holds them (it was empty).
    parent = train_run(tiny_config(tmp_path, model="lenet5", width=1.0)).run_dir
    out = compress_run(parent, ["admm:density=0.1,prune_at=0.75"], epochs=4, out=tmp_path / "admm", progress=False,
                       latency=False)
    log = [json.loads(line) for line in (out.run_dir / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2, 3, 4]
    assert [entry["admm_phase"] for entry in log] == ["admm", "admm", "retrain", "retrain"]
    assert 0.001 < log[0]["admm_rho"] < log[1]["admm_rho"] <= 1.0
