"""The answer the main job exists for: given a budget on this machine (latency at a batch
size, storage, or MACs), which candidate to ship, and what the next faster and the next
more accurate one would cost.

    leancnn bench --budget latency_ms=5 --batch 1
    leancnn bench --budget storage_kib=200,latency_ms=20

Costs come from the bench rows: latency is what the deployed model measured on this machine
(the faster memory format, at the bench's thread count), storage and MACs what the counter
found. Without --budget the bench answers for "faster than the dense model at batch 1" (the
faster of leancnn's deployed PyTorch model and ONNX Runtime, when it is installed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..spec import split_spec

# budget key -> (row key, scale from the row's unit to the budget's, unit, what it is)
KEYS = {
    "latency_ms": (None, 1.0, "ms", "latency"),        # the row key depends on the batch size
    "storage_kib": ("storage_bytes", 1 / 1024, "KiB", "storage"),
    "macs_m": ("macs_effective", 1e-6, "M MACs", "effective MACs per image"),
}
BATCHES = (1, 64)   # the batch sizes every bench candidate is timed at


@dataclass(frozen=True)
class Budget:
    limits: dict[str, float]     # key -> largest allowed value, in the key's unit; the first key is the main axis
    batch: int = 1               # the batch size a latency limit refers to
    origin: str = "given"        # how the limits were set, for the report

    @classmethod
    def parse(cls, text: str, batch: int = 1) -> "Budget":
        """'latency_ms=5' or 'storage_kib=200,latency_ms=20' -> Budget; one clear line otherwise."""
        _, raw = split_spec("budget:" + text)
        if not raw:
            raise ConfigError(f"--budget: give KEY=VALUE pairs, e.g. latency_ms=5; keys: {', '.join(KEYS)}")
        limits = {}
        for key, value in raw.items():
            if key not in KEYS:
                raise ConfigError(f"--budget: unknown key {key!r}; allowed: {', '.join(KEYS)}")
            try:
                limits[key] = float(value)
            except ValueError:
                raise ConfigError(f"--budget: {key} must be a number, got {value!r}") from None
            if limits[key] <= 0:
                raise ConfigError(f"--budget: {key} must be > 0, got {value}")
        if batch not in BATCHES:
            raise ConfigError(f"--batch: candidates are timed at batch {' and '.join(map(str, BATCHES))}, got {batch}")
        return cls(limits, batch)

    @property
    def main_key(self) -> str:
        return next(iter(self.limits))

    def cost(self, row: dict[str, Any], key: str) -> float | None:
        row_key, scale, _, _ = KEYS[key]
        value = row.get(row_key or f"latency_b{self.batch}_ms")
        return None if value is None else value * scale

    def fits(self, row: dict[str, Any]) -> bool:
        costs = [(self.cost(row, key), limit) for key, limit in self.limits.items()]
        return all(cost is not None and cost <= limit for cost, limit in costs)

    def describe_cost(self, row: dict[str, Any], key: str | None = None) -> str:
        key = key or self.main_key
        value = self.cost(row, key)
        where = f" at batch {self.batch}" if key == "latency_ms" else ""
        return "-" if value is None else f"{value:.3g} {KEYS[key][2]}{where}"

    def describe(self) -> str:
        parts = [f"{KEYS[key][3]} <= {limit:.3g} {KEYS[key][2]}" + (f" at batch {self.batch}" if key == "latency_ms" else "")
                 for key, limit in self.limits.items()]
        return ", ".join(parts) + ("" if self.origin == "given" else f" ({self.origin})")


# The default budget: at least this much faster than the dense model at batch 1 (a 1% margin,
# so that dense itself, and a candidate within timing noise of it, do not count as faster).
DEFAULT_SPEEDUP = 1.01


# The dense model as a user who ships it dense would run it: leancnn's deployed PyTorch model, and
# (when the onnx extra is there) the same model in ONNX Runtime, a row of its own in the bench.
DENSE_LABEL = "dense"
DENSE_ONNX_LABEL = "dense, ONNX Runtime"


def dense_baseline_ms(rows: list[dict[str, Any]], batch: int) -> tuple[float | None, float | None]:
    """(the faster dense latency at `batch`, PyTorch's deployed dense latency), ms; None if absent."""
    def latency(label):
        row = next((r for r in rows if r.get("label") == label and not r.get("error")), None)
        return None if row is None else row.get(f"latency_b{batch}_ms")
    pytorch, onnx = latency(DENSE_LABEL), latency(DENSE_ONNX_LABEL)
    present = [ms for ms in (pytorch, onnx) if ms]
    return (min(present) if present else None), pytorch


def default_budget(rows: list[dict[str, Any]]) -> Budget | None:
    """Faster than the dense model at batch 1 on this machine, run the faster way (deployed
    PyTorch or ONNX Runtime): the question a compressed model must answer first, and one that
    means the same on any machine."""
    fastest, _ = dense_baseline_ms(rows, 1)
    if fastest is None:
        return None
    onnx = any(r.get("label") == DENSE_ONNX_LABEL and not r.get("error") for r in rows)
    return Budget({"latency_ms": round(fastest / DEFAULT_SPEEDUP, 4)}, 1,
                  origin="default: faster than the dense model at batch 1 on this machine"
                         + (", run the faster way: deployed PyTorch or ONNX Runtime" if onnx else ""))


@dataclass
class Recommendation:
    budget: Budget
    chosen: dict[str, Any] | None            # the most accurate candidate within every limit
    next_faster: dict[str, Any] | None       # the most accurate of those cheaper on the main axis
    next_more_accurate: dict[str, Any] | None  # the cheapest (main axis) of those more accurate
    considered: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        budget = self.budget
        head = f"Budget: {budget.describe()}."
        if self.chosen is None:
            cheapest = self.next_more_accurate
            tail = (f" Nothing of the {self.considered} candidates fits; the cheapest is {cheapest['label']} "
                    f"({_acc(cheapest)}, {budget.describe_cost(cheapest)})." if cheapest else " No candidate finished.")
            return [head + tail]
        chosen = self.chosen
        lines = [head, f"Ship {chosen['label']}: {_acc(chosen)} test accuracy, "
                       + ", ".join(budget.describe_cost(chosen, key) for key in budget.limits) + "."]
        if self.next_more_accurate is not None:
            other = self.next_more_accurate
            lines.append(f"Next more accurate: {other['label']}, {_gain(other, chosen)} for "
                         f"{budget.describe_cost(other)} (over the budget).")
        else:
            lines.append("Nothing more accurate was benched: this is the most accurate candidate.")
        cheaper = "faster" if budget.main_key == "latency_ms" else "cheaper"
        if self.next_faster is not None:
            other = self.next_faster
            lines.append(f"Next {cheaper}: {other['label']}, {_gain(other, chosen)} for {budget.describe_cost(other)}.")
        else:
            lines.append(f"Nothing {cheaper} was benched.")
        return lines

    def as_dict(self) -> dict[str, Any]:
        def name(row):
            return None if row is None else row["label"]
        return {"budget": self.budget.limits, "batch": self.budget.batch, "budget_origin": self.budget.origin,
                "chosen": name(self.chosen), "next_faster": name(self.next_faster),
                "next_more_accurate": name(self.next_more_accurate), "text": self.lines()}


def _acc(row: dict[str, Any]) -> str:
    return f"{100 * row['test_acc']:.2f}%"


def _gain(other: dict[str, Any], chosen: dict[str, Any]) -> str:
    return f"{100 * (other['test_acc'] - chosen['test_acc']):+.2f} points ({_acc(other)})"


def recommend(rows: list[dict[str, Any]], budget: Budget) -> Recommendation:
    """The candidate to ship under `budget`, from finished bench rows (failed ones are skipped)."""
    done = [r for r in rows if not r.get("error") and r.get("test_acc") is not None
            and budget.cost(r, budget.main_key) is not None]
    main = budget.main_key

    def cost(row):
        return budget.cost(row, main)

    fitting = [r for r in done if budget.fits(r)]
    if not fitting:
        cheapest = min(done, key=cost, default=None)
        return Recommendation(budget, None, None, cheapest, len(done))
    # Ties (the dense model in PyTorch and in ONNX Runtime, under a storage budget): the faster one.
    chosen = max(fitting, key=lambda r: (r["test_acc"], -cost(r), -(r.get("latency_b1_ms") or float("inf"))))
    better = [r for r in done if r["test_acc"] > chosen["test_acc"]]
    cheaper = [r for r in done if cost(r) < cost(chosen) and r is not chosen]
    next_more_accurate = min(better, key=lambda r: (cost(r), -r["test_acc"]), default=None)
    next_faster = max(cheaper, key=lambda r: (r["test_acc"], -cost(r)), default=None)
    return Recommendation(budget, chosen, next_faster, next_more_accurate, len(done))
