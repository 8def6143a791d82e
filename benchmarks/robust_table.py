"""The robust-training methods side by side on Fashion-MNIST, clean, PGD-10 and worst-case
(AutoAttack-style) accuracy on the same test images:

- at eps 0.1: dense adversarial training (`dnr:density=1,prune_fraction=0`), DNR at density
  0.05 (both the DNR table's own runs: same specs, same run directory), and RSR at density 0.15;
- at eps 0.2 (a large budget): plain adversarial training against SAT's curriculum, P-SAT and
  H-SAT, the same loss and budget otherwise.

Every run is vgg11 width 0.25, 4 epochs on 10k images, beta = 0.5 clean + 0.5 PGD-3 loss, as
benchmarks/dnr_table.py trains; finished runs are skipped on a second start.

    nohup .venv/bin/python benchmarks/robust_table.py --threads 1 > robust.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import log, machine_line, pin_threads, publish, worst_case_figures
from dnr_table import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--train-steps", type=int, default=3, help="PGD iterations while training")
    parser.add_argument("--images", type=int, default=500, help="test images every attack runs on (default 500)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "dnr"),
                        help="run directory, shared with dnr_table.py (default benchmarks/out/dnr)")
    parser.add_argument("--quick", action="store_true", help="a toy run: nothing published")
    args = parser.parse_args()
    pin_threads(args.threads)
    small, large = 0.1, 0.2
    attack = f"attack=pgd,steps={args.train_steps}"
    plan = [
        (small, "dense adversarial", "dense-adv", f"dnr:density=1,prune_fraction=0,{attack},eps={small}"),
        (small, "DNR (density 0.05)", "dnr-irregular", f"dnr:density=0.05,{attack},eps={small}"),
        (small, "RSR (density 0.15)", "rsr", f"rsr:density=0.15,{attack},eps={small}"),
        (small, "RSR without noise (density 0.15)", "rsr-noise0", f"rsr:density=0.15,noise=0,{attack},eps={small}"),
        (large, "plain adversarial", "dense-adv-eps0.2", f"dnr:density=1,prune_fraction=0,{attack},eps={large}"),
        (large, "P-SAT", "sat-prob-eps0.2", f"sat:metric=prob,{attack},eps={large}"),
        (large, "H-SAT", "sat-hessian-eps0.2", f"sat:metric=hessian,{attack},eps={large}"),
    ]
    rows = []
    for eps, label, name, spec in plan:
        run_dir = train(args, name, spec)
        result = json.loads((run_dir / "result.json").read_text())
        log(f"attacking {label} at eps {eps} on {args.images} images ...")
        worst = worst_case_figures(run_dir, eps, args.images, log_to=log)
        entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        schedule = [e["sat_eps"] for e in entries if "sat_eps" in e]
        rows.append({"eps": eps, "label": label, "spec": spec, "run_dir": str(run_dir), "clean": result["test_acc"],
                     "params_nonzero": result["params_nonzero"], "params_total": result["params_total"],
                     "train_seconds": result["train_seconds"], "sat_eps_by_epoch": schedule, **worst})
    lines = ["| eps | model | spec | clean | PGD-10 | APGD-CE | + APGD-T | worst case (+ Square) | "
             "worst - PGD-10 | non-zero params | training (s) |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        schedule = f" (eps by epoch: {', '.join(f'{e:g}' for e in r['sat_eps_by_epoch'])})" if r["sat_eps_by_epoch"] else ""
        lines.append(
            f"| {r['eps']:g} | {r['label']}{schedule} | `{r['spec']}` | {100 * r['clean']:.2f}% | {100 * r['pgd']:.1f}% | "
            f"{100 * r['autoattack/apgd-ce']:.1f}% | {100 * r['autoattack/apgd-t']:.1f}% | "
            f"**{100 * r['autoattack']:.1f}%** | {100 * (r['autoattack'] - r['pgd']):+.1f} | "
            f"{r['params_nonzero'] / 1e3:.1f} k of {r['params_total'] / 1e3:.1f} k | {r['train_seconds']:.0f} |")
    summary = (f"{machine_line()}\n\n{args.model} (width {args.width}) on a {args.train_subset}-image subset of "
               f"Fashion-MNIST, {args.epochs} epochs, batch 128, SGD+Nesterov, one-cycle lr {args.lr}, seed {args.seed}; "
               f"every run trains on beta = 0.5 clean + 0.5 PGD-{args.train_steps} loss at the row's eps (SAT: its "
               f"curriculum up to it). Clean accuracy on the full 10k test set; every attack at the row's eps on the "
               f"same {args.images} test images: PGD-10, then AutoAttack's components in turn (50 APGD steps, 3 APGD-T "
               f"targets, 1000 Square queries), each column the accuracy left after it, the last the worst case per "
               f"image. Training wall time at {args.threads} thread(s). `.venv/bin/python benchmarks/robust_table.py "
               f"--threads 1`")
    block = f"{summary}\n\n" + "\n".join(lines)
    print(block)
    if not args.quick:
        publish("robust_table", block, rows, "docs/methods/robust_training.md")


if __name__ == "__main__":
    main()
