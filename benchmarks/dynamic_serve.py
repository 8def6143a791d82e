"""Serving a dynamic resnet20's sub-networks against separately trained models of the same widths:
two zoos from benchmarks/dynamic_table.py's runs (the dynamic run: its sub-networks; the models
trained alone at the same widths and the dense one, as its last table lists them in table.json),
each served by `leancnn serve` with the adaptive policy under the load of benchmarks/serve_load.py (Poisson arrivals, deadlines uniform
in a range, Fashion-MNIST test images as PNG), at each rate; and the memory the zoo's models hold:
the bytes of every distinct tensor storage reachable from the runtime's models (weights, batch-norm
statistics, a deployed layer's packed weights), and the serving worker's RSS from /metrics.

Run benchmarks/dynamic_table.py first.

    .venv/bin/python benchmarks/dynamic_serve.py [--runs benchmarks/out/dynamic]
    .venv/bin/python benchmarks/dynamic_serve.py --quick   # after dynamic_table.py --quick: nothing published
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
from itertools import chain
from pathlib import Path

import httpx

from common import machine_line, publish
from serve_load import ALL_CPUS, Server, run_load, test_images

from leancnn.errors import LeancnnError
from leancnn.zoo.build import build_zoo
from leancnn.zoo.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]


def model_bytes(zoo: Path) -> int:
    """Bytes of the distinct tensor storages the runtime's models hold (shared storage counted once)."""
    runtime = Runtime(zoo, calibrate=False)
    storages = {}
    for model in runtime.models:
        for tensor in chain(model.parameters(), model.buffers()):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(ROOT / "benchmarks" / "out" / "dynamic"),
                        help="dynamic_table.py's run directory")
    parser.add_argument("--rates", type=float, nargs="+", default=[50, 100, 150])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--deadline-ms", type=float, nargs=2, default=[10.0, 50.0], metavar=("LOW", "HIGH"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a toy run (40 requests at 50/s) on the runs of "
                        "`dynamic_table.py --quick`: nothing published")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.rates, args.requests = str(Path(args.runs) / "quick"), [50.0], 40
    runs = Path(args.runs)
    table_file = runs / "table.json"   # the last table's runs (the directory may hold others, and the zoos)
    table = json.loads(table_file.read_text()) if table_file.is_file() else {"dynamic_run": None, "rows": []}
    dynamic = [Path(table["dynamic_run"])] if table["dynamic_run"] else []
    separate = [Path(row["alone_run"]) for row in table["rows"]]
    if not dynamic or not separate or not all((p / "result.json").is_file() for p in dynamic + separate):
        raise LeancnnError(f"{runs}: run benchmarks/dynamic_table.py --out {runs} first (its dynamic and alone runs)")
    zoos = {"dynamic (one set of weights)": runs / "zoo-dynamic", "separate models": runs / "zoo-separate"}
    for (label, zoo), sources in zip(zoos.items(), (dynamic, separate)):
        if not (zoo / "manifest.json").is_file():
            print(f"building {label} zoo ...", flush=True)
            build_zoo([str(p) for p in sources], zoo, epsilon=0.0, runs=50, threads=1)
    images = test_images(2000, args.seed)
    extra = ["--quantile", "0.99", "--blocking-risk", "0.02"]
    pinned = len(ALL_CPUS) >= 2
    if pinned:
        extra += ["--inference-cpus", str(ALL_CPUS[-1])]
        os.sched_setaffinity(0, ALL_CPUS[:-1])
    rows = []
    for label, zoo in zoos.items():
        manifest = json.loads((zoo / "manifest.json").read_text())
        server = Server(zoo, "adaptive", 1, extra)
        try:
            with httpx.Client() as client:
                server.wait(client)
                rss = client.get(server.url + "/metrics").json()["worker"]["rss_bytes"]
            for rate in args.rates:
                row = asyncio.run(run_load(server.url, images, rate, args.requests, tuple(args.deadline_ms), args.seed))
                row.update(zoo=label, models=[m["name"] for m in manifest["models"]], worker_rss_bytes=rss)
                rows.append(row)
                print(f"{label}: {rate:g}/s hits {100 * row['hit_rate']:.1f}%, accuracy {100 * row['accuracy']:.2f}%",
                      flush=True)
        finally:
            server.stop()
        for row in rows:
            if row["zoo"] == label:
                row["model_bytes"] = model_bytes(zoo)
    lines = ["| zoo | models | rate (req/s) | deadline hits | delivered accuracy | p99 (ms) | expired | shed | "
             "model memory | worker RSS |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['zoo']} | {len(r['models'])} | {r['rate']:g} | {100 * r['hit_rate']:.1f}% | "
                     f"{100 * r['accuracy']:.2f}% | {r['p99_ms']:.2f} | {r['expired']} | {r['shed']} | "
                     f"{r['model_bytes'] / 1024:.0f} KiB | {r['worker_rss_bytes'] / 2**20:.0f} MiB |")
    shown = runs.resolve().relative_to(ROOT) if runs.resolve().is_relative_to(ROOT) else runs
    summary = (f"{machine_line()}\n\nThe adaptive policy, 1 inference thread"
               + (f" on CPU {ALL_CPUS[-1]}, event loop and clients on CPU {ALL_CPUS[:-1]}" if pinned else "")
               + f", plans at p99 of measured times; {args.requests} requests per rate, deadlines uniform in "
               f"[{args.deadline_ms[0]:g}, {args.deadline_ms[1]:g}] ms. Model memory: distinct tensor storages "
               f"reachable from the runtime's models (a deployed model's TorchScript graph keeps frozen copies of "
               f"its weights too, not counted: they only add to the separate zoo); worker RSS includes torch "
               f"itself. `.venv/bin/python benchmarks/dynamic_serve.py --runs {shown}`")
    block = f"{summary}\n\n" + "\n".join(lines)
    print(block)
    if not args.quick:
        publish("dynamic_serve", block, rows, "docs/methods/dynamic.md")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
