"""The pruning family's figures: SynFlow against its baselines, ADMM-NN with quantisation, BCR
against irregular pruning, each pruned model deployed and timed.

--part speed (timing; run on an idle machine): resnet18 at width 0.5, every distinct 3x3 layer
shape at 32x32 input, batch 64, density 0.1: the sparse kernel (fastest variant, as a plan
picks) on a random irregular mask and on a BCR mask (bands of 4 filters, column-pruned) against
oneDNN's dense convolution; then the whole resnet18 w0.5 pruned both ways and deployed.

--part train (hours on one core, resumable: finished runs are skipped), then --part table
(times the deployed models on an idle machine and writes the table):
- resnet20 on Fashion-MNIST, one budget for all (--epochs over --train-subset images): dense;
  synflow, random-init, magnitude-init and snip at densities 0.1, 0.01, 0.002 (the layers left
  empty at initialisation are read from each run's log); admm (10x), bcr and magprune at density
  0.1 applied to the dense run, each trained --finetune-epochs more (3: the training's budget).
- lenet5 on Fashion-MNIST (--lenet-epochs over all training images): dense, then admm applied to
  the dense run (as ADMM-NN starts from a trained model) at each of --admm-densities with 4-bit
  levels and the global allocation, --admm-epochs at --admm-lr; model size as the counter
  measures it (codes + index).
- every pruned model deployed: its speed-up at batch 64 (1 thread) next to its MAC ratio.

    nohup .venv/bin/python benchmarks/pruning_family.py --part train --threads 1 > pruning.log 2>&1 &
    .venv/bin/python benchmarks/pruning_family.py --part table
    .venv/bin/python benchmarks/pruning_family.py --part speed
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn import functional as F

from common import (RESNET18_LAYERS, kernel_machine_line, log, machine_line, paired_seconds, pin_threads, publish,
                    with_batch_norm_statistics)

import leancnn
from leancnn.compress import compress_run
from leancnn.config import TrainConfig
from leancnn.deploy import deploy, fold_batchnorm
from leancnn.experiment import ensure_run
from leancnn.kernels import psconv_extension
from leancnn.kernels.sparse import PASS_CHOICES, SparseConvInference
from leancnn.measure import count
from leancnn.methods import parse_method
from leancnn.methods.bcr import block_masks
from leancnn.runs import load_run, read_result

FASHION_MNIST_SHAPE = (1, 28, 28)
DENSITIES = [0.1, 0.01, 0.002]
INIT_METHODS = ["synflow", "random-init", "magnitude-init", "snip"]
BCR_SPEC = "bcr:density=0.1"
IRREGULAR_SPEC = "magprune:density=0.1,attack=none"


# -- speed ----------------------------------------------------------------------
def layer_times(c_in: int, c_out: int, size: int, stride: int, batch: int, runs: int) -> dict:
    generator = torch.Generator().manual_seed(c_in * 7 + c_out)
    weight = torch.randn(c_out, c_in, 3, 3, generator=generator)
    bias = torch.randn(c_out, generator=generator)
    irregular = weight * (torch.rand(weight.shape, generator=generator) < 0.1)
    blocked = weight * block_masks(weight, 4, 0, 0.1, 1.0)
    x = torch.randn(batch, c_in, size, size).contiguous(memory_format=torch.channels_last)
    layers = {"irregular": SparseConvInference(irregular, bias, stride), "bcr": SparseConvInference(blocked, bias, stride)}
    variants = list(PASS_CHOICES.values())
    calls = [lambda: F.conv2d(x, weight, bias, stride, 1), lambda: F.conv2d(x.contiguous(), weight, bias, stride, 1)]
    for layer in layers.values():
        calls += [lambda layer=layer, options=options: layer.kernel(x, None, *options) for options in variants]
    times = paired_seconds(calls, runs)
    dense = min(times[:2])
    n = len(variants)
    irregular_ms, bcr_ms = min(times[2:2 + n]), min(times[2 + n:])
    return {"layer": f"{c_in}->{c_out} @{size} s{stride}", "dense_ms": 1e3 * dense, "irregular_ms": 1e3 * irregular_ms,
            "bcr_ms": 1e3 * bcr_ms, "irregular_speedup": dense / irregular_ms, "bcr_speedup": dense / bcr_ms}


def model_times(width: float, batch: int, runs: int, size: int) -> list[dict]:
    """resnet18 pruned both ways (masks from the untrained weights: time does not depend on values)."""
    torch.manual_seed(0)
    base = with_batch_norm_statistics(leancnn.create_model("resnet18", in_channels=3, width=width)).eval()
    shape = (3, size, size)
    dense = fold_batchnorm(base).to(memory_format=torch.channels_last)
    rows = []
    x = torch.rand(batch, *shape).contiguous(memory_format=torch.channels_last)
    for label, spec in (("irregular", "magprune:density=0.1,attack=none"), ("bcr", BCR_SPEC)):
        model = leancnn.create_model("resnet18", in_channels=3, width=width)
        model.load_state_dict(base.state_dict())
        pruned, _ = parse_method(spec).compress(model, None)
        deployed = deploy(pruned.eval())
        with torch.no_grad():
            deployed(x)
        dense_s, deployed_s = paired_seconds([lambda: dense(x), lambda: deployed(x)], runs)
        ratio = count(dense, shape).macs_effective / count(deployed, shape).macs_effective
        rows.append({"model": f"resnet18 w{width} {label}", "spec": spec, "batch": batch, "dense_ms": 1e3 * dense_s,
                     "deployed_ms": 1e3 * deployed_s, "speedup": dense_s / deployed_s, "mac_ratio": ratio})
        log(f"{rows[-1]['model']}: {rows[-1]['speedup']:.2f}x (MAC ratio {ratio:.2f})")
    return rows


def speed(args) -> None:
    if psconv_extension() is None:
        raise SystemExit("the sparse kernel could not be built here: nothing to measure")
    pin_threads(args.threads)
    half = [(c_in // 2, c_out // 2, size, stride) for c_in, c_out, size, stride in RESNET18_LAYERS]
    layers, batch, runs, size = (half, 64, args.runs, 32) if not args.quick else (half[:2], 4, 2, 8)
    rows = []
    for shape in layers:
        rows.append(layer_times(*shape, batch=batch, runs=runs))
        r = rows[-1]
        log(f"{r['layer']}: irregular {r['irregular_speedup']:.2f}x, bcr {r['bcr_speedup']:.2f}x "
            f"({r['bcr_speedup'] / r['irregular_speedup']:.2f}x of irregular)")
    models = model_times(0.5, batch, runs, size)
    lines = ["| layer (resnet18 w0.5), density 0.1 | dense best (ms) | irregular (ms) | BCR 4-filter bands (ms) | "
             "irregular speed-up | BCR speed-up | BCR / irregular |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['dense_ms']:.3f} | {r['irregular_ms']:.3f} | {r['bcr_ms']:.3f} | "
                     f"{r['irregular_speedup']:.2f}x | {r['bcr_speedup']:.2f}x | **{r['bcr_speedup'] / r['irregular_speedup']:.2f}x** |")
    lines += ["", "| whole model, deployed | batch | dense, BN folded (ms) | deployed (ms) | speed-up | MAC ratio |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in models:
        lines.append(f"| {r['model']} (`{r['spec']}`) | {r['batch']} | {r['dense_ms']:.2f} | {r['deployed_ms']:.2f} | "
                     f"**{r['speedup']:.2f}x** | {r['mac_ratio']:.2f}x |")
    block = (f"{kernel_machine_line(args.threads)}\n\n`.venv/bin/python benchmarks/pruning_family.py --part speed "
             f"--threads {args.threads}` (batch {batch}, median of {runs} alternating runs after 0.3 s of warm-up; the "
             "kernel rows are the fastest of its variants, as a plan picks; dense is the faster memory format)\n\n"
             + "\n".join(lines))
    print(block)
    if not args.quick:
        publish("pruning_speed", block, {"layers": rows, "models": models}, document="docs/methods/pruning.md")


# -- accuracy -------------------------------------------------------------------
def train(args, name: str, model: str, spec: str | None, epochs: int, subset: int | None) -> Path:
    out = Path(args.out) / name
    # lenet5 has no batch norm: at the default lr of 0.1 it diverged within 60 steps.
    lr = args.lenet_lr if model == "lenet5" else 0.1
    config = TrainConfig(data="fashion-mnist", model=model, epochs=epochs, train_subset=subset, seed=args.seed,
                         threads=args.threads, latency=False, methods=[spec] if spec else [], out=str(out),
                         batch_size=128, lr=lr).validate()
    log(f"{name}: {spec or 'dense'} ...")
    result = ensure_run(config, progress=False)
    log(f"    {result.test_acc:.4f}, {result.train_seconds:.0f} s of training")
    return out


def compressed(args, name: str, parent: Path, spec: str, epochs: int, lr: float | None) -> Path:
    out = Path(args.out) / name
    if not (out / "result.json").is_file():
        log(f"{name}: {spec} on {parent.name} ...")
        compress_run(parent, [spec], epochs=epochs, out=out, lr=lr, progress=False, latency=False)
    return out


def collapse(run_dir: Path) -> tuple[list[str], bool | None]:
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    first = entries[0] if entries else {}
    return first.get("collapsed_layers", []), first.get("input_output_path")


def deployed_speedup(run_dir: Path, batch: int, runs: int) -> float:
    model, _ = load_run(run_dir)
    x = torch.rand(batch, *FASHION_MNIST_SHAPE).contiguous(memory_format=torch.channels_last)
    dense = fold_batchnorm(model).to(memory_format=torch.channels_last)   # the same weights, run dense
    fast = deploy(model)
    with torch.no_grad():
        fast(x)
    dense_s, fast_s = paired_seconds([lambda: dense(x), lambda: fast(x)], runs)
    return dense_s / fast_s


def row(run_dir: Path, label: str, dense: Path, args) -> dict:
    result, reference = read_result(run_dir), read_result(dense)
    collapsed, path = collapse(run_dir) if (run_dir / "log.jsonl").is_file() else ([], None)
    return {"run": run_dir.name, "method": label, "test_acc": result.test_acc, "dense_acc": reference.test_acc,
            "params_nonzero": result.params_nonzero, "params_total": result.params_total,
            "weight_ratio": result.params_total / max(result.params_nonzero, 1),
            "mac_ratio": reference.macs_effective / max(result.macs_effective, 1),
            "storage_bytes": result.storage_bytes, "size_ratio": reference.storage_bytes / max(result.storage_bytes, 1),
            "collapsed_layers": collapsed, "input_output_path": path,
            "speedup_b64": deployed_speedup(run_dir, 64, args.runs) if args.part == "table" else None}


def runs(args) -> list[tuple[Path, str, Path]]:
    """Every run of the table as (run, label, its dense reference); trained (or resumed) here
    unless finished, or with --part table only read (a missing one stops the table)."""
    def run(name, model, spec, epochs, subset):
        out = Path(args.out) / name
        if args.only and model != args.only and args.part == "train":
            return out   # another process trains it (two processes must not train the same run)
        if args.part == "table":
            if not (out / "result.json").is_file():
                raise SystemExit(f"{out}: not trained yet; run --part train first")
            return out
        return train(args, name, model, spec, epochs, subset)

    def compressed_run(name, parent, spec, epochs=args.finetune_epochs, lr=None):
        out = Path(args.out) / name
        if args.only and not name.startswith(args.only) and args.part == "train":
            return out
        if args.part == "table" and not (out / "result.json").is_file():
            raise SystemExit(f"{out}: not compressed yet; run --part train first")
        return compressed(args, name, parent, spec, epochs, lr)

    table = []
    dense = run("resnet20-dense", "resnet20", None, args.epochs, args.train_subset)
    table.append((dense, "dense", dense))
    for density in DENSITIES:
        for method in INIT_METHODS:
            spec = f"{method}:density={density}"
            table.append((run(f"resnet20-{method}-{density}", "resnet20", spec, args.epochs, args.train_subset),
                          spec, dense))
    table.append((compressed_run("resnet20-admm-0.1", dense, "admm:density=0.1"),
                  f"admm:density=0.1 (+{args.finetune_epochs} ep.)", dense))
    for name, spec in (("resnet20-bcr-0.1", BCR_SPEC), ("resnet20-magprune-0.1", IRREGULAR_SPEC)):
        table.append((compressed_run(name, dense, spec), f"{spec} (+{args.finetune_epochs} ep.)", dense))
    lenet = run("lenet5-dense", "lenet5", None, args.lenet_epochs, None)
    table.append((lenet, "dense", lenet))
    for density in args.admm_densities:
        spec = f"admm:density={density},bits=4,allocation=global"
        table.append((compressed_run(f"lenet5-admm-{density}-4bit", lenet, spec, args.admm_epochs, args.admm_lr),
                      f"{spec} (+{args.admm_epochs} ep.)", lenet))
    return table


def accuracy(args) -> None:
    finished = runs(args)
    if args.part == "train":
        log(f"{len(finished)} runs finished; time them with --part table on an idle machine")
        return
    rows = [row(run_dir, label, dense, args) for run_dir, label, dense in finished]
    lines = ["| run | method | top-1 | dense top-1 | weights kept | fewer weights | MAC ratio | storage (bytes) | "
             "smaller | layers emptied at init | speed-up b64 (deployed) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        emptied = ", ".join(r["collapsed_layers"]) or "none"
        if r["input_output_path"] is False:
            emptied += " (no input-output path)"
        lines.append(f"| {r['run']} | `{r['method']}` | {r['test_acc']:.4f} | {r['dense_acc']:.4f} | "
                     f"{r['params_nonzero']:,} | {r['weight_ratio']:.1f}x | {r['mac_ratio']:.2f}x | {r['storage_bytes']:,} | "
                     f"{r['size_ratio']:.1f}x | {emptied} | {r['speedup_b64']:.2f}x |")
    block = (f"{kernel_machine_line(args.threads)}\n\n`.venv/bin/python benchmarks/pruning_family.py --part train "
             f"--threads {args.threads} --epochs {args.epochs} --train-subset {args.train_subset} --lenet-epochs "
             f"{args.lenet_epochs} --lenet-lr {args.lenet_lr} --admm-epochs {args.admm_epochs} --admm-lr {args.admm_lr}`, then `--part table` (Fashion-MNIST, test set of 10,000; resnet20 runs {args.epochs} "
             f"epochs over {args.train_subset} training images; admm, bcr and magprune train the dense run "
             f"{args.finetune_epochs} epoch(s) more; lenet5 {args.lenet_epochs} epochs over all 60,000 at lr {args.lenet_lr}, admm on it {args.admm_epochs} more at lr {args.admm_lr}; speed-ups at batch 64, "
             f"{args.threads} thread(s), median of {args.runs} alternating runs: the deployed model against the same "
             "weights run dense with BN folded)\n\n" + "\n".join(lines))
    print(block)
    publish("pruning_accuracy", block, rows, document="docs/methods/pruning.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["speed", "train", "table"], required=True,
                        help="speed: kernel timings; train: the table's runs; table: time them and write the table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15, help="timed runs per measurement")
    parser.add_argument("--quick", action="store_true", help="speed part at toy size: check that the script runs")
    parser.add_argument("--out", default="runs/pruning", help="where the training runs go")
    parser.add_argument("--epochs", type=int, default=3, help="resnet20 training epochs (every method alike)")
    parser.add_argument("--train-subset", type=int, default=20000, help="resnet20 training images")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="resnet20: admm's, bcr's and magprune's epochs on the dense run")
    parser.add_argument("--lenet-epochs", type=int, default=12)
    parser.add_argument("--lenet-lr", type=float, default=0.05)
    parser.add_argument("--admm-densities", type=lambda text: [float(d) for d in text.split(",")],
                        default=[0.045, 0.02],
                        help="lenet5's admm densities, comma-separated: 0.045 = 21x fewer weights (the dense stem "
                             "and the biases count); 0.02 (44x) aims at 100x in size with 4-bit codes and their index")
    parser.add_argument("--admm-epochs", type=int, default=20, help="lenet5: admm's epochs on the dense run")
    parser.add_argument("--admm-lr", type=float, default=0.02, help="lenet5: admm's learning rate on the dense run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["resnet20", "lenet5"], help="train only this model's runs (so that two "
                        "processes with --threads 1 can share two cores)")
    args = parser.parse_args()
    pin_threads(args.threads)
    print(machine_line(), flush=True)
    (speed if args.part == "speed" else accuracy)(args)


if __name__ == "__main__":
    main()
