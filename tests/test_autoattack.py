"""AutoAttack's attacks (APGD-CE, APGD-T, Square) and their worst case: hand-computed
losses and schedules, cross-checks against an independent implementation
(torchattacks) on a trained model, and the gradient-masking checks."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from leancnn.cli import main
from leancnn.errors import ConfigError
from leancnn.measure import parse_attack, robust_accuracies, robust_accuracy
from leancnn.measure.autoattack import apgd_checkpoints, dlr_loss, margin, square_share, worst_case
from leancnn.runs import load_run

SAMPLE = 200
EPS = 0.02   # this undefended model keeps some accuracy here; at 0.1 every attack reaches 0 and agrees


@pytest.fixture(scope="module")
def model_and_data(trained_fmnist, fashion_mnist):
    model, _ = load_run(trained_fmnist.run_dir)
    images = fashion_mnist.test_images[:SAMPLE].float() / 255
    labels = fashion_mnist.test_labels[:SAMPLE]
    return model.eval(), images, labels


def accuracy_on(model, images, labels) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def test_dlr_and_margin_by_hand():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    label = torch.tensor([0])
    # Sorted 3, 2, 1, 0: untargeted -(3 - 2) / (3 - 1); targeted at class 3: -(3 - 0) / (3 - (1 + 0) / 2).
    assert dlr_loss(logits, label).item() == pytest.approx(-0.5)
    assert dlr_loss(logits, label, torch.tensor([3])).item() == pytest.approx(-1.2)
    assert dlr_loss(logits * 5 + 7, label).item() == pytest.approx(-0.5)        # shift and scale invariant
    assert margin(logits, label).item() == 1.0 and margin(logits, torch.tensor([1])).item() == -2.0


def test_apgd_checkpoints_and_square_schedule_by_hand():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    # Square's share of pixels for 5000 queries (the 10,000-query schedule halved in time).
    assert [square_share(0.8, q, 5000) for q in (0, 5, 6, 25, 26, 100, 101, 4001)] == \
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.8 / 512]


@pytest.mark.parametrize("spec, message", [
    ("apgd:steps=0", "steps must be >= 1"),
    ("apgd:loss=hinge", "loss"),
    ("apgd-t:targets=0", "targets must be >= 1"),
    ("square:p_init=2", "p_init must be in (0, 1]"),
    ("autoattack:queries=0", "queries must be >= 1"),
    ("autoattack:eps=-1", "eps must be >= 0"),
])
def test_bad_specs_fail_in_one_line(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_attack(spec)


def test_apgd_stays_in_the_ball_and_beats_pgd(model_and_data):
    model, images, labels = model_and_data
    for norm, eps in (("linf", EPS), ("l2", 0.5)):
        adversarial = parse_attack(f"apgd:eps={eps},norm={norm},steps=5")(model, images[:50], labels[:50])
        delta = (adversarial - images[:50]).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert size.max() <= eps + 1e-5 and adversarial.min() >= 0 and adversarial.max() <= 1, norm
    apgd = robust_accuracy(model, images, labels, parse_attack(f"apgd:eps={EPS},steps=20"), progress=False)
    pgd = robust_accuracy(model, images, labels, parse_attack(f"pgd:eps={EPS},steps=20"), progress=False)
    clean = accuracy_on(model, images, labels)
    assert apgd < clean - 0.1, "eps 0.02 must hurt this undefended model, or the comparisons below mean nothing"
    assert apgd <= pgd + 0.01


@pytest.mark.parametrize("ours, theirs", [
    ("apgd:steps=20,loss=ce", lambda ta, model: ta.APGD(model, eps=EPS, steps=20, loss="ce", n_restarts=1, seed=0)),
    ("apgd:steps=20,loss=dlr", lambda ta, model: ta.APGD(model, eps=EPS, steps=20, loss="dlr", n_restarts=1, seed=0)),
    ("apgd-t:steps=10,targets=3", lambda ta, model: ta.APGDT(model, eps=EPS, steps=10, n_restarts=1, n_classes=10,
                                                             seed=0)),
])
def test_matches_torchattacks_within_a_point(model_and_data, ours, theirs):
    torchattacks = pytest.importorskip("torchattacks")
    model, images, labels = model_and_data
    mine = robust_accuracy(model, images, labels, parse_attack(f"{ours},eps={EPS}"),
                           progress=False)
    attack = theirs(torchattacks, model)
    if "apgd-t" in ours:
        attack.n_target_classes = 3
    reference = accuracy_on(model, attack(images, labels), labels)
    assert abs(mine - reference) <= 0.01 + 1e-9, (ours, mine, reference)


def test_autoattack_is_the_worst_case_and_shows_no_gradient_masking(model_and_data):
    model, images, labels = model_and_data
    images, labels = images[:100], labels[:100]
    spec = f"autoattack:eps={EPS},steps=10,targets=2,queries=200"
    figures = robust_accuracies(model, images, labels, parse_attack(spec), progress=False)
    assert list(figures) == ["autoattack/apgd-ce", "autoattack/apgd-t", "autoattack/square", "autoattack"]
    cumulative = [figures[k] for k in list(figures)[:3]]
    assert cumulative == sorted(cumulative, reverse=True) and figures["autoattack"] == cumulative[-1]
    square = robust_accuracy(model, images, labels, parse_attack(f"square:eps={EPS},queries=200"), progress=False)
    apgd = robust_accuracy(model, images, labels, parse_attack(f"apgd:eps={EPS},steps=10"), progress=False)
    assert figures["autoattack"] <= min(square, apgd)
    # No masking: the black-box attack must not beat the white-box one by much ...
    assert square >= apgd - 0.02, (square, apgd)
    # ... and accuracy must not rise with the budget.
    by_eps = [robust_accuracy(model, images, labels, parse_attack(f"apgd:eps={e},steps=10"), progress=False)
              for e in (0.005, 0.02, 0.05)]
    assert by_eps == sorted(by_eps, reverse=True) and by_eps[-1] < by_eps[0], by_eps


def test_worst_case_takes_each_image_from_the_first_attack_that_fools_it(model_and_data):
    model, images, labels = model_and_data
    components = [("fgsm", "fgsm", parse_attack(f"fgsm:eps={EPS}").options),
                  ("apgd", "apgd", parse_attack(f"apgd:eps={EPS},steps=20").options)]
    adversarial, after = worst_case(model, images, labels, components, torch.Generator().manual_seed(0))
    fgsm_right = accuracy_on_mask(model, parse_attack(f"fgsm:eps={EPS}")(model, images, labels), labels)
    assert torch.equal(after[0], fgsm_right & accuracy_on_mask(model, images, labels))
    assert not (after[1] & ~after[0]).any() and after[1].sum() < after[0].sum()
    assert torch.equal(accuracy_on_mask(model, adversarial, labels), after[1])


def accuracy_on_mask(model, images, labels) -> torch.Tensor:
    with torch.no_grad():
        return model(images).argmax(1) == labels


def test_eval_reports_each_attack_and_the_worst_case(trained_fmnist, tmp_path, capsys):
    # A copy: eval records its figures in the run's result.json, which other tests read.
    run = str(shutil.copytree(trained_fmnist.run_dir, tmp_path / "run"))
    assert main(["eval", run, "--attack", f"autoattack:eps={EPS},steps=5,targets=2,queries=50", "--test-subset",
                 "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    robust = report["robust"]
    for key in ("autoattack/apgd-ce", "autoattack/apgd-t", "autoattack/square", "autoattack"):
        assert key in robust, key
    assert robust["autoattack"] == robust["autoattack/square"] <= robust["autoattack/apgd-ce"]
    assert report["robust_settings"]["autoattack"].startswith("autoattack:eps=0.02,steps=5,targets=2,queries=50")
