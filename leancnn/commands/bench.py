"""`leancnn bench` and `leancnn report`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..bench import QUICK, BenchPlan, default_candidates, describe, fit_budget, print_table, run_bench, write_outputs
from ..errors import LeancnnError


def run_bench_command(args: argparse.Namespace) -> int:
    from ..data import DATASETS, load_dataset
    from ..methods import parse_method
    from ..models import MODELS

    DATASETS.get(args.data)
    quick = QUICK if args.quick else {}
    model = args.model or quick.get("model", "resnet20")
    MODELS.get(model)
    candidates = default_candidates(args.methods, quick=args.quick)
    for candidate in candidates:
        for spec in candidate.methods:
            parse_method(spec)  # bad specs fail before anything is trained
    plan = BenchPlan(data=args.data, model=model, width=args.width or quick.get("width", 1.0),
                     epochs=args.epochs or quick.get("epochs", 5),
                     train_subset=args.train_subset or quick.get("train_subset"),
                     test_subset=args.test_subset or quick.get("test_subset"), candidates=candidates,
                     seed=args.seed, data_dir=args.data_dir, threads=args.threads)
    if args.budget_minutes:
        train_size = len(load_dataset(args.data, args.data_dir).train_labels)
        fit_budget(plan, args.budget_minutes, train_size)
    out = Path(args.out)
    notes = describe(plan)
    for note in notes:
        print(note)
    rows = run_bench(plan, out, progress=not args.no_progress, attacks=args.attack)
    title = f"leancnn bench: {plan.model} on {plan.data}"
    files = write_outputs(rows, out, title, notes)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print_table(rows, title)
        print(f"report: {files['report']}\ntable: {files['markdown']} and {files['csv']}\n"
              f"plots: {', '.join(str(p) for k, p in files.items() if k.startswith('plot_'))}")
    return 0


def run_report_command(args: argparse.Namespace) -> int:
    from ..runs import read_json

    rows = []
    for run in args.runs:
        run_dir = Path(run)
        result = read_json(run_dir / "result.json")
        latency = result.get("latency_ms") or {}
        b1 = next((v for k, v in latency.items() if k.startswith("batch1_")), None)
        b64 = next((v for k, v in latency.items() if k.startswith("batch64_")), None)
        if b1 is None or b64 is None:
            raise LeancnnError(f"{run_dir}: result.json has no batch-1 and batch-64 latency; train with --latency")
        label = ", ".join(result["methods"]) or "dense"
        rows.append({"label": label, "run_dir": str(run_dir),
                     **result, "latency_b1_ms": b1, "latency_b64_ms": b64})
    out = Path(args.out)
    title = "leancnn report"
    files = write_outputs(rows, out, title, [f"{len(rows)} runs: " + ", ".join(args.runs)])
    print_table(rows, title)
    print(f"report: {files['report']}")
    return 0
