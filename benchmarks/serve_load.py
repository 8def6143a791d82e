"""Load test of `leancnn serve` on loopback: Poisson arrivals at stated rates,
deadlines drawn uniformly from a stated range, Fashion-MNIST test images with
their labels. For each rate and policy (adaptive; always the most accurate
model; always the fastest) it reports the deadline-hit rate, the delivered
accuracy (correct answers / answered requests) and latency quantiles. Then,
at the highest rate where the adaptive policy met >= 99% of deadlines, it
mixes 1,000 malformed requests into the load and checks that every one gets
a 4xx, no valid request is lost, and the server's memory stays steady.
Also the cost per decision (the selector's search alone, and with the
blocking guard) against the fastest model.

With 2 or more CPUs the server's inference process gets the last CPU
(`serve --inference-cpus`) and its event loop and this load generator the
others, as one would deploy it; the deadlines' lower end is set to what the
fastest model can meet on this machine with that (a model's time right after
another model ran is 1.5-3x its back-to-back time here, and its p99 more).

The zoo is built (once) from finished runs: by default the pSConv, CaP and
full-bench runs other benchmarks leave in benchmarks/out and bench/full.

    .venv/bin/python benchmarks/serve_load.py
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import cpu_model, machine_line, publish
from http_load import ConnectFailed, LoadClient, NoAnswer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCES = ["benchmarks/out/psconv", "benchmarks/out/cap", "bench/full"]
ALL_CPUS = sorted(os.sched_getaffinity(0))
POLICIES = {"adaptive": [], "most-accurate": ["--static", "most-accurate"], "fastest": ["--static", "fastest"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images(count: int, seed: int) -> list[tuple[bytes, int]]:
    from PIL import Image

    from leancnn.data import load_dataset

    data = load_dataset("fashion-mnist")
    order = np.random.default_rng(seed).permutation(len(data.test_labels))[:count]
    encoded = []
    for index in order:
        buffer = io.BytesIO()
        Image.fromarray(data.test_images[index, 0].numpy()).save(buffer, format="PNG")
        encoded.append((buffer.getvalue(), int(data.test_labels[index])))
    return encoded


MALFORMED = [
    (b"not an image at all", "image/png", "50"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png", "50"),           # truncated
    (None, "image/png", None),                                              # a good image, no deadline
    (None, "image/png", "-3"),                                              # negative deadline
    (None, "text/plain", "50"),                                             # wrong content type
    (b"\x00" * 100, "application/octet-stream", "50"),                     # wrong raw length
    (b"\x00" * (2 << 20), "application/octet-stream", "50"),               # over the size limit
]


class Server:
    def __init__(self, zoo: Path, policy: str, threads: int, extra: list[str] = ()) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "leancnn.cli", "serve", str(zoo), "--port", str(self.port),
                   "--threads", str(threads), *POLICIES[policy], *extra]
        # The server may use every CPU (it pins its own processes), whatever the load generator keeps to.
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        cwd=ROOT, preexec_fn=lambda: os.sched_setaffinity(0, ALL_CPUS))
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, client) -> None:
        # Up to 300 s, the fork server's own start limit: a first start may build the kernel (~60 s).
        for _ in range(3000):
            try:
                if client.get(self.url + "/health").status_code == 200:
                    return
            except Exception:
                pass
            if self.process.poll() is not None:
                raise SystemExit(f"server exited: {self.process.stdout.read()}")
            time.sleep(0.1)
        raise SystemExit("server did not start")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def send_load(url: str, images, rate: float, count: int, deadlines: tuple[float, float], seed: int,
                    malformed: int = 0, during=None, timeout_s: float = 30.0) -> tuple[list[dict], dict, float, dict]:
    """Poisson arrivals at `rate` of `count` valid requests (each with its true class in X-Label) and
    `malformed` bad ones, shuffled; `during(client)`, if given, runs beside the load (a fault injector,
    a memory sampler) and is cancelled when the load ends. (one record per request, the server's
    /metrics after, the seconds it took, /metrics before). A record: kind, status (0: no answer came: lost), label,
    answer, sent and done (perf_counter s), client_ms, retry_after (the header, on a 503)."""
    rng = random.Random(seed)
    plan = [("valid", i % len(images)) for i in range(count)] + [("bad", i) for i in range(malformed)]
    rng.shuffle(plan)
    results: list[dict] = []
    host, port = url.removeprefix("http://").split(":")
    client = LoadClient(host, int(port), timeout_s)
    try:
        async def one(kind: str, index: int) -> None:
            if kind == "valid":
                body, label = images[index]
                deadline = rng.uniform(*deadlines)
                headers = {"content-type": "image/png", "x-deadline-ms": f"{deadline:.3f}", "x-label": str(label)}
            else:
                body, content_type, deadline_text = MALFORMED[index % len(MALFORMED)]
                body = images[0][0] if body is None else body
                headers = {"content-type": content_type}
                if deadline_text is not None:
                    headers["x-deadline-ms"] = deadline_text
                label = None
            sent = time.perf_counter()
            retry_after = None
            try:
                response = await client.post("/predict", content=body, headers=headers)
                status, answer = response.status, response.json()
                retry_after = response.headers.get("retry-after")
            except ConnectFailed as exc:   # never accepted (a server that has closed its socket)
                status, answer = -1, {"error": str(exc)}
            except NoAnswer as exc:        # sent, and no answer came: a lost request
                status, answer = 0, {"error": str(exc)}
            done = time.perf_counter()
            results.append({"kind": kind, "status": status, "label": label, "answer": answer, "sent": sent,
                            "done": done, "client_ms": 1e3 * (done - sent), "retry_after": retry_after})

        before = (await client.get("/metrics")).json()
        side = asyncio.create_task(during(client)) if during is not None else None
        tasks = []
        started = time.perf_counter()
        next_time = started
        for kind, index in plan:
            next_time += rng.expovariate(rate)
            delay = next_time - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(kind, index)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        if side is not None:
            side.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await side
        try:
            metrics = (await client.get("/metrics")).json()
        except (ConnectFailed, NoAnswer):   # the server is gone (a shutdown test)
            metrics = {}
    finally:
        client.close()
    return results, metrics, elapsed, before


def ran_a_model(record: dict) -> bool:
    return record["status"] == 200 and record["answer"].get("model") is not None


def server_effective_accuracy(before: dict, after: dict) -> float | None:
    """The server's own count (/metrics) over one load: correct and on time / labelled requests."""
    if not after or not before:
        return None
    labelled = after["labelled"] - before["labelled"]
    hits = after["labelled_correct_on_time"] - before["labelled_correct_on_time"]
    return hits / labelled if labelled else None


def summarize(results: list[dict], metrics: dict, elapsed: float, before: dict, rate: float) -> dict:
    """The figures of one load: deadline hits, delivered and effective accuracy (correct and on time,
    over every valid request: refused, expired, shed and late ones count as misses), latency quantiles."""
    valid = [r for r in results if r["kind"] == "valid"]
    answered = [r for r in valid if ran_a_model(r)]
    met = [r for r in answered if r["answer"]["deadline_met"]]
    correct = [r for r in answered if r["answer"]["class"] == r["label"]]
    server_ms = sorted(r["answer"]["time_ms"] for r in answered) or [float("nan")]
    bad = [r for r in results if r["kind"] == "bad"]
    models: dict[str, int] = {}
    for r in answered:
        models[r["answer"]["model"]] = models.get(r["answer"]["model"], 0) + 1
    return {"rate": rate, "offered_rate": len(results) / elapsed, "valid": len(valid), "answered": len(answered),
            "lost": len([r for r in valid if r["status"] not in (200, 503)]),
            "shed": len([r for r in valid if r["status"] == 503]),
            "expired": len([r for r in valid if r["status"] == 200 and r["answer"].get("expired")]),
            "hit_rate": len(met) / max(1, len(valid)), "accuracy": len(correct) / max(1, len(answered)),
            "effective_accuracy": len([r for r in met if r["answer"]["class"] == r["label"]]) / max(1, len(valid)),
            "server_effective_accuracy": server_effective_accuracy(before, metrics),
            "p50_ms": server_ms[len(server_ms) // 2],
            "p99_ms": server_ms[min(len(server_ms) - 1, int(0.99 * len(server_ms)))],
            "malformed": len(bad), "malformed_4xx": len([r for r in bad if 400 <= r["status"] < 500]),
            "models": models, "rss_bytes": metrics.get("rss_bytes")}


async def run_load(url: str, images, rate: float, count: int, deadlines: tuple[float, float], seed: int,
                   malformed: int = 0) -> dict:
    return summarize(*(await send_load(url, images, rate, count, deadlines, seed, malformed)), rate)


def decision_cost(zoo: Path, blocking_risk: float) -> tuple[float, float, float]:
    """(median us per decision of the selector's search alone, of the runtime's whole choice with the
    blocking guard fed 200 requests, the fastest model's median batch-1 ms)."""
    from leancnn.zoo.runtime import Runtime

    runtime = Runtime(zoo, blocking_risk=blocking_risk, threads=1)
    manifest = runtime.manifest
    rng = random.Random(0)
    for i in range(200):
        runtime.guard.record(i * 0.01, rng.uniform(10, 50))
    budgets = [rng.uniform(0, 2 * manifest["models"][-1]["expected_ms"]) for _ in range(1000)]

    def per_decision_us(choose) -> float:
        samples = []
        for _ in range(20):
            started = time.perf_counter()
            for budget in budgets:
                choose(budget)
            samples.append((time.perf_counter() - started) / len(budgets) * 1e6)
        return statistics.median(samples)

    return (per_decision_us(runtime.selector.choose), per_decision_us(runtime.choose),
            manifest["models"][0]["latency_median_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default=str(ROOT / "benchmarks" / "out" / "serve_zoo"))
    parser.add_argument("--from", dest="sources", nargs="+", default=DEFAULT_SOURCES)
    parser.add_argument("--rates", type=float, nargs="+", default=[50, 100, 150, 200, 300])
    parser.add_argument("--requests", type=int, default=1000, help="valid requests per rate and policy")
    parser.add_argument("--deadline-ms", type=float, nargs=2, default=[10.0, 50.0], metavar=("LOW", "HIGH"),
                        help="deadlines drawn uniformly from [LOW, HIGH] ms (default 10 50)")
    parser.add_argument("--threads", type=int, default=1, help="server inference threads")
    parser.add_argument("--quantile", type=float, default=0.99, help="serve --quantile (default 0.99)")
    parser.add_argument("--blocking-risk", type=float, default=0.02, help="serve --blocking-risk (default 0.02)")
    parser.add_argument("--no-pinning", action="store_true", help="leave CPU placement to the OS")
    parser.add_argument("--malformed", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import httpx

    zoo = Path(args.zoo)
    if not (zoo / "manifest.json").is_file():
        from leancnn.zoo.build import build_zoo

        sources = [str(ROOT / s) for s in args.sources if (ROOT / s).exists()]
        print(f"building the zoo from {', '.join(sources)} ...", flush=True)
        build_zoo(sources, zoo, runs=50, threads=args.threads)
    manifest = json.loads((zoo / "manifest.json").read_text())
    images = test_images(2000, args.seed)
    extra = ["--quantile", str(args.quantile), "--blocking-risk", str(args.blocking_risk)]
    pinned = not args.no_pinning and len(ALL_CPUS) >= 2
    if pinned:
        extra += ["--inference-cpus", str(ALL_CPUS[-1])]
        os.sched_setaffinity(0, ALL_CPUS[:-1])
    rows = []
    for policy in POLICIES:
        server = Server(zoo, policy, args.threads, extra)
        try:
            with httpx.Client() as client:
                server.wait(client)
            for rate in args.rates:
                row = asyncio.run(run_load(server.url, images, rate, args.requests, tuple(args.deadline_ms),
                                           args.seed))
                row["policy"] = policy
                rows.append(row)
                print(f"{policy:14s} rate {rate:5.0f}/s: hits {100 * row['hit_rate']:.1f}%, accuracy "
                      f"{100 * row['accuracy']:.2f}%, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                      f"lost {row['lost']}", flush=True)
        finally:
            server.stop()
    adaptive_ok = [r for r in rows if r["policy"] == "adaptive" and r["hit_rate"] >= 0.99]
    best_rate = max((r["rate"] for r in adaptive_ok), default=min(args.rates))
    server = Server(zoo, "adaptive", args.threads, extra)
    mixed_rounds = []
    try:
        with httpx.Client() as client:
            server.wait(client)
            rss = [client.get(server.url + "/metrics").json()["rss_bytes"]]
        # Two rounds: the first may grow the allocator's arenas (bodies up to 2 MiB); steady memory
        # means the second adds nothing much.
        for round_seed in (1, 2):
            mixed_rounds.append(asyncio.run(run_load(server.url, images, best_rate, args.requests,
                                                     tuple(args.deadline_ms), args.seed + round_seed,
                                                     malformed=args.malformed)))
            with httpx.Client() as client:
                rss.append(client.get(server.url + "/metrics").json()["rss_bytes"])
    finally:
        server.stop()
    search_us, decision_us, fastest_ms = decision_cost(zoo, args.blocking_risk)
    lines = ["| policy | rate (req/s) | deadline hits | delivered accuracy | effective accuracy | p50 (ms) | "
             "p99 (ms) | expired | shed (503) | lost |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["rate"], list(POLICIES).index(r["policy"]))):
        lines.append(f"| {r['policy']} | {r['rate']:.0f} | {100 * r['hit_rate']:.1f}% | {100 * r['accuracy']:.2f}% | "
                     f"{100 * r['effective_accuracy']:.1f}% | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['expired']} | "
                     f"{r['shed']} | {r['lost']} |")
    zoo_lines = ["| zoo model | accuracy | batch-1 median (ms) | p90 (ms) |", "| --- | ---: | ---: | ---: |"]
    for m in manifest["models"]:
        zoo_lines.append(f"| {m['name']} | {100 * m['accuracy']:.2f}% | {m['latency_median_ms']:.3f} | "
                         f"{m['latency_p90_ms']:.3f} |")
    summary = (f"{machine_line()}\n\nZoo: {len(manifest['models'])} of {len(manifest['models']) + len(manifest['dropped'])} "
               f"runs on the thinned front (p90 latency, epsilon {manifest['epsilon']}); server with "
               f"{args.threads} inference thread(s) in its worker process"
               + (f" on CPU {ALL_CPUS[-1]}, event loop and clients on CPU {ALL_CPUS[:-1]}" if pinned else "")
               + f", plans at p{100 * args.quantile:g} of measured times, blocking risk {args.blocking_risk:g}; "
               f"clients on loopback (benchmarks/http_load.py, asyncio), Poisson arrivals, "
               f"{args.requests} valid requests per point, deadlines uniform in [{args.deadline_ms[0]:g}, "
               f"{args.deadline_ms[1]:g}] ms counted from the server's arrival, Fashion-MNIST test images as PNG.\n\n"
               + "\n".join(zoo_lines) + "\n\n" + "\n".join(lines) + "\n\n"
               + (f"Highest rate with the adaptive policy at >= 99% hits: **{best_rate:g}/s**. There, with "
                  if adaptive_ok else
                  f"No rate gave the adaptive policy >= 99% hits; at the lowest, {best_rate:g}/s, with ") +
               f"{args.malformed} malformed requests mixed in, twice: "
               + "; ".join(f"round {i + 1}: {m['malformed_4xx']} of {m['malformed']} answered 4xx, {m['lost']} valid "
                           f"requests lost, {100 * m['hit_rate']:.1f}% deadline hits" for i, m in enumerate(mixed_rounds))
               + f". Server memory (RSS): {rss[0] / 2**20:.1f} MiB before, {rss[1] / 2**20:.1f} after round 1, "
               f"{rss[2] / 2**20:.1f} after round 2.\n\nDecision cost: "
               f"the selector's search {search_us:.2f} us, the whole choice with the blocking guard "
               f"{decision_us:.2f} us, {100 * decision_us / 1000 / fastest_ms:.3f}% of the fastest "
               f"model's {fastest_ms:.3f} ms.")
    print(summary)
    publish("serve_load", summary, document="docs/serving.md", data={"cpu": cpu_model(), "rows": rows, "mixed": mixed_rounds, "rss_bytes": rss, "best_rate": best_rate,
                                    "search_us": search_us, "decision_us": decision_us})


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
