"""`leancnn runs`: the runs recorded in ROOT/runs.db."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..report.table import print_runs
from ..runs import list_runs
from .base import Command, print_json, register_command


@register_command
class Runs(Command):
    name = "runs"
    help = "list recorded runs"
    description = "List the runs recorded in ROOT/runs.db."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--root", default="runs", help="output root holding runs.db (default: runs)")
        parser.add_argument("--data", help="only runs on this dataset")
        parser.add_argument("--model", help="only runs of this model")
        parser.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        runs = list_runs(Path(args.root), dataset=args.data, model=args.model)
        if args.json:
            print_json(runs)
        else:
            print_runs(runs, Path(args.root))
        return 0
