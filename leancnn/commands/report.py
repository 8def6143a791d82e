"""`leancnn report RUN...`: the bench report of chosen runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..bench import measure_candidates, print_table, write_outputs
from ..report.budget import Budget
from ..runs import read_result
from .base import Command, register_command


@register_command
class Report(Command):
    name = "report"
    help = "HTML report, table and plots of chosen runs"
    description = ("Build the bench report (the answer for a budget, table, plots, report.html) from run directories; "
                   "their deployed models are timed here, in turns, as the bench does.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("runs", nargs="+", help="run directories")
        parser.add_argument("--out", default="report", help="output folder (default report/)")
        parser.add_argument("--budget", default=None, metavar="KEY=VALUE,...",
                            help="the deployment budget to answer for, as in `leancnn bench --budget`")
        parser.add_argument("--batch", type=int, default=1, help="the batch size a latency budget refers to: 1 or 64")
        parser.add_argument("--threads", type=int, default=0, help="CPU threads to time with (0 = all)")

    def run(self, args: argparse.Namespace) -> int:
        budget = Budget.parse(args.budget, args.batch) if args.budget else None
        rows = []
        for run in args.runs:
            run_dir = Path(run)
            result = read_result(run_dir)
            rows.append({"label": ", ".join(result.methods or []) or "dense", "run_dir": str(run_dir), **result.as_dict()})
        print(f"timing the {len(rows)} deployed models in turns, batch 1 and 64 ...", flush=True)
        measure_candidates(rows, args.threads or None, args.batch)   # all the same way, as the bench does
        out = Path(args.out)
        title = "leancnn report"
        written = write_outputs(rows, out, title, [f"{len(rows)} runs: " + ", ".join(args.runs)], budget)
        print_table(rows, title)
        print(f"report: {written.report}")
        if written.recommendation:
            print("\n".join(written.recommendation.lines()))
        return 0
