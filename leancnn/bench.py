"""`leancnn bench`: train a dense baseline and every registered method at a few
strengths on one dataset, measure them all the same way, and answer with a
table, Pareto plots and a self-contained HTML report.

Every candidate is an ordinary run under OUT/runs/ (recorded in OUT/runs/runs.db);
a finished one is skipped and an unfinished one resumed, so a killed bench
continues where it stopped. A candidate that fails is reported with its error
and does not stop the others.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from .compress import compress_run
from .config import TrainConfig, to_toml
from .data import load_dataset
from .evaluate import attack_run
from .experiment import ensure_run
from .errors import LeancnnError, first_line
from .io import slug, write_json, write_text
from .deploy import deploy, deploy_plan
from .measure.latency import cpu_model, fastest_format_latency, layer_times
from .methods import METHODS, parse_method
from .models import create_model
from .measure.onnx_latency import onnx_available, onnx_session, session_latency
from .report.budget import DENSE_LABEL, DENSE_ONNX_LABEL, Budget, Recommendation, default_budget, dense_baseline_ms, recommend
from .report.html import CandidateDetail, write_report
from .measure.pareto import pareto_front
from .report.table import console, fmt_bytes, fmt_count, fmt_pct
from .report.plots import plot_front
from .runs import load_run, read_result, save_result
from .train.distributed import launch
from .train.trainer import resolve_device

# --quick (what `make demo` runs): about 4 minutes on 2 idle cores, real training on real data. Fewer
# candidates (each method's first strength, methods with in_quick_bench) at enough epochs that the
# accuracies rank as a full bench's do: at 2 epochs on 8000 images DNR trailed dense by 14 points,
# at 4 on 10000 by 7, as in a 6-epoch run on 30000 images by 5.5 (dense 90.4%, dnr 84.9%).
QUICK = {"model": "resnet20", "width": 0.5, "epochs": 4, "train_subset": 10000, "test_subset": 2000}
FULL_EPOCHS = 5   # a full bench's default epochs, on the whole training set


@dataclass
class Candidate:
    label: str
    methods: list[str]

    def post_training(self) -> bool:
        """A candidate of post-training methods is the dense candidate's run compressed and
        fine-tuned (`leancnn compress`), not a run trained from scratch."""
        return any(parse_method(spec).post_training for spec in self.methods)


@dataclass
class BenchPlan:
    data: str
    model: str
    width: float
    epochs: int
    train_subset: int | None
    test_subset: int | None
    candidates: list[Candidate]
    seed: int = 0
    data_dir: str | None = None
    threads: int = 0  # 0 = torch's default (all cores)
    profile_batch: int = 1   # the batch size of each candidate's per-layer times (where the time goes)
    cuts: list[str] = field(default_factory=list)
    quick: bool = False      # --quick: the notes say how far from a full bench it is
    finetune_epochs: int = 1  # post-training candidates: epochs of fine-tuning after compressing dense
    nproc: int = 1            # > 1: each candidate trains (or fine-tunes) data-parallel under torchrun


def default_candidates(method_names: list[str] | None = None, quick: bool = False) -> list[Candidate]:
    """Dense plus each method at its bench strengths (with `quick`: only the first, and only
    methods that take part in the quick bench)."""
    candidates = [Candidate("dense", [])]
    names = method_names if method_names else [n for n in METHODS.names() if METHODS.get(n).bench_specs]
    for name in names:
        if ":" in name or name not in METHODS:  # an explicit spec or a paper alias
            candidates.append(Candidate(name, [name]))
            continue
        cls = METHODS.get(name)
        if quick and not cls.in_quick_bench:
            continue
        specs = (cls.bench_specs or [name])[:1 if quick else None]
        candidates += [Candidate(spec if spec != name else name, [spec]) for spec in specs]
    # Post-training candidates compress the dense run: they come after every trained one.
    return sorted(candidates, key=Candidate.post_training)


def _seconds_per_image(plan: BenchPlan) -> float:
    """Training seconds per image of the dense model, from a short probe."""
    dataset = load_dataset(plan.data, plan.data_dir)
    model = create_model(plan.model, num_classes=dataset.num_classes, in_channels=dataset.in_channels,
                         width=plan.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(64, *dataset.input_shape)
    y = torch.randint(0, dataset.num_classes, (64,))
    timings = []
    for _ in range(4):
        started = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        timings.append(time.perf_counter() - started)
    return min(timings[1:]) / 64


def fit_time(plan: BenchPlan, max_minutes: float, train_size: int) -> BenchPlan:
    """Cut epochs, then the training subset, so all candidates train within `max_minutes`.
    Evaluation and latency are given 25% of the time."""
    per_image = _seconds_per_image(plan) * 1.15  # masks and hooks cost a little more than the dense probe
    # A post-training candidate costs its fine-tuning epochs, a trained one all epochs.
    trained = sum(not c.post_training() for c in plan.candidates)
    tuned = len(plan.candidates) - trained
    shares = trained + tuned * plan.finetune_epochs / max(plan.epochs, 1)
    available = max_minutes * 60 * 0.75 / max(shares, 1)
    images = plan.train_subset or train_size
    if plan.epochs * images * per_image <= available:
        return plan
    epochs = max(1, int(available // (images * per_image)))
    if epochs < plan.epochs:
        plan.cuts.append(f"epochs {plan.epochs} -> {epochs}")
        plan.epochs = epochs
    if epochs * images * per_image > available:
        subset = max(1000, int(available / (epochs * per_image)))
        plan.cuts.append(f"training images {images} -> {subset}")
        plan.train_subset = subset
    return plan


def run_candidate(plan: BenchPlan, candidate: Candidate, out: Path, progress: bool) -> dict[str, Any]:
    run_dir = out / "runs" / slug(candidate.label)
    if candidate.post_training():
        dense_dir = out / "runs" / slug(DENSE_LABEL)
        if not (dense_dir / "result.json").is_file():
            raise LeancnnError(f"{candidate.label} compresses the dense run, which did not finish")
        if not (run_dir / "result.json").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)   # a killed compress starts again
            if plan.nproc > 1:
                methods = [part for spec in candidate.methods for part in ("--method", spec)]
                launched(plan, candidate, ["compress", str(dense_dir), *methods, "--epochs", str(plan.finetune_epochs),
                                           "--out", str(run_dir), "--no-latency", "--no-progress"])
            else:
                compress_run(dense_dir, candidate.methods, epochs=plan.finetune_epochs, out=run_dir,
                             progress=progress, latency=False)
        return {"label": candidate.label, "run_dir": str(run_dir), **read_result(run_dir).as_dict()}
    config = TrainConfig(data=plan.data, data_dir=plan.data_dir, model=plan.model, width=plan.width,
                         methods=candidate.methods, epochs=plan.epochs, train_subset=plan.train_subset,
                         test_subset=plan.test_subset, seed=plan.seed, threads=plan.threads, latency=False,
                         out=str(run_dir)).validate()
    if plan.nproc > 1 and not (run_dir / "result.json").is_file():
        launch_config = out / "runs" / f"{run_dir.name}.launch.toml"
        write_text(launch_config, to_toml(config))
        resume = ["--resume"] if (run_dir / "checkpoint").is_dir() else []
        launched(plan, candidate, ["train", "--config", str(launch_config), "--no-progress", *resume])
    result = ensure_run(config, progress=progress)
    return {"label": candidate.label, "run_dir": str(run_dir), **result.as_dict()}


def launched(plan: BenchPlan, candidate: Candidate, argv: list[str]) -> None:
    """`leancnn ARGV` on plan.nproc processes (torchrun); a failure is the candidate's."""
    code = launch(plan.nproc, argv, "auto", resolve_device("auto"))
    if code != 0:
        raise LeancnnError(f"{candidate.label}: `leancnn {argv[0]}` on {plan.nproc} processes exited with {code}")


LATENCY_ROUNDS = 5   # rounds of timing that take turns between the candidates
LATENCY_RUNS = {1: 10, 64: 3}   # timed runs per candidate, batch size and round


def settled_plan(plan: list[dict] | None) -> list[dict]:
    """What each layer runs and why; whether a plan came from the cache is not a change."""
    return [{k: v for k, v in entry.items() if k != "cached"} for entry in plan or []]


def measure_candidates(rows: list[dict[str, Any]], threads: int | None = None, profile_batch: int = 1) -> None:
    """Latency at batch 1 and 64 of every finished candidate's deployed model (batch norm folded,
    sparse layers on their measured plans), the faster memory format: timed in rounds that take
    turns between the candidates, the median of the rounds, so that a noisy moment of a shared
    machine lands on every candidate and not on one. Then each one's deploy plan and layer times.
    With the onnx extra, the dense model in ONNX Runtime is timed in the same rounds and added as
    the row DENSE_ONNX_LABEL after dense's: what a user who ships the dense model could run."""
    models = {}   # row index -> (deployed model, input shape); labels may repeat in a report
    for index, row in enumerate(rows):
        if row.get("error"):
            continue
        try:
            model, architecture = load_run(Path(row["run_dir"]))
            models[index] = (deploy(model), tuple(architecture["input_shape"]))
        except (LeancnnError, RuntimeError, ValueError) as exc:   # reported in its row; the others go on
            row["error"] = f"deploy: {first_line(exc)}"
    dense_index = next((i for i in models if rows[i]["label"] == DENSE_LABEL), None)
    onnx = None
    if dense_index is not None and onnx_available():
        onnx_threads = threads or torch.get_num_threads()
        try:
            onnx = onnx_session(models[dense_index][0], models[dense_index][1], onnx_threads)
        except Exception as exc:  # ONNX export or the runtime: the bench goes on without the row
            print(f"    dense in ONNX Runtime left out: {first_line(exc)}", flush=True)
    samples: dict[int, dict[int, list[float]]] = {index: {b: [] for b in LATENCY_RUNS} for index in models}
    onnx_samples: dict[int, list[float]] = {b: [] for b in LATENCY_RUNS}
    for _ in range(LATENCY_ROUNDS):
        for index, (model, shape) in models.items():
            for batch, runs in LATENCY_RUNS.items():
                samples[index][batch].append(
                    fastest_format_latency(model, shape, batch_size=batch, threads=threads, runs=runs).median_ms)
        if onnx is not None:
            for batch, runs in LATENCY_RUNS.items():
                onnx_samples[batch].append(session_latency(onnx, models[dense_index][1], batch_size=batch,
                                                           threads=onnx_threads, runs=runs).median_ms)
    for index, (model, shape) in models.items():
        row = rows[index]
        for batch in LATENCY_RUNS:
            row[f"latency_b{batch}_ms"] = round(statistics.median(samples[index][batch]), 4)
        row["deploy_plan"] = deploy_plan(model)
        row["layer_times"] = layer_times(model, shape, batch_size=profile_batch, threads=threads)
        stored = read_result(Path(row["run_dir"]))
        if settled_plan(stored.extra.get("deploy_plan")) != settled_plan(row["deploy_plan"]):  # rewritten only when changed
            stored.extra["deploy_plan"] = row["deploy_plan"]
            save_result(Path(row["run_dir"]), stored)
    if onnx is not None:
        dense = rows[dense_index]
        rows.insert(dense_index + 1, {
            **{k: v for k, v in dense.items() if k not in ("deploy_plan", "layer_times")},
            "label": DENSE_ONNX_LABEL, "deploy_plan": [], "layer_times": [],
            **{f"latency_b{b}_ms": round(statistics.median(onnx_samples[b]), 4) for b in LATENCY_RUNS}})


COLUMNS = ["candidate", "test acc", "robust acc", "params nz", "MACs eff", "storage",
           "b1 ms", "b64 ms", "speed-up b1", "speed-up b64", "MAC ratio", "error"]


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[list[str]], set[int]]:
    """The table's cells. Speed-ups are against the faster dense model (deployed PyTorch or ONNX
    Runtime); with the ONNX row present, PyTorch's deployed dense follows in brackets."""
    dense = next((r for r in rows if r["label"] == DENSE_LABEL and not r.get("error")), None)
    baselines = {b: dense_baseline_ms(rows, b) for b in (1, 64)}
    ok = [i for i, r in enumerate(rows) if not r.get("error")]
    front = {ok[i] for i in pareto_front([rows[i]["macs_effective"] for i in ok], [rows[i]["test_acc"] for i in ok])}
    lines = []
    for row in rows:
        if row.get("error"):
            lines.append([row["label"]] + ["-"] * (len(COLUMNS) - 2) + [row["error"]])
            continue
        robust = row.get("robust") or {}
        speedup = {}
        for b, (fastest, pytorch) in baselines.items():
            ms = row[f"latency_b{b}_ms"]
            speedup[b] = "-" if fastest is None else f"{fastest / ms:.2f}x" + (
                f" ({pytorch / ms:.2f}x)" if pytorch is not None and pytorch != fastest else "")
        mac_ratio = (f"{dense['macs_effective'] / row['macs_effective']:.2f}x" if dense else "-")
        lines.append([row["label"], fmt_pct(row["test_acc"]),
                      ", ".join(f"{k} {fmt_pct(v)}" for k, v in robust.items()) or "-",
                      fmt_count(row["params_nonzero"]), fmt_count(row["macs_effective"]),
                      fmt_bytes(row["storage_bytes"]), f"{row['latency_b1_ms']:.2f}", f"{row['latency_b64_ms']:.1f}",
                      speedup[1], speedup[64], mac_ratio, ""])
    return lines, front


def answer(rows: list[dict[str, Any]], budget: Budget | None) -> Recommendation | None:
    """The recommendation for `budget`, or for the default budget (half the dense model's
    batch-1 latency) when none was given; None when there is nothing to answer with."""
    budget = budget or default_budget(rows)
    return recommend(rows, budget) if budget else None


@dataclass
class BenchOutputs:
    """What write_outputs wrote, and the answer it gave."""

    report: Path                          # report.html
    markdown: Path                        # results.md
    csv: Path                             # results.csv
    plots: dict[str, Path]                # cost axis -> its accuracy-vs-cost PNG
    recommendation: Recommendation | None
    recommendation_file: Path | None      # recommendation.json


def write_outputs(rows: list[dict[str, Any]], out: Path, title: str, notes: list[str],
                  budget: Budget | None = None) -> BenchOutputs:
    lines, front = table_rows(rows)
    recommendation = answer(rows, budget)
    answer_lines = recommendation.lines() if recommendation else []
    if recommendation:
        write_json(out / "recommendation.json", recommendation.as_dict())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    keys = ["label", "test_acc", "test_top5", "params_total", "params_nonzero", "macs_dense", "macs_effective",
            "storage_bytes", "latency_b1_ms", "latency_b64_ms", "robust", "train_seconds", "run_dir", "error"]
    writer.writerow(keys)
    for row in rows:
        writer.writerow([json.dumps(row.get(k)) if isinstance(row.get(k), dict) else row.get(k, "") for k in keys])
    write_text(out / "results.csv", buffer.getvalue())
    columns = COLUMNS if any(line[-1] for line in lines) else COLUMNS[:-1]
    md = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for index, line in enumerate(lines):
        cells = ([f"**{line[0]}**" if index in front else line[0]] + line[1:])[:len(columns)]
        md.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lead = "".join(f"> {line}\n" for line in answer_lines) + ("\n" if answer_lines else "")
    write_text(out / "results.md", lead + "\n".join(notes) + "\n\n" + "\n".join(md)
               + "\n\nBold: on the accuracy/effective-MACs Pareto front.\n")
    ok = [r for r in rows if not r.get("error")]
    axes = {"macs": "effective MACs", "latency_b1": "batch-1 latency", "latency": "batch-64 latency",
            "storage": "storage"}
    plots = {axis: plot_front(ok, axis, out / f"pareto_{axis}.png", f"{title}: accuracy vs {name}")
             for axis, name in axes.items()}
    plots = {axis: path for axis, path in plots.items() if path}
    chosen = next((i for i, r in enumerate(rows) if recommendation and r is recommendation.chosen), None)
    report = write_report(out / "report.html", title, COLUMNS, lines, front, list(plots.values()), notes,
                          answer=answer_lines, details=candidate_details(ok, recommendation), chosen_row=chosen)
    return BenchOutputs(report, out / "results.md", out / "results.csv", plots, recommendation,
                        out / "recommendation.json" if recommendation else None)


def plan_input(key: str) -> str:
    """'... batch=64 threads=2 channels_last' (a plan key) -> 'batch 64, 2 threads, channels_last'."""
    match = re.search(r"batch=(\d+) threads=(\d+) (\S+)$", key)
    return f"batch {match[1]}, {match[2]} thread(s), {match[3]}" if match else key


def candidate_details(rows: list[dict[str, Any]], recommendation: Recommendation | None = None,
                      top: int = 8) -> list[CandidateDetail]:
    """Per candidate: what each kernel layer runs (its deploy plan) and the layers that take
    the most time, for the report."""
    details = []
    for row in rows:
        timed = row.get("layer_times") or []
        total = sum(entry["ms"] for entry in timed) or 1.0
        slowest = sorted(timed, key=lambda entry: -entry["ms"])[:top]
        plan = [[p["layer"], plan_input(p["key"]), f"{p['density']:.3f}", p["choice"],
                 ", ".join(f"{name} {ms:.3f}" for name, ms in p["times_ms"].items())]
                for p in row.get("deploy_plan") or []]
        time_rows = [[e["layer"], e["type"], f"{e['ms']:.3f}", f"{100 * e['ms'] / total:.1f}%"] for e in slowest]
        chosen = recommendation is not None and row is recommendation.chosen
        details.append(CandidateDetail(row["label"], plan, time_rows, len(timed), chosen))
    return details


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    lines, front = table_rows(rows)
    show_errors = any(line[-1] for line in lines)
    columns = COLUMNS if show_errors else COLUMNS[:-1]
    table = Table(title=title, caption="bold: on the accuracy/effective-MACs Pareto front; b1/b64: latency at batch 1/64")
    for column in columns:
        table.add_column(column, justify="left" if column in ("candidate", "error") else "right")
    for index, line in enumerate(lines):
        table.add_row(*line[:len(columns)], style="bold" if index in front else None)
    console().print(table)


def run_bench(plan: BenchPlan, out: Path, *, progress: bool = True, attacks: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for number, candidate in enumerate(plan.candidates, 1):
        print(f"[{number}/{len(plan.candidates)}] {candidate.label}", flush=True)
        try:
            row = run_candidate(plan, candidate, out, progress)
            if attacks:
                row["robust"] = attack_run(Path(row["run_dir"]), attacks, test_subset=min(plan.test_subset or 1000, 1000),
                                           progress=progress)
        except (LeancnnError, RuntimeError, ValueError) as exc:
            message = first_line(exc)
            print(f"    failed: {message}", flush=True)
            row = {"label": candidate.label, "error": message}
        rows.append(row)
    print(f"timing the deployed models: {LATENCY_ROUNDS} rounds taking turns, batch 1 and 64", flush=True)
    measure_candidates(rows, plan.threads or None, plan.profile_batch)
    return rows


def describe(plan: BenchPlan) -> list[str]:
    subset = f"{plan.train_subset} training images" if plan.train_subset else "the full training set"
    test = f"{plan.test_subset} test images" if plan.test_subset else "the full test set"
    notes = [f"{plan.data}, {plan.model} width {plan.width}, {plan.epochs} epoch(s) on {subset}, accuracy on {test}, seed {plan.seed}.",
             f"Machine: {cpu_model()}, torch {torch.__version__}, {plan.threads or torch.get_num_threads()} thread(s); "
             f"latency: each deployed model in the faster memory format, the median of {LATENCY_ROUNDS} rounds "
             f"that take turns between the candidates; speed-up: against the faster dense model"
             + (f" (deployed PyTorch or ONNX Runtime, in the row '{DENSE_ONNX_LABEL}'; in brackets against PyTorch's)"
                if onnx_available() else " (deployed PyTorch; install the onnx extra to compare ONNX Runtime too)")
             + "."]
    if plan.cuts:
        notes.append("Cut to fit the time limit: " + "; ".join(plan.cuts) + ".")
    if plan.quick:
        notes.append(quick_scale(plan, len(load_dataset(plan.data, plan.data_dir).train_labels)))
    return notes


def quick_scale(plan: BenchPlan, train_size: int) -> str:
    """How far a quick bench is from a full one, in training images seen."""
    seen = plan.epochs * min(plan.train_subset or train_size, train_size)
    full = FULL_EPOCHS * train_size
    epochs = f"{plan.epochs} epoch{'s' if plan.epochs != 1 else ''}"
    return (f"Quick bench: each candidate sees {seen:,} training images ({epochs} on "
            f"{min(plan.train_subset or train_size, train_size):,}), 1/{full / seen:.0f} of a full bench "
            f"({FULL_EPOCHS} epochs on all {train_size:,}); expect every accuracy several points higher there, "
            f"in the same order. `leancnn bench` runs the full one.")
