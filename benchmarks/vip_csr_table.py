"""ViP and CSR-Conv on Fashion-MNIST (28x28, no padding).

--part vip: virtual pooling applied by `vip:layers=auto,max_drop=0.01` (rounds
  of the least sensitive blocks, one fine-tuning epoch per round) to the dense
  vgg16 (width 0.5) of benchmarks/cap_table.py, and to its CaP model at half
  the MACs, so the two speed-ups can be seen to multiply. Run cap_table.py
  first (this part reuses its runs).
--part csr: resnet20 (width 0.5) with CSR-Conv T=2 and T=4 on every 3x3
  convolution but the stem, next to dense and to pSConv at similar parameter
  counts (PS4_P4 keeps 4/9 of the 3x3 weights, near T=2's 1/2; PS1_P9 1/9,
  near T=4's 1/8); mobilenetv2 (width 0.5) with CSR-Conv on its 1x1
  convolutions. Parameters are checked against the formula 2/T^2-style count
  of METHODS.md (CSRConv2d.expected_params) per layer.

Latency: batch norm folded, median of --latency-runs, the faster memory
format, at --latency-threads. Finished runs are skipped, so running a part
again only re-measures (do that on an idle machine).

    nohup .venv/bin/python benchmarks/vip_csr_table.py --part csr --threads 1 > csr.log 2>&1 &
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
from leancnn.errors import LeancnnError
from leancnn.experiment import ensure_run
from leancnn.layers.csrconv import CSRConv2d
from leancnn.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
VIP_SPEC = "vip:layers=auto,max_drop=0.01,per_round=3,rounds=2"
CSR_ROWS = [("resnet20", "dense"), ("resnet20", "csr:T=2"), ("resnet20", "csr:T=4"), ("resnet20", "PS4_P4"),
            ("resnet20", "PS1_P9"), ("mobilenetv2", "dense"), ("mobilenetv2", "csr:T=2,layers=1x1"),
            ("mobilenetv2", "csr:T=4,layers=1x1")]


def latency_row(run_dir: Path, args: argparse.Namespace) -> dict:
    model, architecture = load_run(run_dir)
    deployed = fold_batchnorm(model)
    shape = tuple(architecture["input_shape"])
    return {f"latency_b{batch}": best_latency_ms(deployed, shape, batch, args.latency_threads, args.latency_runs)
            for batch in (1, 64)}


def run_name(model: str, spec: str, width: float) -> str:
    return f"{model}-w{width}-" + spec.replace(":", "-").replace(",", "-").replace("=", "")


def vip_part(args: argparse.Namespace) -> tuple[str, list[dict]]:
    cap_out = Path(args.cap_out)
    bases = {"dense": cap_out / "vgg16-w0.5-dense", "cap 0.5": cap_out / "vgg16-w0.5-cap-0.5"}
    if not (bases["dense"] / "result.json").is_file():
        raise LeancnnError(f"{bases['dense']}: not finished; run benchmarks/cap_table.py first")
    runs = []
    for label, base in bases.items():
        for _ in range(args.wait_minutes * 2):  # cap_table.py may still be making the CaP model
            if (base / "result.json").is_file():
                break
            time.sleep(30)
        if not (base / "result.json").is_file():
            raise LeancnnError(f"{base}: not finished; run benchmarks/cap_table.py first")
        runs.append((label, base))
        out = Path(args.out) / f"vgg16-w0.5-{label.replace(' ', '')}-vip"
        if not (out / "result.json").is_file():
            log(f"{base.name} -> {VIP_SPEC}, final fine-tune {args.finetune} epoch(s) ...")
            started = time.time()
            compress_run(base, [VIP_SPEC], epochs=args.finetune, out=out, progress=False, latency=False)
            log(f"    done ({time.time() - started:.0f} s)")
        runs.append((f"{label} + ViP", out))
    pin_threads(args.latency_threads)
    log("measuring latency ...")
    rows = []
    for label, run_dir in runs:
        result = json.loads((run_dir / "result.json").read_text())
        rows.append({"variant": label, "run_dir": str(run_dir), "test_acc": result["test_acc"],
                     "macs": result["macs_effective"], "vip_layers": result.get("compress", {}).get("vip_layers"),
                     **latency_row(run_dir, args)})
    dense = rows[0]
    lines = ["| vgg16 (w0.5) | ViP blocks | test acc | vs dense | MACs | latency b1 (ms) | latency b64 (ms) | "
             "speed-up b64 | speed-up b1 |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        blocks = ", ".join(r["vip_layers"] or []) or "-"
        lines.append(f"| {r['variant']} | {blocks} | {100 * r['test_acc']:.2f}% | "
                     f"{100 * (r['test_acc'] - dense['test_acc']):+.2f} | {r['macs'] / 1e6:.2f} M | "
                     f"{r['latency_b1']:.2f} | {r['latency_b64']:.1f} | "
                     f"{dense['latency_b64'] / r['latency_b64']:.2f}x | {dense['latency_b1'] / r['latency_b1']:.2f}x |")
    summary = (f"{machine_line()}\n\n`{VIP_SPEC}` on the dense and the CaP (half MACs) vgg16 of the CaP table: "
               f"blocks added three per round (at most two rounds) by least sensitivity, one fine-tuning epoch per "
               f"round, then "
               f"{args.finetune} final fine-tuning epoch(s). Latency: whole model, {args.latency_threads} thread(s), "
               f"batch norm folded, median of {args.latency_runs} runs, the faster memory format.")
    return f"{summary}\n\n" + "\n".join(lines), rows


def csr_param_check(run_dir: Path) -> tuple[int, int]:
    """(parameters of the CSR layers, the formula's count for the same layers)."""
    model, _ = load_run(run_dir)
    real = formula = 0
    for module in model.modules():
        if isinstance(module, CSRConv2d):
            real += sum(p.numel() for p in module.parameters())
            formula += CSRConv2d.expected_params(module.in_channels, module.out_channels,
                                                 module.input_conv.kernel_size[0], module.steps,
                                                 module.input_conv.bias is not None)
    return real, formula


def csr_part(args: argparse.Namespace) -> tuple[str, list[dict]]:
    runs = []
    # The shared dense resnet20 last: cap_table.py may still be training it.
    for model, spec in sorted(CSR_ROWS, key=lambda row: row == ("resnet20", "dense")):
        width = args.width
        out = Path(args.out) / run_name(model, spec, width)
        if model == "resnet20" and spec == "dense":
            out = Path(args.cap_out) / f"resnet20-w{width}-dense"  # the CaP table's dense model, same schedule
        epochs = args.mobilenet_epochs if model == "mobilenetv2" else args.epochs
        subset = args.mobilenet_subset if model == "mobilenetv2" else args.train_subset
        config = TrainConfig(data="fashion-mnist", model=model, width=width, epochs=epochs,
                             train_subset=subset, seed=args.seed, threads=args.threads,
                             methods=[] if spec == "dense" else [spec], latency=False, out=str(out), lr=args.lr,
                             batch_size=128).validate()
        log(f"{model} w{width} {spec} ...")
        started = time.time()
        result = ensure_run(config, progress=False)
        log(f"    acc {result.test_acc:.4f} ({time.time() - started:.0f} s)")
        runs.append((model, spec, out, result))
    runs.sort(key=lambda run: CSR_ROWS.index(run[:2]))
    pin_threads(args.latency_threads)
    log("measuring latency ...")
    rows = []
    for model, spec, out, result in runs:
        real, formula = csr_param_check(out)
        rows.append({"model": model, "variant": spec, "run_dir": str(out), "test_acc": result.test_acc,
                     "params": result.params_nonzero, "macs": result.macs_effective,
                     "csr_params": real, "csr_formula": formula, **latency_row(out, args)})
    lines = ["| model | variant | test acc | params non-zero | CSR layer params / formula | MACs effective | "
             "latency b1 (ms) | latency b64 (ms) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        check = f"{r['csr_params']} / {r['csr_formula']}" if r["csr_formula"] else "-"
        lines.append(f"| {r['model']} (w{args.width}) | {r['variant']} | {100 * r['test_acc']:.2f}% | "
                     f"{r['params'] / 1e3:.1f} k | {check} | {r['macs'] / 1e6:.2f} M | {r['latency_b1']:.2f} | "
                     f"{r['latency_b64']:.1f} |")
    summary = (f"{machine_line()}\n\nAll trained from scratch, {args.epochs} epochs on a {args.train_subset}-image "
               f"subset of the training set (mobilenetv2: {args.mobilenet_epochs} epochs on {args.mobilenet_subset} "
               f"images; it trains about 3x slower), batch 128, SGD+Nesterov, one-cycle lr {args.lr}, seed {args.seed}; "
               f"accuracy on the full 10k test set. Latency: {args.latency_threads} thread(s), batch norm folded, "
               f"median of {args.latency_runs} runs, the faster memory format (pSConv runs as a masked dense "
               f"convolution here).")
    return f"{summary}\n\n" + "\n".join(lines), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["vip", "csr"], required=True)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (csr part)")
    parser.add_argument("--mobilenet-epochs", type=int, default=3,
                        help="training epochs of the mobilenetv2 rows (csr part; it trains about 3x slower)")
    parser.add_argument("--mobilenet-subset", type=int, default=10000, help="training images of the mobilenetv2 rows")
    parser.add_argument("--finetune", type=int, default=1, help="final fine-tuning epochs (vip part)")
    parser.add_argument("--train-subset", type=int, default=30000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for training")
    parser.add_argument("--latency-threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "vip_csr"))
    parser.add_argument("--cap-out", default=str(ROOT / "benchmarks" / "out" / "cap"))
    parser.add_argument("--wait-minutes", type=int, default=0,
                        help="vip part: wait this long for cap_table.py's CaP model (it may still be running)")
    args = parser.parse_args()
    pin_threads(args.threads)
    block, rows = vip_part(args) if args.part == "vip" else csr_part(args)
    print(block)
    publish(f"{args.part}_table", block, rows, f"docs/methods/{args.part}.md")


if __name__ == "__main__":
    main()
