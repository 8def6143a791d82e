"""Data-parallel training on one CPU machine: `leancnn train --nproc 2` (torchrun, gloo, two
processes of one thread each) against one process of two threads, same model, data, global batch,
learning rate, seed and epochs. Training throughput is each epoch's images per second over its
training steps (log.jsonl; evaluation excluded), the median over epochs; test accuracy after the
last epoch. The processes run one after another on an otherwise idle machine (two processes of
one run already hold both cores, so alternating within one process is not possible here).

    .venv/bin/python benchmarks/ddp_throughput.py [--epochs 3] [--train-subset N] [--quick]

With the default settings (resnet20 w1, all 60k Fashion-MNIST images, 3 epochs) it takes about
30 minutes on a 2-core machine. --quick trains 1 epoch on 2000 images and publishes nothing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import machine_line, median, print_and_publish

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "1 process x 2 threads": ["--threads", "2"],
    "2 processes x 1 thread (gloo), per-rank batch norm": ["--nproc", "2"],
    "2 processes x 1 thread (gloo), global batch norm": ["--nproc", "2", "--sync-batchnorm"],
}


def train(label: str, flags: list[str], args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / label.split(",")[-1].strip().replace(" ", "-").replace("(", "").replace(")", "")
    if not (run_dir / "result.json").is_file():
        command = [sys.executable, "-m", "leancnn", "train", "--model", args.model, "--width", str(args.width),
                   "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", "0",
                   "--no-latency", "--no-progress", "--out", str(run_dir), *flags]
        if args.train_subset:
            command += ["--train-subset", str(args.train_subset)]
        if (run_dir / "checkpoint").is_dir():
            command.append("--resume")
        print("$", " ".join(command[1:]), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    result = json.loads((run_dir / "result.json").read_text())
    return {"setting": label, "images_per_second": median([e["images_per_second"] for e in log]),
            "test_acc": result["test_acc"], "epoch_seconds": [e["seconds"] for e in log], "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "ddp"))
    parser.add_argument("--settings", type=int, nargs="+", default=list(range(len(SETTINGS))),
                        help="which settings to run, by position: " + "; ".join(
                            f"{i}: {label}" for i, label in enumerate(SETTINGS)) + " (0 is the baseline, always run)")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 2000 images; publishes nothing")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_subset, args.out = 1, 2000, args.out + "-quick"
    out = Path(args.out)
    chosen = sorted(set([0, *args.settings]))
    rows = [train(label, flags, args, out) for index, (label, flags) in enumerate(SETTINGS.items()) if index in chosen]
    base = rows[0]
    lines = ["| setting | train images/s | vs 1 process | test acc | vs 1 process |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        row["throughput_ratio"] = row["images_per_second"] / base["images_per_second"]
        row["accuracy_points"] = 100 * (row["test_acc"] - base["test_acc"])
        lines.append(f"| {row['setting']} | {row['images_per_second']:.0f} | {row['throughput_ratio']:.2f}x | "
                     f"{100 * row['test_acc']:.2f}% | {row['accuracy_points']:+.2f} |")
    subset = f"{args.train_subset} images" if args.train_subset else "all 60k images"
    how = (f"{args.model} w{args.width:g}, Fashion-MNIST ({subset}), {args.epochs} epochs, global batch "
           f"{args.batch_size}, seed 0; throughput the median epoch's")
    print_and_publish("ddp_throughput", machine_line(), how, "\n".join(lines), rows, args.quick,
                      "docs/distributed.md")


if __name__ == "__main__":
    main()
