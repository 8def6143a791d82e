"""`leancnn compress RUN --method SPEC`: post-training methods on a trained run, into a new run."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..compress import compress_run
from ..config import load_config
from ..train.distributed import launch, without_flag
from ..train.trainer import resolve_device
from ..report.table import print_result
from .base import Command, print_json, register_command


@register_command
class Compress(Command):
    name = "compress"
    help = "apply post-training methods to a trained run, fine-tune, new run"
    description = ("Apply post-training methods (cap, l1prune, vip, ...) to a trained run, fine-tune, and write a new "
                   "run directory. Methods that only analyse (vip:sensitivity) print their table and write nothing.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run", help="trained run directory")
        parser.add_argument("--method", dest="methods", action="append", default=[], required=True,
                            help="method spec, repeatable, e.g. vip:sensitivity or vip:layers=auto,max_drop=0.01")
        parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs after the methods (default 1)")
        parser.add_argument("--lr", type=float, default=None, help="fine-tuning peak lr (default: the run's lr / 10)")
        parser.add_argument("--out", default=None, help="new run directory")
        parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--nproc", type=int, default=None,
                            help="fine-tune data-parallel on this many processes (runs this command under torchrun, "
                                 "as `leancnn train --nproc` does)")
        parser.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        out = Path(args.out) if args.out else None
        if args.nproc is not None and args.nproc != 1:
            config = load_config(Path(args.run) / "config.toml")
            return launch(args.nproc, without_flag(args.argv, "--nproc"), config.backend, resolve_device(config.device))
        outcome = compress_run(Path(args.run), args.methods, epochs=args.epochs, out=out, lr=args.lr,
                               progress=not args.no_progress, latency=not args.no_latency)
        if outcome is None or outcome.result is None:   # only reported, or a rank other than 0
            return 0
        result = outcome.result
        if args.json:
            print_json({"run_dir": str(out), **result.as_dict()})
            return 0
        notes = result.extra["compress"]
        print(f"test accuracy: {100 * notes['test_acc_original']:.2f}% original, "
              f"{100 * notes['test_acc_before_finetune']:.2f}% compressed, {100 * result.test_acc:.2f}% "
              f"after {args.epochs} fine-tuning epoch(s)")
        print_result(out, result)
        return 0
