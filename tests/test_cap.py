"""CaP: orthonormal projections, exact merging, ranks, misfits."""
from __future__ import annotations

import copy

import pytest
import torch

from leancnn.errors import ConfigError
from leancnn.methods import apply_methods
from leancnn.methods.cap import (Reconstruction, fold_groups, insert_projections, merge_projections, retract,
                                 stiefel_step)
from leancnn.methods.channel_graph import channel_graph
from leancnn.models import MODELS, create_model

from .test_channel_graph import Branchy, user_model


def projectable(model):
    graph = channel_graph(model)
    return graph, [g for g in graph.groups if graph.projectable(g)]


def trained_like(name: str) -> torch.nn.Module:
    """A model with non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, width=0.25)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 1, 16, 16))
    return model.eval()


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_folding_and_full_rank_permutation_merge_reproduce_the_model(name):
    model = trained_like(name)
    x = torch.rand(4, 1, 16, 16)
    reference = model(x)
    graph, groups = projectable(model)
    folded = fold_groups(copy.deepcopy(model), graph, groups)
    assert torch.allclose(folded(x), reference, atol=1e-4)
    # A permutation is orthonormal and commutes with ReLU and pooling: merging it must be exact.
    generator = torch.Generator().manual_seed(1)
    projections = [torch.eye(g.width)[:, torch.randperm(g.width, generator=generator)] for g in groups]
    merged = merge_projections(copy.deepcopy(folded), graph, groups, projections, model)
    assert torch.allclose(merged(x), reference, atol=1e-4)
    assert [type(m) for m in merged.modules()] == [type(m) for m in model.modules()]   # the same layer types


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_merged_network_equals_the_projected_one_at_any_rank(name):
    original = trained_like(name)
    graph, groups = projectable(original)
    model = fold_groups(copy.deepcopy(original), graph, groups)
    generator = torch.Generator().manual_seed(2)
    projections = [torch.nn.Parameter(retract(torch.randn(g.width, max(1, g.width // 2), generator=generator)))
                   for g in groups]
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        projected = insert_projections(copy.deepcopy(model), graph, groups, projections)(x)
        merged_model = merge_projections(copy.deepcopy(model), graph, groups, [p.detach() for p in projections],
                                         original)
        merged = merged_model(x)
    assert torch.allclose(projected, merged, atol=1e-4)
    for group, projection in zip(groups, projections):
        assert merged_model.get_submodule(group.producer).out_channels == projection.shape[1]


def test_stiefel_steps_keep_projections_orthonormal():
    generator = torch.Generator().manual_seed(0)
    projection = retract(torch.randn(24, 7, generator=generator))
    for _ in range(50):
        projection = stiefel_step(projection, torch.randn(24, 7, generator=generator) * 3, lr=0.1)
    assert torch.allclose(projection.T @ projection, torch.eye(7), atol=1e-5)




@pytest.mark.parametrize("ranks", ["uniform", "energy"])
def test_compress_with_cap_meets_the_mac_target(synthetic_vgg, tmp_path, ranks):
    from leancnn.compress import compress_run
    from leancnn.runs import load_run

    out = tmp_path / ranks
    result = compress_run(synthetic_vgg.run_dir, [f"cap:macs=0.5,ranks={ranks},steps=5"], epochs=1, out=out,
                          progress=False, latency=False).result
    assert result.macs_dense <= 0.5 * synthetic_vgg.result.macs_dense
    model, architecture = load_run(out)
    ranks_chosen = result.extra["compress"]["cap_ranks"]
    for producer, rank in ranks_chosen.items():
        assert model.get_submodule(producer).out_channels == rank
    # This tiny 2-epoch model loses most of its accuracy when every layer is halved at once
    # (so does L1 pruning); one fine-tuning epoch must bring it well above chance (0.25).
    assert result.test_acc > 0.6


@pytest.mark.parametrize("spec, message", [("cap:macs=0", "macs must be in \\(0, 1\\]"),
                                           ("cap:macs=1.2", "macs must be in \\(0, 1\\]"),
                                           ("cap:macs=0.5", "needs a trained model")])
def test_cap_bad_options(spec, message):
    with pytest.raises(ConfigError, match=message):
        apply_methods(create_model("vgg11"), [spec])


def session():
    from leancnn.compress import CompressSession
    from leancnn.config import TrainConfig
    from leancnn.data import load_dataset

    dataset = load_dataset("synthetic")
    return CompressSession(dataset, TrainConfig(), dataset.test_images, dataset.test_labels, [], False)


@pytest.mark.parametrize("spec", ["cap:macs=0.5", "l1prune:macs=0.5"])
def test_an_untraceable_model_fails_in_compress_before_changes(spec):
    from leancnn.methods import parse_method

    model = Branchy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"cannot trace module gate \(Gate\)"):
        parse_method(spec).compress(model, session())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(MODELS.names()) + ["user"])
def test_cap_at_full_rank_is_exact_on_every_model(name):
    """macs=1 keeps every rank whole; the start is then the identity and, with no optimisation
    step, the merged network computes what the trained one does."""
    from leancnn.methods import parse_method

    model = (user_model() if name == "user" else trained_like(name)).eval()
    shape = session().dataset.input_shape
    x = torch.rand(4, *shape)
    reference = model(x)
    # coupled=select: the groups a projection cannot cross go through channel selection (of all of them)
    compressed, _ = parse_method("cap:macs=1.0,steps=0,lr=0.01,coupled=select").compress(copy.deepcopy(model),
                                                                                          session())
    out = compressed.eval()(x)
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max())), name


@pytest.mark.parametrize("name", MODELS.names())
def test_identity_projections_reconstruct_every_layer_exactly(name):
    """At full rank with P = I the projected network is the folded one: zero reconstruction error
    at every consumer (the targets come from the folded network, as the projected side has its
    batch norms folded too), on every registered model CaP supports."""
    model = trained_like(name)
    graph, groups = projectable(model)
    assert groups, name
    folded = fold_groups(copy.deepcopy(model), graph, groups)
    identities = [torch.eye(g.width) for g in groups]
    objective = Reconstruction(folded, graph, groups, identities)
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        logits, error = objective(x)
        assert float(error) < 1e-9 and torch.allclose(logits, model(x), atol=1e-4)
        assert set(objective.targets) == {c.module for g in groups for c in g.consumers}   # every consumer is compared
        assert all((t ** 2).mean() > 0 for t in objective.targets.values())
    objective.close()


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_kernel_relax_moves_exactly_the_projected_layers_kernels(name):
    """relax=false trains only the projections; relax=true also the producers' and consumers'
    kernels (and their biases), and nothing else of the network."""
    from leancnn.data import BatchLoader, load_dataset
    from leancnn.methods.cap import CaP, CaPOptions

    model = trained_like(name)
    graph, groups = projectable(model)
    folded = fold_groups(copy.deepcopy(model), graph, groups)
    dataset = load_dataset("synthetic")
    loader = BatchLoader(dataset.train_images[:256], dataset.train_labels[:256], 64, shuffle=True, seed=0)
    layers = {c.module for g in groups for c in g.consumers} | {g.producer for g in groups}
    before = {key: value.clone() for key, value in folded.state_dict().items()}
    for relax in (False, True):
        generator = torch.Generator().manual_seed(3)
        projections = [torch.nn.Parameter(retract(torch.randn(g.width, 2, generator=generator))) for g in groups]
        start = [p.detach().clone() for p in projections]
        optimised = CaP(CaPOptions(steps=3, relax=relax)).optimise(folded, graph, groups, projections, loader,
                                                                   lr=0.05)
        after = optimised.state_dict()
        moved = {key.rsplit(".", 1)[0] for key in before if not torch.equal(before[key], after[key])}
        assert moved == (layers if relax else set()), relax
        assert all(not torch.equal(a, p) for a, p in zip(start, projections))   # the projections moved too
    assert folded.state_dict().keys() == before.keys() and all(
        torch.equal(before[k], v) for k, v in folded.state_dict().items())      # the input is left alone
