"""The traced channel graph and the one surgery over it, on every registered model and on the
issue's user model: removing channels that were silenced changes no output; groups are what a
hand reading of the layouts says; untraceable models fail with one line naming the module."""
from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn

from leancnn.errors import ConfigError
from leancnn.methods.channel_graph import channel_graph
from leancnn.measure import count
from leancnn.methods.channels import (keep_channels, shrink_to_widths, silence_channels, transform_channels,
                                      width_macs)
from leancnn.models import MODELS, create_model

from .test_user_models import USER_NET


def user_model(tmp_path_factory=None) -> nn.Module:
    spec = importlib.util.spec_from_loader("leancnn_test_mynet", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(USER_NET, "mynet.py", "exec"), module.__dict__)
    sys.modules.setdefault("leancnn_test_mynet", module)
    return module.build(10, 1)


def with_statistics(model: nn.Module, size: int) -> nn.Module:
    """Random batch-norm affine parameters and statistics of a batch, in eval mode: surgery is
    checked on values that are not the identity."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
            module.momentum = None   # a cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 1, size, size))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model.eval()


def models() -> list[str]:
    return sorted(MODELS.names()) + ["user"]


def build(name: str) -> tuple[nn.Module, int]:
    if name == "user":
        return with_statistics(user_model(), 16), 16
    size = 28 if name == "lenet5" else 16
    return with_statistics(create_model(name, in_channels=1, width=0.25), size), size


def varied(groups: list) -> list:
    """One group of each structure (producers, depthwise layers, consumer kinds), and the last:
    deep networks repeat the same few dozens of times."""
    chosen: dict[tuple, object] = {}
    for group in groups:
        shape = (len(group.producers), len(group.role("pass")), len(group.consumers),
                 tuple(sorted({len(s.positions[0]) for s in group.consumers})))
        chosen.setdefault(shape, group)
    return list(chosen.values()) + ([groups[-1]] if groups[-1] not in chosen.values() else [])


@pytest.mark.parametrize("name", models())
def test_removing_silenced_channels_of_any_group_changes_no_output(name):
    model, size = build(name)
    example = torch.rand(1, 1, size, size)
    graph = channel_graph(model, example)
    assert graph.groups, f"{name}: no removable channel group found"
    x = torch.rand(3, 1, size, size)
    generator = torch.Generator().manual_seed(2)
    for group in varied(graph.groups):
        drop = torch.randperm(group.width, generator=generator)[:max(1, group.width // 2)]
        if len(drop) == group.width:
            drop = drop[1:]
        if len(drop) == 0:
            continue
        silenced = copy.deepcopy(model)
        silence_channels(silenced, group, drop)
        reference = silenced(x)
        keep = torch.tensor([c for c in range(group.width) if c not in set(drop.tolist())])
        pruned = keep_channels(copy.deepcopy(silenced), graph, {group.name: keep})
        assert torch.allclose(pruned(x), reference, rtol=1e-4, atol=1e-5), f"{name}: group {group.name}"
        # and the pruned model is what its graph says: the group is narrower by what was dropped
        assert channel_graph(pruned, example).group(group.name).width == len(keep)
        # silencing must matter: with the same channels merely removed from the unsilenced model
        # the output differs (so the comparison above could fail)
        changed = keep_channels(copy.deepcopy(model), graph, {group.name: keep})(x)
        original = model(x)
        assert (changed - original).abs().max() > 1e-3 * original.abs().max(), f"{name}: group {group.name}"


@pytest.mark.parametrize("name", models())
def test_every_group_pruned_at_once_by_recorded_widths_rebuilds_the_same_shapes(name):
    model, size = build(name)
    example = torch.rand(1, 1, size, size)
    graph = channel_graph(model, example)
    widths = {g.name: max(1, g.width // 2) for g in graph.groups}
    pruned = keep_channels(copy.deepcopy(model), graph,
                           {g.name: torch.randperm(g.width)[:widths[g.name]] for g in graph.groups})
    rebuilt = shrink_to_widths(build(name)[0], widths, example)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    assert pruned(torch.rand(2, 1, size, size)).shape == (2, 10)


@pytest.mark.parametrize("name", models())
def test_width_macs_are_the_counted_macs_of_the_model_built_at_those_widths(name):
    model, size = build(name)
    graph = channel_graph(model, torch.rand(1, 1, size, size))
    thin_macs = width_macs(model, graph, (1, size, size))
    generator = torch.Generator().manual_seed(3)
    # the full model, every group at one channel, then random counts kept as random subsets
    trials = [{}, {g.name: 1 for g in graph.groups}]
    trials += [{g.name: int(torch.randint(1, g.width + 1, (1,), generator=generator)) for g in graph.groups
                if torch.rand(1, generator=generator) < 0.7} for _ in range(3)]
    seen = set()
    for kept in trials:
        keep = {n: torch.randperm(graph.group(n).width, generator=generator)[:k] for n, k in kept.items()}
        built = count(keep_channels(copy.deepcopy(model), graph, keep), (1, size, size)).macs_dense
        assert thin_macs(kept) == built, f"{name}: {kept}"
        seen.add(built)
    assert len(seen) >= 3, f"{name}: the trials must differ in MACs for the comparison to mean anything"


def test_a_full_width_orthonormal_projection_of_a_linear_chain_is_exact():
    """Between two convolutions with nothing in between, rotating the channels (Q^T W, W' Q) is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
    x = torch.rand(2, 1, 16, 16)
    graph = channel_graph(model, x)
    assert [g.name for g in graph.groups] == ["0", "1"]
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    rotated = transform_channels(copy.deepcopy(model), graph, {"0": q})
    assert torch.allclose(rotated(x), model(x), atol=1e-5)
    # the flattened classifier reads 196 features per channel of group "1"; a permutation moves them all
    permuted = transform_channels(copy.deepcopy(model), graph, {"1": torch.tensor([2, 0, 3, 1])})
    assert torch.allclose(permuted(x), model(x), atol=1e-5)


def test_groups_of_a_residual_network_and_the_user_model_are_the_coupled_sets():
    graph = channel_graph(create_model("resnet20", in_channels=1, width=0.25))
    names = [g.name for g in graph.groups]
    # a stage's block outputs and identity shortcuts form one group per stage (3), plus each block's inside (9)
    assert len(names) == 12
    stage1 = graph.group("features.0.0")
    assert [s.module for s in stage1.producers] == ["features.0.0", "features.1.conv2.0", "features.2.conv2.0",
                                                    "features.3.conv2.0"]
    assert not graph.projectable(stage1) and graph.projectable(graph.group("features.1.conv1.0"))
    user = channel_graph(user_model())
    stem, branch = user.group("stem.0"), user.group("blocks.0.branch.0")
    tied = {(f"blocks.{b}.{layer}", role) for b in (0, 2) for layer, role in (
        ("branch.0", "in"), ("depthwise.0", "pass"), ("depthwise.1", "norm"), ("mix.0", "in"), ("mix.0", "out"),
        ("mix.1", "norm"))}
    assert {(s.module, s.role) for s in stem.sites} == {("stem.0", "out"), ("stem.1", "norm"), ("head", "in")} | tied
    width = stem.width
    mix_in = next(s for s in stem.sites if (s.module, s.role) == ("blocks.0.mix.0", "in"))
    assert mix_in.positions == tuple((width + c,) for c in range(width))   # after the branch in the concatenation
    assert [(s.module, s.role) for s in branch.sites] == [("blocks.0.branch.0", "out"), ("blocks.0.branch.1", "norm"),
                                                          ("blocks.0.mix.0", "in")]
    assert len(user.groups) == 3   # the residual stream through both blocks and the max-pool, and two branches


def test_channels_through_a_split_or_shuffle_or_to_the_output_are_fixed():
    graph = channel_graph(create_model("shufflenetv2", in_channels=1, width=0.5))
    modules = {s.module for g in graph.groups for s in g.producers}
    # a unit's last 1x1 feeds the concatenation and the shuffle: never removable
    assert not any(m.endswith("right.2.0") for m in modules)
    assert "features.1.right.0.0" in modules
    classifier_out = [g for g in graph.groups if any(s.module == "classifier" and s.role == "out" for s in g.sites)]
    assert classifier_out == []


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x)).mean(dim=(2, 3))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:   # data-dependent control flow: torch.fx cannot trace it
            return x
        return -x


def test_an_untraceable_module_fails_with_one_line_naming_it_before_anything_changes():
    model = Branchy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"cannot trace module gate \(Gate\)") as error:
        channel_graph(model)
    assert "\n" not in str(error.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_filling_grows_each_group_while_the_budget_holds():
    from leancnn.methods.channels import fill_to_budget

    # cost = 3a + 2b + c, budget 20, widths (4, 5, 6): widest first, c grows 1 -> 6 (cost 6 + 4 + 6 = 16),
    # then b 2 -> 4 (cost 20), then a cannot grow
    assert fill_to_budget([2, 2, 1], [4, 5, 6], lambda c: 3 * c[0] + 2 * c[1] + c[2] <= 20) == [2, 4, 6]
    assert fill_to_budget([2, 2, 1], [4, 5, 6], lambda c: False) == [2, 2, 1]
    assert fill_to_budget([1, 1], [8, 8], lambda c: True, step=4) == [8, 8]


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "shufflenetv2", "lenet5", "user"])
@pytest.mark.parametrize("spec", ["l1prune:macs=0.5", "cap:macs=0.5,steps=0,lr=0.01"])
def test_half_the_macs_within_three_percent_and_a_plain_model_that_reloads(name, spec):
    from leancnn.measure import count
    from leancnn.methods import parse_method

    from .test_cap import session

    torch.manual_seed(0)
    model = user_model() if name == "user" else create_model(name, in_channels=1, width=0.5)
    shape = session().dataset.input_shape
    dense = count(model, shape).macs_dense
    pruned, resolved = parse_method(spec).compress(copy.deepcopy(model), session())
    macs = count(pruned, shape).macs_dense
    assert 0.47 * dense <= macs <= 0.5 * dense, (name, macs / dense)
    # an ordinary dense model: the layer types it had, only thinner
    assert [type(m) for m in pruned.modules()] == [type(m) for m in model.modules()]
    rebuilt = (user_model() if name == "user" else create_model(name, in_channels=1, width=0.5))
    rebuilt = resolved.prepare(rebuilt)   # the recorded widths rebuild the architecture
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.rand(2, *shape)
    assert torch.equal(rebuilt.eval()(x), pruned.eval()(x))


class SumsChannels(nn.Module):
    """8 channels on an 8x8 map: a sum over channels has the shape a spatial mean would."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.spatial = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.spatial(self.conv(x))
        return self.head(y.mean(dim=(2, 3)) + y.sum(dim=1).mean(dim=2))


def test_a_reduction_over_channels_fixes_them_though_its_shape_looks_spatial():
    graph = channel_graph(SumsChannels(), torch.rand(1, 1, 8, 8))
    assert [g.name for g in graph.groups] == ["conv"]   # spatial's output is summed over channels: fixed
