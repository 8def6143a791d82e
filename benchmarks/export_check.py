"""The shipped file against the deployed model: `leancnn export --format pt2` of a trained run,
planned at batch 1 and at batch 64, loaded in a fresh Python process that has torch and the
kernel library and none of leancnn, run on the whole Fashion-MNIST test set (top-1 against the
run's), and timed against the deployed model in leancnn (alternating calls in one process, one
thread, medians).

    .venv/bin/python benchmarks/export_check.py --run runs/ps4      # a trained run
    .venv/bin/python benchmarks/export_check.py                     # trains one first (~2 min)
    .venv/bin/python benchmarks/export_check.py --quick             # synthetic data, nothing written
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch._inductor

from common import log, machine_line, paired_seconds, pin_threads, publish

from leancnn.config import TrainConfig, load_config
from leancnn.deploy import deploy
from leancnn.experiment import prepare_data, train_run
from leancnn.export import export_run
from leancnn.kernels import expose_operator_shims
from leancnn.io import load_tensors, save_tensors
from leancnn.runs import load_run, read_result

# A fresh interpreter: the kernel library, the package, the images; nothing of leancnn.
LOADER = """
import ctypes, os, sys, torch, torch._inductor
from safetensors.torch import load_file, save_file
package, library, images, out = sys.argv[1:5]
if library:
    ctypes.CDLL(library, mode=os.RTLD_GLOBAL)   # as the card says
runner = torch._inductor.aoti_load_package(package)
images = load_file(images)["images"]
with torch.no_grad():
    logits = torch.cat([runner(images[i:i + 500]) for i in range(0, len(images), 500)])
save_file({"logits": logits}, out)
assert not [name for name in sys.modules if name.startswith("leancnn")], "the loader imported leancnn"
"""


def trained_run(folder: Path, quick: bool) -> Path:
    config = TrainConfig(data="synthetic" if quick else "fashion-mnist", model="resnet20", width=0.5,
                         methods=["PS4_P4"], epochs=1, train_subset=256 if quick else 10000, threads=1,
                         latency=False, out=str(folder / "run")).validate()
    log(f"training {config.model} w{config.width} {config.methods[0]} on {config.data} ({config.train_subset} images)")
    return train_run(config, progress=False).run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run (default: train resnet20 w0.5 PS4_P4 for one epoch)")
    parser.add_argument("--runs", type=int, default=300, help="alternating calls at batch 1 (batch 64: a tenth)")
    parser.add_argument("--quick", action="store_true", help="synthetic data, 20 calls, nothing written")
    args = parser.parse_args()
    pin_threads(1)
    print(machine_line(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="export-check-"))
    run_dir = Path(args.run) if args.run else trained_run(work, args.quick)
    config = load_config(run_dir / "config.toml")
    dataset = prepare_data(replace(config, test_subset=None))
    model, architecture = load_run(run_dir)
    shape = tuple(architecture["input_shape"])
    # Pixels in [0, 1], float32, as leancnn's loaders give them (the dataset keeps uint8): the program
    # was exported for float input, and AOTInductor does not check dtypes (uint8 crashed the loader).
    images = dataset.test_images.float().div_(255.0).contiguous()
    with torch.no_grad():
        model_top1 = float((torch.cat([model(images[i:i + 500]) for i in range(0, len(dataset.test_labels), 500)])
                            .argmax(1) == dataset.test_labels).float().mean())
    save_tensors(work / "images.safetensors", {"images": images})
    runs = 20 if args.quick else args.runs
    rows = []
    for batch in (1, 64):
        package = work / f"model-b{batch}.pt2"
        card = export_run(run_dir, "pt2", package, batch=batch, log=log)
        library = str(work / card["kernel_library"]) if card["kernel_library"] else ""
        done = subprocess.run([sys.executable, "-c", LOADER, str(package), library, str(work / "images.safetensors"),
                               str(work / "logits.safetensors")], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"the fresh process failed (exit {done.returncode}): {done.stderr[-2000:]}")
        logits = load_tensors(work / "logits.safetensors")["logits"]
        shipped_top1 = float((logits.argmax(1) == dataset.test_labels).float().mean())
        x = torch.rand(batch, *shape)
        deployed = deploy(model, example_inputs=[x])
        expose_operator_shims()
        runner = torch._inductor.aoti_load_package(str(package))
        # runner(x) goes through AOTInductor's Python wrapper (pytree flattening per call); its loader's
        # run() is the compiled program itself, what a C++ deployment calls.
        flat = [x]
        deployed_s, shipped_s, program_s = paired_seconds(
            [lambda: deployed(x), lambda: runner(x), lambda: runner.loader.run(flat)],
            runs if batch == 1 else max(runs // 10, 5))
        rows.append({"batch": batch, "deployed_ms": deployed_s * 1e3, "pt2_ms": shipped_s * 1e3,
                     "pt2_loader_run_ms": program_s * 1e3,
                     "model_top1": model_top1, "pt2_top1": shipped_top1, "run_test_acc": read_result(run_dir).test_acc})
        log(str(rows[-1]))
    methods = ", ".join(read_result(run_dir).methods) or "dense"
    lines = ["| planned for batch | run's test acc (result.json) | model top-1, full test set | pt2 top-1, fresh process "
             "| deployed ms | pt2 `runner(x)` ms | pt2 `runner.loader.run` ms | pt2 / deployed (loader.run) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['batch']} | {100 * r['run_test_acc']:.2f}% | {100 * r['model_top1']:.2f}% | "
                     f"{100 * r['pt2_top1']:.2f}% | {r['deployed_ms']:.3f} | {r['pt2_ms']:.3f} | "
                     f"{r['pt2_loader_run_ms']:.3f} | {r['pt2_ms'] / r['deployed_ms']:.2f} "
                     f"({r['pt2_loader_run_ms'] / r['deployed_ms']:.2f}) |")
    block = (f"{machine_line()}\n\n`.venv/bin/python benchmarks/export_check.py` ({config.model} w{config.width} "
             f"{methods}, {config.data}; 1 thread, medians of alternating calls, contiguous input)\n\n" + "\n".join(lines))
    print(block)
    if not args.quick:
        publish("export_check", block, rows, "docs/deploy.md")


if __name__ == "__main__":
    main()
