"""CSR-Conv and ViP layers: shapes, parameter formula, interpolation rule, save/load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from leancnn.deploy import deploy
from leancnn.errors import ConfigError
from leancnn.io import load_tensors, save_tensors
from leancnn.kernels import psconv_extension
from leancnn.kernels.virtual_pool import VirtualPoolInference
from leancnn.layers import CSRConv2d, VirtualPool, virtual_upsample
from leancnn.measure import count
from leancnn.methods import apply_methods
from leancnn.models import create_model

from .deploy_checks import assert_deploy_matches


@pytest.mark.parametrize("c_in, c_out, steps, kernel", [(16, 16, 2, 3), (16, 32, 4, 3), (10, 7, 3, 3),
                                                         (5, 13, 4, 1), (64, 96, 4, 1), (3, 3, 1, 3)])
def test_csr_shapes_and_parameter_count(c_in, c_out, steps, kernel):
    layer = CSRConv2d(c_in, c_out, kernel, bias=True, steps=steps)
    out = layer(torch.rand(2, c_in, 9, 9))
    assert out.shape == (2, c_out, 9, 9)
    params = sum(p.numel() for p in layer.parameters())
    assert params == CSRConv2d.expected_params(c_in, c_out, kernel, steps, bias=True)


def test_csr_stride_two_and_first_group_is_plain_convolution():
    torch.manual_seed(0)
    layer = CSRConv2d(8, 8, 3, stride=2, steps=2)
    x = torch.rand(1, 8, 10, 10)
    out = layer(x)
    assert out.shape == (1, 8, 5, 5)
    first = nn.functional.conv2d(x[:, :4], layer.input_conv.weight, layer.input_conv.bias, stride=2, padding=1)
    assert torch.allclose(out[:, :4], first, atol=1e-6)


def test_csr_method_parameters_follow_the_formula():
    model, _ = apply_methods(create_model("resnet20", in_channels=1), ["csr:T=4"])
    layers = [m for m in model.modules() if isinstance(m, CSRConv2d)]
    assert len(layers) == 18 + 2  # all dense convs but the first: 18 3x3 and 2 1x1 shortcuts
    for layer in layers:
        k = layer.input_conv.kernel_size[0]
        assert sum(p.numel() for p in layer.parameters()) == CSRConv2d.expected_params(
            layer.in_channels, layer.out_channels, k, 4, bias=False)
    profile = count(model, (1, 28, 28))
    dense = count(create_model("resnet20", in_channels=1), (1, 28, 28))
    assert profile.params_total < 0.2 * dense.params_total
    # U runs T times and V T-1 times: MACs fall by about T/2, not T^2/2.
    assert 0.3 * dense.macs_dense < profile.macs_dense < 0.6 * dense.macs_dense


def test_csr_save_load_identity(tmp_path):
    torch.manual_seed(0)
    model, _ = apply_methods(create_model("resnet20", in_channels=1, width=0.5), ["csr:T=2,layers=3x3"])
    model.eval()
    save_tensors(tmp_path / "m.safetensors", model.state_dict())
    torch.manual_seed(1)
    again, _ = apply_methods(create_model("resnet20", in_channels=1, width=0.5), ["csr:T=2,layers=3x3"])
    again.load_state_dict(load_tensors(tmp_path / "m.safetensors"))
    again.eval()
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(x), again(x))


def test_csr_bad_options():
    with pytest.raises(ConfigError, match="T must be >= 1"):
        apply_methods(create_model("resnet20"), ["csr:T=0"])
    with pytest.raises(ConfigError, match="T=40 is larger than the channel count of layer"):
        apply_methods(create_model("resnet20"), ["csr:T=40"])


def test_vip_interpolation_hand_computed():
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    odd = torch.tensor([[1.0, 1.5, 2.0], [2.0, 2.5, 3.0], [3.0, 3.5, 4.0]])
    even = torch.tensor([[1.0, 1.5, 2.0, 2.0], [2.0, 2.5, 3.0, 3.0], [3.0, 3.5, 4.0, 4.0], [3.0, 3.5, 4.0, 4.0]])
    assert torch.equal(virtual_upsample(y, 3, 3)[0, 0], odd)
    assert torch.equal(virtual_upsample(y, 4, 4)[0, 0], even)
    mixed = virtual_upsample(torch.arange(6.0).view(1, 1, 2, 3), 3, 5)[0, 0]
    assert torch.equal(mixed[1], torch.tensor([1.5, 2.0, 2.5, 3.0, 3.5]))  # odd row: mean of rows 0 and 2


@pytest.mark.parametrize("size", [6, 7, 8, 9])
def test_vip_equals_full_convolution_on_constant_input_away_from_border(size):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    full = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    full.load_state_dict(block.state_dict())
    vip = VirtualPool(block)
    x = torch.full((1, 3, size, size), 0.7)
    out, expected = vip(x), full(x)
    assert out.shape == expected.shape
    # Position 1 mixes in the zero-padded border value, so "away from the border" starts at 2.
    inner = slice(2, size - 2)
    assert torch.allclose(out[..., inner, inner], expected[..., inner, inner], atol=1e-6)
    assert not torch.allclose(out[..., 0, 0], expected[..., 1, 1])  # the border differs: the test can fail


def test_vip_counts_quarter_macs_and_rejects_1x1_maps():
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU())
    profile = count(nn.Sequential(VirtualPool(block)), (8, 16, 16))
    assert profile.macs_dense == 8 * 8 * 9 * 8 * 8  # 8x8 computed pixels instead of 16x16
    with pytest.raises(ValueError, match="cannot apply to a 1x1 feature map"):
        VirtualPool(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1)))(torch.rand(1, 2, 1, 1))




def test_compress_vip_named_layers_round_trip(synthetic_vgg, tmp_path, capsys):
    from leancnn.cli import main
    from leancnn.runs import load_run

    out = tmp_path / "vip"
    code = main(["compress", str(synthetic_vgg.run_dir), "--method", "vip:layers=features.0+features.2",
                 "--epochs", "1", "--out", str(out), "--no-latency", "--no-progress", "--json"])
    assert code == 0
    import json

    result = json.loads(capsys.readouterr().out)   # the printed result.json
    assert result["macs_dense"] < synthetic_vgg.result.macs_dense
    assert result["compress"]["test_acc_original"] == pytest.approx(synthetic_vgg.result.test_acc)
    model, architecture = load_run(out)
    assert architecture["methods"][-1].startswith("vip:layers=features.0+features.2")
    assert sum(isinstance(m, VirtualPool) for m in model.modules()) == 2
    again, _ = load_run(out)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(model(x), again(x))


def test_compress_vip_sensitivity_reports_and_writes_nothing(synthetic_vgg, tmp_path, capsys):
    from leancnn.cli import main

    out = tmp_path / "nothing"
    assert main(["compress", str(synthetic_vgg.run_dir), "--method", "vip:sensitivity", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ViP sensitivity" in printed and "features.0" in printed
    assert not out.exists()


def test_compress_vip_auto_respects_max_drop(synthetic_vgg, tmp_path):
    from leancnn.compress import compress_run

    result = compress_run(synthetic_vgg.run_dir, ["vip:layers=auto,max_drop=0.05,per_round=1,rounds=2"], epochs=0,
                          out=tmp_path / "auto", progress=False, latency=False).result
    notes = result.extra["compress"]
    chosen, rounds, base = notes["vip_layers"], notes["vip_rounds"], notes["vip_base_accuracy"]
    ranked = list(notes["vip_sensitivity"])
    # Each round adds the next least sensitive block; a round is kept exactly when its drop is
    # within max_drop, and the first one that is not ends the search.
    assert [r["added"] for r in rounds] == [[name] for name in ranked[:len(rounds)]]
    assert [r["kept"] for r in rounds] == [base - r["accuracy"] <= 0.05 for r in rounds]
    assert all(r["kept"] for r in rounds[:-1]) and (len(rounds) == 2 or not rounds[-1]["kept"])
    assert chosen == [name for r in rounds if r["kept"] for name in r["added"]] == ranked[:len(chosen)]
    assert result.methods[-1].startswith("vip:layers=" + "+".join(chosen))


def test_vip_misfits(synthetic_vgg):
    from leancnn.compress import compress_run

    with pytest.raises(ConfigError, match="no block matches layers='nothing'"):
        compress_run(synthetic_vgg.run_dir, ["vip:layers=nothing"], epochs=0, out=None, progress=False)
    # vgg11 on 16x16 inputs: the last blocks see 1x1 maps.
    with pytest.raises(ConfigError, match="feature map is smaller than 2x2"):
        compress_run(synthetic_vgg.run_dir, ["vip:layers=features.10"], epochs=0, out=None, progress=False)
    with pytest.raises(ConfigError, match="need a trained model"):
        apply_methods(create_model("vgg11"), ["vip:layers=auto"])


def test_l1prune_halves_macs_and_reloads(synthetic_vgg, tmp_path):
    from leancnn.compress import compress_run
    from leancnn.runs import load_run

    result = compress_run(synthetic_vgg.run_dir, ["l1prune:macs=0.5"], epochs=1, out=tmp_path / "l1",
                          progress=False, latency=False).result
    ratio = result.macs_dense / synthetic_vgg.result.macs_dense
    assert 0.35 < ratio <= 0.5
    model, _ = load_run(tmp_path / "l1")
    assert model.features[0][0].out_channels < 16
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize("spec, message", [("l1prune:macs=0", "macs must be in \\(0, 1\\]"),
                                           ("l1prune:macs=1.5", "macs must be in \\(0, 1\\]"),
                                           ("l1prune", "needs a trained model")])
def test_l1prune_bad_options(spec, message):
    with pytest.raises(ConfigError, match=message):
        apply_methods(create_model("vgg11"), [spec])


def test_fast_upsample_matches_the_written_out_rule():
    """The bilinear/replicate fast path against the rule applied axis by axis, on fresh random values."""
    from leancnn.layers.vip import upsample_axis

    torch.manual_seed(0)
    for height, width in [(1, 1), (1, 2), (2, 1), (2, 2), (3, 3), (4, 7), (7, 4), (28, 28), (14, 15), (5, 2)]:
        values = torch.randn(2, 3, (height + 1) // 2, (width + 1) // 2)
        reference = upsample_axis(upsample_axis(values, height, 2), width, 3)
        fast = virtual_upsample(values, height, width)
        assert fast.shape == reference.shape == (2, 3, height, width)
        assert torch.allclose(fast, reference, atol=1e-6), (height, width)
        cl = virtual_upsample(values.contiguous(memory_format=torch.channels_last), height, width)
        assert torch.allclose(cl, reference, atol=1e-6)


def test_csr_recurrence_by_hand_at_three_steps():
    """1x1, three channels, T = 3: scalar U (2, bias 0.5), V (-1, bias 0.25), a = 0.5, b = 0.25.
    h1 = U x1; h_t = l + a relu(c + l) - b l with c = U x_t, l = V h_{t-1}."""
    layer = CSRConv2d(3, 3, 1, bias=True, steps=3)
    with torch.no_grad():
        layer.input_conv.weight.fill_(2.0), layer.input_conv.bias.fill_(0.5)
        layer.hidden_conv.weight.fill_(-1.0), layer.hidden_conv.bias.fill_(0.25)
        layer.mix_a.fill_(0.5), layer.mix_b.fill_(0.25)
        out = layer(torch.tensor([1.0, -3.0, 2.0]).view(1, 3, 1, 1)).flatten().tolist()
    # h1 = 2.5; t=2: c = -5.5, l = -2.25, relu(-7.75) = 0, h2 = -2.25 + 0.5625 = -1.6875;
    # t=3: c = 4.5, l = 1.9375, relu(6.4375) = 6.4375, h3 = 1.9375 + 3.21875 - 0.484375 = 4.671875.
    assert out == [2.5, -1.6875, 4.671875]
    # With bias both U and V have one: 16 -> 16, 3x3, T = 2: U and V 8x8x9 each, 2 scalars, 2 x 8 biases.
    assert sum(p.numel() for p in CSRConv2d(16, 16, 3, bias=True, steps=2).parameters()) == 576 + 576 + 2 + 16
    assert sum(p.numel() for p in CSRConv2d(16, 16, 3, bias=False, steps=2).parameters()) == 576 + 576 + 2


@pytest.mark.skipif(psconv_extension() is None, reason="no C++ compiler: the kernels could not be built")
def test_fused_upsample_operator_matches_the_written_out_rule():
    """leancnn::virtual_upsample (one compiled pass) against the rule axis by axis, on fresh random
    values in both memory formats, with more computed values than the map needs (they are ignored),
    and keeping the values' memory format."""
    from leancnn.layers.vip import upsample_axis

    torch.manual_seed(1)
    for height, width, channels in [(1, 1, 3), (2, 2, 1), (3, 3, 5), (4, 7, 16), (7, 4, 2), (28, 28, 24),
                                    (14, 15, 3), (32, 32, 64), (5, 2, 8)]:
        values = torch.randn(3, channels, (height + 1) // 2 + 1, (width + 1) // 2 + 2)
        reference = upsample_axis(upsample_axis(values, height, 2), width, 3)
        for fmt in (torch.contiguous_format, torch.channels_last):
            got = torch.ops.leancnn.virtual_upsample(values.contiguous(memory_format=fmt), height, width)
            assert got.shape == (3, channels, height, width)
            assert torch.allclose(got, reference, atol=1e-6), (height, width, channels, fmt)
            assert got.is_contiguous(memory_format=fmt)
    assert torch.ops.leancnn.virtual_upsample(torch.rand(0, 4, 2, 2), 4, 4).shape == (0, 4, 4, 4)
    with pytest.raises(RuntimeError, match="cannot fill 6x6"):
        torch.ops.leancnn.virtual_upsample(torch.rand(1, 2, 2, 3), 6, 6)


def test_deployed_vip_block_runs_the_planned_upsample_and_matches():
    """deploy swaps each ViP block for VirtualPoolInference, which plans fused against interpolate;
    the deployed model equals the model (every upsample forced: tests/deploy_checks.py)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
                          nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
    model[1] = VirtualPool(model[1])
    assert_deploy_matches(model, (3, 14, 15), graph_on_kernel=False, eager_choices=("dense", "kernel"))
    deployed = deploy(model)
    assert not any(isinstance(m, VirtualPool) for m in deployed.modules())
    with torch.no_grad():
        deployed(torch.rand(2, 3, 14, 15))
    pools = [m for m in deployed.modules() if isinstance(m, VirtualPoolInference)]
    summary = pools[0].plan_summary()   # as given (NCHW) and with the graph's channels_last entry
    assert len(pools) == 1 and {p["key"].split()[-1] for p in summary} == {"contiguous", "channels_last"}
    assert all(p["choice"] == min(p["times_ms"], key=p["times_ms"].get) for p in summary)
