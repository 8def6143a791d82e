"""Robust training: SAT's curriculum (by hand and in a run), the Hessian's top eigenvalue, RSR's
noise, lasso and saved zeros, APGD's iterates by hand, and bad options."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from leancnn.cli import main
from leancnn.errors import ConfigError
from leancnn.experiment import train_run
from leancnn.io import load_tensors
from leancnn.measure import autoattack
from leancnn.measure.sharpness import hessian_top_eigenvalue
from leancnn.methods import apply_methods, parse_method
from leancnn.methods.adversarial import AdversarialLoss
from leancnn.methods.curriculum import Curriculum, CurriculumSettings
from leancnn.methods.dnr import prunable
from leancnn.methods.rsr import MASK, NOISE_SCALE
from leancnn.models import create_model

from .conftest import tiny_config


# -- SAT's curriculum --------------------------------------------------------------------------
def run_schedule(curriculum: Curriculum, steps: int, total: int, difficulties: list[float]) -> tuple[list[float], int]:
    """The budget each step trains at, and how many times the difficulty was measured."""
    values = iter(difficulties)
    calls = 0

    def difficulty():
        nonlocal calls
        calls += 1
        return next(values)

    budgets = []
    for step in range(steps):
        budgets.append(curriculum.budget_at(step, total))
        curriculum.observe(step, difficulty)
    return budgets, calls


def test_prob_curriculum_opens_a_stage_when_the_model_copes_and_never_lags_the_deadline():
    # 4 stages of 0.05 up to 0.2; the deadline reaches the target by half of 80 steps:
    # stage >= ceil(4 (step + 1) / 40), i.e. 2 from step 10, 3 from step 20, 4 from step 30.
    # Checks at steps 6, 13, 20: copes (0.6 >= 0.5) -> stage 2 from step 7; 0.3 -> no (the deadline
    # opens 3 at step 20); 0.9 -> stage 4 from step 21.
    curriculum = Curriculum(CurriculumSettings("prob", stages=4, ramp=0.5, check_every=7), 0.2)
    budgets, calls = run_schedule(curriculum, 80, 80, [0.6, 0.3, 0.9])
    assert budgets == pytest.approx([0.05] * 7 + [0.1] * 13 + [0.15] + [0.2] * 59)
    assert calls == 3    # no check once the last stage is open
    assert [c["copes"] for c in curriculum.checks] == [True, False, True]


def test_a_model_that_never_copes_follows_the_deadline_and_one_that_always_copes_rises_each_check():
    never = Curriculum(CurriculumSettings("prob", stages=4, ramp=0.5, check_every=10), 0.2)
    budgets, _ = run_schedule(never, 80, 80, [0.0] * 8)
    assert budgets == pytest.approx([0.05] * 10 + [0.1] * 10 + [0.15] * 10 + [0.2] * 50)
    always = Curriculum(CurriculumSettings("prob", stages=4, ramp=1.0, check_every=5), 0.2)
    budgets, calls = run_schedule(always, 80, 80, [1.0] * 8)
    assert budgets[:16] == pytest.approx([0.05] * 5 + [0.1] * 5 + [0.15] * 5 + [0.2]) and calls == 3


def test_hessian_curriculum_compares_each_check_with_the_stage_s_first():
    # Stage 1: the first check records 2.0; 3.0 is sharper (no); 1.5 <= 2.0 opens stage 2, whose first
    # check records 5.0; 4.0 <= 5.0 opens stage 3. The deadline (ramp 1 over 1000 steps) stays at 1.
    curriculum = Curriculum(CurriculumSettings("hessian", stages=10, ramp=1.0, check_every=1), 1.0)
    budgets, _ = run_schedule(curriculum, 5, 1000, [2.0, 3.0, 1.5, 5.0, 4.0])
    assert budgets == pytest.approx([0.1, 0.1, 0.1, 0.2, 0.2]) and curriculum.eps == pytest.approx(0.3)


def test_hessian_top_eigenvalue_of_a_quadratic():
    # loss = 1/2 x' A x has Hessian A; its eigenvalue of largest magnitude is found, sign included.
    for eigenvalues in ([5.0, 2.0, 1.0], [-7.0, 3.0, 0.5]):
        basis, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
        a = basis @ torch.diag(torch.tensor(eigenvalues)) @ basis.T
        x = nn.Parameter(torch.randn(3))
        found = hessian_top_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iterations=60,
                                       generator=torch.Generator().manual_seed(0))
        assert found == pytest.approx(eigenvalues[0], rel=1e-3)


def sat_log(tmp_path, spec: str, epochs: int = 3) -> list[dict]:
    # 192 images in batches of 32: 6 steps an epoch.
    outcome = train_run(tiny_config(tmp_path, epochs=epochs, train_subset=192, test_subset=64, methods=[spec]),
                        progress=False)
    return [json.loads(line) for line in (outcome.run_dir / "log.jsonl").read_text().splitlines()]


def test_sat_training_attacks_at_the_curriculum_s_budget(tmp_path, monkeypatch):
    seen = []
    make_attack = AdversarialLoss.make_attack
    monkeypatch.setattr(AdversarialLoss, "make_attack", lambda self, eps: seen.append(eps) or make_attack(self, eps))
    # threshold 1: a probability never reaches it, so the budget is the deadline's: 3 stages of eps 0.09
    # reached by half of 18 steps, stage >= ceil(3 (step + 1) / 9): 1 for steps 0-2, 2 for 3-5, 3 from 6.
    log = sat_log(tmp_path, "sat:eps=0.09,steps=1,stages=3,ramp=0.5,threshold=1,check_every=2,eval_images=0")
    assert seen == pytest.approx([0.03] * 3 + [0.06] * 3 + [0.09] * 12)
    assert [e["sat_eps"] for e in log] == pytest.approx([0.06, 0.09, 0.09])   # after each epoch's last step
    # A threshold every model reaches opens a stage at each check (steps 1 and 3): full budget from step 4.
    seen.clear()
    sat_log(tmp_path / "b", "sat:eps=0.09,steps=1,stages=3,ramp=1,threshold=0.001,check_every=2,eval_images=0")
    assert seen[:5] == pytest.approx([0.03, 0.03, 0.06, 0.06, 0.09])


def test_dnr_takes_sat_s_schedule():
    method = parse_method("dnr:density=0.5,schedule=hessian")
    assert method.adversarial.curriculum_settings.metric == "hessian"
    assert parse_method("dnr:density=0.5").adversarial.curriculum_settings is None


# -- RSR ---------------------------------------------------------------------------------------
def test_rsr_prunes_to_exact_zeros_in_the_saved_model_and_learns_its_noise(tmp_path):
    outcome = train_run(tiny_config(tmp_path, epochs=3, train_subset=192, test_subset=64,
                                    methods=["rsr:density=0.2,prune_at=0.67,steps=1,eps=0.05,lasso=1e-4,"
                                             "eval_images=0"]),
                        progress=False)
    saved = load_tensors(outcome.run_dir / "model.safetensors")
    layers = prunable(create_model("resnet20", in_channels=1, width=0.25))
    assert layers
    for name, module in layers:
        weight, mask = saved[f"{name}.weight"], saved[f"{name}.{MASK}"]
        assert int(mask.sum()) == max(1, round(0.2 * weight.numel())), name   # per layer, exactly
        assert torch.count_nonzero(weight[~mask]) == 0, name
        assert torch.count_nonzero(weight[mask]) > 0.9 * int(mask.sum()), name
    scales = torch.cat([t for k, t in saved.items() if k.endswith(NOISE_SCALE)])
    assert len(scales) > 0 and not torch.allclose(scales, torch.full_like(scales, 0.25))   # trained
    log = [json.loads(line) for line in (outcome.run_dir / "log.jsonl").read_text().splitlines()]
    assert set(log[0]["rsr_density"].values()) == {1.0}          # pruned at the end of epoch round(0.67 x 3) = 2
    assert max(log[1]["rsr_density"].values()) < 0.21 and log[2]["rsr_density"] == log[1]["rsr_density"]


def test_rsr_noise_is_injected_in_training_only_unless_asked():
    images = torch.rand(4, 1, 28, 28)
    for eval_noise in (False, True):
        model, (method,) = apply_methods(create_model("resnet20", in_channels=1, width=0.25),
                                         [f"rsr:density=0.5,eval_noise={str(eval_noise).lower()}"])
        assert any(m._forward_hooks for m in model.modules()) == eval_noise   # as built (and loaded)
        method.attach_noise(model)                                            # what before_training does
        with torch.no_grad():
            assert torch.equal(model.eval()(images), model(images)) != eval_noise
            assert not torch.equal(model.train()(images), model(images))     # noise in training
            model = method.finalize(model)
            # Training-only noise leaves no hook (a hooked model never runs as a graph) and no noise.
            assert any(m._forward_hooks for m in model.modules()) == eval_noise
            assert torch.equal(model.train()(images), model(images)) != eval_noise
    quiet, (method,) = apply_methods(create_model("resnet20", in_channels=1, width=0.25), ["rsr:density=0.5,noise=0"])
    method.attach_noise(quiet)
    quiet.train()
    with torch.no_grad():
        assert torch.equal(quiet(images), quiet(images))


def test_rsr_batch_norm_statistics_are_re_estimated_without_noise():
    model, (method,) = apply_methods(create_model("resnet20", in_channels=1, width=0.25), ["rsr:density=0.5"])
    method.attach_noise(model)
    quiet = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in quiet.named_parameters():
            if name.endswith(NOISE_SCALE):
                param.zero_()
        norms = [m for m in quiet.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        images = torch.rand(100, 1, 28, 28)
        quiet.train()(images)
    method.recalibrate_batch_norm(model.eval(), images)
    ours = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.allclose(a.running_var, b.running_var) and torch.allclose(a.running_mean, b.running_mean)
               for a, b in zip(ours, norms))
    assert not model.training and ours[0].momentum == 0.1     # mode and momentum restored
    model.train()
    assert not torch.equal(model(images[:4]), model(images[:4]))   # the noise is back after it


class Stub:
    """The parts of a trainer RSR's loss reads."""

    class State:
        epoch = 0
        step = 0

    def __init__(self, model, epochs: int):
        self.model, self.loss_fn, self.state = model, nn.CrossEntropyLoss(), self.State()
        self.config = type("Config", (), {"epochs": epochs})()


def test_rsr_lasso_is_the_l1_of_the_prunable_weights_until_pruning():
    model, (method,) = apply_methods(create_model("resnet20", in_channels=1, width=0.25),
                                     ["rsr:density=0.5,attack=none,noise=0,lasso=0.001,prune_at=0.5"])
    images, labels = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    trainer = Stub(model.eval(), epochs=4)
    plain = nn.functional.cross_entropy(model(images), labels)
    l1 = sum(m.weight.abs().sum() for _, m in prunable(model))
    stem = model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)))
    assert stem not in [m for _, m in prunable(model)]        # the first convolution is not penalised
    assert method.loss(trainer, images, labels).item() == pytest.approx((plain + 0.001 * l1).item(), rel=1e-6)
    trainer.state.epoch = 2                                   # prune_epoch(4) = 2: fine-tuning, no lasso
    assert method.loss(trainer, images, labels).item() == pytest.approx(plain.item(), rel=1e-6)


# -- APGD by hand ------------------------------------------------------------------------------
class OnePixel(nn.Module):
    """Two classes on a one-pixel image x: logits [0, -10 (x - 0.45)^2 - 1], so class 0 always wins
    and cross-entropy rises as x nears 0.45; records every point it is evaluated at."""

    def __init__(self):
        super().__init__()
        self.seen: list[float] = []

    def forward(self, x):
        self.seen.append(float(x.detach().flatten()[0]))
        other = -10 * (x.flatten(1)[:, :1] - 0.45) ** 2 - 1
        return torch.cat([torch.zeros_like(other), other], 1)


def test_apgd_momentum_and_step_halving_by_hand(monkeypatch):
    # x0 = 0.5, eps 0.2 (ball [0.3, 0.7]), step 2 eps = 0.4, start x0 + 0.05 = 0.55 (patched).
    # 1: z = clip(0.55 - 0.4) = 0.3, first step without momentum: x1 = 0.3 (loss falls: no rise).
    # 2: z = clip(0.3 + 0.4) = 0.7; x2 = 0.3 + 0.75 (0.7 - 0.3) + 0.25 (0.3 - 0.55) = 0.5375 (rise, best).
    #    Checkpoint 2 (of 10 steps): 1 rise in 2 steps < 0.75 x 2: the step halves to 0.2, x = best.
    # 3: z = clip(0.5375 - 0.2) = 0.3375; x3 = 0.5375 + 0.75 (0.3375 - 0.5375) + 0.25 (0.5375 - 0.3) = 0.446875.
    #    (Without momentum x2 would be 0.7; without the halving x3 would be 0.41875.)
    monkeypatch.setattr(autoattack, "_random_start", lambda images, eps, norm, generator: images + 0.05)
    model = OnePixel()
    autoattack.apgd_run(model, torch.full((1, 1, 1, 1), 0.5), torch.tensor([0]), 0.2, 10, "linf", "ce")
    assert model.seen[:4] == pytest.approx([0.55, 0.3, 0.5375, 0.446875], abs=1e-6)


# -- bad options -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("sat:metric=loss", "metric must be one of prob, hessian"),
    ("sat:attack=none", "attack=none leaves nothing to schedule"),
    ("sat:beta=1", "beta must be < 1"),
    ("sat:ramp=0", "ramp must be in \\(0, 1\\]"),
    ("sat:stages=0", "stages must be a whole number >= 1"),
    ("sat:metric=prob,threshold=2", "threshold must be in \\(0, 1\\]"),
    ("sat:check_every=0", "check_every must be a whole number >= 1"),
    ("rsr:density=0", "density must be in \\(0, 1\\]"),
    ("rsr:prune_at=1", "prune_at must be in \\(0, 1\\)"),
    ("rsr:lasso=-1", "lasso must be >= 0"),
    ("rsr:noise=-0.1", "noise must be >= 0"),
    ("rsr:schedule=prob,attack=none", "needs an attack"),
    ("dnr:schedule=linear", "schedule must be one of constant, prob, hessian"),
    ("dnr:steps=0", "steps must be a whole number >= 1"),
])
def test_bad_options_fail_in_one_line_before_training(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_method(spec)


def test_rsr_with_one_epoch_is_refused_before_anything_is_written(tmp_path, capsys):
    code = main(["train", "--data", "synthetic", "--model", "resnet20", "--width", "0.25", "--epochs", "1",
                 "--method", "rsr:density=0.5", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "needs epochs >= 2" in err
    assert not (tmp_path / "run").exists()
