"""The zoo's front and thinning, the selector's boundaries and the runtime's plans
(the server is in test_serve.py)."""
from __future__ import annotations

import json

import pytest
import torch

from leancnn.errors import LeancnnError
from leancnn.zoo import FrontModel, Selector, pareto_front, thin


def names(models: list[FrontModel]) -> list[str]:
    return [m.name for m in models]


def test_front_drops_slower_and_less_accurate_models():
    table = [FrontModel("a", 1.0, 0.80), FrontModel("b", 2.0, 0.85), FrontModel("slow-bad", 3.0, 0.84),
             FrontModel("c", 4.0, 0.90), FrontModel("equal-acc-slower", 5.0, 0.90), FrontModel("d", 6.0, 0.91),
             FrontModel("same-time-worse", 4.0, 0.70)]
    assert names(pareto_front(table)) == ["a", "b", "c", "d"]


def test_front_of_equal_times_keeps_the_more_accurate():
    assert names(pareto_front([FrontModel("x", 1.0, 0.5), FrontModel("y", 1.0, 0.6)])) == ["y"]


def test_thinning_needs_an_epsilon_step():
    front = [FrontModel("a", 1.0, 0.800), FrontModel("b", 2.0, 0.801), FrontModel("c", 3.0, 0.803),
             FrontModel("d", 4.0, 0.804), FrontModel("e", 5.0, 0.810)]
    assert names(thin(front, 0.002)) == ["a", "c", "e"]
    assert names(thin(front, 0.0)) == names(front)
    assert names(thin(front, 0.5)) == ["a"]
    with pytest.raises(ValueError):
        thin(front, -0.1)


def test_selector_at_every_boundary():
    models = [FrontModel("fast", 1.0, 0.8), FrontModel("mid", 2.0, 0.85), FrontModel("slow", 3.0, 0.9)]
    selector = Selector(models)
    cases = {0.0: (0, False), 0.999: (0, False), 1.0: (0, True), 1.5: (0, True), 1.999: (0, True), 2.0: (1, True),
             2.5: (1, True), 3.0: (2, True), 1e9: (2, True), -5.0: (0, False)}
    for time_left, (index, fits) in cases.items():
        choice = selector.choose(time_left)
        assert (choice.index, choice.fits) == (index, fits), time_left
    refusing = Selector(models, policy="refuse")
    assert refusing.choose(0.5).index is None and not refusing.choose(0.5).fits
    assert refusing.choose(2.0).index == 1
    with pytest.raises(ValueError):
        Selector([FrontModel("b", 2.0, 0.9), FrontModel("a", 1.0, 0.8)])  # not sorted
    with pytest.raises(ValueError):
        Selector(models, policy="maybe")


def test_zoo_manifest_and_models(tiny_zoo):
    zoo, manifest = tiny_zoo
    assert manifest["input_shape"] == [1, 16, 16]
    # Two runs: the slower one stays only if it is more accurate (epsilon 0), else it is dropped.
    fast, slow = sorted(manifest["models"] + manifest["dropped"], key=lambda e: (e["expected_ms"], -e["accuracy"]))
    expected = [fast["name"], slow["name"]] if slow["accuracy"] > fast["accuracy"] else [fast["name"]]
    assert [m["name"] for m in manifest["models"]] == expected
    times = [m["expected_ms"] for m in manifest["models"]]
    accuracies = [m["accuracy"] for m in manifest["models"]]
    assert times == sorted(times) and accuracies == sorted(accuracies)
    for entry in manifest["models"]:
        assert (zoo / entry["path"] / "model.safetensors").is_file()
    assert len(manifest["models"]) + len(manifest["dropped"]) == 2


def test_zoo_build_rejects_what_is_not_a_run(tmp_path):
    from leancnn.zoo.build import build_zoo

    with pytest.raises(LeancnnError, match="not a finished run"):
        build_zoo([str(tmp_path)], tmp_path / "zoo")


def test_refuse_policy_answers_without_a_model(tiny_zoo):
    from leancnn.zoo.runtime import Runtime

    zoo, _ = tiny_zoo
    runtime = Runtime(zoo, policy="refuse", threads=1)
    refused = runtime.predict(torch.rand(1, 16, 16), deadline_ms=1e-6)
    assert refused.model is None and not refused.deadline_met
    answered = runtime.predict(torch.rand(1, 16, 16), deadline_ms=1e4)
    assert answered.model == runtime.names[-1] and answered.deadline_met


def test_selector_stays_exact_when_measured_times_stop_rising():
    models = [FrontModel("fast", 1.0, 0.8), FrontModel("mid", 2.0, 0.85), FrontModel("slow", 3.0, 0.9)]
    selector = Selector(models)
    selector.update(1, 5.0)   # "mid" measured slower than the more accurate "slow"
    brute = lambda budget: max((i for i, t in enumerate(selector.own_times) if t <= budget), default=None)  # noqa: E731
    for budget in (0.5, 1.0, 2.0, 2.9, 3.0, 3.5, 5.0, 9.0):
        choice = selector.choose(budget)
        expected = brute(budget)
        assert choice.index == (0 if expected is None else expected) and choice.fits == (expected is not None), budget
    assert selector.choose(3.5).index == 2        # "slow" fits; "mid" no longer does
    selector.update(2, 0.5)                        # now the most accurate is also the fastest
    assert selector.choose(0.6).index == 2 and selector.times == [0.5, 0.5, 0.5]


def test_runtime_plans_with_the_times_it_measures(tiny_zoo):
    from leancnn.measure.latency import quantile
    from leancnn.zoo.runtime import Runtime

    zoo, manifest = tiny_zoo
    runtime = Runtime(zoo, threads=1, min_samples=3, window=5)
    last = len(runtime.names) - 1
    seeded = list(runtime.samples[last])
    assert len(seeded) == 3                                    # warm-up measured it here, taking turns
    assert runtime.expected_ms()[last] == quantile(seeded, 0.9)
    for _ in range(3):
        runtime.observe(last, 1000.0)
    assert runtime.expected_ms()[last] == 1000.0               # the model is now expected to take 1 s here
    answer = runtime.predict(torch.rand(1, 16, 16), deadline_ms=500.0)
    assert last == 0 or answer.model != runtime.names[last]    # so a 500 ms deadline no longer picks it
    for _ in range(5):
        runtime.observe(last, 0.001)
    assert runtime.expected_ms()[last] == 0.001                # the window forgets the slow runs
    fixed = Runtime(zoo, threads=1, calibrate=False, min_samples=1)
    fixed.observe(0, 1000.0)
    assert fixed.expected_ms() == [m["expected_ms"] for m in manifest["models"]]
    with pytest.raises(ValueError, match="plan_quantile"):
        Runtime(zoo, plan_quantile=1.5)


def test_blocking_guard_on_a_hand_computed_load():
    from leancnn.zoo.blocking import BlockingGuard

    guard = BlockingGuard(risk=0.005, min_requests=20)
    times = [1.0, 4.0, 9.0, 12.0, 20.0]
    assert guard.cap_ms(times, 2.0) == float("inf")            # too few requests seen to judge
    for i in range(21):
        guard.record(i * 1e-3, 10.0)                           # one request per ms, every deadline 10 ms
    assert guard.rate_per_ms() == pytest.approx(1.0)
    # A 9 ms run: an arrival with r ms of it left needs r + 2 ms, under 10 at every midpoint -> nobody late.
    assert guard.expected_late(9.0, 2.0, 1.0) == 0.0
    # A 12 ms run: the midpoint r = 10.5 needs 12.5 ms > 10: a quarter of the 12 arrivals are late.
    assert guard.expected_late(12.0, 2.0, 1.0) == pytest.approx(3.0)
    assert guard.cap_ms(times, 2.0) == 9.0
    sparse = BlockingGuard(risk=0.005, min_requests=20)
    for i in range(21):
        sparse.record(i * 1.0, 10.0)                           # one request per second
    # 12 ms: 0.001/ms * 12 ms * 1/4 = 0.003 <= 0.005; 20 ms: 0.001 * 20 * 2/4 = 0.01 > 0.005.
    assert sparse.cap_ms(times, 2.0) == 12.0
    assert sparse.cap_ms([50.0, 60.0], 2.0) == 50.0            # never below the fastest
    for i in range(400):                                       # the window forgets the old deadlines
        sparse.record(21 + i, 100.0)
    assert sparse.late_fraction(50.0) == 0.0 and len(sparse.sorted) == 200
    with pytest.raises(ValueError):
        BlockingGuard(risk=0.0)


def test_zoo_build_trains_a_generated_family(tmp_path, capsys):
    from leancnn.cli import main

    out = tmp_path / "zoo"
    argv = ["zoo", "build", "--family", "resnet20,vgg11", "--widths", "0.25", "--data", "synthetic", "--epochs", "1",
            "--train-subset", "300", "--runs", "5", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "family").iterdir() if p.is_dir()) == ["resnet20-w0.25", "vgg11-w0.25"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["models"]) + len(manifest["dropped"]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["zoo", "build", "--family", "resnet7", "--out", str(tmp_path / "bad")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model 'resnet7'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad" / "family").exists()   # rejected before any training
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["zoo", "build", "--out", str(tmp_path / "none")]))
    assert exit_info.value.code == 2 and "--from SOURCE" in capsys.readouterr().err


def test_quantiles_are_written_the_same_way_on_every_command():
    from leancnn.measure.latency import parse_quantile

    assert [parse_quantile(text, "--q") for text in ("median", "p90", "P99", "0.95", "1")] == [0.5, 0.9, 0.99, 0.95, 1.0]
    for bad in ("0", "p0", "fast", "-0.5"):
        with pytest.raises(LeancnnError, match="--q must be median, pNN"):
            parse_quantile(bad, "--q")


def test_zoo_build_accepts_only_the_quantiles_a_zoo_records(tmp_path, capsys):
    from leancnn.cli import main

    code = main(["zoo", "build", "--from", str(tmp_path), "--out", str(tmp_path / "zoo"), "--quantile", "p99"])
    assert code == 2
    assert "a zoo records the median and p90 of each model, got 'p99'" in capsys.readouterr().err
    assert not (tmp_path / "zoo").exists()


def test_a_dynamic_run_serves_its_sub_networks_from_one_copy_of_the_weights(tmp_path):
    from leancnn.experiment import train_run
    from itertools import chain

    from leancnn.methods.dynamic import select_subnet
    from leancnn.runs import load_run
    from leancnn.zoo.build import build_zoo
    from leancnn.zoo.runtime import Runtime

    from .conftest import tiny_config

    spec = "dynamic:targets=1+0.6+0.3,smallest=0.25,random=1,candidates=4,holdout=64,recalibrate=64,front=macs"
    dynamic = train_run(tiny_config(tmp_path, width=0.5, epochs=1, methods=[spec], out=str(tmp_path / "dyn")),
                        progress=False)
    plain = train_run(tiny_config(tmp_path, width=0.25, out=str(tmp_path / "plain")), progress=False)
    manifest = build_zoo([str(dynamic.run_dir), str(plain.run_dir)], tmp_path / "zoo", epsilon=0.0, runs=5,
                         log=lambda _: None)
    entries = {m["name"]: m for m in manifest["models"]} | {d["name"]: d for d in manifest["dropped"]}
    assert {"dyn-sub0", "dyn-sub1", "dyn-sub2", "plain"} == set(entries)   # mixed in one zoo
    kept = [m for m in manifest["models"] if m.get("subnet") is not None]
    assert kept and all(m["path"] == "models/dyn" for m in kept)
    assert {p.name for p in (tmp_path / "zoo" / "models").iterdir()} <= {"dyn", "plain"}   # one copy of dyn

    runtime = Runtime(tmp_path / "zoo", calibrate=False)
    views = {e["subnet"]: m for e, m in zip(runtime.entries, runtime.models) if e.get("subnet") is not None}
    assert len(views) == len(kept)
    # One set of weights behind every sub-network: the same storages, as many as one model has.
    storages = [{t.data_ptr() for t in chain(v.parameters(), v.buffers())} for v in views.values()]
    reference, _ = load_run(dynamic.run_dir)
    assert all(s == storages[0] for s in storages)
    assert len(storages[0]) == len(list(chain(reference.parameters(), reference.buffers())))
    x = torch.rand(3, *runtime.input_shape)
    with torch.no_grad():
        for _ in range(2):
            for index, view in views.items():   # back and forth: each its own function, no weight copied
                expected = select_subnet(reference, index).eval()(x)
                assert torch.allclose(view(x), expected, atol=1e-6)
                assert {t.data_ptr() for t in chain(view.parameters(), view.buffers())} == storages[0]
    answer = runtime.predict(x[0], deadline_ms=10_000.0)
    assert answer.model in runtime.names and len(answer.probabilities) == 4
