"""Block-circulant layers (CirCNN) on resnet20, Fashion-MNIST: blocks of 4 and 8 trained from
scratch next to the dense model with the same budget, and the dense model projected onto blocks
of 8 (`leancnn compress`, then fine-tuned). Per model: accuracy, the parameters of the converted
layers against their dense count, effective MACs (the FFT route's, leancnn.layers.circulant), and
the deployed latency against the deployed dense model (each block-circulant layer on its plan:
the FFT or the expanded dense convolution), timed in alternating rounds in one process.

Finished runs are skipped, so a second start only re-measures (do that on an idle machine).

    nohup .venv/bin/python benchmarks/circulant_table.py --threads 1 > circulant.log 2>&1 &
    .venv/bin/python benchmarks/circulant_table.py --quick      # a toy run: nothing published
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from common import log, machine_line, paired_seconds, pin_threads, publish

from leancnn.compress import compress_run
from leancnn.config import TrainConfig
from leancnn.deploy import deploy, deploy_plan
from leancnn.experiment import ensure_run
from leancnn.layers.circulant import BlockCirculantConv2d, BlockCirculantLinear
from leancnn.models import create_model
from leancnn.runs import load_run, read_result

ROOT = Path(__file__).resolve().parents[1]


def converted_params(run_dir: Path) -> tuple[int, int]:
    """(parameters of the block-circulant layers, the same layers' dense parameter count)."""
    model, architecture = load_run(run_dir)
    dense = dict(create_model(architecture["model"], **architecture["model_kwargs"]).named_modules())
    ours = total = 0
    for name, module in model.named_modules():
        if isinstance(module, (BlockCirculantConv2d, BlockCirculantLinear)):
            ours += module.weight.numel()
            total += dense[name].weight.numel()
    return ours, total


def latencies(run_dir: Path, dense_dir: Path, batch: int, threads: int, runs: int) -> dict:
    """Deployed model against the deployed dense model, alternating; and what the circulant layers' plans chose."""
    model, architecture = load_run(run_dir)
    baseline, _ = load_run(dense_dir)
    x = torch.rand(batch, *architecture["input_shape"])
    pin_threads(threads)
    fast, reference = deploy(model.eval()), deploy(baseline.eval())
    with torch.no_grad():
        fast(x), reference(x)   # plans made (or read) before timing
    reference_s, fast_s = paired_seconds([lambda: reference(x), lambda: fast(x)], runs)
    choices = Counter(row["choice"] for row in deploy_plan(fast) if row["key"].startswith("circulant") and f" batch={batch} " in row["key"])
    return {"ms": 1e3 * fast_s, "dense_ms": 1e3 * reference_s, "speedup": reference_s / fast_s,
            "choices": dict(choices)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--width", type=float, default=0.5, help="width multiplier (0.5: 8, 16 and 32 channels)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-subset", type=int, default=30000)
    parser.add_argument("--finetune", type=int, default=2, help="fine-tuning epochs of the projected model")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for training")
    parser.add_argument("--latency-threads", type=int, default=1)
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "circulant"))
    parser.add_argument("--quick", action="store_true", help="a toy run (1 epoch, 1000 images): nothing published")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_subset, args.finetune, args.latency_runs = 1, 1000, 1, 3
        args.out = str(Path(args.out) / "quick")
    pin_threads(args.threads)

    def train(spec: str | None) -> Path:
        name = f"{args.model}-w{args.width}-" + (spec.replace(":", "-").replace("=", "") if spec else "dense")
        out = Path(args.out) / name
        config = TrainConfig(data="fashion-mnist", model=args.model, width=args.width, epochs=args.epochs,
                             train_subset=args.train_subset, seed=args.seed, threads=args.threads, lr=args.lr,
                             batch_size=128, methods=[spec] if spec else [], latency=False, out=str(out)).validate()
        log(f"{name} ...")
        result = ensure_run(config, progress=False)
        log(f"    {result.test_acc:.4f}, {result.train_seconds:.0f} s of training")
        return out

    dense = train(None)
    variants = [("block 4, from scratch", "circulant:block=4", train("circulant:block=4")),
                ("block 8, from scratch", "circulant:block=8", train("circulant:block=8"))]
    projected = Path(args.out) / f"{args.model}-w{args.width}-dense-projected-circulant-block8"
    if not (projected / "result.json").is_file():
        log(f"{projected.name}: projecting the dense model, {args.finetune} fine-tuning epoch(s) ...")
        compress_run(dense, ["circulant:block=8"], epochs=args.finetune, out=projected, progress=False, latency=False)
    variants.append((f"block 8, dense projected + {args.finetune} epoch(s)", "circulant:block=8", projected))

    reference = read_result(dense)
    rows = [{"label": "dense", "spec": "-", "run_dir": str(dense), "test_acc": reference.test_acc,
             "params_total": reference.params_total, "macs_effective": reference.macs_effective,
             "macs_dense": reference.macs_dense, "converted_params": None, "converted_dense_params": None,
             **{f"b{b}": None for b in (1, 64)}}]
    for label, spec, run_dir in variants:
        result = read_result(run_dir)
        ours, total = converted_params(run_dir)
        log(f"timing {run_dir.name} ...")
        rows.append({"label": label, "spec": spec, "run_dir": str(run_dir), "test_acc": result.test_acc,
                     "params_total": result.params_total, "macs_effective": result.macs_effective,
                     "macs_dense": result.macs_dense, "converted_params": ours, "converted_dense_params": total,
                     **{f"b{b}": latencies(run_dir, dense, b, args.latency_threads, args.latency_runs)
                        for b in (1, 64)}})
    lines = ["| resnet20 (w{}) | test acc | vs dense | converted layers' params | cut | params (all) | "
             "MACs effective | MAC ratio | deployed b1 (ms) | speed-up b1 | deployed b64 (ms) | speed-up b64 | "
             "layer plans b64 |".format(args.width),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r["converted_params"] is None:
            lines.append(f"| dense | {100 * r['test_acc']:.2f}% | - | - | - | {r['params_total'] / 1e3:.1f} k | "
                         f"{r['macs_effective'] / 1e6:.2f} M | 1.00x | - | 1.00x | - | 1.00x | - |")
            continue
        plans = ", ".join(f"{n} {choice}" for choice, n in sorted(r["b64"]["choices"].items()))
        lines.append(
            f"| {r['label']} (`{r['spec']}`) | {100 * r['test_acc']:.2f}% | "
            f"{100 * (r['test_acc'] - reference.test_acc):+.2f} | {r['converted_params'] / 1e3:.1f} k of "
            f"{r['converted_dense_params'] / 1e3:.1f} k | {r['converted_dense_params'] / r['converted_params']:.2f}x | "
            f"{r['params_total'] / 1e3:.1f} k | {r['macs_effective'] / 1e6:.2f} M | "
            f"{reference.macs_effective / r['macs_effective']:.2f}x | {r['b1']['ms']:.3f} | {r['b1']['speedup']:.2f}x | "
            f"{r['b64']['ms']:.2f} | {r['b64']['speedup']:.2f}x | {plans} |")
    summary = (f"{machine_line()}\n\n{args.model} (width {args.width}) on a {args.train_subset}-image subset of "
               f"Fashion-MNIST, {args.epochs} epochs, batch 128, SGD+Nesterov, one-cycle lr {args.lr}, seed "
               f"{args.seed}, the same for every row; accuracy on the full 10k test set. Converted: every convolution "
               f"but the stem and every linear layer whose channels the block divides (`layers=auto`). Effective "
               f"MACs count the FFT route (products and transforms). Latency: the deployed model (batch norm folded, "
               f"each circulant layer on its measured plan) against the deployed dense model, "
               f"{args.latency_threads} thread(s), median of {args.latency_runs} alternating runs; 'layer plans' "
               f"counts what the circulant layers' plans chose at batch 64.")
    block = f"{summary}\n\n" + "\n".join(lines)
    print(block)
    if not args.quick:
        publish("circulant_table", block, rows, "docs/methods/circulant.md")


if __name__ == "__main__":
    main()
