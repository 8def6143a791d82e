"""Accuracy-vs-cost plots with the Pareto front marked and every point labelled."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_write
from .pareto import pareto_front

AXES = {
    "macs": ("macs_effective", "effective MACs per image (millions)", 1e-6),
    "latency_b1": ("latency_b1_ms", "latency, batch 1 (ms)", 1.0),
    "latency": ("latency_b64_ms", "latency, batch 64 (ms)", 1.0),
    "storage": ("storage_bytes", "storage (KiB)", 1 / 1024),
}


def plot_front(rows: list[dict[str, Any]], axis: str, path: Path, title: str) -> Path | None:
    """One PNG; rows need 'label', 'test_acc' and the axis' key. None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, scale = AXES[axis]
    points = [r for r in rows if r.get(key) is not None and r.get("test_acc") is not None]
    if not points:
        return None
    costs = [r[key] * scale for r in points]
    accs = [100 * r["test_acc"] for r in points]
    front = pareto_front(costs, accs)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.scatter(costs, accs, color="#888888", zorder=2, label="candidate")
    ax.plot([costs[i] for i in front], [accs[i] for i in front], "-o", color="#d62728", zorder=3,
            label="Pareto front")
    for cost, acc, row in zip(costs, accs, points):
        ax.annotate(row["label"], (cost, acc), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if max(costs) / max(min(costs), 1e-12) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.12, y=0.12)  # room for the labels of the outermost points
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def plot_zoo_front(manifest: dict[str, Any], path: Path) -> Path:
    """A zoo's models (and those it dropped, in grey) against the time the selector plans with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    kept = manifest["models"]
    dropped = manifest.get("dropped", [])
    if dropped:
        ax.scatter([d["expected_ms"] for d in dropped], [100 * d["accuracy"] for d in dropped], c="lightgray",
                   label="dropped")
    ax.step([m["expected_ms"] for m in kept], [100 * m["accuracy"] for m in kept], where="post", c="tab:blue")
    ax.scatter([m["expected_ms"] for m in kept], [100 * m["accuracy"] for m in kept], c="tab:blue", label="zoo")
    for m in kept:
        ax.annotate(m["name"], (m["expected_ms"], 100 * m["accuracy"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"expected batch-1 time ({manifest['quantile']}, ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
