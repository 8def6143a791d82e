"""Run-time dynamic sub-networks: a sub-network against a plain model built at its widths with
the sliced weights; switching allocates nothing; the sandwich loss by hand; the search's
choices within their MAC targets, saved and reloaded; the held-out split; bad options."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from leancnn.cli import main
from leancnn.data import ImageDataset
from leancnn.errors import ConfigError
from leancnn.experiment import train_run
from leancnn.measure import count
from leancnn.methods import apply_methods, parse_method
from leancnn.methods.channels import shrink_to_widths
from leancnn.methods.dynamic import (full_widths, random_widths, re_estimate, select_subnet, set_widths, store_subnet,
                                     subnet_model)
from leancnn.models import create_model
from leancnn.runs import load_run
from leancnn.train import hold_out

from .conftest import tiny_config


def dynamic_model(name: str, spec: str = "dynamic:targets=1+0.5"):
    model, (method,) = apply_methods(create_model(name, in_channels=1, width=0.5), [spec])
    return model, method


def plain_at_widths(name: str, dynamic: nn.Module, widths: list[int]) -> nn.Module:
    """An ordinary model of `name` narrowed to `widths`, every tensor the leading slice of the
    dynamic model's (its statistics those of row 0)."""
    plain = create_model(name, in_channels=1, width=0.5)
    producers = [name for name, m in dynamic.named_modules() if getattr(m, "chooses_width", False)]
    plain = shrink_to_widths(plain, dict(zip(producers, widths)))
    source = dict(dynamic.state_dict())
    for key, tensor in source.items():
        if key.endswith("subnet_mean"):
            source[key.replace("subnet_mean", "running_mean")] = tensor[0]
        if key.endswith("subnet_var"):
            source[key.replace("subnet_var", "running_var")] = tensor[0]
    with torch.no_grad():
        for key, tensor in plain.state_dict().items():
            tensor.copy_(source[key][tuple(slice(0, s) for s in tensor.shape)])
    return plain.eval()


@pytest.mark.parametrize("name", ["resnet20", "vgg11", "mobilenetv2", "shufflenetv2", "resnet50"])
def test_a_sub_network_equals_the_plain_model_at_its_widths(name):
    model, _ = dynamic_model(name)
    generator = torch.Generator().manual_seed(5)
    widths = random_widths(full_widths(model), 0.25, generator)
    assert widths != full_widths(model)
    set_widths(model, widths)
    re_estimate(model, torch.rand(96, 1, 28, 28, generator=generator))
    store_subnet(model, 0, widths)
    x = torch.rand(6, 1, 28, 28, generator=generator)
    with torch.no_grad():
        got = select_subnet(model, 0).eval()(x)
        expected = plain_at_widths(name, model, widths)(x)
        thin = subnet_model(model, 0).eval()
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        assert torch.allclose(thin(x), expected, atol=1e-5)
        assert not any(type(m).__name__.startswith("Dynamic") for m in thin.modules())
        full = select_subnet(model, None)(x)
    assert not torch.allclose(full, got, atol=1e-3)    # the full network is another function


def test_switching_sub_networks_allocates_no_weights():
    model, _ = dynamic_model("resnet20", "dynamic:targets=1+0.7+0.5")
    full = full_widths(model)
    for index, fraction in enumerate((1.0, 0.7, 0.5)):
        widths = [max(1, round(fraction * w)) for w in full]
        set_widths(model, widths)
        re_estimate(model, torch.rand(32, 1, 28, 28))
        store_subnet(model, index, widths)
    before = {k: (t.data_ptr(), t.shape) for k, t in model.state_dict().items()}
    macs = []
    for index in (2, 0, 1, 2):
        select_subnet(model, index)
        with torch.no_grad():
            model.eval()(torch.rand(2, 1, 28, 28))
        macs.append(count(model, (1, 28, 28)).macs_effective)
        assert {k: (t.data_ptr(), t.shape) for k, t in model.state_dict().items()} == before
    assert macs[0] == macs[3] < macs[2] < macs[1]    # the widths really change what runs


class Stub:
    class State:
        step = 3

    def __init__(self, model):
        self.model, self.loss_fn, self.state = model, nn.CrossEntropyLoss(), self.State()


def test_sandwich_loss_by_hand_and_the_running_statistics_stay_the_full_networks():
    model, method = dynamic_model("resnet20", "dynamic:smallest=0.5,random=1,narrower=sum")
    images, labels = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    model.train()
    loss = method.loss(Stub(model), images, labels)
    after = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # By hand: the full network on labels; the half-width one and the step's random one on its soft outputs.
    reference, _ = dynamic_model("resnet20", "dynamic:smallest=0.5,random=1,narrower=sum")
    reference.load_state_dict(dict(model.state_dict(), **{k: v for k, v in reference.state_dict().items()
                                                          if "running" in k or "tracked" in k}))
    reference.train()
    full = full_widths(reference)
    logits = reference(images)
    expected = F.cross_entropy(logits, labels)
    single_pass = [m.running_mean.clone() for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    soft = logits.detach().softmax(1)
    generator = torch.Generator().manual_seed(0 * 1_000_003 + 3)
    for widths in ([max(1, round(0.5 * w)) for w in full], random_widths(full, 0.5, generator)):
        set_widths(reference, widths)
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.frozen = True
        expected = expected + (-soft * F.log_softmax(reference(images), 1)).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(torch.allclose(a, b) for a, b in zip(after, single_pass))   # narrower passes left them alone
    assert full_widths(model) == [m.active_out for m in model.modules() if getattr(m, "active_out", None)]


def test_narrower_mean_weighs_the_narrower_passes_by_one_over_their_count():
    # Same weights and step: with 3 narrower passes, the summed rule adds 3x what the mean adds
    # to the full network's loss (the full pass alone is the same in both).
    losses = {}
    for narrower in ("sum", "mean"):
        model, method = dynamic_model("resnet20", f"dynamic:random=2,distill=false,narrower={narrower}")
        torch.manual_seed(5)
        for tensor in model.state_dict().values():   # the two models get identical weights
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) - 0.5)
        images, labels = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.arange(8)
        model.train()
        set_widths(model, full_widths(model))
        with torch.no_grad():
            full_only = F.cross_entropy(model(images), labels).item()
        losses[narrower] = (method.loss(Stub(model), images, labels).item(), full_only)
    (summed, full_sum), (mean, full_mean) = losses["sum"], losses["mean"]
    assert full_sum == pytest.approx(full_mean, rel=1e-6)
    assert summed - full_sum > 0.1
    assert summed - full_sum == pytest.approx(3 * (mean - full_mean), rel=1e-4)


def test_hold_out_is_a_seeded_disjoint_split():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    dataset = ImageDataset(name="toy", train_images=images, train_labels=torch.arange(40), test_images=images[:4],
                           test_labels=torch.arange(4), num_classes=40)
    kept, (held, held_labels) = hold_out(dataset, 10, seed=3)
    assert len(held_labels) == 10 and len(kept.train_labels) == 30
    assert sorted(kept.train_labels.tolist() + held_labels.tolist()) == list(range(40))
    assert torch.equal(hold_out(dataset, 10, seed=3)[1][1], held_labels)
    assert not torch.equal(hold_out(dataset, 10, seed=4)[1][1], held_labels)
    assert hold_out(dataset, 0, seed=3) == (dataset, None)


def test_a_trained_run_keeps_sub_networks_within_their_targets_and_they_reload(tmp_path):
    spec = "dynamic:targets=1+0.6+0.4,smallest=0.3,random=1,candidates=6,holdout=64,recalibrate=64,front=macs"
    outcome = train_run(tiny_config(tmp_path, epochs=2, width=0.5, methods=[spec]), progress=False)
    log = [json.loads(line) for line in (outcome.run_dir / "log.jsonl").read_text().splitlines()]
    assert "dynamic_subnets" not in log[0]                      # the search runs after the last epoch only
    chosen = log[-1]["dynamic_subnets"]
    assert [c["target"] for c in chosen] == [1.0, 0.6, 0.4]
    loaded, architecture = load_run(outcome.run_dir)
    shape = tuple(architecture["input_shape"])
    full_macs = count(select_subnet(loaded, None), shape).macs_effective
    x = torch.rand(4, *shape)
    for index, record in enumerate(chosen):
        assert record["mac_fraction"] <= record["target"] * 1.02
        macs = count(select_subnet(loaded, index), shape).macs_effective
        assert macs == record["macs"] and macs / full_macs == pytest.approx(record["mac_fraction"], abs=1e-4)
        with torch.no_grad():
            assert torch.equal(select_subnet(loaded, index).eval()(x), select_subnet(outcome.model, index).eval()(x))
    assert chosen[2]["macs"] < chosen[0]["macs"]


@pytest.mark.parametrize("spec, message", [
    ("dynamic:targets=1+1.5", r"every target must be in \(0, 1\]"),
    ("dynamic:targets=a+b", "MAC fractions joined by"),
    ("dynamic:smallest=0", "smallest"),
    ("dynamic:candidates=0", "candidates must be >= 1"),
    ("dynamic:front=flops", "front must be one of latency, macs"),
    ("dynamic:narrower=max", "narrower must be one of sum, mean"),
])
def test_bad_options_fail_in_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_method(spec)


UNTRACEABLE = """
import torch
from torch import nn


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x   # data-dependent control flow: torch.fx cannot trace it


class Net(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3)
        self.gate = Gate()
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.gate(self.conv(x)).mean(dim=(2, 3)))


def build(num_classes, in_channels):
    return Net(num_classes, in_channels)
"""


def test_a_model_it_cannot_trace_fails_before_training(tmp_path, capsys):
    (tmp_path / "gated.py").write_text(UNTRACEABLE)
    code = main(["train", "--data", "synthetic", "--model", str(tmp_path / "gated.py") + ":build", "--epochs", "1",
                 "--method", "dynamic", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "method 'dynamic': channel surgery cannot trace module gate (Gate)" in err
    assert not (tmp_path / "run").exists()


def test_choosing_a_sub_network_for_a_mac_target_by_hand():
    from leancnn.methods.dynamic import choose

    def c(name, macs, acc, ms):
        return {"name": name, "macs": macs, "holdout_acc": acc, "latency_ms": ms}

    measured = [c("a", 100, 0.90, 10.0), c("b", 96, 0.91, 9.5), c("c", 68, 0.88, 7.0), c("d", 65, 0.885, 8.0),
                c("e", 51, 0.89, 5.0), c("f", 30, 0.80, 3.0)]

    def pick(target, cost="latency_ms"):
        return choose(measured, target, 100, cost)["name"]

    assert pick(1.0) == "b"       # band [90, 102]: b is faster and more accurate than a
    assert pick(0.7) == "d"       # band [60, 71.4]: c and d both on the front, d the more accurate; e (51) is out
    assert pick(0.5) == "e"       # band [40, 51]
    assert pick(0.35) == "f"      # band [25, 35.7]
    assert pick(0.45) == "f"      # empty band [35, 45.9]: the largest within the target
    assert pick(0.2) == "f"       # nothing within: the smallest of all
    assert choose(measured, 0.7, 100, "macs")["name"] == "d"   # against MACs d (65) is cheaper and more accurate
