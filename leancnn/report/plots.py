"""Accuracy-vs-cost plots with the front marked and every point labelled: the bench's (one per
cost axis, its Pareto front) and a zoo's (the models it keeps, against their expected time)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_write
from ..measure.pareto import pareto_front

AXES = {
    "macs": ("macs_effective", "effective MACs per image (millions)", 1e-6),
    "latency_b1": ("latency_b1_ms", "latency, batch 1 (ms)", 1.0),
    "latency": ("latency_b64_ms", "latency, batch 64 (ms)", 1.0),
    "storage": ("storage_bytes", "storage (KiB)", 1 / 1024),
}


def plot_points(costs: Sequence[float], accuracies: Sequence[float], labels: Sequence[str], front: Sequence[int],
                path: Path, *, xlabel: str, title: str, front_label: str, other_label: str) -> Path:
    """One PNG: every point grey and labelled, the `front` ones (indices, by rising cost) joined
    in red. Accuracies in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.scatter(costs, accuracies, color="#888888", zorder=2, label=other_label)
    ax.plot([costs[i] for i in front], [accuracies[i] for i in front], "-o", color="#d62728", zorder=3,
            label=front_label)
    for cost, acc, label in zip(costs, accuracies, labels):
        ax.annotate(label, (cost, acc), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if max(costs) / max(min(costs), 1e-12) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.12, y=0.12)  # room for the labels of the outermost points
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def plot_front(rows: list[dict[str, Any]], axis: str, path: Path, title: str) -> Path | None:
    """The bench's plot for one cost axis; rows need 'label', 'test_acc' and the axis' key.
    None if nothing to plot."""
    key, label, scale = AXES[axis]
    points = [r for r in rows if r.get(key) is not None and r.get("test_acc") is not None]
    if not points:
        return None
    costs = [r[key] * scale for r in points]
    accuracies = [100 * r["test_acc"] for r in points]
    return plot_points(costs, accuracies, [r["label"] for r in points], pareto_front(costs, accuracies), path,
                       xlabel=label, title=title, front_label="Pareto front", other_label="candidate")


def plot_zoo_front(manifest: dict[str, Any], path: Path) -> Path:
    """A zoo's models in red (the ones it keeps) and those it dropped in grey, against the time
    the selector plans with."""
    entries = sorted(manifest["models"], key=lambda m: m["expected_ms"]) + manifest.get("dropped", [])
    kept = list(range(len(manifest["models"])))
    return plot_points([e["expected_ms"] for e in entries], [100 * e["accuracy"] for e in entries],
                       [e["name"] for e in entries], kept, path,
                       xlabel=f"expected batch-1 time ({manifest['quantile']}, ms)",
                       title=f"zoo: {len(kept)} model{'s' if len(kept) != 1 else ''} kept", front_label="kept",
                       other_label="dropped")
