"""L1 channel pruning and CaP to half the dense MACs on every registered CNN and on a user model
(examples/user_model.py), through the traced channel graph; and DNR's channel mode on
mobilenetv2 at density 0.7. Each dense model is trained once on Fashion-MNIST; both
compressions start from it and get the same fine-tuning. Reports the MACs reached against the
target, accuracy before and after fine-tuning, and the realized speed-up at batch 64 (batch
norm folded, the faster memory format) next to the MAC ratio. Writes
benchmarks/results/channel_table.{md,json} and splices the table into docs/channel-graph.md.

Runs are ordinary leancnn runs under --out: a finished one is skipped, so the script can be
killed and started again. Training and timing are separate phases: `--phase train` (run it in
the background with --threads 1), then `--phase measure` on a quiet machine.

    nohup .venv/bin/python benchmarks/channel_table.py --phase train --threads 1 > channel.log 2>&1 &
    .venv/bin/python benchmarks/channel_table.py --phase measure
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
USER_MODEL = str(ROOT / "examples" / "user_model.py") + ":build"
# model@width: the ImageNet-sized ResNets at a quarter width keep the run within an hour on 2 cores
MODELS = ["resnet20@0.5", "resnet56@0.5", "vgg11@0.5", "vgg16@0.5", "mobilenetv2@0.5", "shufflenetv2@0.5",
          f"{USER_MODEL}@1", "resnet18@0.25", "resnet50@0.25"]
METHODS = {"l1prune": "l1prune:macs=0.5", "cap": "cap:macs=0.5"}
DNR_CHANNEL = ("mobilenetv2", "dnr:density=0.7,mode=channel,attack=none,round_to=8")


def short(model: str) -> str:
    return "user_model.py:build" if model == USER_MODEL else model


def parse_model(text: str) -> tuple[str, float]:
    model, _, width = text.rpartition("@")
    return (model, float(width)) if model else (text, 1.0)


def config_for(args: argparse.Namespace, model: str, width: float, methods: list[str], tag: str) -> TrainConfig:
    name = short(model).replace(".py:", ".").replace(":", ".")
    return TrainConfig(data="fashion-mnist", model=model, width=width, epochs=args.epochs,
                       train_subset=args.train_subset, seed=args.seed, threads=args.threads, latency=False,
                       out=str(Path(args.out) / f"{name}-w{width:g}-{tag}"), lr=args.lr, batch_size=128,
                       methods=methods).validate()


def train(args: argparse.Namespace) -> list[tuple[Path, str, str]]:
    runs = []
    widths = dict(parse_model(text) for text in args.models)
    for model, width in widths.items():
        config = config_for(args, model, width, [], "dense")
        started = time.time()
        log(f"{short(model)} w{width:g} dense, {args.epochs} epochs ...")
        result = ensure_run(config, progress=False)
        log(f"    acc {result.test_acc:.4f} ({time.time() - started:.0f} s)")
        base = config.run_dir()
        label = f"{short(model)} w{width:g}"
        runs.append((base, label, "dense"))
        for method, spec in METHODS.items():
            out = Path(str(base).replace("-dense", f"-{method}"))
            if not (out / "result.json").is_file():
                started = time.time()
                log(f"    -> {spec}, fine-tune {args.finetune} epochs ...")
                compress_run(base, [spec], epochs=args.finetune, out=out, progress=False, latency=False)
                log(f"       done ({time.time() - started:.0f} s)")
            runs.append((out, label, method))
    model, spec = DNR_CHANNEL
    if model in widths:
        config = config_for(args, model, widths[model], [spec], "dnr-channel")
        log(f"{model} {spec}, {args.epochs} epochs ...")
        ensure_run(config, progress=False)
        runs.append((config.run_dir(), f"{model} w{widths[model]:g}", "dnr-channel"))
    return runs


def row_for(run_dir: Path, model_label: str, method: str, args: argparse.Namespace) -> dict:
    result = json.loads((run_dir / "result.json").read_text())
    model, architecture = load_run(run_dir)
    model = fold_batchnorm(model)  # every row deployed the same way
    shape = tuple(architecture["input_shape"])
    compress = result.get("compress", {})
    return {"model": model_label, "method": method, "run_dir": str(run_dir), "spec": result.get("methods"),
            "test_acc": result["test_acc"], "before_finetune": compress.get("test_acc_before_finetune"),
            "macs": result["macs_dense"], "params": result["params_total"],
            "latency_b64": best_latency_ms(model, shape, 64, args.latency_threads, args.latency_runs)}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | method | MACs | of dense | test acc before fine-tune | test acc | vs dense | "
             "latency b64 (ms) | MAC ratio | speed-up b64 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    dense = {r["model"]: r for r in rows if r["method"] == "dense"}
    for r in rows:
        d = dense[r["model"]]
        before = "" if r["before_finetune"] is None else f"{100 * r['before_finetune']:.2f}%"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['macs'] / 1e6:.2f} M | {r['macs'] / d['macs']:.3f} | {before} | "
            f"{100 * r['test_acc']:.2f}% | {100 * (r['test_acc'] - d['test_acc']):+.2f} | {r['latency_b64']:.1f} | "
            f"{d['macs'] / r['macs']:.2f}x | {d['latency_b64'] / r['latency_b64']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["train", "measure", "all"], default="all")
    parser.add_argument("--models", nargs="+", default=MODELS, help="MODEL@WIDTH ...")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the dense model")
    parser.add_argument("--finetune", type=int, default=1, help="fine-tuning epochs after compression (both methods)")
    parser.add_argument("--train-subset", type=int, default=8000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for training")
    parser.add_argument("--latency-threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "channels"))
    parser.add_argument("--quick", action="store_true", help="toy size (three models, 500 images, 1 epoch) into "
                        "--out, nothing published: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.models = ["resnet20@0.5", f"{USER_MODEL}@0.25", "mobilenetv2@0.25"]
        args.epochs, args.train_subset, args.finetune = 1, 500, 1
        args.latency_runs = 3
    pin_threads(args.threads)
    runs = train(args)   # in the measure phase every run is finished: this only lists them
    if args.phase == "train":
        return
    pin_threads(args.latency_threads)
    log("measuring latency ...")
    rows = [row_for(run_dir, label, method, args) for run_dir, label, method in runs]
    summary = (f"{machine_line()}\n\n`.venv/bin/python benchmarks/channel_table.py` (then `--phase measure`). "
               f"Dense models (each at the width its row names): {args.epochs} epochs on a "
               f"{args.train_subset}-image subset of the training set, batch 128, lr {args.lr}, seed {args.seed}. `l1prune:macs=0.5` and `cap:macs=0.5` "
               f"start from the same dense model and are fine-tuned for {args.finetune} epoch(s); "
               f"`{DNR_CHANNEL[1]}` trains {DNR_CHANNEL[0]} from scratch for the same {args.epochs} epochs. "
               f"Accuracy on the full 10k test set. Latency: {args.latency_threads} thread(s), batch 64, median of "
               f"{args.latency_runs} runs, batch norm folded, the faster memory format; speed-up = dense latency / "
               f"compressed latency, MAC ratio = dense MACs / compressed MACs.")
    block = f"{summary}\n\n{markdown(rows)}"
    print(block)
    if not args.quick:
        publish("channel_table", block, rows, "docs/channel-graph.md")


if __name__ == "__main__":
    main()
