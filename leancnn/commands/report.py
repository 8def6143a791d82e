"""`leancnn report RUN...`: the bench report of chosen runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..bench import answer, print_table, write_outputs
from ..errors import LeancnnError
from ..measure.latency import latency_at
from ..report.budget import Budget
from ..runs import read_json
from .base import Command, register_command


@register_command
class Report(Command):
    name = "report"
    help = "HTML report, table and plots of chosen runs"
    description = "Build the bench report (table, Pareto plots, report.html) from run directories."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("runs", nargs="+", help="run directories")
        parser.add_argument("--out", default="report", help="output folder (default report/)")
        parser.add_argument("--budget", default=None, metavar="KEY=VALUE,...",
                            help="the deployment budget to answer for, as in `leancnn bench --budget`")
        parser.add_argument("--batch", type=int, default=1, help="the batch size a latency budget refers to: 1 or 64")

    def run(self, args: argparse.Namespace) -> int:
        return run_report_command(args)


def run_report_command(args: argparse.Namespace) -> int:
    budget = Budget.parse(args.budget, args.batch) if args.budget else None
    rows = []
    for run in args.runs:
        run_dir = Path(run)
        result = read_json(run_dir / "result.json")
        latency = result.get("latency_ms") or {}
        b1, b64 = latency_at(latency, 1), latency_at(latency, 64)
        if b1 is None or b64 is None:
            raise LeancnnError(f"{run_dir}: result.json has no batch-1 and batch-64 latency; train with --latency")
        label = ", ".join(result["methods"]) or "dense"
        rows.append({"label": label, "run_dir": str(run_dir),
                     **result, "latency_b1_ms": b1, "latency_b64_ms": b64})
    out = Path(args.out)
    title = "leancnn report"
    files = write_outputs(rows, out, title, [f"{len(rows)} runs: " + ", ".join(args.runs)], budget)
    print_table(rows, title)
    print(f"report: {files['report']}")
    recommendation = answer(rows, budget)
    if recommendation:
        print("\n".join(recommendation.lines()))
    return 0
