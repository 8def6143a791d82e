"""Every registered model, with each method that applies to it (every declared test spec of
every registered method), deployed eager and as the frozen TorchScript graph, computes what
the model computes on fresh random inputs (1e-4, on every implementation a sparse layer can
choose: tests/deploy_checks.py).

No training: training-time methods are applied and finalized on a fresh model, post-training
ones compress it through the same session `leancnn compress` uses (on the synthetic set).
Batch norms get random affine parameters and the statistics of a batch first, so folding
them into the convolutions is checked on values that are not the identity.

A (method, model) pair declared in NOT_APPLICABLE must fail with its one-line reason; every
other pair must deploy. So a method that starts to apply, or stops, changes this file.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from leancnn.compress import CompressSession, split_selection
from leancnn.errors import LeancnnError
from leancnn.experiment import build_model, prepare_data
from leancnn.kernels import plans
from leancnn.methods import parse_method
from leancnn.methods.base import METHODS
from leancnn.models import MODELS, create_model

from .conftest import tiny_config
from .deploy_checks import assert_deploy_matches

# Channel surgery knows VGG chains and BasicBlock ResNets with batch norm only (the any-model issue
# replaces it with a traced channel graph): these pairs stop before doing anything, with this reason.
# pSConv converts dense 3x3 convolutions other than the stem: these have none (depthwise 3x3s; lenet5's 5x5s).
NO_DENSE_3X3 = "no 3x3 convolution to convert"
# ViP replaces a stride-1 3x3 convolution block: lenet5 has only 5x5 convolutions without batch norm.
NO_VIP_BLOCK = "the model has no block that can take ViP"
# BCR's blocks of 4 filters must divide every pruned layer: shufflenetv2 at width 0.25 has 14-filter layers.
BLOCKS_DO_NOT_DIVIDE = "do not divide layer"
# lenet5 at the tests' width has 5 and 12 filters and 125 hidden units: no circulant block of 2 or 4 divides them.
NO_CIRCULANT_LAYER = "the block divides the channels of no"
NOT_APPLICABLE = {
    ("bcr", "shufflenetv2"): BLOCKS_DO_NOT_DIVIDE,
    ("vip", "lenet5"): NO_VIP_BLOCK,
    ("circulant", "lenet5"): NO_CIRCULANT_LAYER,
    **{("psconv", model): NO_DENSE_3X3 for model in ("mobilenetv2", "shufflenetv2", "lenet5")},
}


def method_key(spec: str) -> str:
    method = parse_method(spec)
    return f"{method.name}-channel" if getattr(method.options, "mode", None) == "channel" else method.name


# Deeper models of the same builder (more blocks of the same kinds, checked below): every method
# is checked on the shallow one; the deeper one deploys dense, with irregular masks and pSConv
# (3 cases instead of 11: resnet110 alone took a minute of CI's ten).
SAME_KINDS_AS = {"resnet32": "resnet20", "resnet56": "resnet20", "resnet110": "resnet20", "resnet34": "resnet18"}
DEEPER_MODEL_SPECS = [None, "dnr:density=0.1,attack=none", "PS4_P4"]


# SynFlow's baselines leave every layer as it is and zero weights through a mask, as synflow does
# (checked on every model); only which weights differ, not what deploys: they are checked on
# resnet20 alone (their layer kinds are checked below).
SCORE_ONLY_BASELINES = ("snip", "magnitude-init", "random-init")


def cases() -> list:
    specs = [None] + [spec for name in METHODS.names() for spec in METHODS.get(name).test_specs]
    return [pytest.param(model, spec, id=f"{model}-{spec or 'dense'}") for model in MODELS.names()
            for spec in (DEEPER_MODEL_SPECS if model in SAME_KINDS_AS else specs)
            if model == "resnet20" or spec is None or parse_method(spec).name not in SCORE_ONLY_BASELINES]


@pytest.mark.parametrize("name", SCORE_ONLY_BASELINES)
def test_the_baselines_prepare_and_finalize_as_synflow_does(name):
    # They differ from synflow in their scores only: a baseline that starts to build its model
    # another way fails here and must go back to every model.
    ours, synflow = METHODS.get(name), METHODS.get("synflow")
    for hook in ("prepare", "layers", "finalize", "after_step"):
        assert getattr(ours, hook) is getattr(synflow, hook), hook


def layer_kinds(model: nn.Module) -> set[tuple]:
    return {(type(m).__name__, getattr(m, "kernel_size", None), getattr(m, "stride", None), getattr(m, "groups", None))
            for m in model.modules()}


@pytest.mark.parametrize("deeper, shallow", SAME_KINDS_AS.items())
def test_deeper_models_have_the_kinds_of_layers_of_their_shallow_sibling(deeper, shallow):
    assert layer_kinds(create_model(deeper)) == layer_kinds(create_model(shallow))


def calibrate_batch_norms(model: nn.Module, images: torch.Tensor, seed: int) -> None:
    """Affine parameters drawn at random, running statistics those of `images` (as after training:
    an untrained deep ResNet in eval mode with unit statistics reaches logits of 1e8)."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(norm.num_features, generator=generator) * 0.4 + 0.8)
            norm.bias.copy_(torch.randn(norm.num_features, generator=generator) * 0.1)
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: one batch sets the statistics
        model.train()(images)
    for norm in norms:
        norm.momentum = 0.1
        # A channel a sparse mask left constant has variance 0, and 1 / sqrt(eps) then multiplies
        # float rounding by 316 on both sides differently (5e-3 apart on mobilenetv2 at density 0.1):
        # an ill-posed comparison, not a wrong fold.
        norm.running_var.clamp_(min=0.01)
    model.eval()


@pytest.fixture(autouse=True)
def quick_plans(monkeypatch):
    """Plans timed once per candidate: this file checks what every implementation computes (each is
    forced in turn), not which is fastest; full timing made half of its two minutes."""
    timed = plans.time_candidates
    monkeypatch.setattr(plans, "time_candidates", lambda candidates: timed(candidates, rounds=1, min_seconds=0.0))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("deploy-models"), train_subset=128, test_subset=32)
    return config, prepare_data(config)


def with_method(config, dataset, model_name: str, spec: str | None) -> nn.Module:
    config = replace(config, model=model_name)
    method = parse_method(spec) if spec else None
    if method is None or not method.post_training:
        model, methods, _ = build_model(replace(config, methods=[spec] if spec else []), dataset)
        calibrate_batch_norms(model, dataset.train_images[:64], 5)
        for applied in methods:
            model = applied.finalize(model)
        return model
    model = build_model(config, dataset)[0]
    calibrate_batch_norms(model, dataset.train_images[:64], 5)
    train_split, selection_images, selection_labels = split_selection(dataset, config.seed)
    session = CompressSession(train_split, config, selection_images, selection_labels, [], progress=False,
                              log=lambda line: None)
    outcome = method.compress(model.eval(), session)
    assert outcome is not None, f"{spec} only reports: it should not be a test spec"
    return outcome[0]


@pytest.mark.parametrize("model_name, spec", cases())
def test_every_model_deploys_with_every_method(synthetic, model_name, spec):
    config, dataset = synthetic
    reason = NOT_APPLICABLE.get((method_key(spec), model_name)) if spec else None
    if reason is not None:
        with pytest.raises(LeancnnError, match=reason):
            with_method(config, dataset, model_name, spec)
        return
    model = with_method(config, dataset, model_name, spec)
    # Eager on oneDNN and on the kernel's default pass plan, the graph on the plans: the method contract
    # also runs the other pass plans and formats, and a graph with every layer on the kernel.
    assert_deploy_matches(model, tuple(dataset.train_images.shape[1:]), graph_on_kernel=False,
                          eager_choices=("dense", "kernel"))
