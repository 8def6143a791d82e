"""CaP against L1-norm filter pruning on Fashion-MNIST, at half and a quarter
of the dense MACs, for resnet20 and vgg16 (width 0.5). Each dense model is
trained once; every compression starts from it, and both methods get the same
fine-tuning. Accuracy before and after fine-tuning, MACs, parameters and the
measured CPU latency (batch 1 and 64) with the realized speed-up next to the
MAC ratio. Writes benchmarks/results/cap_table.{md,json} and splices the
table into docs/methods/cap.md.

Runs are ordinary leancnn runs under --out: a finished one is skipped, so the
script can be killed and started again.

    nohup .venv/bin/python benchmarks/cap_table.py --threads 1 > cap.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import best_latency_ms, log, machine_line, pin_threads, publish

from leancnn.compress import compress_run
from leancnn.config import TrainConfig
from leancnn.deploy import fold_batchnorm
from leancnn.experiment import ensure_run
from leancnn.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["resnet20", "vgg16"]
TARGETS = [0.5, 0.25]
# cap-relax: the paper's full method ("projection & kernel relax"), kernels optimised with the projections.
METHODS = {"cap": "cap:macs={target}", "cap-relax": "cap:macs={target},relax=true", "l1prune": "l1prune:macs={target}"}


def train_base(args: argparse.Namespace, model: str) -> Path:
    out = Path(args.out) / f"{model}-w{args.width}-dense"
    config = TrainConfig(data="fashion-mnist", model=model, width=args.width, epochs=args.epochs,
                         train_subset=args.train_subset, seed=args.seed, threads=args.threads, latency=False,
                         out=str(out), lr=args.lr, batch_size=128).validate()
    started = time.time()
    log(f"{model} w{args.width} dense, {args.epochs} epochs ...")
    result = ensure_run(config, progress=False)
    log(f"    acc {result.test_acc:.4f} ({time.time() - started:.0f} s)")
    return out


def compress_one(args: argparse.Namespace, base: Path, method: str, target: float) -> Path:
    out = Path(args.out) / f"{base.name.replace('-dense', '')}-{method}-{target}"
    if not (out / "result.json").is_file():
        started = time.time()
        log(f"{base.name} -> {method} macs={target}, fine-tune {args.finetune} epochs ...")
        compress_run(base, [METHODS[method].format(target=target)], epochs=args.finetune, out=out, progress=False,
                     latency=False)
        log(f"    done ({time.time() - started:.0f} s)")
    return out


def row_for(run_dir: Path, args: argparse.Namespace, method: str, target: float | None) -> dict:
    result = json.loads((run_dir / "result.json").read_text())
    model, architecture = load_run(run_dir)
    model = fold_batchnorm(model)  # every row deployed the same way
    shape = tuple(architecture["input_shape"])
    compress = result.get("compress", {})
    row = {"model": result["model"], "method": method, "target": target, "run_dir": str(run_dir),
           "test_acc": result["test_acc"], "before_finetune": compress.get("test_acc_before_finetune"),
           "macs": result["macs_dense"], "params": result["params_total"]}
    for batch in (1, 64):
        row[f"latency_b{batch}"] = best_latency_ms(model, shape, batch, args.latency_threads, args.latency_runs)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | method | MAC target | test acc before fine-tune | test acc after | vs dense | MACs | "
             "params | latency b1 (ms) | latency b64 (ms) | MAC ratio | speed-up b64 | speed-up b1 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    dense = {r["model"]: r for r in rows if r["method"] == "dense"}
    for r in rows:
        d = dense[r["model"]]
        before = "" if r["before_finetune"] is None else f"{100 * r['before_finetune']:.2f}%"
        target = "1" if r["target"] is None else f"{r['target']:g}"
        lines.append(
            f"| {r['model']} | {r['method']} | {target} | {before} | {100 * r['test_acc']:.2f}% | "
            f"{100 * (r['test_acc'] - d['test_acc']):+.2f} | {r['macs'] / 1e6:.2f} M | {r['params'] / 1e3:.1f} k | "
            f"{r['latency_b1']:.2f} | {r['latency_b64']:.1f} | {d['macs'] / r['macs']:.2f}x | "
            f"{d['latency_b64'] / r['latency_b64']:.2f}x | {d['latency_b1'] / r['latency_b1']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the dense model")
    parser.add_argument("--finetune", type=int, default=3, help="fine-tuning epochs after compression (both methods)")
    parser.add_argument("--train-subset", type=int, default=30000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for training")
    parser.add_argument("--latency-threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "cap"))
    args = parser.parse_args()
    pin_threads(args.threads)
    runs = []
    for model in args.models:
        base = train_base(args, model)
        runs.append((base, "dense", None))
        for target in TARGETS:
            for method in METHODS:
                runs.append((compress_one(args, base, method, target), method, target))
    pin_threads(args.latency_threads)
    log("measuring latency ...")
    rows = [row_for(run_dir, args, method, target) for run_dir, method, target in runs]
    summary = (f"{machine_line()}\n\nDense models: {args.epochs} epochs on a {args.train_subset}-image subset of the "
               f"training set, batch 128, SGD+Nesterov, one-cycle lr {args.lr}, seed {args.seed}. Each compression "
               f"starts from the same dense model and is fine-tuned for {args.finetune} epochs (cosine, lr "
               f"{args.lr / 10:g}); CaP's projections are chosen on 2,000 training images held out of the "
               f"fine-tuning set. Accuracy on the full 10k test set. Latency: {args.latency_threads} thread(s), "
               f"median of {args.latency_runs} runs, batch norm folded into the convolutions, the faster memory format; speed-up = dense latency / "
               f"compressed latency, MAC ratio = dense MACs / compressed MACs.")
    block = f"{summary}\n\n{markdown(rows)}"
    print(block)
    publish("cap_table", block, rows, "docs/methods/cap.md")


if __name__ == "__main__":
    main()
