"""Robust accuracy of one run under PGD and under AutoAttack's attacks, each
cross-checked against an independent implementation (torchattacks), with the
gradient-masking checks: accuracy must not rise with eps, and the black-box
Square must not beat the white-box APGD by much.

By default the run is an adversarially trained resnet20 (the `dnr:density=1`
method is plain PGD adversarial training):

    .venv/bin/python -m leancnn.cli train --model resnet20 --width 0.5 \\
        --method "dnr:density=1,beta=0.5,steps=3,eval_images=0" --epochs 3 --train-subset 15000 \\
        --threads 1 --out benchmarks/out/adv_r20
    .venv/bin/python benchmarks/autoattack_check.py [--run DIR] [--images 500]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import machine_line, publish

from leancnn.data import load_dataset
from leancnn.measure import parse_attack, robust_accuracies
from leancnn.runs import load_run, read_result

ROOT = Path(__file__).resolve().parents[1]


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(ROOT / "benchmarks" / "out" / "adv_r20"))
    parser.add_argument("--images", type=int, default=500, help="first test images attacked (default 500)")
    parser.add_argument("--eps", type=float, default=None, help="Linf budget (default: the dataset's)")
    parser.add_argument("--steps", type=int, default=50, help="APGD iterations (default 50; standard 100)")
    parser.add_argument("--targets", type=int, default=3, help="APGD-T target classes (default 3; standard 9)")
    parser.add_argument("--queries", type=int, default=1000, help="Square queries (default 1000; standard 5000)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a toy run (50 images, few steps), nothing published")
    args = parser.parse_args()
    if args.quick:
        args.images, args.steps, args.targets, args.queries = 50, 5, 2, 50
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    model, _ = load_run(run)
    model.eval()
    result = read_result(run)
    data = load_dataset(result.dataset or "fashion-mnist")
    eps = args.eps if args.eps is not None else data.attack_eps
    images = data.test_images[:args.images].float() / 255
    labels = data.test_labels[:args.images]
    with torch.no_grad():
        clean = (model(images).argmax(1) == labels).float().mean().item()

    rows: list[tuple[str, str, float, float, float | None]] = []   # attack, spec, ours, seconds, torchattacks

    def ours(spec: str) -> tuple[dict[str, float], float]:
        return timed(lambda: robust_accuracies(model, images, labels, parse_attack(spec), progress=False))

    try:
        import torchattacks
    except ImportError:
        torchattacks = None

    def theirs(make) -> float | None:
        if torchattacks is None:
            return None
        attack = make(torchattacks)
        adversarial = attack(images, labels)
        with torch.no_grad():
            return (model(adversarial).argmax(1) == labels).float().mean().item()

    references = {
        "pgd": lambda ta: ta.PGD(model, eps=eps, alpha=eps / 4, steps=10, random_start=True),
        "apgd": lambda ta: ta.APGD(model, eps=eps, steps=args.steps, loss="ce", n_restarts=1, seed=0),
        "apgd-t": lambda ta: _targeted(ta.APGDT(model, eps=eps, steps=args.steps, n_restarts=1, n_classes=10, seed=0),
                                       args.targets),
        "square": lambda ta: ta.Square(model, eps=eps, n_queries=args.queries, n_restarts=1, seed=0),
    }
    specs = {"pgd": f"pgd:eps={eps},steps=10", "apgd": f"apgd:eps={eps},steps={args.steps},loss=ce",
             "apgd-t": f"apgd-t:eps={eps},steps={args.steps},targets={args.targets}",
             "square": f"square:eps={eps},queries={args.queries}"}
    for name, spec in specs.items():
        figures, seconds = ours(spec)
        rows.append((name, spec, figures[name], seconds, theirs(references[name])))
        print(rows[-1], flush=True)
    auto_spec = f"autoattack:eps={eps},steps={args.steps},targets={args.targets},queries={args.queries}"
    auto, auto_seconds = ours(auto_spec)
    print(auto, flush=True)
    sweep = []
    for scale in (0.25, 0.5, 1.0, 2.0):
        figures, _ = ours(f"apgd:eps={eps * scale:g},steps={args.steps}")
        sweep.append((eps * scale, figures["apgd"]))

    lines = [machine_line(), "", f"Run: `{run.relative_to(ROOT) if run.is_relative_to(ROOT) else run}` "
             f"({result.model}, {', '.join(result.methods or []) or 'no method'}, test accuracy "
             f"{100 * (result.test_acc or 0):.2f}%); "
             f"first {args.images} test images, clean accuracy {100 * clean:.2f}%, Linf eps {eps:g}.", "",
             "| attack | spec | robust accuracy | torchattacks, same settings | difference | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, spec, value, seconds, reference in rows:
        other = "-" if reference is None else f"{100 * reference:.2f}%"
        diff = "-" if reference is None else f"{100 * (value - reference):+.2f}"
        lines.append(f"| {name} | `{spec}` | {100 * value:.2f}% | {other} | {diff} | {seconds:.0f} |")
    lines.append(f"| **autoattack** (worst case per image) | `{auto_spec}` | **{100 * auto['autoattack']:.2f}%** | | | "
                 f"{auto_seconds:.0f} |")
    lines += ["", "AutoAttack's robust accuracy after each component, in turn: "
              + ", ".join(f"{k.split('/')[1]} {100 * v:.2f}%" for k, v in auto.items() if "/" in k) + ".", "",
              "Masking checks: APGD-CE against eps: "
              + ", ".join(f"{e:g}: {100 * v:.2f}%" for e, v in sweep)
              + (" (never rises)" if all(b[1] <= a[1] for a, b in zip(sweep, sweep[1:])) else " (**rises**)")
              + f"; Square {100 * rows[3][2]:.2f}% against APGD-CE {100 * rows[1][2]:.2f}% "
              + ("(the black-box attack does not beat the white-box one)" if rows[3][2] >= rows[1][2] - 0.01
                 else "(**the black-box attack beats the white-box one: gradients may be masked**)") + "."]
    block = "\n".join(lines)
    print(block)
    if not args.quick:
        publish("autoattack_check", block, document="docs/robustness.md",
                data={"clean": clean, "rows": rows, "autoattack": auto, "sweep": sweep, "eps": eps})


def _targeted(attack, targets: int):
    attack.n_target_classes = targets
    return attack


if __name__ == "__main__":
    main()
