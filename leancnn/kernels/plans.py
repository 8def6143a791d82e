"""Deploy plans: which implementation a layer runs, chosen by timing the candidates on
this machine at the layer's real input (shape, batch size, memory format, threads),
like FFTW's or oneDNN's plans. A plan is made the first time a deployed layer sees
a new key, and kept in memory and in a cache file, one per machine
(~/.cache/leancnn/plans-<machine digest>.json; LEANCNN_PLAN_CACHE names one file for
every machine, LEANCNN_CACHE moves the directory) so the next process reproduces it
without re-timing. One file per machine, because a home directory shared by different
machines (a cluster's nodes, a forced instruction set) would otherwise replace the other
machine's plans at every switch and re-time every layer.

The cache file names the machine it was measured on (CPU model, cores, the kernel's
instruction set, torch version, kernel build). A file that does not parse, or that
belongs to another machine, is ignored with one warning and re-measured; it is
replaced when the new plans are written. Writes go through a temporary file and a
rename, merged with what another process may have written since.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..measure.latency import cpu_model
from . import cache_root, kernel_build_id, psconv_extension

FORMAT = "leancnn-plans-1"
# Timed rounds per candidate (alternating, one call each), and at least this long in all (s):
# enough for a median that the 2-core VM's noise does not flip between close candidates.
ROUNDS = 7
MIN_SECONDS = 0.05
_lock = threading.Lock()
_state: dict[str, Any] = {}


def machine_id() -> str:
    extension = psconv_extension()
    isa = extension.isa() if extension is not None else "no-kernel"
    return f"{cpu_model()} | {os.cpu_count()} cores | {isa} | torch {torch.__version__} | kernel {kernel_build_id()}"


def cache_path() -> Path:
    """LEANCNN_PLAN_CACHE (a file), else this machine's plans-<digest>.json in leancnn's cache directory."""
    override = os.environ.get("LEANCNN_PLAN_CACHE")
    if override:
        return Path(override)
    return cache_root() / f"plans-{hashlib.sha256(machine_id().encode()).hexdigest()[:12]}.json"


def _read_file(path: Path, machine: str, warn: bool) -> dict[str, Any]:
    """The plans in `path` for this machine; {} (with a warning if `warn`) if absent, corrupt or foreign."""
    if not path.exists():
        return {}
    problem = None
    try:
        content = json.loads(path.read_text())
        if not isinstance(content, dict) or content.get("format") != FORMAT or not isinstance(content.get("plans"), dict):
            problem = "not a leancnn plan file"
        elif content.get("machine") != machine:
            problem = f"measured on another machine ({content.get('machine')!r})"
        else:
            plans = {key: entry for key, entry in content["plans"].items() if valid_entry(entry)}
            if len(plans) != len(content["plans"]):
                problem = "some entries are malformed"
            else:
                return plans
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"unreadable ({type(error).__name__})"
    if warn:
        warnings.warn(f"leancnn: ignoring the plan cache {path}: {problem}; plans will be measured again",
                      RuntimeWarning, stacklevel=4)
    return {}


def valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("choice"), str) and isinstance(entry.get("times_ms"), dict)
            and entry["choice"] in entry["times_ms"]
            and all(isinstance(v, (int, float)) for v in entry["times_ms"].values()))


def _plans() -> dict[str, Any]:
    """This process's view of the cache, read once (re-read when LEANCNN_CACHE moves it)."""
    path = cache_path()
    if _state.get("path") != path:
        _state.update(path=path, machine=machine_id())
        _state["plans"] = _read_file(path, _state["machine"], warn=True)
    return _state["plans"]


def lookup(key: str) -> dict[str, Any] | None:
    with _lock:
        return _plans().get(key)


def store(key: str, entry: dict[str, Any]) -> None:
    """Record a plan in memory and in the cache file (merged with the file's current plans)."""
    with _lock:
        plans = _plans()
        plans[key] = entry
        path = cache_path()
        merged = {**_read_file(path, _state["machine"], warn=False), **plans}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".plans-", suffix=".json")
            with os.fdopen(handle, "w") as out:
                json.dump({"format": FORMAT, "machine": _state["machine"], "plans": merged}, out, indent=1,
                          sort_keys=True)
            os.replace(temporary, path)
        except OSError as error:  # a read-only cache: plans still hold for this process
            if not _state.get("write_warned"):
                _state["write_warned"] = True
                warnings.warn(f"leancnn: cannot write the plan cache {path} ({error}); plans are kept in memory only",
                              RuntimeWarning, stacklevel=3)


def forget_loaded() -> None:
    """Drop the in-memory view so the next lookup reads the file again (tests, a changed cache)."""
    with _lock:
        _state.clear()


def time_candidates(candidates: dict[str, Callable[[], Any]], rounds: int = ROUNDS,
                    min_seconds: float = MIN_SECONDS) -> dict[str, float]:
    """Median milliseconds of each candidate: two warm-up calls each, then rounds taking turns
    (one call per candidate per round), so a change in the machine's speed hits all of them."""
    for run in candidates.values():
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    started = time.perf_counter()
    while min(len(t) for t in times.values()) < rounds or time.perf_counter() - started < min_seconds:
        for name, run in candidates.items():
            begin = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - begin) * 1000.0)
        if len(times[next(iter(times))]) >= 50 * rounds:
            break
    return {name: round(statistics.median(values), 5) for name, values in times.items()}


def choose(key: str, candidates: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """The plan for `key`: from the cache when it names one of `candidates`, else measured and stored.
    Returns {"choice": name, "times_ms": {name: median ms}, "cached": bool}."""
    entry = lookup(key)
    if entry is not None and entry["choice"] in candidates:
        return {**entry, "cached": True}
    times = time_candidates(candidates)
    entry = {"choice": min(times, key=times.get), "times_ms": times}
    store(key, entry)
    return {**entry, "cached": False}


class PlannedChoices:
    """A layer's choices per input key, for the layers that pick an implementation by plan
    (SparseConvInference, VirtualPoolInference): `fast_key` (a tuple, cheap to build every call)
    -> the choice; `plans` (cache key -> the plan, for plan_summary); `last` (what the last eager
    call ran: a graph being captured runs it, having no shapes to time)."""

    def __init__(self) -> None:
        self.plans: dict[str, dict[str, Any]] = {}
        self.by_key: dict[tuple, str] = {}
        self.last: str | None = None

    def get(self, fast_key: tuple) -> str | None:
        """The choice already made for `fast_key` (remembered as the last one run), else None."""
        choice = self.by_key.get(fast_key)
        if choice is not None:
            self.last = choice
        return choice

    def plan(self, fast_key: tuple, key: str, candidates: dict[str, Callable[[], Any]]) -> str:
        """Plan `fast_key` (choose(): from the cache file or by timing `candidates`) under cache key `key`."""
        self.plans[key] = choose(key, candidates)
        choice = self.last = self.by_key[fast_key] = self.plans[key]["choice"]
        return choice

    def summary(self) -> list[dict[str, Any]]:
        """The plans made or read: one dict per key."""
        return [{"key": key, **plan} for key, plan in self.plans.items()]
