"""`leancnn zoo build`: finished runs -> a directory of models on the
accuracy/time front, with a manifest.

    zoo/manifest.json           what the runtime reads (see `build_zoo`)
    zoo/models/<name>/model.json, model.safetensors

Latency is re-measured here, on this machine, at batch 1 on the deployed
model (batch norm folded, pSConv on the kernel): the median and a high
quantile. Accuracy is the run's test accuracy.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..deploy import deploy
from ..measure import measure_latency
from ..measure.latency import machine
from ..errors import LeancnnError
from ..io import slug, write_json
from ..methods.dynamic import is_dynamic, subnet_count, traced_subnet
from ..runs import DB_NAME, list_runs, load_run, read_json, read_result
from .front import FrontModel, pareto_front, thin

MANIFEST = "manifest.json"
QUANTILES = ("median", "p90")


@dataclass
class ZooModel:
    name: str
    path: str                 # relative to the zoo directory
    accuracy: float
    latency_median_ms: float
    latency_p90_ms: float
    expected_ms: float        # the chosen quantile (the selector adds the server's measured overhead)
    macs_effective: int
    source_run: str
    subnet: int | None = None   # a dynamic run's sub-network (models sharing `path` share one set of weights)


def find_runs(sources: list[str]) -> list[Path]:
    """Run directories from run directories, bench directories (their runs/),
    parents holding runs.db, or runs.db files."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.name == DB_NAME and path.is_file():
            found += [Path(r["run_dir"]) for r in list_runs(path.parent)]
        elif (path / "result.json").is_file():
            found.append(path)
        elif (path / "runs").is_dir():
            found += sorted(p.parent for p in (path / "runs").glob("*/result.json"))
        elif (path / DB_NAME).is_file():
            found += [Path(r["run_dir"]) for r in list_runs(path)]
        else:
            raise LeancnnError(f"{source}: not a finished run, a bench directory or a runs database")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise LeancnnError("no finished runs found in " + ", ".join(sources))
    return unique


def measure_batch1(model: torch.nn.Module, input_shape: tuple[int, ...], runs: int, threads: int) -> tuple[float, float]:
    """(median, p90) ms of one-image requests through the deployed model."""
    latency = measure_latency(model, input_shape, batch_size=1, threads=threads, channels_last=False, runs=runs)
    return latency.median_ms, latency.p90_ms


def build_zoo(sources: list[str], out: Path, *, quantile: str = "p90", epsilon: float = 0.002, runs: int = 50,
              threads: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    if quantile not in QUANTILES:
        raise LeancnnError(f"quantile must be one of {', '.join(QUANTILES)}, got {quantile!r}")
    if not 0 <= epsilon < 1:
        raise LeancnnError(f"epsilon must be in [0, 1) (an accuracy step), got {epsilon}")
    run_dirs = find_runs(sources)
    measured: list[ZooModel] = []
    shapes, datasets = set(), set()
    for run_dir in run_dirs:
        result = read_result(run_dir)
        model, architecture = load_run(run_dir)
        shape = tuple(architecture["input_shape"])
        shapes.add(shape)
        datasets.add(result.dataset)
        base = slug(run_dir.name, "model")
        if any(m.path == f"models/{base}" for m in measured):  # two runs with one directory name
            base = f"{base}-{len(measured)}"
        for subnet, accuracy, macs, runner in servable(run_dir, model, result):
            median, p90 = measure_batch1(runner, shape, runs, threads)
            name = base if subnet is None else f"{base}-sub{subnet}"
            measured.append(ZooModel(name, f"models/{base}", accuracy, median, p90,
                                     median if quantile == "median" else p90, macs, str(run_dir), subnet))
            log(f"  {name}: accuracy {100 * accuracy:.2f}%, batch-1 latency median {median:.3f} ms, "
                f"p90 {p90:.3f} ms")
    if len(shapes) > 1 or len(datasets) > 1:
        raise LeancnnError(f"runs disagree on input shape or dataset ({sorted(shapes)}, {sorted(datasets)}): "
                           "a zoo serves one kind of input")
    by_name = {m.name: m for m in measured}
    front = pareto_front([FrontModel(m.name, m.expected_ms, m.accuracy) for m in measured])
    kept = thin(front, epsilon)
    kept_names = {c.name for c in kept}
    front_names = {c.name for c in front}
    dropped = [{"name": m.name, "accuracy": m.accuracy, "expected_ms": m.expected_ms,
                "reason": "thinned (less than epsilon more accurate than a faster model)" if m.name in front_names
                else "dominated (a faster model is at least as accurate)"}
               for m in measured if m.name not in kept_names]
    out.mkdir(parents=True, exist_ok=True)
    models = []
    for candidate in kept:
        model = by_name[candidate.name]
        target = out / model.path
        if not target.is_dir():   # a dynamic run's sub-networks share one copy
            target.mkdir(parents=True)
            for file in ("model.json", "model.safetensors"):
                shutil.copyfile(Path(model.source_run) / file, target / file)
        models.append(asdict(model))
    manifest = {"version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "dataset": datasets.pop(),
                "input_shape": list(shapes.pop()), "quantile": quantile, "epsilon": epsilon, "threads": threads,
                "models": models, "dropped": dropped}
    manifest["machine"] = machine()
    write_json(out / MANIFEST, manifest)  # written last, atomically: a zoo without it is unfinished
    return manifest


def load_manifest(zoo: Path) -> dict[str, Any]:
    path = Path(zoo) / MANIFEST
    if not path.is_file():
        raise LeancnnError(f"{zoo}: no {MANIFEST} (build one with `leancnn zoo build`)")
    manifest = read_json(path)
    if not manifest.get("models"):
        raise LeancnnError(f"{path}: lists no models")
    return manifest


def servable(run_dir: Path, model: torch.nn.Module, result) -> list[tuple[int | None, float, int, torch.nn.Module]]:
    """(sub-network or None, test accuracy, effective MACs, what serves it) for each model a run
    offers: a dynamic run its chosen sub-networks (graphs over one model), any other run itself, deployed."""
    if not is_dynamic(model):
        return [(None, result.test_acc, result.macs_effective or 0, deploy(model))]
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    chosen = next((e["dynamic_subnets"] for e in reversed(entries) if "dynamic_subnets" in e), None)
    if chosen is None or len(chosen) != subnet_count(model):
        raise LeancnnError(f"{run_dir}: a dynamic run without its search's record (log.jsonl dynamic_subnets)")
    example = torch.rand(1, *read_json(run_dir / "model.json")["input_shape"])
    return [(index, record["test_acc"], record["macs"], traced_subnet(model, index, example))
            for index, record in enumerate(chosen)]


def load_zoo_models(zoo: Path, manifest: dict[str, Any]) -> list[torch.nn.Module]:
    """The zoo's models for inference, in manifest order (rising time): each deployed, or, for a
    dynamic run's sub-networks, one traced graph each over one shared model (loaded once; the
    graphs slice its weights, no copy). A dynamic model is not deployed: its batch norms'
    statistics change with the sub-network, so they cannot be folded into the shared weights."""
    shared: dict[str, torch.nn.Module] = {}
    models = []
    for entry in manifest["models"]:
        subnet = entry.get("subnet")
        if subnet is None:
            models.append(deploy(load_run(Path(zoo) / entry["path"])[0]))
            continue
        if entry["path"] not in shared:
            shared[entry["path"]] = load_run(Path(zoo) / entry["path"])[0].eval()
        models.append(traced_subnet(shared[entry["path"]], subnet, torch.rand(1, *manifest["input_shape"])))
    return models
