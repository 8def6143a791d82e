"""Terminal tables (rich) for results, runs and profiles."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..runs import RunResult


def console() -> Console:
    """A console that gives pipes and logs whole tables, not an 80-column squeeze."""
    terminal = Console()
    return terminal if terminal.is_terminal else Console(width=200)


def fmt_count(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def fmt_bytes(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def fmt_pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def print_result(run_dir: Path, result: RunResult) -> None:
    table = Table(title=f"run {run_dir}", show_header=False)
    rows = [("dataset", result.dataset), ("model", result.model),
            ("methods", ", ".join(result.methods or []) or "-"), ("epochs", result.epochs),
            ("test accuracy", fmt_pct(result.test_acc)), ("test top-5", fmt_pct(result.test_top5)),
            ("params (non-zero / total)", f"{fmt_count(result.params_nonzero)} / {fmt_count(result.params_total)}"),
            ("MACs per image (effective / dense)", f"{fmt_count(result.macs_effective)} / {fmt_count(result.macs_dense)}"),
            ("storage", fmt_bytes(result.storage_bytes)), ("train seconds", result.train_seconds)]
    for key, value in (result.latency_ms or {}).items():
        rows.append((f"latency {key} (ms, median)", f"{value:.3f}"))
    for key, value in (result.robust or {}).items():
        rows.append((f"accuracy under {key}", fmt_pct(value)))
    for key, value in rows:
        table.add_row(key, str(value))
    console().print(table)


def print_runs(runs: list[dict[str, Any]], root: Path) -> None:
    if not runs:
        console().print(f"no runs recorded in {root}")
        return
    table = Table(title=f"runs in {root}")
    for column in ("run", "dataset", "model", "methods", "epochs", "acc", "params nz", "MACs eff"):
        table.add_column(column)
    for run in runs:
        table.add_row(Path(run["run_dir"]).name, run["dataset"], run["model"], ", ".join(run["methods"]) or "-",
                      str(run["epochs"]), fmt_pct(run["test_acc"]), fmt_count(run["params_nonzero"]),
                      fmt_count(run["macs_effective"]))
    console().print(table)


def print_profile(title: str, rows: list[dict[str, Any]], totals: dict[str, Any]) -> None:
    """The per-layer table; a deployed model's rows that carry a plan (`runs`, `runs_ms`,
    `dense_ms`) get a column with what the layer runs at batch 1 and its measured time."""
    planned = any("runs" in row for row in rows)
    columns = ["layer", "kind", "output", "params", "non-zero", "MACs dense", "MACs eff", "storage", "format"]
    table = Table(title=title)
    for column in columns + (["runs (batch 1)"] if planned else []):
        table.add_column(column, justify="left" if column in ("layer", "kind", "format", "runs (batch 1)") else "right")
    for row in rows:
        cells = [row["name"], row["kind"], "x".join(map(str, row["output_shape"])), fmt_count(row["params"]),
                 fmt_count(row["params_nonzero"]), fmt_count(row["macs_dense"]), fmt_count(row["macs_effective"]),
                 fmt_bytes(row["storage_bytes"]), row["storage_format"]]
        if planned:
            cells.append(f"{row['runs']} {row['runs_ms']:.3f} ms (dense {row['dense_ms']:.3f})" if "runs" in row
                         else "-")
        table.add_row(*cells)
    table.add_row("total", "", "", fmt_count(totals["params_total"]), fmt_count(totals["params_nonzero"]),
                  fmt_count(totals["macs_dense"]), fmt_count(totals["macs_effective"]),
                  fmt_bytes(totals["storage_bytes"]), "", *([""] if planned else []), style="bold")
    console().print(table)
    dense, effective = totals["macs_dense"], totals["macs_effective"]
    if effective:
        console().print(f"MACs per image: {dense:,} dense, {effective:,} effective ({dense / effective:.2f}x fewer)")
