"""`leancnn eval RUN [--attack SPEC]...`: clean and robust accuracy, recorded in result.json."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluate import evaluate_run
from ..runs import read_result
from .base import Command, print_json, register_command


@register_command
class Eval(Command):
    name = "eval"
    help = "accuracy, and with --attack robust accuracy"
    description = ("Evaluate a run on its dataset's test split; --attack adds accuracy under attack and records it "
                   "in result.json's `robust`.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run", help="run directory")
        parser.add_argument("--attack", action="append", default=[],
                            help="attack spec, repeatable: fgsm:eps=0.1, "
                                 "pgd:eps=0.1,steps=20,step=0.025,random_start=false,norm=linf, "
                                 "apgd:loss=ce|dlr,steps=100,restarts=1, apgd-t:targets=9, square:queries=5000, or "
                                 "autoattack:eps=0.1 (APGD-CE, APGD-T and Square in turn, the worst case per image; "
                                 "each component's figure is reported too)")
        parser.add_argument("--test-subset", type=int, default=None, help="evaluate on this many test images")
        parser.add_argument("--data-dir", default=None, help="dataset folder, if not the run's")
        parser.add_argument("--batch-size", type=int, default=250)
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        run_dir = Path(args.run)
        clean, robust = evaluate_run(run_dir, args.attack, test_subset=args.test_subset, data_dir=args.data_dir,
                                     batch_size=args.batch_size, progress=not args.no_progress)
        settings = read_result(run_dir).extra.get("robust_settings", {})
        if args.json:
            print_json({"run_dir": str(run_dir), "test_images": clean.count, "test_acc": clean.top1,
                        "test_top5": clean.top5, "robust": robust, "robust_settings": settings})
        else:
            print(f"{run_dir}: clean accuracy {100 * clean.top1:.2f}% on {clean.count} test images")
            for name, value in robust.items():
                print(f"  under {settings.get(name, name)}: {100 * value:.2f}%"
                      + (" (worst case per image)" if f"{name}/" in " ".join(robust) else ""))
        return 0
