"""DNR: exact density, regrowth at zero positions, saved zeros, bad options."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leancnn.errors import ConfigError
from leancnn.experiment import prepare_data, train_run
from leancnn.io import load_tensors
from leancnn.methods import apply_methods, parse_method
from leancnn.methods.dnr import MASK, prunable
from leancnn.models import create_model
from leancnn.train import evaluate

from .conftest import tiny_config


def active_counts(model):
    return {n: int(getattr(m, MASK).sum()) for n, m in model.named_modules() if hasattr(m, MASK)}


def test_density_stays_at_target_and_saved_weights_are_zero(tmp_path):
    outcome = train_run(tiny_config(tmp_path, epochs=3, methods=["dnr:density=0.1,attack=none"]), progress=False)
    model = outcome.model
    layers = prunable(create_model("resnet20", in_channels=1, width=0.25))
    target = sum(max(1, round(0.1 * m.weight.numel())) for _, m in layers)
    counts = active_counts(model)
    assert abs(sum(counts.values()) - target) <= len(layers)
    saved = load_tensors(outcome.run_dir / "model.safetensors")
    for name in counts:
        weight, mask = saved[f"{name}.weight"], saved[f"{name}.{MASK}"]
        assert torch.count_nonzero(weight[~mask]) == 0, name
    log = [json.loads(line) for line in (outcome.run_dir / "log.jsonl").read_text().splitlines()]
    densities = [d for entry in log for d in entry["dnr_density"].values()]
    assert max(densities) <= 1.0 and min(densities) > 0
    # Rewiring moved densities between layers: not all layers stay at 0.1.
    assert len({round(d, 3) for d in log[-1]["dnr_density"].values()}) > 1


def test_regrowth_only_picks_zero_positions():
    torch.manual_seed(0)
    method = parse_method("dnr:density=0.3,attack=none")
    model = method.prepare(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 8, 3), nn.Linear(8, 5)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    layers = method.layers(model)
    assert [n for n, _ in layers] == ["1", "2"]  # the first convolution stays dense
    for _, module in layers:
        optimizer.state[module.weight]["momentum_buffer"] = torch.randn_like(module.weight)
        with torch.no_grad():
            module.weight.add_(torch.randn_like(module.weight)).mul_(getattr(module, MASK))
    before = {n: getattr(m, MASK).clone() for n, m in layers}
    total_before = sum(int(v.sum()) for v in before.values())
    method.rewire(layers, optimizer, fraction=0.5)
    for name, module in layers:
        after = getattr(module, MASK)
        grown = after & ~before[name]
        # regrown positions start at zero; pruned ones are zero
        assert torch.count_nonzero(module.weight[grown]) == 0
        assert torch.count_nonzero(module.weight[~after]) == 0
    assert sum(int(getattr(m, MASK).sum()) for _, m in layers) == total_before
    assert any(not torch.equal(getattr(m, MASK), before[n]) for n, m in layers), "the rewiring moved weights"


def test_beta_one_trains_like_plain_dynamic_sparse_training(tmp_path):
    a = train_run(tiny_config(tmp_path, epochs=2, methods=["dnr:density=0.2,beta=1,attack=pgd"],
                              out=str(tmp_path / "a")), progress=False)
    b = train_run(tiny_config(tmp_path, epochs=2, methods=["dnr:density=0.2,attack=none"],
                              out=str(tmp_path / "b")), progress=False)
    c = train_run(tiny_config(tmp_path, epochs=2, methods=["dnr:density=0.2,beta=0.5,attack=pgd,steps=1"],
                              out=str(tmp_path / "c")), progress=False)
    sa, sb, sc = (load_tensors(r.run_dir / "model.safetensors") for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)   # beta = 1: the attack's loss has no weight
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)   # beta < 1: the same attack changes training


def test_adversarial_dnr_trains_and_restores_train_mode(tmp_path):
    outcome = train_run(tiny_config(tmp_path, epochs=1, methods=["dnr:density=0.2,steps=2"]), progress=False)
    dataset = prepare_data(tiny_config(tmp_path))
    assert outcome.result.test_acc == evaluate(outcome.model, dataset.test_images, dataset.test_labels).top1
    assert outcome.result.params_nonzero < 0.5 * outcome.result.params_total


@pytest.mark.parametrize("spec, message", [
    ("dnr:density=0", "density must be in \\(0, 1\\]"),
    ("dnr:density=1.5", "density must be in \\(0, 1\\]"),
    ("dnr:beta=2", "beta must be in \\[0, 1\\]"),
    ("dnr:attack=cw", "unknown attack 'cw'; choose one of: none, apgd, apgd-t, autoattack, fgsm, pgd, square"),
    ("dnr:mode=channel,round_to=0", "round_to must be a whole number >= 1"),
    ("dnr:round_to=8", "round_to applies to mode=channel only"),
])
def test_bad_options_fail_before_training(spec, message):
    with pytest.raises(ConfigError, match=message):
        apply_methods(create_model("resnet20"), [spec])


def test_channel_mode_removes_empty_channels_and_reloads(tmp_path):
    """Channel mode keeps the target fraction of channels per group (within one channel),
    regrows only empty channels, and leaves a thinner dense model that reloads."""
    from leancnn.measure import count
    from leancnn.methods.channel_graph import channel_graph
    from leancnn.runs import load_run

    config = tiny_config(tmp_path, model="vgg11", width=0.25, epochs=3,
                         methods=["dnr:density=0.5,attack=none,mode=channel"])
    outcome = train_run(config, progress=False)
    spec = outcome.result.methods[0]
    assert "widths=" in spec and "mode=channel" in spec
    model = outcome.model
    dense = create_model("vgg11", in_channels=1, width=0.25, num_classes=4)
    pruned = channel_graph(model)
    for group in channel_graph(dense).groups:
        full, kept = group.width, pruned.group(group.name).width
        assert abs(kept - 0.5 * full) <= 1  # each layer keeps its share of channels
        weight = model.get_submodule(group.producer).weight
        assert (weight.flatten(1).abs().sum(1) > 0).all()  # no dead (all-zero) channel is left
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(0 < d <= 1 for entry in log for d in entry["dnr_density"].values())
    assert not any("dnr_channel_mask" in name for name, _ in model.named_buffers())
    reloaded, _ = load_run(tmp_path / "run")
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), model.eval()(x), atol=1e-5)
    assert count(reloaded, (1, 16, 16)).macs_dense < count(dense, (1, 16, 16)).macs_dense * 0.35


@pytest.mark.parametrize("name", ["vgg11", "resnet20", "mobilenetv2"])
def test_channel_mode_masked_channels_are_zero_wherever_they_flow(name):
    """Every layer a group lives in (producers, batch norms, depthwise layers) outputs exactly zero
    on the group's masked channels, in training and in eval mode."""
    method = parse_method("dnr:density=0.25,attack=none,mode=channel")
    model = method.prepare(create_model(name, in_channels=1, width=0.25, num_classes=4))
    outputs = {}
    for module_name, module in model.named_modules():
        module.register_forward_hook(lambda mod, args, out, n=module_name: outputs.__setitem__(n, out))
    for mode in (True, False):
        model.train(mode)
        model(torch.rand(8, 1, 16, 16))
        checked = 0
        for group, mask in method.channel_masks(model):
            assert (~mask).any()
            for site in group.sites:
                if site.role != "in":
                    positions = [p for c in torch.nonzero(~mask).flatten().tolist() for p in site.positions[c]]
                    assert (outputs[site.module][:, positions] == 0).all(), (name, group.name, site.module)
                    checked += 1
        assert checked > len(method.channel_masks(model))


def test_channel_mode_rejects_a_model_it_cannot_trace():
    from .test_channel_graph import Branchy

    with pytest.raises(ConfigError, match=r"cannot trace module gate"):
        parse_method("dnr:mode=channel").prepare(Branchy())
    with pytest.raises(ConfigError, match="mode must be one of"):
        parse_method("dnr:mode=filters")


def test_magprune_keeps_the_largest_weights_through_adversarial_finetuning(tmp_path):
    from leancnn.compress import compress_run
    from leancnn.runs import load_run

    base = train_run(tiny_config(tmp_path, epochs=1), progress=False)
    out = tmp_path / "pruned"
    result = compress_run(base.run_dir, ["magprune:density=0.1,steps=2"], epochs=1, out=out, progress=False,
                          latency=False).result
    model, _ = load_run(out)
    original = base.model
    for name, module in prunable(model):
        mask = getattr(module, MASK)
        assert abs(mask.float().mean().item() - 0.1) <= 1 / mask.numel() + 1e-6
        assert (module.weight[~mask] == 0).all()  # pruned weights stay exactly zero after fine-tuning
        before = original.get_submodule(name).weight.abs().flatten()
        assert before[mask.flatten()].min() >= before[~mask.flatten()].max()  # the largest were kept
    assert result.extra["compress"]["test_acc_before_finetune"] is not None
    # Fine-tuned against PGD: the new run records its accuracy under FGSM and PGD-10 (its test subset: 300).
    assert set(result.robust) == {"fgsm", "pgd"} and result.extra["robust_images"] == 300


def test_aligned_channel_counts():
    from leancnn.methods.channels import rounded_width

    # density x channels to the nearest multiple of 8, at least 8, at most all
    assert [rounded_width(c, 0.7, 8) for c in (16, 32, 64, 128)] == [8, 24, 48, 88]
    assert rounded_width(16, 0.95, 8) == 16 and rounded_width(64, 0.01, 8) == 8
    assert rounded_width(6, 0.5, 8) == 3                       # narrower than the multiple: plain rounding
    assert [rounded_width(c, 0.7, 1) for c in (16, 64)] == [11, 45]
    method = parse_method("dnr:density=0.7,attack=none,mode=channel,round_to=8")
    model = method.prepare(create_model("vgg11", in_channels=1, width=0.25, num_classes=4))
    kept = [int(mask.sum()) for _, mask in method.channel_masks(model)]
    assert kept == [8, 24, 48, 48, 88, 88, 88, 88]


def test_full_density_is_plain_dense_training():
    method = parse_method("dnr:density=1,prune_fraction=0,attack=none")
    model = method.prepare(create_model("vgg11", in_channels=1, width=0.25, num_classes=4))
    assert method.layers(model) == [] and not any("dnr" in name for name, _ in model.named_buffers())


def test_rewiring_by_hand():
    """Two prunable layers of 8 weights, 4 active each; prune half of each by magnitude, regrow
    the 4 in proportion to each layer's mean |momentum| over its weights active before pruning
    (1.0 and 1.0: 2 each, where the survivors alone would give A 2.0 and B 1.0), at the zero
    positions with the largest |momentum|, starting at zero."""
    method = parse_method("dnr:density=0.5,attack=none")
    model = method.prepare(nn.Sequential(nn.Conv2d(1, 2, 2), nn.Conv2d(2, 1, 2), nn.Linear(8, 1)))
    layers = method.layers(model)
    assert [n for n, _ in layers] == ["1", "2"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cases = {  # weights (active 0..3), momentum
        "1": ([4.0, -1.0, 3.0, 2.0, 0, 0, 0, 0], [2.0, 0.0, -2.0, 0.0, 0.5, -9.0, 0.1, 0.2]),
        "2": ([5.0, 6.0, -0.5, 7.0, 0, 0, 0, 0], [1.0, 1.0, 1.0, -1.0, 3.0, 0.3, 0.2, 4.0]),
    }
    for name, module in layers:
        weight, momentum = cases[name]
        with torch.no_grad():
            module.weight.copy_(torch.tensor(weight).view_as(module.weight))
        getattr(module, MASK).copy_(torch.tensor([True] * 4 + [False] * 4).view_as(module.weight))
        optimizer.state[module.weight]["momentum_buffer"] = torch.tensor(momentum).view_as(module.weight)
    method.rewire(layers, optimizer, fraction=0.5)
    a, b = (module for _, module in layers)
    # A: prune |w| 1 and 2 (positions 1, 3); regrow at |momentum| 9 and 0.5 (positions 5, 4).
    assert getattr(a, MASK).flatten().nonzero().flatten().tolist() == [0, 2, 4, 5]
    assert a.weight.flatten().tolist() == [4.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # B: prune |w| 0.5 and 5 (positions 2, 0); regrow at |momentum| 4 and 3 (positions 7, 4).
    assert getattr(b, MASK).flatten().nonzero().flatten().tolist() == [1, 3, 4, 7]
    assert b.weight.flatten().tolist() == [0.0, 6.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0]


def test_dnr_without_momentum_is_refused_before_anything_is_written(tmp_path):
    config = tiny_config(tmp_path, momentum=0.0, nesterov=False, methods=["dnr:density=0.2,attack=none"])
    with pytest.raises(ConfigError, match="needs momentum > 0"):
        train_run(config, progress=False)
    assert not (tmp_path / "run").exists()
    train_run(tiny_config(tmp_path, momentum=0.0, nesterov=False,   # a fixed mask needs no momentum
                          methods=["dnr:density=0.2,attack=none,prune_fraction=0"]), progress=False)


def test_an_adversarial_dnr_run_records_its_robust_accuracy(tmp_path):
    from leancnn.measure import parse_attack, robust_accuracy

    outcome = train_run(tiny_config(tmp_path, epochs=1, methods=["dnr:density=0.2,steps=1,eps=0.05,eval_images=40"]),
                        progress=False)
    result = outcome.result
    assert result.extra["robust_settings"] == {"fgsm": "fgsm:eps=0.05,norm=linf",
                                               "pgd": "pgd:eps=0.05,step=None,steps=10,random_start=True,norm=linf"}
    assert result.extra["robust_images"] == 40
    dataset = prepare_data(tiny_config(tmp_path))
    for name, spec in result.extra["robust_settings"].items():   # the same figure, measured again
        again = robust_accuracy(outcome.model, dataset.test_images[:40], dataset.test_labels[:40], parse_attack(spec),
                                progress=False)
        assert result.robust[name] == again
    stored = json.loads((outcome.run_dir / "result.json").read_text())
    assert stored["robust"] == result.robust and stored["robust_images"] == 40
    plain = train_run(tiny_config(tmp_path, epochs=1, methods=["dnr:density=0.2,attack=none"], out=str(tmp_path / "p")),
                      progress=False)
    assert plain.result.robust is None and "robust_settings" not in plain.result.extra
