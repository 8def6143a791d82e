"""Whole-model plans (leancnn.kernels.graph): eager or the frozen graph per input key, chosen by
measuring; a model TorchScript cannot trace runs eager with one warning; hooks see every layer."""
from __future__ import annotations

import warnings

import torch
from torch import nn

import leancnn
from leancnn.deploy import deploy
from leancnn.kernels import graph
from leancnn.kernels.graph import CHANNELS_LAST_ENTRY, ChannelsLastEntry, channels_last_entry, graph_plan
from leancnn.measure import count


class _ReturnsAName(nn.Module):
    """A model whose output TorchScript's tracer refuses (a string in it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return {"logits": self.conv(x).mean((2, 3)), "unit": "logit"}


def test_each_input_key_runs_what_measured_faster_and_matches_eager():
    torch.manual_seed(0)
    model = leancnn.apply_method(leancnn.create_model("resnet20", in_channels=1, width=0.25), "PS4_P4").eval()
    deployed = deploy(model)
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.rand(batch, 1, 16, 16)
            assert torch.allclose(deployed(x), model(x), atol=1e-4, rtol=1e-4)
        wide = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)   # already channels_last
        three = leancnn.create_model("resnet20", in_channels=3, width=0.25).eval()
        deployed_three = deploy(three)
        assert torch.allclose(deployed_three(wide), three(wide), atol=1e-4, rtol=1e-4)
    plans = graph_plan(deployed)
    assert [p["key"].split()[0] for p in plans] == ["batch=1", "batch=3"]
    entry = CHANNELS_LAST_ENTRY
    for plan in plans:   # a one-channel NCHW image: each also with the channels_last entry
        assert set(plan["times_ms"]) == {"eager", "torchscript", "eager" + entry, "torchscript" + entry}
        assert plan["choice"] == min(plan["times_ms"], key=plan["times_ms"].get)
    assert set(graph_plan(deployed_three)[0]["times_ms"]) == {"eager", "torchscript"}


def test_the_channels_last_entry_of_a_one_channel_image_makes_the_layers_channels_last():
    """.contiguous(memory_format=channels_last) leaves a one-channel image NCHW-strided, and oneDNN's
    first convolution then writes NCHW: every layer after it ran NCHW."""
    x = torch.rand(2, 1, 8, 8)
    assert x.contiguous(memory_format=torch.channels_last).stride() == x.stride()   # why the view exists
    entered = channels_last_entry(x)
    assert torch.equal(entered, x) and entered.stride() == (64, 1, 8, 1)
    out = torch.nn.functional.conv2d(entered, torch.randn(4, 1, 3, 3), padding=1)
    assert out.stride(1) == 1 and out.is_contiguous(memory_format=torch.channels_last)
    assert channels_last_entry(torch.rand(2, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)


def test_an_untraceable_model_runs_eager_with_one_warning():
    model = _ReturnsAName().eval()
    deployed = deploy(model)
    x = torch.rand(2, 1, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = deployed(x)
            again = deployed(x)      # planned once: no second warning
    ours = [w for w in caught if "leancnn:" in str(w.message)]
    assert len(ours) == 1 and "runs eager: TorchScript cannot trace it" in str(ours[0].message)
    assert "\n" not in str(ours[0].message)
    with torch.no_grad():
        assert torch.allclose(out["logits"], model(x)["logits"], atol=1e-6) and again["unit"] == "logit"
    assert graph_plan(deployed)[0]["choice"] == "eager"


def test_counting_a_deployed_model_sees_its_layers_after_it_ran_as_a_graph():
    torch.manual_seed(0)
    model = leancnn.create_model("resnet20", in_channels=1, width=0.25).eval()
    deployed = deploy(model, graph="torchscript")
    with torch.no_grad():
        deployed(torch.rand(1, 1, 16, 16))                   # the graph is made for this key
    profile = count(deployed, (1, 16, 16))                    # hooks: the same key must run eager
    assert len(profile.layers) > 20 and profile.macs_dense == count(model, (1, 16, 16)).macs_dense


def test_the_channels_last_entry_exports_with_a_dynamic_batch():
    """What `leancnn export --format pt2` captures when the plan chose the entry (the AOTInductor
    compile itself: tests/test_export.py)."""
    torch.manual_seed(3)
    model = leancnn.apply_method(leancnn.create_model("resnet20", in_channels=1, width=0.25), "PS4_P4").eval()
    deployed = deploy(model, graph="eager")
    with torch.no_grad():
        deployed(channels_last_entry(torch.rand(2, 1, 16, 16)))   # the layers' choices for this input
        program = torch.export.export(ChannelsLastEntry(deployed), (torch.rand(2, 1, 16, 16),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
        assert any(str(node.target).startswith("leancnn.sparse_conv") for node in program.graph.nodes)
        x = torch.rand(3, 1, 16, 16)
        assert torch.allclose(program.module()(x), model(x), atol=1e-4, rtol=1e-4)


class _MixesTheBatch(nn.Module):
    """Each image's output depends on the others (the batch mean): running it in chunks would differ."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return y - y.mean(0, keepdim=True)


def test_a_large_batch_may_run_in_chunks_where_they_give_the_same_output(monkeypatch):
    monkeypatch.setattr(graph, "CHUNK_MIN_MS", 0.0)   # a toy model: chunks are tried however fast it runs
    torch.manual_seed(5)
    model = leancnn.apply_method(leancnn.create_model("resnet20", in_channels=1, width=0.25), "PS1_P9").eval()
    deployed = deploy(model)
    x = torch.rand(32, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-4, rtol=1e-4)
    plan = next(p for p in graph_plan(deployed) if p["key"].startswith("batch=32 "))
    assert "chunks of 8" in plan["times_ms"] and "chunks of 16" not in plan["times_ms"]   # 32 < 4 x 16
    assert plan["choice"] == min(plan["times_ms"], key=plan["times_ms"].get)
    assert any(p["key"].startswith("batch=8 ") for p in graph_plan(deployed))   # the chunk's own plan
    mixing = _MixesTheBatch().eval()
    deployed_mixing = deploy(mixing)
    with torch.no_grad():
        assert torch.allclose(deployed_mixing(x), mixing(x), atol=1e-5)
    assert not any("chunks" in label for p in graph_plan(deployed_mixing) for label in p["times_ms"])


def test_a_fast_batch_is_not_chunked():
    torch.manual_seed(6)
    model = leancnn.create_model("resnet20", in_channels=1, width=0.25).eval()
    deployed = deploy(model)
    with torch.no_grad():
        deployed(torch.rand(32, 1, 8, 8))   # well under CHUNK_MIN_MS
    assert not any("chunks" in label for p in graph_plan(deployed) for label in p["times_ms"])
