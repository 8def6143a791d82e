"""`leancnn zoo build|show` and `leancnn serve`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import LeancnnError


def train_family(args: argparse.Namespace, out: Path) -> list[str]:
    """--family: one run per (model, width) under OUT/family/, trained with the given budget
    (finished runs are reused); the run directories, for the zoo to choose from."""
    from ..config import TrainConfig
    from ..experiment import ensure_run

    models = [m.strip() for m in args.family.split(",") if m.strip()]
    runs = []
    for model in models:
        for width in args.widths:
            run_dir = out / "family" / f"{model}-w{width:g}"
            config = TrainConfig(data=args.data, model=model, width=width, epochs=args.epochs,
                                 train_subset=args.train_subset, threads=args.threads, latency=False,
                                 out=str(run_dir)).validate()   # a bad model or width fails before any training
            print(f"training {model} at width {width:g} ({args.epochs} epoch(s)) -> {run_dir}", flush=True)
            ensure_run(config, progress=not args.no_progress)
            runs.append(str(run_dir))
    return runs


def run_zoo_build(args: argparse.Namespace) -> int:
    from ..zoo.build import build_zoo

    out = Path(args.out)
    if not args.sources and not args.family:
        raise LeancnnError("zoo build needs runs: --from SOURCE... and/or --family MODELS")
    sources = list(args.sources or []) + (train_family(args, out) if args.family else [])
    print(f"measuring batch-1 latency of each run's deployed model ({args.runs} runs, {args.threads} thread(s)) ...")
    manifest = build_zoo(sources, out, quantile=args.quantile, epsilon=args.epsilon, runs=args.runs,
                         threads=args.threads)
    show(out, manifest)
    return 0


def show(zoo: Path, manifest: dict) -> None:
    from ..report.table import console
    from rich.table import Table

    table = Table(title=f"zoo {zoo}: {len(manifest['models'])} models on the front ({manifest['quantile']} latency, "
                        f"epsilon {manifest['epsilon']})")
    for column in ("model", "accuracy", "median ms", "p90 ms", "expected ms", "MACs eff"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for entry in manifest["models"]:
        table.add_row(entry["name"], f"{100 * entry['accuracy']:.2f}%", f"{entry['latency_median_ms']:.3f}",
                      f"{entry['latency_p90_ms']:.3f}", f"{entry['expected_ms']:.3f}",
                      f"{entry['macs_effective'] / 1e6:.2f}M")
    console().print(table)
    for entry in manifest.get("dropped", []):
        print(f"dropped {entry['name']}: {entry['reason']}")
    plot_front(zoo, manifest)
    print(f"plot: {zoo / 'front.png'}")


def plot_front(zoo: Path, manifest: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write

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
    atomic_write(zoo / "front.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def run_zoo_show(args: argparse.Namespace) -> int:
    from ..zoo.build import load_manifest

    show(Path(args.zoo), load_manifest(Path(args.zoo)))
    return 0


def parse_cpus(text: str | None) -> list[int] | None:
    """'1' or '2,3' -> CPU ids this process may use; one clear line otherwise."""
    if not text:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    try:
        cpus = [int(part) for part in text.split(",")]
    except ValueError:
        raise LeancnnError(f"--inference-cpus must be CPU ids separated by commas, got {text!r}") from None
    unknown = [c for c in cpus if c not in allowed]
    if unknown:
        raise LeancnnError(f"--inference-cpus names CPU(s) {unknown} this process cannot use; allowed: {allowed}")
    return cpus


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as exc:
        raise LeancnnError(f"serving needs the serve extra: pip install -e '.[serve]' ({exc.name} is missing)") from None
    from ..zoo.build import load_manifest

    load_manifest(Path(args.zoo))   # a bad zoo fails here, in one line, before the worker starts
    if not 0 < args.quantile <= 1:
        raise LeancnnError(f"--quantile must be in (0, 1], got {args.quantile}")
    if not 0 <= args.blocking_risk < 1:
        raise LeancnnError(f"--blocking-risk must be in [0, 1) (0 turns it off), got {args.blocking_risk}")
    app = create_app(args.zoo, policy=args.when_nothing_fits, fixed=args.static, threads=args.threads,
                     plan_quantile=args.quantile,
                     blocking_risk=args.blocking_risk or None, inference_cpus=parse_cpus(args.inference_cpus),
                     max_pending=args.max_pending, max_bytes=args.max_bytes)
    worker = app.state.worker
    print(f"serving {len(worker.names)} models from {args.zoo} on http://{args.host}:{args.port} "
          f"(inference in process {worker.process.pid}; hand-back overhead {worker.overhead_ms():.3f} ms, "
          f"measured as it serves)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
