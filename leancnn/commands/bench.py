"""`leancnn bench`: the main job."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..bench import (QUICK, BenchPlan, default_candidates, describe, fit_time, print_table, run_bench,
                     write_outputs)
from ..errors import LeancnnError
from ..report.budget import BATCHES, Budget
from ..data import DATASETS, load_dataset
from ..methods import parse_method
from ..models import check_model_name
from ..train.distributed import launched_by_torchrun
from .base import Command, print_json, register_command


@register_command
class Bench(Command):
    name = "bench"
    help = "the main job: compare methods on one dataset (table, Pareto plots, report)"
    description = ("Train a dense baseline and every registered method at a few strengths, measure them the same "
                   "way, and write OUT/results.{md,csv}, OUT/pareto_*.png and OUT/report.html. Finished candidates "
                   "are skipped on a second run.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", default="fashion-mnist", help="dataset (default fashion-mnist)")
        parser.add_argument("--data-dir", default=None)
        parser.add_argument("--model", default=None, help="model (default resnet20)")
        parser.add_argument("--width", type=float, default=None, help="width multiplier (default 1.0; --quick: 0.5)")
        parser.add_argument("--methods", nargs="+", default=None,
                            help="methods or specs to compare (default: every registered method at its bench "
                                 "strengths)")
        parser.add_argument("--epochs", type=int, default=None, help="epochs per candidate (default 5; --quick: 4)")
        parser.add_argument("--train-subset", type=int, default=None,
                            help="training images (default all; --quick: 10000)")
        parser.add_argument("--test-subset", type=int, default=None, help="test images (default all; --quick: 2000)")
        parser.add_argument("--budget", default=None, metavar="KEY=VALUE,...",
                            help="the deployment budget to answer for: latency_ms (at --batch), storage_kib, "
                                 "macs_m (millions of effective MACs), e.g. latency_ms=5 or "
                                 "storage_kib=200,latency_ms=20; the report names the most accurate candidate "
                                 "within it (default: faster than the dense model at batch 1)")
        parser.add_argument("--batch", type=int, default=1,
                            help="the batch size a latency budget refers to: 1 or 64 (default 1)")
        parser.add_argument("--max-minutes", type=float, default=None,
                            help="cut epochs, then training images, so the whole bench fits in this many minutes; "
                                 "says what it cut")
        parser.add_argument("--attack", action="append", default=[],
                            help="also measure accuracy under this attack (repeatable)")
        parser.add_argument("--quick", action="store_true",
                            help="a small real bench for a first look (what `make demo` runs): resnet20 width 0.5, "
                                 "4 epochs on 10000 images, dense and each method at its first strength (about 4 "
                                 "minutes on 2 cores); it says how far from a full bench it is")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--threads", type=int, default=0,
                            help="CPU threads for training and latency (0 = all)")
        parser.add_argument("--nproc", type=int, default=1,
                            help="train (and fine-tune) each candidate data-parallel on this many processes, each "
                                 "under torchrun as `leancnn train --nproc` does (default 1: in this process)")
        parser.add_argument("--out", default="bench", help="output folder (default bench/)")
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        DATASETS.get(args.data)
        budget = Budget.parse(args.budget, args.batch) if args.budget else None   # bad budgets fail before training
        if budget is None and args.batch not in BATCHES:
            raise LeancnnError(f"--batch: candidates are timed at batch {' and '.join(map(str, BATCHES))}, got {args.batch}")
        if args.nproc < 1:
            raise LeancnnError(f"--nproc must be >= 1 (processes on this machine), got {args.nproc}")
        if launched_by_torchrun():
            raise LeancnnError("leancnn bench runs in one process and starts each candidate's training under "
                               "torchrun itself: use `leancnn bench --nproc N`, not torchrun")
        quick = QUICK if args.quick else {}
        model = args.model or quick.get("model", "resnet20")
        check_model_name(model)
        candidates = default_candidates(args.methods, quick=args.quick)
        for candidate in candidates:
            for spec in candidate.methods:
                parse_method(spec)  # bad specs fail before anything is trained
        plan = BenchPlan(quick=args.quick, data=args.data, model=model, width=args.width or quick.get("width", 1.0),
                         epochs=args.epochs or quick.get("epochs", 5),
                         train_subset=args.train_subset or quick.get("train_subset"),
                         test_subset=args.test_subset or quick.get("test_subset"), candidates=candidates,
                         seed=args.seed, data_dir=args.data_dir, threads=args.threads, profile_batch=args.batch,
                         nproc=args.nproc)
        if args.max_minutes:
            train_size = len(load_dataset(args.data, args.data_dir).train_labels)
            fit_time(plan, args.max_minutes, train_size)
        out = Path(args.out)
        notes = describe(plan)
        for note in notes:
            print(note)
        rows = run_bench(plan, out, progress=not args.no_progress, attacks=args.attack)
        title = f"leancnn bench: {plan.model} on {plan.data}"
        written = write_outputs(rows, out, title, notes, budget)
        recommendation = written.recommendation
        if args.json:
            print_json({"rows": rows, "recommendation": recommendation.as_dict() if recommendation else None})
            return 0
        print_table(rows, title)
        print(f"report: {written.report}\ntable: {written.markdown} and {written.csv}\n"
              f"plots: {', '.join(str(p) for p in written.plots.values())}")
        if recommendation:
            print("\n" + "\n".join(recommendation.lines()))
        return 0
