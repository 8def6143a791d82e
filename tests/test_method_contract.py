"""The method contract: every registered method, at each of its declared test specs
(`Method.test_specs`), on resnet20 and vgg11, must

- round-trip its spec through parse and format;
- train (training methods: a two-epoch run; post-training methods: `leancnn compress`
  with one fine-tuning epoch);
- save and load to identical logits;
- report consistent counts (non-zero <= total, effective <= dense, result.json = the model);
- deploy to a model that computes the same function on fresh random inputs, on every
  implementation a deployed layer can choose;
- (training methods) resume after a kill to bit-identical weights, optimizer and method state.

The cases grow with the registry: a new method without test specs fails
`test_every_method_declares_test_specs`.
"""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from leancnn.compress import compress_run
from leancnn.experiment import build_model, prepare_data, train_run
from leancnn.io import load_tensors
from leancnn.measure import count
from leancnn.methods import Method, parse_method
from leancnn.methods.base import METHODS
from leancnn.runs import load_run, read_result

from .conftest import tiny_config
from .deploy_checks import assert_deploy_matches

CONTRACT_MODELS = ["resnet20", "vgg11"]


def cases(post_training: bool) -> list:
    return [pytest.param(spec, model, id=f"{spec}-{model}")
            for name in METHODS.names() if METHODS.get(name).post_training == post_training
            for spec in METHODS.get(name).test_specs for model in CONTRACT_MODELS]


def contract_config(tmp_path, model: str, methods: list[str], out: str, epochs: int = 2):
    # 192 images in batches of 32: six steps an epoch, enough to move every method's state.
    return tiny_config(tmp_path, model=model, methods=methods, epochs=epochs, train_subset=192, test_subset=64,
                       out=str(tmp_path / out))


class Interrupt(Exception):
    pass


def kill_after(epoch: int):
    def callback(entry):
        if entry["epoch"] == epoch:
            raise Interrupt
    return callback


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_declares_test_specs(name):
    method = METHODS.get(name)
    assert method.test_specs, f"method {name!r} declares no test_specs: the contract cannot check it"
    assert all(parse_method(spec).name == name for spec in method.test_specs)


@pytest.mark.parametrize("spec", [s for n in METHODS.names() for s in METHODS.get(n).test_specs])
def test_spec_round_trips(spec):
    method = parse_method(spec)
    again = parse_method(method.spec())
    assert type(again) is type(method) and asdict(again.options) == asdict(method.options)
    assert again.spec() == method.spec()


def assert_saved_run_matches(outcome) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """Load the run back: identical logits on fresh inputs, and counts consistent with result.json."""
    loaded, architecture = load_run(outcome.run_dir)
    shape = tuple(architecture["input_shape"])
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), outcome.model.eval()(x)), "save then load changed the logits"
    profile = count(loaded, shape)
    assert 0 < profile.params_nonzero <= profile.params_total
    assert 0 < profile.macs_effective <= profile.macs_dense
    assert profile.params_total == sum(p.numel() for p in loaded.parameters())
    result = read_result(outcome.run_dir)
    for key, value in profile.totals().items():
        assert getattr(result, key) == value, key
    return loaded, shape


def assert_resume_is_exact(tmp_path, model: str, spec: str):
    """A two-epoch run killed after epoch 1 and resumed, against one never killed: both stopped
    right after epoch 2's checkpoint, whose weights, optimizer buffers, step and methods' own
    state must be bit-identical. Returns the resumed run's config."""
    straight = contract_config(tmp_path, model, [spec], "straight")
    with pytest.raises(Interrupt):
        train_run(straight, progress=False, on_epoch=kill_after(2))
    resumed = contract_config(tmp_path, model, [spec], "resumed")
    with pytest.raises(Interrupt):
        train_run(resumed, progress=False, on_epoch=kill_after(1))
    with pytest.raises(Interrupt):
        train_run(resumed, resume=True, progress=False, on_epoch=kill_after(2))
    records = [json.loads((tmp_path / run / "checkpoint" / "latest.json").read_text())
               for run in ("straight", "resumed")]
    assert records[0]["epoch"] == records[1]["epoch"] == 2
    assert records[0]["step"] == records[1]["step"]
    assert records[0]["methods"] == records[1]["methods"], "the methods' state differs after a resume"
    tensors = [load_tensors(tmp_path / run / "checkpoint" / record["weights"])
               for run, record in zip(("straight", "resumed"), records)]
    assert tensors[0].keys() == tensors[1].keys()
    differ = [k for k in tensors[0] if not torch.equal(tensors[0][k], tensors[1][k])]
    assert not differ, f"resumed run differs in {differ[:5]}"
    return resumed


@pytest.mark.parametrize("spec, model", cases(post_training=False))
def test_training_method_contract(tmp_path, spec, model):
    resumed = assert_resume_is_exact(tmp_path, model, spec)
    outcome = train_run(resumed, resume=True, progress=False)   # nothing left to train: finishes the run
    initial, _, _ = build_model(resumed, prepare_data(resumed))
    trained_state = outcome.model.state_dict()
    moved = [k for k, v in initial.state_dict().items()
             if k in trained_state and v.shape == trained_state[k].shape and not torch.equal(v, trained_state[k])]
    assert moved, "training changed no weight"
    loaded, shape = assert_saved_run_matches(outcome)
    assert_deploy_matches(loaded, shape)


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """One trained dense run per contract model, compressed by the post-training cases."""
    tmp = tmp_path_factory.mktemp("contract-base")
    return {model: train_run(contract_config(tmp, model, [], model, epochs=1), progress=False)
            for model in CONTRACT_MODELS}


@pytest.mark.parametrize("spec, model", cases(post_training=True))
def test_post_training_method_contract(tmp_path, base_runs, spec, model):
    base = base_runs[model]
    outcome = compress_run(base.run_dir, [spec], epochs=1, out=tmp_path / "compressed", progress=False,
                           latency=False)
    assert outcome is not None and outcome.result.methods[-1].split(":")[0] == parse_method(spec).name
    loaded, shape = assert_saved_run_matches(outcome)
    assert_deploy_matches(loaded, shape)


class _StepScaledLoss(Method):
    """A test-only method with state outside the model: the loss is scaled by a factor that
    depends on how many steps it has seen, so a resume that loses the count trains differently."""

    name = "test-step-scaled-loss"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.steps = 0

    def loss(self, trainer, images, labels):
        return trainer.loss_fn(trainer.model(images), labels) * (1.0 + 0.5 * (self.steps % 4))

    def after_step(self, trainer) -> None:
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state) -> None:
        self.steps = state["steps"]


class _ForgetfulStepScaledLoss(_StepScaledLoss):
    name = "test-forgetful-step-scaled-loss"

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


def test_resume_restores_a_methods_own_state(tmp_path, register_test_method):
    register_test_method(_StepScaledLoss)
    assert_resume_is_exact(tmp_path, "resnet20", _StepScaledLoss.name)


def test_the_resume_check_catches_a_method_that_loses_its_state(tmp_path, register_test_method):
    register_test_method(_ForgetfulStepScaledLoss)
    with pytest.raises(AssertionError, match="resumed run differs"):
        assert_resume_is_exact(tmp_path, "resnet20", _ForgetfulStepScaledLoss.name)
