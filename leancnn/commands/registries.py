"""`leancnn models`, `leancnn datasets`, `leancnn methods`: what the registries hold."""
from __future__ import annotations

import argparse
import dataclasses

from ..data import DATASETS, load_dataset
from ..methods import METHODS
from ..models import MODELS
from .base import Command, register_command


@register_command
class Models(Command):
    name = "models"
    help = "list registered models"

    def run(self, args: argparse.Namespace) -> int:
        print("\n".join(MODELS.names()))
        return 0


@register_command
class Datasets(Command):
    name = "datasets"
    help = "list registered datasets, or check that one is available"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--check", metavar="NAME", help="load dataset NAME and say whether it is there; exit 1 "
                                                             "with how to get it if not (what `make setup` runs)")
        parser.add_argument("--data-dir", default=None, help="folder holding the dataset files, for --check")

    def run(self, args: argparse.Namespace) -> int:
        if args.check:
            dataset = load_dataset(args.check, args.data_dir)  # DataError: one line naming where it looked
            print(f"{args.check}: found ({len(dataset.train_labels)} training and {len(dataset.test_labels)} "
                  f"test images)")
            return 0
        for name in DATASETS.names():
            doc = (DATASETS.get(name).__doc__ or "").strip().splitlines()[0]
            print(f"{name:15s} {doc}")
        return 0


@register_command
class Methods(Command):
    name = "methods"
    help = "list registered methods and their options"

    def run(self, args: argparse.Namespace) -> int:
        for name in METHODS.names():
            cls = METHODS.get(name)
            fields = ", ".join(f.name for f in dataclasses.fields(cls.Options))
            aliases = f"  aliases: {', '.join(cls.aliases)}" if cls.aliases else ""
            print(f"{name:10s} options: {fields or '-'}{aliases}")
        return 0
