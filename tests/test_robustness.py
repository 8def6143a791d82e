"""Attacks: FGSM and PGD in [0, 1] pixel space, checked on a trained model and
against an independent implementation (torchattacks)."""
from __future__ import annotations

import json

import pytest
import torch

from leancnn.cli import main
from leancnn.data import load_dataset
from leancnn.errors import ConfigError
from leancnn.measure import parse_attack, robust_accuracy
from leancnn.measure.latency import measure_latency
from leancnn.runs import load_run
from leancnn.train import evaluate
from tests.test_data import write_idx_dataset

SAMPLE = 300


@pytest.fixture(scope="module")
def model_and_data(trained_fmnist, fashion_mnist):
    model, _ = load_run(trained_fmnist.run_dir)
    images = fashion_mnist.test_images[:SAMPLE].float() / 255
    labels = fashion_mnist.test_labels[:SAMPLE]
    return model, images, labels


def test_pgd_with_zero_eps_is_clean_accuracy(model_and_data):
    model, images, labels = model_and_data
    clean = evaluate(model, images, labels).top1
    assert robust_accuracy(model, images, labels, parse_attack("pgd:eps=0"), progress=False) == clean
    assert robust_accuracy(model, images, labels, parse_attack("fgsm:eps=0"), progress=False) == clean


def test_attack_strength_ordering(model_and_data, fashion_mnist):
    model, images, labels = model_and_data
    eps = fashion_mnist.attack_eps
    noise = 0.02  # 6 of 300 images
    clean = evaluate(model, images, labels).top1
    fgsm = robust_accuracy(model, images, labels, parse_attack("fgsm", eps), progress=False)
    pgd10 = robust_accuracy(model, images, labels, parse_attack("pgd:steps=10", eps), progress=False)
    pgd20 = robust_accuracy(model, images, labels, parse_attack("pgd:steps=20", eps), progress=False)
    assert clean > 0.6, "the fixture model must be trained for these checks to mean anything"
    assert pgd10 <= fgsm + noise <= clean + 2 * noise
    assert pgd20 <= pgd10 + noise
    assert fgsm < clean - 0.1, "eps 0.1 must hurt an undefended model"


def test_pgd_matches_torchattacks(model_and_data):
    torchattacks = pytest.importorskip("torchattacks")
    model, images, labels = model_and_data
    eps, step, steps = 0.1, 0.025, 10
    ours = robust_accuracy(model, images, labels,
                           parse_attack(f"pgd:eps={eps},step={step},steps={steps},random_start=false"),
                           progress=False)
    attack = torchattacks.PGD(model.eval(), eps=eps, alpha=step, steps=steps, random_start=False)
    adversarial = attack(images, labels)
    with torch.no_grad():
        theirs = (model(adversarial).argmax(1) == labels).float().mean().item()
    assert abs(ours - theirs) <= 0.01, (ours, theirs)


def test_attack_restores_training_mode(model_and_data):
    model, images, labels = model_and_data
    model.train()
    parse_attack("pgd:eps=0.05,steps=2")(model, images[:8], labels[:8])
    assert model.training
    model.eval()


@pytest.mark.parametrize("spec, message", [
    ("cw", "unknown attack 'cw'; choose one of: apgd, apgd-t, autoattack, fgsm, pgd, square"),
    ("pgd:eps=-0.1", "eps must be >= 0"),
    ("pgd:steps=0", "steps must be >= 1"),
    ("pgd:norm=l7", "'l7' is not one of linf, l2"),
    ("pgd:epsilon=0.1", "unknown option 'epsilon'; allowed: eps, step, steps, random_start, norm"),
    ("fgsm:steps=5", "attack 'fgsm': unknown option 'steps'; allowed: eps, norm"),
])
def test_bad_attack_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_attack(spec)


def test_recorded_spec_lists_only_the_options_an_attack_reads():
    assert parse_attack("fgsm:eps=0.1").spec == "fgsm:eps=0.1,norm=linf"
    assert parse_attack("pgd:eps=0.1,steps=5").spec == "pgd:eps=0.1,step=None,steps=5,random_start=True,norm=linf"


def test_default_eps_comes_from_the_dataset(tmp_path):
    write_idx_dataset(tmp_path / "mnist")
    grey = load_dataset("mnist", tmp_path / "mnist").subset(10, 5)   # a subset keeps the budget
    natural = load_dataset("synthetic")
    assert grey.attack_eps == 0.1 and natural.attack_eps == pytest.approx(8 / 255)
    assert parse_attack("pgd", grey.attack_eps).options.eps == 0.1
    assert parse_attack("pgd", natural.attack_eps).options.eps == pytest.approx(8 / 255)
    assert parse_attack("fgsm:eps=8/255", 0.1).options.eps == pytest.approx(8 / 255)   # the spec wins
    assert parse_attack("pgd").options.eps == pytest.approx(8 / 255)


def test_l2_pgd_stays_in_ball(model_and_data):
    model, images, labels = model_and_data
    adversarial = parse_attack("pgd:eps=0.5,norm=l2,steps=3")(model, images[:16], labels[:16])
    norms = (adversarial - images[:16]).flatten(1).norm(dim=1)
    assert norms.max() <= 0.5 + 1e-5 and adversarial.min() >= 0 and adversarial.max() <= 1


def test_eval_and_profile_cli_on_a_trained_run(trained_fmnist, capsys):
    run = str(trained_fmnist.run_dir)
    code = main(["eval", run, "--attack", "fgsm", "--attack", "pgd:steps=5", "--test-subset", "200",
                 "--json", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["robust"]) == {"fgsm", "pgd"}
    stored = json.loads((trained_fmnist.run_dir / "result.json").read_text())
    assert stored["robust"] == printed["robust"]
    assert main(["profile", run, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs_dense"] == trained_fmnist.result.macs_dense or \
        trained_fmnist.result.macs_dense is None
    assert main(["eval", run, "--attack", "pgd:eps=-1"]) == 2
    assert "eps must be >= 0" in capsys.readouterr().err


class TimedByAFakeClock(torch.nn.Module):
    """Each forward advances a fake clock by the next of `durations` (seconds)."""

    def __init__(self, durations):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.durations, self.now = list(durations), 0.0

    def forward(self, x):
        self.now += self.durations.pop(0)
        return x


def test_latency_reports_median_and_p90_of_the_timed_runs(monkeypatch):
    from leancnn.measure import latency as latency_module

    # Warm-up: 2 runs of 1 s (not timed); then 10 timed runs of 1..10 ms, shuffled.
    model = TimedByAFakeClock([1.0, 1.0] + [ms / 1000 for ms in (7, 2, 9, 4, 1, 10, 3, 8, 6, 5)])
    monkeypatch.setattr(latency_module.time, "perf_counter", lambda: model.now)
    stat = measure_latency(model, (1, 2, 2), batch_size=1, threads=1, warmup=2, warmup_seconds=0.0, runs=10)
    assert stat.runs == 10 and model.durations == []
    assert stat.median_ms == pytest.approx(5.5) and stat.p90_ms == pytest.approx(9.1)   # p90: 9 + 0.1 x (10 - 9)


def test_onnxruntime_latency_backend():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import onnxruntime

    from leancnn.measure.onnx_latency import export_onnx, measure_onnx_latency
    from leancnn.methods import apply_methods
    from leancnn.models import create_model

    model, _ = apply_methods(create_model("resnet20", width=0.25, in_channels=1), ["PS4_P4"])
    model.eval()
    session = onnxruntime.InferenceSession(export_onnx(model, (1, 16, 16)), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), expected, atol=1e-5)
    stat = measure_onnx_latency(model, (1, 16, 16), batch_size=2, runs=20)
    assert stat.backend == "onnxruntime" and stat.runs == 20 and stat.batch_size == 2 and stat.median_ms > 0


def test_one_quantile_definition_interpolates_between_order_statistics():
    from leancnn.measure.latency import quantile

    values = [10.0, 1.0, 4.0, 2.0, 3.0]   # sorted: 1 2 3 4 10
    assert [quantile(values, q) for q in (0.0, 0.5, 0.9, 1.0)] == [1.0, 3.0, pytest.approx(7.6), 10.0]
    assert quantile([5.0], 0.99) == 5.0
