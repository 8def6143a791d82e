"""A generated family for the zoo: one run per (model, width), trained with one budget."""
from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..experiment import ensure_run


def train_family(models: list[str], widths: list[float], out: Path, *, data: str, epochs: int,
                 train_subset: int | None, threads: int, progress: bool = True) -> list[str]:
    """Runs under OUT/family/<model>-w<width> (finished runs are reused, unfinished ones
    resumed); the run directories, for the zoo to choose from."""
    configs = [TrainConfig(data=data, model=model, width=width, epochs=epochs, train_subset=train_subset,
                           threads=threads, latency=False, out=str(out / "family" / f"{model}-w{width:g}")).validate()
               for model in models for width in widths]   # a bad width fails before any training
    for config in configs:
        print(f"training {config.model} at width {config.width:g} ({epochs} epoch(s)) -> {config.out}", flush=True)
        ensure_run(config, progress=progress)
    return [config.out for config in configs]
