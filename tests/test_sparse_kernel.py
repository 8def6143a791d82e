"""The sparse kernel on irregular masks against the masked dense convolution (every
instruction set this CPU has, forced), deploy plans and their cache, and a deployed
DNR model against the trained one."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import leancnn
from leancnn.deploy import deploy, deploy_plan
from leancnn.kernels.fusion import fusions
from leancnn.kernels import plans
from leancnn.kernels import sparse as sparse_module
from leancnn.kernels.sparse import SparseConvInference

from .test_kernel import EXTENSION, kernel_isa, needs_kernel, relative_error  # noqa: F401  (fixture)

# (C_in, C_out, H, W, stride, batch, kernel size): odd sizes, 1x1 and 2x2 maps, channel counts
# off 16, both plane layouts (W a multiple of 16 x stride, or not), 1x1 convolutions at stride 1 and 2.
SHAPES = [(16, 16, 5, 5, 1, 1, 3), (7, 13, 9, 6, 1, 3, 3), (20, 40, 1, 1, 1, 2, 3), (24, 70, 2, 2, 1, 2, 3),
          (33, 65, 7, 7, 2, 2, 3), (48, 40, 6, 5, 2, 4, 3), (32, 48, 19, 16, 1, 1, 3), (20, 36, 7, 64, 2, 5, 3),
          (16, 16, 2, 3, 1, 40, 3), (64, 64, 8, 8, 1, 1, 3), (24, 40, 8, 16, 1, 5, 1), (33, 17, 9, 7, 2, 3, 1),
          (16, 32, 16, 32, 2, 2, 1), (40, 24, 2, 2, 1, 1, 1),
          # stride 1 on maps whose rows end in a partly padded pixel vector (row planes): 28, 14, 13, 30
          (8, 16, 28, 28, 1, 3, 3), (16, 8, 14, 14, 1, 1, 3), (12, 20, 5, 13, 1, 2, 3), (24, 16, 3, 30, 1, 9, 1),
          # wider layers: row planes past 256 KB an image, and tap planes at stride 2
          (64, 24, 40, 32, 1, 4, 3), (40, 16, 30, 48, 2, 4, 3)]
DENSITIES = [0.0, 0.02, 0.1, 0.5, 1.0]


def masked_weight(c_out, c_in, k, density, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, k, k, generator=generator)
    mask = torch.rand(c_out, c_in, k, k, generator=generator) < density
    return weight * mask, mask


def reference(weight, bias, x, stride, relu, residual=None):
    out = F.conv2d(x, weight, bias, stride, weight.shape[-1] // 2)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def test_sparse_kernel_matches_masked_dense_convolution(kernel_isa):
    for index, (c_in, c_out, h, w, stride, batch, k) in enumerate(SHAPES):
        for density in DENSITIES:
            weight, mask = masked_weight(c_out, c_in, k, density, seed=index)
            bias = torch.randn(c_out) if index % 2 else None
            x = torch.randn(batch, c_in, h, w).contiguous(memory_format=torch.channels_last)  # fresh inputs
            out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
            residual = torch.randn(batch, c_out, out_h, out_w) if index % 3 == 0 else None
            for relu in (False, True):
                layer = SparseConvInference(weight, bias, stride, mask=mask, relu=relu)
                with torch.no_grad():
                    want = reference(weight, bias, x, stride, relu, residual)
                    for blocks, serial in sparse_module.PASS_CHOICES.values():
                        got = layer.kernel(x, residual, blocks, serial)
                        assert got.shape == want.shape
                        error = relative_error(got, want)
                        assert error < 1e-5, (f"{kernel_isa} {(c_in, c_out, h, w, stride, batch, k)} density={density} "
                                              f"relu={relu} pass={blocks} serial={serial}: {error:.2e}")


@needs_kernel
def test_the_kernel_on_the_dense_packing_matches_and_stays_out_of_the_state_dict():
    """DENSE_PACKED: the layer's zeros packed too (one group of every filter), for small layers whose
    sparse groups are too narrow; the same convolution, on fresh inputs, 3x3 and 1x1, both strides."""
    for index, (c_in, c_out, h, w, stride, k) in enumerate([(8, 8, 28, 28, 1, 3), (16, 24, 7, 9, 2, 3),
                                                           (24, 40, 8, 16, 1, 1), (33, 17, 9, 7, 2, 1)]):
        weight, mask = masked_weight(c_out, c_in, k, 0.44, seed=40 + index)
        bias = torch.randn(c_out)
        layer = SparseConvInference(weight, bias, stride, mask=mask, relu=True)
        assert sparse_module.DENSE_PACKED in layer.choices()
        keys = set(layer.state_dict())
        x = torch.randn(3, c_in, h, w).contiguous(memory_format=torch.channels_last)
        residual = torch.randn(3, c_out, (h - 1) // stride + 1, (w - 1) // stride + 1)
        with torch.no_grad():
            got = layer.run(sparse_module.DENSE_PACKED, x, residual)
        assert relative_error(got, reference(weight, bias, x, stride, True, residual)) < 1e-5
        assert int(layer.dense_packed_chunk_slot[-1]) == c_out and layer.dense_packed_weights.numel() == weight.numel()
        assert set(layer.state_dict()) == keys   # not saved, not exported as weights
        layer.drop_dense_packing()
        assert not any(name.startswith("dense_packed") for name, _ in layer.named_buffers())
    full = SparseConvInference(torch.randn(4, 4, 3, 3), None, 1)
    assert sparse_module.DENSE_PACKED not in full.choices()   # already dense: the plain kernel is the same


@needs_kernel
def test_an_all_zero_layer_gives_bias_then_relu():
    weight = torch.zeros(12, 8, 3, 3)
    bias = torch.linspace(-1, 1, 12)
    layer = SparseConvInference(weight, bias, 1, relu=True)
    assert layer.packed_channels.numel() == 0  # nothing packed
    out = layer.kernel(torch.randn(2, 8, 5, 5))
    assert torch.equal(out, F.relu(bias).view(1, 12, 1, 1).expand(2, 12, 5, 5))


def test_pack_of_an_irregular_mask_lists_each_filters_nonzeros_once():
    weight, mask = masked_weight(10, 20, 3, 0.1, seed=3)
    packed = sparse_module.pack(weight, mask, None)
    # every filter has a support row of its own here: one group and one chunk of one per filter
    assert packed["chunk_slot"].tolist() == list(range(11))
    assert packed["weights"].numel() == int(mask.sum()) == packed["channels"].numel()
    assert sorted(packed["position"].tolist()) == list(range(10))
    assert (packed["weights"] != 0).all()


@needs_kernel
def test_sparse_layer_counts_values_and_16_bit_indices():
    weight, mask = masked_weight(32, 16, 3, 0.1, seed=0)
    layer = SparseConvInference(weight, torch.zeros(32), 1, mask=mask)
    x = torch.randn(1, 16, 6, 6)
    cost = layer.leancnn_cost((x,), torch.empty(1, 32, 6, 6))
    kept = int(mask.sum())
    tables = 33 + 32 + 32 + 1  # chunk slots, chunk groups, one segment per group and block, + 1
    assert cost.storage_bytes == kept * 4 + 32 * 4 + kept * 2 + tables * 4
    assert cost.macs_effective == kept * 36 and cost.macs_dense == 32 * 16 * 9 * 36
    assert cost.storage_format == "sparse_packed"


@needs_kernel
def test_plan_picks_the_fastest_measured_candidate_and_the_cache_replays_it(monkeypatch, tmp_path):
    path = tmp_path / "plans.json"
    monkeypatch.setenv("LEANCNN_PLAN_CACHE", str(path))
    plans.forget_loaded()
    weight, mask = masked_weight(16, 16, 3, 0.05, seed=1)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    # Fake clocks: whichever candidate is named here "measures" fastest.
    fastest = {"name": "kernel-pass1"}

    def fake_times(candidates, **_):
        return {name: (0.5 if name == fastest["name"] else 2.0) for name in candidates}

    monkeypatch.setattr(plans, "time_candidates", fake_times)
    layer = SparseConvInference(weight, None, 1, mask=mask)
    calls = []
    monkeypatch.setattr(SparseConvInference, "kernel", lambda self, x, residual=None, pass_blocks=0, serial=False:
                        calls.append(pass_blocks) or F.conv2d(x, self.weight, None, 1, 1))
    with torch.no_grad():
        layer(x)
    assert calls[-1] == 1 and layer.plans[layer.plan_key(x, None)]["choice"] == "kernel-pass1"
    stored = json.loads(path.read_text())
    assert stored["machine"] == plans.machine_id() and len(stored["plans"]) == 1
    # A new process (memory forgotten) with clocks that would now pick dense reads the cache instead.
    fastest["name"] = "dense"
    plans.forget_loaded()
    again = SparseConvInference(weight, None, 1, mask=mask)
    with torch.no_grad():
        again(x)
    entry = again.plans[again.plan_key(x, None)]
    assert entry["choice"] == "kernel-pass1" and entry["cached"]
    # Another batch size is another key: measured afresh (and dense wins it).
    with torch.no_grad():
        again(torch.randn(3, 16, 8, 8).contiguous(memory_format=torch.channels_last))
    assert [p["choice"] for p in again.plan_summary()] == ["kernel-pass1", "dense"]
    plans.forget_loaded()


@needs_kernel
def test_each_machine_keeps_its_own_plan_file_in_a_shared_cache_directory(monkeypatch, tmp_path):
    # A home directory shared by two machines (or a forced instruction set): switching between
    # them must not throw the other's plans away.
    monkeypatch.delenv("LEANCNN_PLAN_CACHE", raising=False)
    monkeypatch.setattr(plans, "cache_root", lambda: tmp_path)
    timed = []
    monkeypatch.setattr(plans, "time_candidates",
                        lambda candidates, **_: timed.append(1) or {n: 1.0 + i for i, n in enumerate(candidates)})
    weight, mask = masked_weight(8, 8, 3, 0.2, seed=3)
    x = torch.randn(2, 8, 4, 4)

    def run_on(machine):
        monkeypatch.setattr(plans, "machine_id", lambda: machine)
        plans.forget_loaded()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "measured on another machine" warning either
            with torch.no_grad():
                SparseConvInference(weight, None, 1, mask=mask)(x)

    run_on("CPU A")
    run_on("CPU B")
    assert len(timed) == 2 and len(list(tmp_path.glob("plans-*.json"))) == 2
    run_on("CPU A")  # back on the first machine: its plan is read, not timed again
    assert len(timed) == 2
    files = {json.loads(f.read_text())["machine"] for f in tmp_path.glob("plans-*.json")}
    assert files == {"CPU A", "CPU B"}
    plans.forget_loaded()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "leancnn-plans-1", "machine": "another CPU",
                                                                "plans": {}}),
                                     json.dumps({"format": "leancnn-plans-1", "machine": "MACHINE",
                                                 "plans": {"k": {"choice": "dense"}}})])
@needs_kernel
def test_a_corrupt_or_foreign_plan_cache_is_ignored_with_one_warning_and_remeasured(monkeypatch, tmp_path, content):
    path = tmp_path / "plans.json"
    path.write_text(content.replace("MACHINE", plans.machine_id()))
    monkeypatch.setenv("LEANCNN_PLAN_CACHE", str(path))
    plans.forget_loaded()
    measured = []
    monkeypatch.setattr(plans, "time_candidates",
                        lambda candidates, **_: measured.append(1) or {n: 1.0 + i for i, n in enumerate(candidates)})
    weight, mask = masked_weight(8, 8, 3, 0.2, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (1, 2):
            with torch.no_grad():
                SparseConvInference(weight, None, 1, mask=mask)(torch.randn(batch, 8, 4, 4))
    messages = [str(w.message) for w in caught if "plan cache" in str(w.message)]
    assert len(messages) == 1 and "measured again" in messages[0]
    assert len(measured) == 2  # both keys timed: nothing was taken from the bad file
    rewritten = json.loads(path.read_text())
    assert rewritten["machine"] == plans.machine_id() and len(rewritten["plans"]) == 2
    plans.forget_loaded()


def test_without_a_compiler_a_sparse_layer_runs_dense(monkeypatch):
    monkeypatch.setattr(sparse_module, "psconv_extension", lambda: None)
    weight, mask = masked_weight(12, 8, 3, 0.1, seed=4)
    layer = SparseConvInference(weight, None, 2, mask=mask, relu=True)
    assert layer.isa == "unavailable" and layer.choices() == ["dense", "dense-other-format"]
    x = torch.randn(3, 8, 7, 5)
    with torch.no_grad():
        assert torch.allclose(layer(x), reference(weight, None, x, 2, True), rtol=1e-5, atol=1e-5)
    assert layer.plans == {}  # nothing to choose from: no plan made


def pruned_resnet(density: float) -> nn.Module:
    torch.manual_seed(0)
    model = leancnn.create_model("resnet20", in_channels=1, width=0.5)
    model = leancnn.apply_method(model, f"dnr:density={density},attack=none").eval()
    return model


@needs_kernel
def test_deploy_swaps_pruned_convolutions_and_records_their_plans():
    model = pruned_resnet(0.1)
    x = torch.rand(2, 1, 28, 28)
    deployed = deploy(model, example_inputs=[x])
    swapped = {name: m for name, m in deployed.named_modules() if isinstance(m, SparseConvInference)}
    # every 3x3 conv (the dense stem too: the kernel is a candidate at any density) and the two 1x1 shortcuts
    assert len(swapped) == 21 and swapped["features.0.0"].density == 1.0
    assert len(fusions(deployed)) == 9   # every residual block's add and ReLU in its conv2
    plan = deploy_plan(deployed)
    assert {row["layer"] for row in plan} == set(swapped)
    assert all(row["choice"] in row["times_ms"] and row["times_ms"][row["choice"]] == min(row["times_ms"].values())
               for row in plan)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), rtol=1e-4, atol=1e-4)
    # a dense model's layers are planned too, each between oneDNN and the kernel at density 1
    dense_model = leancnn.create_model("resnet20", in_channels=1, width=0.5).eval()
    dense = deploy(dense_model, example_inputs=[x])
    rows = deploy_plan(dense)
    assert len(rows) == 21 and all(row["density"] == 1.0 and {"dense", "kernel"} <= set(row["times_ms"])
                                   for row in rows)
    with torch.no_grad():
        assert torch.allclose(dense(x), dense_model(x), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_deployed_dnr_model_predicts_like_the_trained_one(tmp_path, fashion_mnist):
    """A DNR resnet20 (density 0.05) trained briefly on Fashion-MNIST: every pruned layer forced
    onto the kernel, the deployed model gives the same predictions on all 10,000 test images."""
    from leancnn.config import TrainConfig
    from leancnn.experiment import train_run
    from leancnn.runs import load_run

    # test_subset: the run's own evaluations (2 of them) need not see all 10,000; the check below does.
    config = TrainConfig(data="fashion-mnist", model="resnet20", width=0.5, epochs=1, train_subset=3000,
                         test_subset=500, methods=["dnr:density=0.05,attack=none"], latency=False,
                         out=str(tmp_path / "run")).validate()
    train_run(config, progress=False)
    model, _ = load_run(tmp_path / "run")
    deployed = deploy(model, graph="eager")   # the layers here; the frozen graph: the method contract
    layers = [m for m in deployed.modules() if isinstance(m, SparseConvInference)]
    # the 20 pruned layers, and the dense stem (planned too, at density 1)
    assert len(layers) == 21 and sorted(m.density < 0.2 for m in layers) == [False] + [True] * 20
    for layer in layers:  # the kernel itself, whatever a plan would pick
        layer.forward = (lambda layer: lambda x, residual=None: layer.kernel(x, residual))(layer)
    images = fashion_mnist.test_images.float() / 255.0
    with torch.no_grad():
        trained = torch.cat([model(batch).argmax(1) for batch in images.split(1000)])
        served = torch.cat([deployed(batch).argmax(1) for batch in images.split(1000)])
    assert (trained == served).float().mean().item() >= 0.999  # float rounding may flip a near tie


@needs_kernel
def test_profile_deploy_shows_what_each_pruned_layer_runs(capsys):
    from leancnn.cli import main

    code = main(["profile", "--model", "resnet20", "--input", "1x16x16", "--width", "0.25",
                 "--method", "dnr:density=0.1,attack=none", "--deploy", "--json"])
    assert code == 0
    output = json.loads(capsys.readouterr().out)
    planned = [layer for layer in output["layers"] if "runs" in layer]
    # the 20 pruned layers and the dense stem
    assert len(planned) == 21 and {row["layer"] for row in output["deploy_plan"]} == {l["name"] for l in planned}
    for layer in planned:  # the batch-1 plan of the profile's own pass: the fastest candidate, and dense's time
        assert layer["runs"] in _any_layer().choices() and layer["runs_ms"] <= layer["dense_ms"]
    assert all("batch=1 " in row["key"] for row in output["deploy_plan"])
    assert main(["profile", "--model", "resnet20", "--input", "1x16x16", "--width", "0.25", "--deploy"]) == 0
    assert "runs (batch 1)" in capsys.readouterr().out  # a dense model's layers are planned too


def _any_layer() -> SparseConvInference:
    weight, mask = masked_weight(4, 4, 3, 0.5, seed=0)
    return SparseConvInference(weight, None, 1, mask=mask)


# Pixel vectors per tile for one-filter chunks (irregular masks) and for pSConv's 6-filter chunks:
# the accumulators each instruction set has room for (generic: one vector, the compiler's business).
TILE_VECTORS = {"generic": (1, 1), "avx2": (4, 1), "avx512": (8, 4)}


def sparse_layer(c_in, c_out, k, density, stride, seed=3):
    weight, mask = masked_weight(c_out, c_in, k, density, seed)
    return SparseConvInference(weight, None, stride, mask=mask)


def test_the_kernel_plan_says_how_a_layer_runs(kernel_isa):
    one_filter = sparse_layer(16, 16, 3, 0.1, stride=1)
    x = torch.zeros(1, 16, 32, 32)
    plan = one_filter.kernel_plan(x)
    # 32 columns are two whole pixel vectors: three row planes; one image, one thread: all at once.
    assert (plan["isa"], plan["planes"], plan["plane_count"]) == (kernel_isa, "rows", 3)
    assert plan["tile_vectors"] == TILE_VECTORS[kernel_isa][0] and plan["tile_pixels"] == 16 * plan["tile_vectors"]
    assert plan["batch_images"] == 1 and plan["threads"] == 1
    assert plan["blocks_per_pass"] == 1 and one_filter.kernel_plan(x, "kernel-pass1")["blocks_per_pass"] == 1
    # Rows of 7 are mostly padding in a 16-pixel vector: nine tap planes at output resolution.
    assert one_filter.kernel_plan(torch.zeros(1, 16, 7, 7))["planes"] == "taps"
    # Stride 2 needs rows that split into whole even and odd vectors (32 columns).
    strided = sparse_layer(16, 16, 3, 0.1, stride=2)
    assert strided.kernel_plan(torch.zeros(1, 16, 16, 16))["planes"] == "taps"
    assert strided.kernel_plan(x)["planes"] == "rows"
    # A 1x1 layer reads the centre tap only (bit 4); a 3x3 mask at density 0.1 reads them all.
    pointwise = sparse_layer(16, 16, 1, 0.5, stride=1, seed=4)
    assert pointwise.kernel_plan(x)["used_taps"] == 1 << 4 and plan["used_taps"] == 0b111111111
    # pSConv-like: every filter keeps the same taps, so chunks hold 6 filters and tiles are narrower.
    weight = torch.randn(24, 16, 3, 3)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[:, :, 1, :] = True
    shared = SparseConvInference(weight * mask, None, 1, mask=mask)
    assert shared.kernel_plan(x)["tile_vectors"] == TILE_VECTORS[kernel_isa][1]
