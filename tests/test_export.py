"""`leancnn export`: pt2 and ONNX files that compute the run's model, loadable without leancnn;
bad arguments fail with one line and leave nothing behind."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile

import pytest
import torch

from leancnn.cli import main
from leancnn.compress import compress_run
from leancnn.experiment import train_run
from leancnn.export import export_run
from leancnn.io import load_tensors, save_tensors
from leancnn.kernels import psconv_extension
from leancnn.measure.onnx_latency import onnx_available
from leancnn.runs import load_run

from .conftest import tiny_config

# Runs in a fresh interpreter: torch, the kernel library and the file; nothing of leancnn.
LOADER = """
import ctypes, os, sys, torch, torch._inductor
from safetensors.torch import load_file, save_file
folder = sys.argv[1]
card = __import__("json").load(open(folder + "/model.pt2.card.json"))
if card["kernel_library"]:
    ctypes.CDLL(folder + "/" + card["kernel_library"], mode=os.RTLD_GLOBAL)   # as the card says
program = torch._inductor.aoti_load_package(folder + "/model.pt2")
images = load_file(folder + "/images.safetensors")["images"]
with torch.no_grad():
    save_file({"logits": program(images)}, folder + "/logits.safetensors")
print(sorted(name for name in sys.modules if name.startswith("leancnn")))
"""


@pytest.fixture(scope="module")
def psconv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    return train_run(tiny_config(tmp, methods=["PS4_P4"], train_subset=256, test_subset=64), progress=False)


def fresh_images(run_dir, count: int) -> torch.Tensor:
    _, architecture = load_run(run_dir)
    return torch.rand(count, *architecture["input_shape"], generator=torch.Generator().manual_seed(5))


def test_pt2_runs_in_a_process_without_leancnn_and_matches_the_run(psconv_run, tmp_path, capsys):
    """ViP on the PS4_P4 run's stem, so that one package (AOTInductor compiles for ~40 s) holds both
    kinds of kernel call: leancnn::sparse_conv and leancnn::virtual_upsample, each through its C shim."""
    vip = compress_run(psconv_run.run_dir, ["vip:layers=features.0"], epochs=0, out=tmp_path / "vip", progress=False,
                       latency=False)
    out = tmp_path / "model.pt2"
    assert main(["export", str(vip.run_dir), "--format", "pt2", "--out", str(out)]) == 0
    card = json.loads((tmp_path / "model.pt2.card.json").read_text())
    assert card["methods"] == vip.result.methods and [m.split(":")[0] for m in card["methods"]] == ["psconv", "vip"]
    assert card["test_acc"] == vip.result.test_acc and card["planned_for_batch"] == 1
    assert card["macs_effective"] == vip.result.macs_effective < psconv_run.result.macs_effective
    if psconv_extension() is not None:   # the graph runs the kernels, shipped beside the file
        assert card["kernel_library"] == "model.pt2.kernels.so" and (tmp_path / card["kernel_library"]).is_file()
        # resnet20's 19 3x3 and 2 1x1 convolutions, each planned, and the stem's upsampling
        assert len(card["deploy_plan"]) == 22 and card["deploy_plan"][0]["key"].startswith("vip-upsample")
        # The compiled program calls the kernels' C shims, not AOTInductor's proxy executor (which
        # boxes every argument of every call).
        with zipfile.ZipFile(out) as package:
            wrapper = next(package.read(n).decode() for n in package.namelist() if n.endswith("wrapper.cpp"))
        assert "CHECK(aoti_torch_cpu_sparse_conv(" in wrapper and "proxy_executor_call_function" not in wrapper
        assert "CHECK(aoti_torch_cpu_virtual_upsample(" in wrapper
    images = fresh_images(vip.run_dir, 5)      # another batch size than the one planned for
    save_tensors(tmp_path / "images.safetensors", {"images": images})
    done = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", "the loader imported leancnn"
    logits = load_tensors(tmp_path / "logits.safetensors")["logits"]
    model, _ = load_run(vip.run_dir)
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not onnx_available(), reason="needs the onnx extra")
def test_onnx_export_runs_in_onnx_runtime_and_matches_the_run(psconv_run, tmp_path):
    import onnx
    import onnxruntime

    out = tmp_path / "model.onnx"
    assert main(["export", str(psconv_run.run_dir), "--format", "onnx", "--out", str(out)]) == 0
    operators = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "Conv" in operators and all(not op.startswith("leancnn") for op in operators)
    images = fresh_images(psconv_run.run_dir, 3)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    model, _ = load_run(psconv_run.run_dir)
    with torch.no_grad():
        assert torch.allclose(logits, model(images), atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "model.onnx.card.json").read_text())["kernel_library"] is None


@pytest.mark.parametrize("arguments, message", [
    (["--format", "tflite", "--out", "{tmp}/m.tflite"], "unknown export format 'tflite'; choose one of: pt2, onnx"),
    (["--format", "pt2", "--out", "{tmp}/no-such-folder/m.pt2"], "its folder .*no-such-folder does not exist"),
    (["--format", "pt2", "--out", "{tmp}"], "is a directory"),
    (["--format", "pt2", "--out", "{tmp}/m.pt2", "--batch", "0"], "--batch must be at least 1"),
])
def test_bad_export_arguments_fail_with_one_line(psconv_run, tmp_path, capsys, arguments, message):
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    assert main(["export", str(psconv_run.run_dir), *arguments]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_missing_run_fails_with_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.json: not found" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not onnx_available(), reason="needs the onnx extra")
def test_a_failed_export_leaves_no_partial_file(psconv_run, tmp_path, capsys, monkeypatch):
    from leancnn import export

    # Every read-back check fails, after the file was written (ONNX: pt2 compiles for 20 s first).
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    assert main(["export", str(psconv_run.run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "differs from the run's" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_torch_compile_of_a_deployed_model_runs_the_kernel_operator(psconv_run):
    """Dynamo and AOT autograd (with the operator's fake implementation) capture the kernel layers;
    Inductor's code generation is left to the compiled-deploy work (30 s of compiling here)."""
    from leancnn.deploy import deploy

    model, _ = load_run(psconv_run.run_dir)
    images = fresh_images(psconv_run.run_dir, 4)
    deployed = deploy(model, example_inputs=[images])
    with torch.no_grad():
        program = torch.export.export(deployed, (images,))
        compiled = torch.compile(deployed, backend="aot_eager", dynamic=False, fullgraph=True)
        got = compiled(images)
        expected = model(images)
    if psconv_extension() is not None:
        assert any("leancnn.sparse_conv" in str(node.target) for node in program.graph.nodes)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
