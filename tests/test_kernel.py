"""The compiled pSConv kernel against the masked dense convolution, every
instruction set this CPU has, the fallback paths, and a deployed model."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import leancnn
from leancnn import kernels
from leancnn.deploy import deploy, fold_batchnorm
from leancnn.kernels import psconv as kernel_module
from leancnn.kernels import sparse as sparse_module
from leancnn.kernels.psconv import PSConvInference
from leancnn.layers.psconv import PSConv2d

EXTENSION = kernels.psconv_extension()
needs_kernel = pytest.mark.skipif(EXTENSION is None, reason="no C++ compiler: the kernel could not be built")

SUPPORTS = {
    "PS4_P4": dict(k=4, period=4),
    "PS2_P6": dict(k=2, period=6),
    "PS1_P9": dict(k=1, period=9),
    "PSD4_P8": dict(k=4, period=8, dense_every=True),
    "PSD1_P16": dict(k=1, period=16, dense_every=True),
    "PS3_P4": dict(k=3, period=4),
    "PS4_P4_random": dict(k=4, period=4, assign="random"),
}
# (C_in, C_out, H, W, stride, batch): odd sizes, 1x1 and 2x2 maps, channel counts off 16 and 64.
SHAPES = [(16, 16, 5, 5, 1, 1), (7, 13, 9, 6, 1, 3), (20, 40, 1, 1, 1, 2), (24, 70, 2, 2, 1, 2),
          (33, 65, 7, 7, 2, 2), (64, 64, 8, 8, 1, 1), (48, 128, 6, 5, 2, 4), (3, 5, 3, 3, 1, 5),
          (16, 24, 16, 17, 1, 2), (64, 64, 5, 20, 1, 3), (16, 16, 16, 16, 2, 1),
          # stride 1 on maps a multiple of 16 wide (stride 2: of 32): planes over padded rows, one
          # image or many, one or two pixel vectors per output row
          (32, 48, 19, 16, 1, 1), (24, 40, 8, 16, 1, 5), (20, 36, 3, 32, 1, 4),
          (16, 24, 6, 32, 2, 2), (20, 36, 7, 64, 2, 5),
          # wider layers over row planes past 256 KB an image: tiles of two rows, of three vectors per
          # row (tiles straddle rows), and at stride 2
          (64, 24, 40, 32, 1, 4), (40, 16, 30, 48, 1, 4), (64, 16, 20, 64, 2, 4),
          # many small images: each thread rearranges its own batch of images (the last one short)
          (16, 16, 2, 3, 1, 40), (40, 24, 9, 9, 2, 12),
          # stride 1, rows ending in a partly padded pixel vector (row planes): one image and many
          (8, 16, 28, 28, 1, 3), (16, 8, 14, 14, 1, 1), (12, 20, 5, 13, 1, 6)]


def isas() -> list[str]:
    if EXTENSION is None:
        return []
    native = EXTENSION.isa()
    return {"avx512": ["generic", "avx2", "avx512"], "avx2": ["generic", "avx2"]}.get(native, ["generic"])


@pytest.fixture(params=["generic", "avx2", "avx512"])
def kernel_isa(request, monkeypatch) -> str:
    """Each instruction set this CPU has, forced for the test (the others are skipped)."""
    if EXTENSION is None:
        pytest.skip("no C++ compiler: the kernel could not be built")
    if request.param not in isas():
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("LEANCNN_PSCONV_ISA", request.param)
    return request.param


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def reference(conv: PSConv2d, x: torch.Tensor, relu: bool) -> torch.Tensor:
    out = F.conv2d(x, conv.weight * conv.mask, conv.bias, conv.stride, 1)
    return F.relu(out) if relu else out


def random_layer(c_in, c_out, stride, support, bias=True, seed=0) -> PSConv2d:
    torch.manual_seed(seed)
    conv = PSConv2d(c_in, c_out, 3, stride, 1, bias=bias, **SUPPORTS[support])
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    return conv


def test_kernel_adds_a_residual_before_the_relu(kernel_isa):
    isa = kernel_isa
    for index, (c_in, c_out, h, w, stride, batch) in enumerate(SHAPES):
        conv = random_layer(c_in, c_out, stride, "PS4_P4" if index % 2 else "PSD1_P16", seed=index)
        x = torch.randn(batch, c_in, h, w)
        out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
        residual = torch.randn(batch, c_out, out_h, out_w)   # contiguous: the kernel converts it
        for relu in (False, True):
            with torch.no_grad():
                want = F.conv2d(x, conv.weight * conv.mask, conv.bias, stride, 1) + residual
                want = F.relu(want) if relu else want
                got = PSConvInference(conv, relu=relu).kernel(x, residual=residual)
            error = relative_error(got, want)
            assert error < 1e-5, f"{isa} {(c_in, c_out, h, w, stride, batch)} relu={relu}: {error:.2e}"
    with pytest.raises(RuntimeError, match="residual"):
        PSConvInference(random_layer(16, 16, 1, "PS4_P4")).kernel(torch.randn(1, 16, 4, 4), residual=torch.randn(1, 8, 4, 4))


def test_deploy_fuses_residual_blocks_whose_second_conv_runs_on_the_kernel():
    from leancnn.kernels.fusion import fusions

    torch.manual_seed(0)
    model = leancnn.apply_method(leancnn.create_model("resnet20", in_channels=1, width=0.25), "PS4_P4").eval()
    deployed = deploy(model)
    every_block = {f"features.{i}": ["conv2.0: add+relu"] for i in range(1, 10)}   # resnet20's nine blocks
    assert fusions(deployed) == every_block
    assert all(deployed.get_submodule(f"{name}.conv2.0").relu for name in every_block)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), rtol=1e-4, atol=1e-4)
    dense_model = leancnn.create_model("resnet20", in_channels=1, width=0.25).eval()
    dense = deploy(dense_model)   # a dense model's blocks fuse too: their convolutions are kernel layers
    assert fusions(dense) == every_block
    with torch.no_grad():
        assert torch.allclose(dense(x), dense_model(x), rtol=1e-4, atol=1e-4)


def test_kernel_matches_masked_dense_convolution(kernel_isa):
    isa = kernel_isa
    for index, (c_in, c_out, h, w, stride, batch) in enumerate(SHAPES):
        for support in SUPPORTS:
            if support == "PS1_P9" and c_in * c_out < 9:
                continue
            conv = random_layer(c_in, c_out, stride, support, bias=index % 2 == 0, seed=index)
            x = torch.randn(batch, c_in, h, w)  # fresh inputs per case
            for relu in (False, True):
                layer = PSConvInference(conv, relu=relu)
                with torch.no_grad():
                    want = reference(conv, x, relu)
                    got = layer.kernel(x.contiguous(memory_format=torch.channels_last), pass_blocks=index % 3)
                assert got.shape == want.shape
                assert got.is_contiguous(memory_format=torch.channels_last)
                error = relative_error(got, want)
                assert error < 1e-5, f"{isa} {support} {(c_in, c_out, h, w, stride, batch)} relu={relu}: {error:.2e}"


def test_chunk_sizes_are_balanced_and_at_most_six():
    assert kernel_module.chunk_sizes(16) == [6, 5, 5]
    assert kernel_module.chunk_sizes(4) == [4]
    assert kernel_module.chunk_sizes(7) == [4, 3]
    for filters in range(1, 80):
        sizes = kernel_module.chunk_sizes(filters)
        assert sum(sizes) == filters and max(sizes) <= kernel_module.MAX_CHUNK and max(sizes) - min(sizes) <= 1


@needs_kernel
def test_one_thread_and_two_give_the_same_result():
    """Few images: planes for all, tiles split between threads; many: a batch of images per thread."""
    conv = random_layer(24, 40, 1, "PS4_P4")
    for batch in (1, 9):
        x = torch.randn(batch, 24, 8, 16)
        results = []
        for threads in (1, 2):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.no_grad():
                    results.append(PSConvInference(conv, relu=True).kernel(x))
            finally:
                torch.set_num_threads(previous)
        assert torch.allclose(results[0], results[1], rtol=1e-6, atol=1e-6)
        assert relative_error(results[0], reference(conv, x, True)) < 1e-5


@needs_kernel
def test_kernel_rejects_a_pack_made_for_other_input_channels():
    layer = PSConvInference(random_layer(48, 16, 1, "PS4_P4"))
    with pytest.raises(RuntimeError, match="segments must cover the input channels"):
        EXTENSION.forward(torch.randn(1, 16, 4, 4), layer.packed_weights, layer.packed_channels, layer.packed_taps,
                          layer.packed_chunk_slot, layer.packed_chunk_group, layer.packed_segment_pair,
                          layer.packed_bias, layer.packed_position, 1, False, None, 0, False)


def test_fallback_when_the_kernel_is_missing(monkeypatch):
    conv = random_layer(12, 20, 2, "PSD4_P8")
    monkeypatch.setattr(sparse_module, "psconv_extension", lambda: None)
    layer = PSConvInference(conv, relu=True)
    assert layer.isa == "unavailable"
    x = torch.randn(3, 12, 7, 5)
    with torch.no_grad():
        assert torch.allclose(layer(x), reference(conv, x, True), rtol=1e-5, atol=1e-5)


def test_no_compiler_warns_once_and_returns_none(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def failing_load(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp, "load", failing_load)
    monkeypatch.setitem(kernels._state, "psconv", "sentinel")
    kernels._state.pop("psconv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.psconv_extension() is None
        assert kernels.psconv_extension() is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "masked dense convolution" in messages[0]


def test_a_build_lock_left_by_a_killed_build_does_not_stop_the_next_load():
    # torch's build lock is a file; a process killed while building leaves it, and torch's loader
    # then waits for it to go away forever. A fresh process must load the kernel regardless.
    if kernels.psconv_extension() is None:
        pytest.skip("no compiled kernel on this machine")
    stale = kernels.cache_dir() / "lock"
    stale.touch()
    done = subprocess.run([sys.executable, "-c", "from leancnn.kernels import psconv_extension as p; "
                           "assert p() is not None"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not stale.exists()


def test_pack_lists_only_kept_taps():
    conv = random_layer(48, 32, 1, "PS4_P4")
    packed = kernel_module.pack(conv.weight.detach(), conv.mask, None)
    # Periodic PS4: 4 support groups of 8 filters, each cut into chunks of 4 and 4; every group
    # lists 48 channels x 4 taps once for its chunks, in segments of 16 channels (3 blocks x 4 groups).
    slots = packed["chunk_slot"].tolist()
    assert slots == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    assert packed["chunk_group"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    pairs = packed["segment_pair"]
    assert len(pairs) == 3 * 4 + 1 and packed["channels"].numel() == 4 * 48 * 4
    assert ((pairs[1:] - pairs[:-1]) == 16 * 4).all()
    assert packed["weights"].numel() == 32 * 48 * 4  # one weight per kept tap, nothing padded
    position = packed["position"].long()
    assert sorted(position.tolist()) == list(range(32))  # every filter has its own slot
    rows = conv.mask.reshape(32, -1)
    for chunk in range(8):  # the filters of a chunk share their support row
        members = torch.nonzero((position >= slots[chunk]) & (position < slots[chunk + 1])).flatten()
        assert (rows[members] == rows[members[0]]).all()
    for segment in range(12):  # a segment's channels lie in its channel block, and only kept taps
        group, block = segment % 4, segment // 4
        channel = packed["channels"][pairs[segment]:pairs[segment + 1]].long()
        tap = packed["taps"][pairs[segment]:pairs[segment + 1]].long()
        assert ((channel >= 16 * block) & (channel < 16 * block + 16)).all()
        member = torch.nonzero(position == slots[2 * group]).item()
        assert conv.mask[member].reshape(48, 9)[channel, tap].all()


def test_fold_batchnorm_keeps_outputs():
    torch.manual_seed(0)
    model = leancnn.create_model("resnet20", in_channels=1, width=0.5)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_deployed_model_predicts_like_the_trained_one(tmp_path, fashion_mnist):
    """A PS4_P4 resnet20 trained briefly on Fashion-MNIST: the deployed model
    (batch norm folded, kernel, fused ReLU) gives the same predictions on all
    10,000 test images."""
    from leancnn.config import TrainConfig
    from leancnn.experiment import train_run
    from leancnn.runs import load_run

    # test_subset: the run's own evaluations (2 of them) need not see all 10,000; the check below does.
    config = TrainConfig(data="fashion-mnist", model="resnet20", width=0.5, epochs=1, train_subset=3000,
                         test_subset=500, methods=["PS4_P4"], latency=False, out=str(tmp_path / "run")).validate()
    train_run(config, progress=False)
    model, _ = load_run(tmp_path / "run")
    deployed = deploy(model, graph="eager")   # the layers here; the frozen graph: the method contract
    swapped = [m for m in deployed.modules() if isinstance(m, PSConvInference)]
    # conv1 of every block fuses its ReLU; conv2 the residual add and the ReLU after it
    assert len(swapped) == 18 and sum(m.relu for m in swapped) == 18
    for layer in swapped:  # the kernel itself, whatever a plan would pick (and no planning at batch 1000)
        layer.forward = (lambda layer: lambda x, residual=None: layer.kernel(x, residual))(layer)
    images = fashion_mnist.test_images.float() / 255.0
    with torch.no_grad():
        trained = torch.cat([model(batch).argmax(1) for batch in images.split(1000)])
        served = torch.cat([deployed(batch).argmax(1) for batch in images.split(1000)])
    assert (trained == served).float().mean().item() >= 0.999  # float rounding may flip a near tie


def test_onnx_export_of_a_deployed_model_sees_ordinary_convolutions():
    """The kernel is opaque to tracing; export must use the dense path, not bake in a constant."""
    pytest.importorskip("onnxruntime")
    from leancnn.measure.onnx_latency import export_onnx

    torch.manual_seed(0)
    model = leancnn.apply_method(leancnn.create_model("resnet20", in_channels=1, width=0.25), "PS4_P4").eval()
    deployed = deploy(model)
    import onnxruntime

    session = onnxruntime.InferenceSession(export_onnx(deployed, (1, 28, 28)), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 1, 28, 28)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model(x), rtol=1e-3, atol=1e-4)
