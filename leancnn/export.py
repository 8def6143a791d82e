"""`leancnn export`: a trained run as a file a user can ship, with its model card.

- `pt2`: an AOTInductor package: the `torch.export` program of the deployed model (batch norm
  folded, sparse layers on the implementation their deploy plan measured fastest here, as the
  operator `leancnn::sparse_conv`), with a dynamic batch dimension, compiled ahead of time with
  frozen weights into a shared library inside the package, so that no Python runs between the
  layers (the program run as an FX graph was 3x slower than the deployed model at batch 1),
  calling leancnn's operators through their C shims (leancnn/kernels/aoti_shims.cpp) rather than
  the package's proxy executor (export with --batch N for batch-N serving: docs/deploy.md). It
  runs in a process that has torch and the kernel library, and none of leancnn:
  `ctypes.CDLL(LIB, mode=os.RTLD_GLOBAL)` (the package's library calls the shims in it; this also
  registers the operators) then `torch._inductor.aoti_load_package(FILE)`. When the graph uses
  a leancnn operator, the library is written beside the file (`FILE.kernels.so`, built for this
  torch and CPU family). Compiling takes 20-60 s and needs the C++ compiler the kernel is built with.
- `onnx`: standard operators only (every sparse layer as the convolution it equals), checked
  against ONNX Runtime.

Beside the file, `FILE.card.json`: accuracy, MACs, storage, the methods, the machine the plans
were measured on, how to load it, and the largest difference from the run's model found when
the written file was read back. Everything is written to temporary names and renamed at the
end: a failed export leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch._inductor

from .deploy import deploy, deploy_plan
from .errors import LeancnnError, first_line
from .io import write_json
from .kernels import expose_operator_shims, kernel_library
from .kernels.graph import ChannelsLastEntry, channels_last_entry, chose_channels_last_entry
from .kernels.plans import machine_id
from .measure.latency import machine
from .measure.onnx_latency import export_onnx, onnx_available
from .runs import load_run, read_result

FORMATS = ("pt2", "onnx")
# The C shims of aoti_shims.cpp, declared to AOTInductor's code generator (its conventions: tensors
# as handles, an optional tensor as a pointer to one, bools as int32, the result through ret0).
SHIM_DECLARATIONS = {
    "sparse_conv": "AOTITorchError aoti_torch_cpu_sparse_conv(AtenTensorHandle input, AtenTensorHandle weights, "
                   "AtenTensorHandle channels, AtenTensorHandle taps, AtenTensorHandle chunk_slot, "
                   "AtenTensorHandle chunk_group, AtenTensorHandle segment_pair, AtenTensorHandle bias, "
                   "AtenTensorHandle position, int64_t stride, int32_t relu, AtenTensorHandle* residual, "
                   "int64_t pass_blocks, int32_t serial, AtenTensorHandle* ret0)",
    "virtual_upsample": "AOTITorchError aoti_torch_cpu_virtual_upsample(AtenTensorHandle values, int64_t height, "
                        "int64_t width, AtenTensorHandle* ret0)",
}
# Largest difference from the run's model (logits) a written file may show when read back.
TOLERANCE = 1e-3


def _check_destination(out: Path) -> None:
    if out.is_dir():
        raise LeancnnError(f"{out}: is a directory; give the file to write (e.g. {out / 'model.pt2'})")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise LeancnnError(f"{out}: its folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LeancnnError(f"{out}: cannot write into {parent} (permission denied)")


def _uses_kernel(program: torch.export.ExportedProgram) -> bool:
    """Whether the program calls one of leancnn's operators (sparse_conv, virtual_upsample)."""
    return any(str(node.target).startswith("leancnn.") for node in program.graph.nodes)


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _write_pt2(model: torch.nn.Module, example: torch.Tensor, path: Path,
               log: Callable[[str], None]) -> tuple[bool, list[dict]]:
    # Planned as it will run (the layers, and whether the input enters channels_last: a one-channel
    # image otherwise runs NCHW through every layer); torch.export then captures the eager path, on
    # each layer's choice for the last input it ran, which is this one.
    deployed = deploy(model, example_inputs=[example])
    entered = chose_channels_last_entry(deployed, example)
    with torch.no_grad():
        deployed.leancnn_graph_plans.eager(channels_last_entry(example) if entered else example)
    captured = ChannelsLastEntry(deployed) if entered else deployed
    batch = torch.export.Dim("batch", min=1, max=4096)
    # Traced at a batch of at least 2: a batch of 1 would be specialised into the graph.
    traced = example if example.shape[0] > 1 else example.expand(2, *example.shape[1:]).contiguous()
    try:
        with torch.no_grad():
            program = torch.export.export(captured, (traced,), dynamic_shapes=({0: batch},))
    except Exception as error:  # torch.export's errors run to pages: the first line says what failed
        first = first_line(error)
        raise LeancnnError(f"torch.export cannot capture this model ({type(error).__name__}: {first}); "
                           f"try --format onnx") from None
    log(f"compiling the graph ahead of time (AOTInductor, frozen weights; 20-60 s) into {path.name}")
    try:
        with torch.no_grad():
            shims = {getattr(torch.ops.leancnn, name).default: [declaration]
                     for name, declaration in SHIM_DECLARATIONS.items()} if expose_operator_shims() else {}
            torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs={
                "freezing": True, "aot_inductor.custom_ops_to_c_shims": shims})
    except Exception as error:
        raise LeancnnError(f"AOTInductor cannot compile this model ({type(error).__name__}: {first_line(error)}); "
                           f"try --format onnx") from None
    return _uses_kernel(program), deploy_plan(deployed)


def _read_back_pt2(path: Path, example: torch.Tensor) -> torch.Tensor:
    expose_operator_shims()
    with torch.no_grad():
        return torch._inductor.aoti_load_package(str(path))(example)


def _read_back_onnx(path: Path, example: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": example.numpy()})[0])


def export_run(run_dir: str | Path, fmt: str, out: str | Path, *, batch: int = 1,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the run's model to `out` in `fmt` (pt2 or onnx) and its card beside it; returns the card.
    `batch`: the batch size the deploy plans are measured for (any batch runs); `log`: progress lines."""
    if fmt not in FORMATS:
        raise LeancnnError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if batch < 1:
        raise LeancnnError(f"--batch must be at least 1, got {batch}")
    out = Path(out)
    _check_destination(out)
    if fmt == "onnx" and not onnx_available():
        raise LeancnnError("ONNX export needs the onnx extra: pip install 'leancnn[onnx]'")
    run_dir = Path(run_dir)
    model, architecture = load_run(run_dir)
    result = read_result(run_dir)
    input_shape = tuple(architecture["input_shape"])
    example = torch.rand(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    check = torch.rand(max(batch, 2) + 1, *input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(check)
    library = out.with_name(out.name + ".kernels.so")
    card_path = out.with_name(out.name + ".card.json")
    staging = Path(tempfile.mkdtemp(prefix=".leancnn-export-", dir=out.parent))
    try:
        written = staging / out.name
        plans: list[dict] = []
        uses_kernel = False
        if fmt == "pt2":
            uses_kernel, plans = _write_pt2(model, example, written, log)
            got = _read_back_pt2(written, check)
            load = (f"ctypes.CDLL('{library.name}', mode=os.RTLD_GLOBAL); " if uses_kernel else "") + \
                f"torch._inductor.aoti_load_package('{out.name}')(images)"
        else:
            written.write_bytes(export_onnx(deploy(model, kernels=False), input_shape))
            got = _read_back_onnx(written, check)
            load = f"onnxruntime.InferenceSession('{out.name}').run(None, {{'images': images}})"
        difference = _max_difference(got, expected)
        if not difference <= TOLERANCE:
            raise LeancnnError(f"{out}: the exported model differs from the run's by {difference:.2e} "
                               f"(allowed {TOLERANCE:g}); nothing written")
        card = {"format": fmt, "file": out.name, "from_run": str(run_dir), "model": result.model,
                "methods": result.methods, "input_shape": list(input_shape), "dataset": result.dataset,
                "test_acc": result.test_acc, "robust": result.robust, "params_total": result.params_total,
                "params_nonzero": result.params_nonzero, "macs_dense": result.macs_dense,
                "macs_effective": result.macs_effective, "storage_bytes": result.storage_bytes,
                "input": {"dtype": "float32", "pixels": "[0, 1]", "shape": ["batch", *input_shape],
                          "note": "pt2 packages do not check the dtype: convert uint8 images first (x / 255)"},
                "planned_for_batch": batch, "planned_on": {**machine(), "plan_machine_id": machine_id()}, "torch": torch.__version__,
                "kernel_library": library.name if uses_kernel else None, "deploy_plan": plans,
                "max_abs_difference": difference, "load": load}
        if uses_kernel:
            shutil.copyfile(kernel_library(), staging / library.name)
        write_json(staging / card_path.name, card)
        # Rename into place last, the model file after its companions.
        for name in ([library.name] if uses_kernel else []) + [card_path.name, out.name]:
            os.replace(staging / name, out.parent / name)
        return card
    finally:
        shutil.rmtree(staging, ignore_errors=True)
