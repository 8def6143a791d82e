"""Run directories and the runs database.

A run directory holds config.toml, model.safetensors, model.json, result.json,
log.jsonl and checkpoint/. Every run is also a row of `runs.db` (SQLite) in
the run directory's parent, the output root.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import nn

from .errors import LeancnnError, first_line
from .io import load_tensors, read_json_file, save_tensors, write_json, write_text
from .methods import apply_methods
from .models import check_user_model_source, create_model, reload_reference
from .version import __version__

DB_NAME = "runs.db"


@dataclass
class RunResult:
    """A run's figures: what result.json holds. The contract's keys are the fields, None where not
    measured (accuracies are fractions, MACs per image, latency_ms maps 'batch{B}_threads{T}' to the
    median ms); what a job adds beyond the contract (deploy_plan, compress, robust_settings) is kept,
    and written, in `extra`."""

    dataset: str | None = None
    model: str | None = None
    methods: list[str] | None = None
    epochs: int | None = None
    seed: int | None = None
    test_acc: float | None = None
    test_top5: float | None = None
    params_total: int | None = None
    params_nonzero: int | None = None
    macs_dense: int | None = None
    macs_effective: int | None = None
    storage_bytes: int | None = None
    latency_ms: dict[str, float] | None = None
    robust: dict[str, float] | None = None
    train_seconds: float | None = None
    versions: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """result.json's object: the contract's keys, then the extras."""
        return {**{key: getattr(self, key) for key in RESULT_KEYS}, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        return cls(**{key: data.get(key) for key in RESULT_KEYS},
                   extra={key: value for key, value in data.items() if key not in RESULT_KEYS})


RESULT_KEYS = tuple(item.name for item in dataclasses.fields(RunResult) if item.name != "extra")


def versions() -> dict[str, str]:
    return {"leancnn": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def write_model(run_dir: Path, model: nn.Module, architecture: dict[str, Any]) -> None:
    """Weights as safetensors plus what rebuilds the architecture (model.json)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(run_dir / "model.safetensors", model.state_dict(), metadata={"format": "pt"})
    write_json(run_dir / "model.json", architecture)


def write_log(run_dir: Path, log: list[dict[str, Any]]) -> None:
    write_text(run_dir / "log.jsonl", "".join(json.dumps(entry) + "\n" for entry in log))


def read_json(path: Path) -> dict[str, Any]:
    """A run directory's JSON file (model.json, result.json), as an object."""
    if not path.is_file():
        raise LeancnnError(f"{path}: not found; is {path.parent} a leancnn run directory?")
    content = read_json_file(path)
    if not isinstance(content, dict):
        raise LeancnnError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def build_architecture(architecture: dict[str, Any], described_in: Path | None = None) -> tuple[nn.Module, list]:
    """Rebuild a model (methods applied) from model.json's description; a user model only from
    the source file that trained it (its SHA-256 is recorded)."""
    name = architecture["model"]
    source = architecture.get("model_source")
    if source is not None:
        check_user_model_source(source, described_in or Path("model.json"))
        name = reload_reference(source)
    model = create_model(name, **architecture["model_kwargs"])
    return apply_methods(model, architecture.get("methods", []))


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, model.json contents); weights never unpickled."""
    model, architecture, _ = load_run_with_methods(run_dir)
    return model, architecture


def load_run_with_methods(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any], list]:
    """The run's model in eval mode with its weights, model.json's contents, and the methods
    that rebuilt it; every file problem one line naming the file."""
    run_dir = Path(run_dir)
    path = run_dir / "model.json"
    architecture = read_json(path)
    try:
        model, methods = build_architecture(architecture, path)
    except (KeyError, TypeError) as exc:
        raise LeancnnError(f"{path}: not a leancnn model description ({type(exc).__name__}: {exc})") from None
    weights = run_dir / "model.safetensors"
    state = load_tensors(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = first_line(exc)
        raise LeancnnError(f"{weights}: does not fit the architecture in model.json ({first})") from None
    return model.eval(), architecture, methods


def read_result(run_dir: Path) -> RunResult:
    """A run directory's result.json; one clear line if it is missing or not JSON."""
    return RunResult.from_dict(read_json(Path(run_dir) / "result.json"))


def save_result(run_dir: Path, result: RunResult) -> None:
    """result.json (atomically) and the run's row in the runs database."""
    write_json(run_dir / "result.json", result.as_dict())
    record_run(run_dir, result)


# -- the runs database ---------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_dir TEXT PRIMARY KEY,
    recorded REAL,
    dataset TEXT, model TEXT, methods TEXT, epochs INTEGER, seed INTEGER,
    test_acc REAL, params_nonzero INTEGER, macs_effective INTEGER,
    result TEXT
)"""


def _connect(root: Path) -> sqlite3.Connection:
    root.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(root / DB_NAME, timeout=30)
    connection.execute(_SCHEMA)
    return connection


def record_run(run_dir: Path, result: RunResult) -> None:
    run_dir = run_dir.resolve()
    with _connect(run_dir.parent) as connection:
        connection.execute(
            "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (str(run_dir), time.time(), result.dataset, result.model, json.dumps(result.methods),
             result.epochs, result.seed, result.test_acc, result.params_nonzero,
             result.macs_effective, json.dumps(result.as_dict())))


def list_runs(root: Path, *, dataset: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
    if not (root / DB_NAME).is_file():
        return []
    query, args = "SELECT run_dir, result FROM runs WHERE 1=1", []
    if dataset:
        query += " AND dataset = ?"
        args.append(dataset)
    if model:
        query += " AND model = ?"
        args.append(model)
    with _connect(root) as connection:
        rows = connection.execute(query + " ORDER BY recorded", args).fetchall()
    return [{"run_dir": run_dir, **json.loads(result)} for run_dir, result in rows]
