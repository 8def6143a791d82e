"""Faults under load, on loopback, bounded in time: `leancnn serve` with the
worker killed every few seconds, an overload phase, and SIGTERM under load.

1. Kills: Poisson load at `--rate` for `--duration` s while the serving worker
   is killed (SIGKILL) every `--kill-every` s (and first the same load without
   kills, the baseline for the hit rate). Every request must be answered
   (200, or 503 with Retry-After; none lost or hung); a worker must serve again
   within 2 s of each kill (from the kill to the first answer a model gave to a
   request sent after it); deadline hits are counted outside those 2 s windows.
2. Overload: `--overload-requests` at twice the highest rate the adaptive
   policy sustained at >= 99% hits (serve_load.py's result on this machine,
   or `--sustainable-rate`): p99 of the answered requests against the largest
   deadline, what was shed with 503, and the resident memory of the server
   and its workers, sampled through the run (steady: within 10 MiB from the
   first tenth to the end).
3. SIGTERM under load: the server must exit 0 within 5 s, every request sent
   before the signal answered; after it, 503s and refused connections only.

Pinning as in serve_load.py (worker on the last CPU, event loop, the standby's
loading and the clients on the others).

    .venv/bin/python benchmarks/serve_chaos.py [--zoo DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

from common import cpu_model, machine_line, publish
from serve_load import ALL_CPUS, ROOT, Server, ran_a_model, send_load, summarize, test_images

RECOVERY_LIMIT_S = 2.0


def answered(record: dict) -> bool:
    """200, or 503 that says when to retry: the outcomes a client can act on."""
    return record["status"] == 200 or (record["status"] == 503 and record["retry_after"] is not None)


async def kill_phase(server: Server, images, args, kill: bool = True) -> dict:
    """The kill phase's load; with `kill` False, the same load (same seed) without faults: the baseline
    the hits outside the windows are compared with."""
    kills: list[float] = []

    async def killer(client) -> None:
        while kill:
            await asyncio.sleep(args.kill_every)
            pid = (await client.get("/metrics")).json()["worker"]["pid"]
            if pid is None:   # still restarting from the last kill
                continue
            kills.append(time.perf_counter())
            os.kill(pid, signal.SIGKILL)

    count = int(args.rate * args.duration)
    results, metrics, elapsed, before = await send_load(server.url, images, args.rate, count, tuple(args.deadline_ms),
                                                        args.seed, during=killer)
    recoveries = []
    for kill in kills:
        served = [r["done"] for r in results if r["sent"] >= kill and ran_a_model(r)]
        recoveries.append(min(served) - kill if served else float("inf"))
    outside = [r for r in results if not any(k <= r["sent"] < k + RECOVERY_LIMIT_S for k in kills)]
    met_outside = [r for r in outside if ran_a_model(r) and r["answer"]["deadline_met"]]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"requests": len(results), "elapsed_s": elapsed, "kills": len(kills), "recoveries_s": recoveries,
            "server_recoveries_s": metrics["worker"]["recoveries_s"], "restarts": metrics["worker"]["restarts"],
            "statuses": statuses, "unanswered": len([r for r in results if not answered(r)]),
            "shed_without_retry_after": len([r for r in results if r["status"] == 503 and not r["retry_after"]]),
            "outside": len(outside), "hit_rate_outside": len(met_outside) / max(1, len(outside)),
            "summary": summarize(results, metrics, elapsed, before, args.rate)}


async def overload_phase(server: Server, images, rate: float, args) -> dict:
    samples: list[tuple[float, int, int]] = []   # (s since start, server RSS, workers' RSS)

    async def sampler(client) -> None:
        started = time.perf_counter()
        while True:
            values = (await client.get("/metrics")).json()
            samples.append((time.perf_counter() - started, values["rss_bytes"], values["worker"]["rss_bytes"]))
            await asyncio.sleep(2.0)

    results, metrics, elapsed, before = await send_load(server.url, images, rate, args.overload_requests,
                                                        tuple(args.deadline_ms), args.seed + 1, during=sampler)
    row = summarize(results, metrics, elapsed, before, rate)
    client_ms = sorted(r["client_ms"] for r in results if ran_a_model(r)) or [float("nan")]
    tenth = [s for s in samples if s[0] >= samples[-1][0] / 10] or samples
    return {"rate": rate, "requests": len(results), "elapsed_s": elapsed, "summary": row,
            "client_p99_ms": client_ms[min(len(client_ms) - 1, int(0.99 * len(client_ms)))],
            "unanswered": len([r for r in results if not answered(r)]), "rss_samples": samples,
            "server_rss_growth_mib": (samples[-1][1] - tenth[0][1]) / 2**20,
            "worker_rss_growth_mib": (samples[-1][2] - tenth[0][2]) / 2**20}


async def sigterm_phase(server: Server, images, args) -> dict:
    signalled: list[float] = []
    exited: list[float] = []

    async def terminate(client) -> None:
        await asyncio.sleep(args.sigterm_after)
        signalled.append(time.perf_counter())
        server.process.send_signal(signal.SIGTERM)
        while server.process.poll() is None:
            await asyncio.sleep(0.01)
        exited.append(time.perf_counter())

    count = int(args.rate * (args.sigterm_after + 3.0))   # keeps sending for 3 s after the signal
    results, _, elapsed, _ = await send_load(server.url, images, args.rate, count, tuple(args.deadline_ms),
                                             args.seed + 2, during=terminate)
    try:
        code = server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        code = None
    at = signalled[0]
    before = [r for r in results if r["sent"] < at]
    after = [r for r in results if r["sent"] >= at]
    return {"requests": len(results), "exit_code": code, "exit_s": (exited[0] if exited else time.perf_counter()) - at,
            "before": len(before), "before_unanswered": len([r for r in before if not answered(r)]),
            "after_503": len([r for r in after if r["status"] == 503]),
            "after_refused": len([r for r in after if r["status"] == -1]),
            "after_200": len([r for r in after if r["status"] == 200]),
            "after_lost": len([r for r in after if r["status"] not in (200, 503, -1)])}


def sustainable_rate(given: float | None) -> tuple[float, str]:
    if given:
        return given, "given"
    results = ROOT / "benchmarks" / "results" / "serve_load.json"
    if results.is_file():
        data = json.loads(results.read_text())
        if data.get("cpu") == cpu_model():
            return float(data["best_rate"]), "serve_load.py on this machine"
    return 150.0, "the figure the serving issue states (150/s); serve_load.py has not run on this machine"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default=str(ROOT / "benchmarks" / "out" / "serve_zoo"))
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s while killing (default 100)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the kill phase (default 60)")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills (default 10)")
    parser.add_argument("--sustainable-rate", type=float, default=None,
                        help="highest rate at >= 99%% hits (default: serve_load.py's result on this machine)")
    parser.add_argument("--overload-requests", type=int, default=100_000)
    parser.add_argument("--sigterm-after", type=float, default=5.0, help="seconds of load before SIGTERM")
    parser.add_argument("--deadline-ms", type=float, nargs=2, default=[10.0, 50.0], metavar=("LOW", "HIGH"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a toy run (short phases), nothing published")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.kill_every, args.overload_requests, args.sigterm_after = 13.0, 6.0, 2000, 2.0
    import httpx

    zoo = Path(args.zoo)
    if not (zoo / "manifest.json").is_file():
        raise SystemExit(f"no zoo at {zoo}: build one (leancnn zoo build ... --out {zoo})")
    manifest = json.loads((zoo / "manifest.json").read_text())
    images = test_images(2000, args.seed)
    extra = []
    pinned = len(ALL_CPUS) >= 2
    if pinned:
        extra += ["--inference-cpus", str(ALL_CPUS[-1])]
        os.sched_setaffinity(0, ALL_CPUS[:-1])
    rate2, rate_source = sustainable_rate(args.sustainable_rate)
    overload_rate = 2 * rate2
    phases = {}
    for name, run in (("baseline", lambda s: kill_phase(s, images, args, kill=False)),
                      ("kills", lambda s: kill_phase(s, images, args)),
                      ("overload", lambda s: overload_phase(s, images, overload_rate, args)),
                      ("sigterm", lambda s: sigterm_phase(s, images, args))):
        server = Server(zoo, "adaptive", args.threads, extra)
        try:
            with httpx.Client() as client:
                server.wait(client)
            print(f"{name} ...", flush=True)
            phases[name] = asyncio.run(run(server))
            print(json.dumps({k: v for k, v in phases[name].items() if k not in ("rss_samples",)}, default=str),
                  flush=True)
        finally:
            if server.process.poll() is None:
                server.stop()
    base, kills, over, term = phases["baseline"], phases["kills"], phases["overload"], phases["sigterm"]
    recoveries = kills["recoveries_s"]
    lines = [machine_line(), "",
             f"Zoo: {len(manifest['models'])} models ({', '.join(m['name'] for m in manifest['models'])}); "
             f"`leancnn serve`" + (f" with the worker on CPU {ALL_CPUS[-1]}, event loop, fork server "
                                 f"and clients on CPU {ALL_CPUS[:-1]}" if pinned else "")
             + f"; deadlines uniform in [{args.deadline_ms[0]:g}, {args.deadline_ms[1]:g}] ms; Poisson arrivals; "
             f"loopback.", "",
             "| phase | figure | target | measured |", "| --- | --- | --- | ---: |",
             f"| kills ({args.rate:g}/s, {args.duration:g} s, SIGKILL every {args.kill_every:g} s) | requests answered "
             f"(200, or 503 with Retry-After) | all | {kills['requests'] - kills['unanswered']} of {kills['requests']} |",
             f"| | worker serving again after each of {kills['kills']} kills (kill to first model answer) | "
             f"<= {RECOVERY_LIMIT_S:g} s | max {max(recoveries, default=float('nan')):.3f} s, median "
             f"{statistics.median(recoveries) if recoveries else float('nan'):.3f} s |",
             f"| | deadline hits outside the {RECOVERY_LIMIT_S:g} s windows ({kills['outside']} requests) | >= 99% | "
             f"{100 * kills['hit_rate_outside']:.1f}% (the same load without kills: "
             f"{100 * base['summary']['hit_rate']:.1f}%) |",
             f"| | all requests: hits / effective accuracy / shed (503) / expired | | "
             f"{100 * kills['summary']['hit_rate']:.1f}% / {100 * kills['summary']['effective_accuracy']:.1f}% / "
             f"{kills['summary']['shed']} / {kills['summary']['expired']} |",
             f"| overload ({over['rate']:g}/s = 2 x {rate2:g}, {over['requests']} requests) | p99 of answered "
             f"requests (server / client) | < {args.deadline_ms[1]:g} ms | {over['summary']['p99_ms']:.2f} / "
             f"{over['client_p99_ms']:.2f} ms |",
             f"| | shed (503) / expired / answered by a model / unanswered | | {over['summary']['shed']} / "
             f"{over['summary']['expired']} / {over['summary']['answered']} / {over['unanswered']} |",
             f"| | offered rate reached | | {over['summary']['offered_rate']:.0f}/s |",
             f"| | RSS growth from the first tenth to the end: server / workers | within 10 MiB | "
             f"{over['server_rss_growth_mib']:+.1f} / {over['worker_rss_growth_mib']:+.1f} MiB |",
             f"| SIGTERM after {args.sigterm_after:g} s of {args.rate:g}/s | exit status, time to exit | 0, < 5 s | "
             f"{term['exit_code']}, {term['exit_s']:.2f} s |",
             f"| | requests sent before the signal left unanswered | 0 | {term['before_unanswered']} of "
             f"{term['before']} |",
             f"| | after it: 200 / 503 / connection refused / lost | lost 0 | {term['after_200']} / "
             f"{term['after_503']} / {term['after_refused']} / {term['after_lost']} |", "",
             f"Sustainable rate from {rate_source}. Server-side recovery (death seen to a forked worker serving): "
             f"{', '.join(f'{t * 1e3:.1f}' for t in kills['server_recoveries_s'])} ms."]
    block = "\n".join(lines)
    print(block)
    if not args.quick:
        publish("serve_chaos", block, document="docs/serving.md", data=phases)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
