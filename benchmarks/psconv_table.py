"""The pSConv comparison on Fashion-MNIST: dense and five pSConv variants of
resnet18 and vgg16 (width 0.25 on a CPU, 1.0 on a GPU), plus mobilenetv2 and
shufflenetv2 at similar MACs, all trained with one schedule. Writes a Markdown
table and an accuracy-vs-MACs plot, and splices both into docs/methods/psconv.md.

Runs are ordinary leancnn runs under --out; a finished run is skipped and an
unfinished one resumed, so the script can be killed and started again.

    nohup .venv/bin/python benchmarks/psconv_table.py --threads 1 > psconv.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import machine_line, median, pin_threads, splice_doc

from leancnn.config import TrainConfig
from leancnn.experiment import ensure_run
from leancnn.measure import measure_latency
from leancnn.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["dense", "PS4_P4", "PSD4_P8", "PSD2_P8", "PSD1_P16", "PS1_P9"]
# Compact baselines at widths that put their MACs near resnet18-0.25's PS4_P4 (about 13M at 28x28).
BASELINES = [("mobilenetv2", 0.35), ("shufflenetv2", 0.5)]


def candidates(width: float) -> list[tuple[str, float, str]]:
    rows = [(model, width, variant) for model in ("resnet18", "vgg16") for variant in VARIANTS]
    return rows + [(model, w, "dense") for model, w in BASELINES]


def train_all(args: argparse.Namespace, width: float) -> list[dict]:
    rows = []
    for model, model_width, variant in candidates(width):
        out = Path(args.out) / f"{model}-w{model_width}-{variant}"
        config = TrainConfig(data="fashion-mnist", model=model, width=model_width, epochs=args.epochs,
                             train_subset=args.train_subset, seed=args.seed, threads=args.threads,
                             methods=[] if variant == "dense" else [variant], latency=False, out=str(out),
                             lr=args.lr, batch_size=128).validate()
        started = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {model} w{model_width} {variant} ...", flush=True)
        result = ensure_run(config, progress=False)
        print(f"    acc {result.test_acc:.4f}, MACs {result.macs_effective / 1e6:.1f}M "
              f"({time.time() - started:.0f} s)", flush=True)
        rows.append({"model": model, "width": model_width, "variant": variant, "run_dir": str(out), **result.as_dict()})
    return rows


def add_latency(rows: list[dict], threads: int, runs: int) -> None:
    for row in rows:
        model, architecture = load_run(row["run_dir"])
        shape = tuple(architecture["input_shape"])
        for batch in (1, 64):
            row[f"latency_b{batch}"] = min(measure_latency(model, shape, batch_size=batch, threads=threads,
                                                           channels_last=cl, runs=runs).median_ms
                                           for cl in (True, False))


def training_overhead(width: float, threads: int, steps: int = 30, repeats: int = 3) -> tuple[float, float]:
    """Seconds per step of resnet18 dense vs PS4_P4 (median of alternating repeats)."""
    from leancnn.methods import apply_methods
    from leancnn.models import create_model

    def seconds_per_step(methods: list[str]) -> float:
        torch.manual_seed(0)
        model, method_objs = apply_methods(create_model("resnet18", in_channels=1, width=width), methods)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
        model.train()
        for step in range(steps + 3):
            if step == 3:
                started = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            for method in method_objs:  # what the Trainer does after every step
                method.after_step(type("T", (), {"model": model})())
        return (time.perf_counter() - started) / steps

    torch.set_num_threads(threads)
    dense, sparse = [], []
    for _ in range(repeats):
        dense.append(seconds_per_step([]))
        sparse.append(seconds_per_step(["PS4_P4"]))
    return median(dense), median(sparse)


def markdown(rows: list[dict]) -> str:
    lines = ["| model | variant | test acc | params non-zero | MACs effective | storage | latency b1 (ms) | latency b64 (ms) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} (w{r['width']}) | {r['variant']} | {100 * r['test_acc']:.2f}% | "
                     f"{r['params_nonzero'] / 1e6:.3f} M | {r['macs_effective'] / 1e6:.2f} M | "
                     f"{r['storage_bytes'] / 2**20:.2f} MiB | {r.get('latency_b1', float('nan')):.2f} | "
                     f"{r.get('latency_b64', float('nan')):.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for model, marker in (("resnet18", "o"), ("vgg16", "s"), ("mobilenetv2", "^"), ("shufflenetv2", "v")):
        points = [r for r in rows if r["model"] == model]
        if not points:
            continue
        ax.scatter([r["macs_effective"] / 1e6 for r in points], [100 * r["test_acc"] for r in points],
                   marker=marker, label=model)
        for r in points:
            ax.annotate(r["variant"], (r["macs_effective"] / 1e6, 100 * r["test_acc"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("effective MACs per image (millions, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("pSConv on Fashion-MNIST: accuracy vs effective MACs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=30000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--width", type=float, default=None, help="default: 1.0 with CUDA, else 0.25")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "psconv"))
    parser.add_argument("--latency-runs", type=int, default=20)
    args = parser.parse_args()
    pin_threads(args.threads)
    width = args.width or (1.0 if torch.cuda.is_available() else 0.25)
    rows = train_all(args, width)
    add_latency(rows, threads=1, runs=args.latency_runs)
    dense_step, sparse_step = training_overhead(width, args.threads)
    table = markdown(rows)
    plot_path = ROOT / "docs" / "psconv_accuracy_vs_macs.png"
    plot(rows, plot_path)
    summary = (f"{machine_line()}\n\nSchedule for all: {args.epochs} epochs on a {args.train_subset}-image subset "
               f"of the training set, batch 128, SGD+Nesterov, one-cycle lr {args.lr}, weight decay 5e-4, seed "
               f"{args.seed}; accuracy on the full 10k test set; latency: 1 thread, median of {args.latency_runs} "
               f"runs, the faster memory format.\n\nTraining cost of the masks (resnet18 w{width}, batch 128, "
               f"{args.threads} thread(s)): dense {1000 * dense_step:.0f} ms/step, PS4_P4 {1000 * sparse_step:.0f} "
               f"ms/step ({100 * (sparse_step / dense_step - 1):+.1f}%).")
    block = f"{summary}\n\n{table}\n\n![accuracy vs MACs](../psconv_accuracy_vs_macs.png)"
    print(block)
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "psconv_table.md").write_text(block + "\n")
    (ROOT / "benchmarks" / "results" / "psconv_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    splice_doc(block, "psconv-table", "docs/methods/psconv.md")


if __name__ == "__main__":
    main()
