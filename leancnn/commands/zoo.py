"""`leancnn zoo build` and `leancnn zoo show`."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from ..errors import LeancnnError
from ..measure.latency import parse_quantile
from ..report.plots import plot_zoo_front
from ..report.table import console
from ..zoo.build import build_zoo, load_manifest
from ..zoo.family import train_family
from .base import Command, register_command, register_group

register_group("zoo", "a model zoo on the accuracy/time front, for the deadline-aware runtime",
               "Build or show a zoo: the runs' models re-timed at batch 1 on this machine, only those on the "
               "accuracy/time front, thinned so accuracy rises with time.")


@register_command
class ZooBuild(Command):
    name = "zoo build"
    help = "runs -> zoo directory with manifest.json"
    description = "Runs -> a zoo directory (manifest.json, models/, front.png)."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--from", dest="sources", nargs="+", metavar="SOURCE",
                            help="run directories, bench directories, or runs.db files / their directories")
        parser.add_argument("--family", metavar="MODELS",
                            help="also train a generated family first: these models (depths, e.g. "
                                 "'resnet20,resnet32,resnet56') at each of --widths, into OUT/family/")
        parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5],
                            help="family widths (default 0.25 0.5)")
        parser.add_argument("--data", default="fashion-mnist", help="family dataset (default fashion-mnist)")
        parser.add_argument("--epochs", type=int, default=5, help="family training epochs (default 5)")
        parser.add_argument("--train-subset", type=int, default=None, help="family training images (default all)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bars while training the family")
        parser.add_argument("--out", required=True, help="zoo directory to write")
        parser.add_argument("--quantile", default="p90",
                            help="latency the selector plans with: median or p90, written as on `leancnn serve` "
                                 "(median, pNN or a fraction; default p90)")
        parser.add_argument("--epsilon", type=float, default=0.002,
                            help="smallest accuracy gain (fraction) a slower model must bring (default 0.002)")
        parser.add_argument("--runs", type=int, default=50, help="timed batch-1 runs per model (default 50)")
        parser.add_argument("--threads", type=int, default=1, help="threads to time (and serve) with (default 1)")

    def run(self, args: argparse.Namespace) -> int:
        out = Path(args.out)
        measured = {0.5: "median", 0.9: "p90"}   # the quantiles a zoo records per model
        quantile = measured.get(parse_quantile(args.quantile, "--quantile"))
        if quantile is None:
            raise LeancnnError(f"--quantile: a zoo records the median and p90 of each model, got {args.quantile!r}")
        if not args.sources and not args.family:
            raise LeancnnError("zoo build needs runs: --from SOURCE... and/or --family MODELS")
        sources = list(args.sources or [])
        if args.family:
            models = [m.strip() for m in args.family.split(",") if m.strip()]
            sources += train_family(models, args.widths, out, data=args.data, epochs=args.epochs,
                                    train_subset=args.train_subset, threads=args.threads,
                                    progress=not args.no_progress)
        print(f"measuring batch-1 latency of each run's deployed model ({args.runs} runs, {args.threads} "
              f"thread(s)) ...")
        manifest = build_zoo(sources, out, quantile=quantile, epsilon=args.epsilon, runs=args.runs,
                             threads=args.threads)
        show(out, manifest)
        return 0


@register_command
class ZooShow(Command):
    name = "zoo show"
    help = "print a zoo's table and plot its front"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("zoo", help="zoo directory")

    def run(self, args: argparse.Namespace) -> int:
        show(Path(args.zoo), load_manifest(Path(args.zoo)))
        return 0


def show(zoo: Path, manifest: dict) -> None:
    table = Table(title=f"zoo {zoo}: {len(manifest['models'])} models on the front ({manifest['quantile']} latency, "
                        f"epsilon {manifest['epsilon']})")
    for column in ("model", "accuracy", "median ms", "p90 ms", "expected ms", "MACs eff"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for entry in manifest["models"]:
        table.add_row(entry["name"], f"{100 * entry['accuracy']:.2f}%", f"{entry['latency_median_ms']:.3f}",
                      f"{entry['latency_p90_ms']:.3f}", f"{entry['expected_ms']:.3f}",
                      f"{entry['macs_effective'] / 1e6:.2f}M")
    console().print(table)
    for entry in manifest.get("dropped", []):
        print(f"dropped {entry['name']}: {entry['reason']}")
    print(f"plot: {plot_zoo_front(manifest, zoo / 'front.png')}")
