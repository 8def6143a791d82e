"""`leancnn train`: a model, optionally with methods, into a run directory."""
from __future__ import annotations

import argparse
from typing import Any

from ..experiment import train_run
from ..train.distributed import current_ranks, launch, without_flag
from ..train.trainer import resolve_device
from ..report.table import print_result
from .base import Command, add_config_flags, config_from_args, print_json, register_command


@register_command
class Train(Command):
    name = "train"
    help = "train a model (optionally with methods) into a run directory"
    description = ("Train a model into a run directory (config.toml, model.safetensors, model.json, result.json, "
                   "log.jsonl). Flags override --config.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", help="TOML file of config keys (flags override it)")
        add_config_flags(parser)
        parser.add_argument("--resume", action="store_true",
                            help="continue the unfinished run in --out from its last epoch")
        parser.add_argument("--json", action="store_true", help="print result.json's figures as JSON")
        parser.add_argument("--nproc", type=int, default=None,
                            help="data-parallel on this many processes: runs this command under `torchrun "
                                 "--standalone --nproc-per-node N` (gloo on CPU); the global batch and lr stay "
                                 "as configured, each process gets cores/N threads")
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(self, args: argparse.Namespace) -> int:
        config = config_from_args(args)
        if args.nproc is not None and args.nproc != 1:
            return launch(args.nproc, without_flag(args.argv, "--nproc"), config.backend, resolve_device(config.device))

        def report_epoch(entry: dict[str, Any]) -> None:
            if not args.json and current_ranks().main:
                print(f"epoch {entry['epoch']}/{config.epochs}: train loss {entry['train_loss']:.4f}, "
                      f"test acc {100 * entry['test_acc']:.2f}%, {entry['images_per_second']:.0f} img/s, "
                      f"{entry['seconds']:.1f} s", flush=True)

        outcome = train_run(config, resume=args.resume, progress=not args.no_progress, on_epoch=report_epoch)
        if outcome.result is None:   # a rank other than 0 of a distributed run: rank 0 reports
            return 0
        if args.json:
            print_json({"run_dir": str(outcome.run_dir), **outcome.result.as_dict()})
        else:
            print_result(outcome.run_dir, outcome.result)
        return 0
