"""Keeps an inference worker serving: when the serving one dies, a new one is
forked from the fork server (serve/worker.py) at once, and when the fork
server itself dies, a new one is started in the background while the worker
keeps serving.

Forking takes tens of milliseconds and loads nothing (the fork server holds
the zoo, planned and warm), so a killed worker is replaced well within 2 s;
until then /predict and /health answer 503 with Retry-After. Starting a fork
server takes seconds (importing torch, loading and planning the zoo); it loads
on the CPUs not reserved for inference.

A worker that keeps dying soon after it started (or a start that fails) makes
the next start wait, doubling from `first_backoff_s` up to `max_backoff_s`
(the restart policy of TorchServe and systemd); one that served `stable_s`
resets that.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from .worker import ForkServer, InferenceWorker, WorkerGone

HEALTH_CHECK_S = 1.0   # how often the supervisor looks at the fork server when nothing else wakes it


def backoff_s(failures: int, first_s: float, max_s: float) -> float:
    """Wait before the next start after `failures` quick deaths or failed starts in a row:
    0, first, 2 first, 4 first, ... at most max_s."""
    return 0.0 if failures <= 0 else min(max_s, first_s * 2.0 ** (failures - 1))


class Supervisor:
    def __init__(self, fork_server: ForkServer | None, start_fork_server: Callable[[], ForkServer],
                 first: InferenceWorker | None, *, inference_cpus: list[int] | None = None, stable_s: float = 5.0,
                 first_backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        self.fork_server = fork_server
        self.start_fork_server = start_fork_server
        self.active = first
        self.inference_cpus = inference_cpus
        self.stable_s, self.first_backoff_s, self.max_backoff_s = stable_s, first_backoff_s, max_backoff_s
        source = first or fork_server
        self.names, self.input_shape = source.names, source.input_shape
        self.restarts = 0              # serving workers that died (each replaced, or being replaced)
        self.fork_server_restarts = 0
        self.failures = 0              # quick deaths and failed starts in a row: the backoff's count
        self.last_error: str | None = None
        self.active_since = time.monotonic()
        self.down_since: float | None = None if first is not None else time.monotonic()
        self.recoveries_s: list[float] = []   # each death -> a worker serving again
        self.return_ms = None                 # the last worker's hand-back times, for its successor
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake: asyncio.Event | None = None
        self.keeper: asyncio.Task | None = None
        self.closing = False

    # -- state the server reads -------------------------------------------------------------------
    @property
    def status(self) -> str:
        return "ok" if self.active is not None else "restarting"

    def expected_ms(self) -> list[float]:
        return self.active.expected_ms if self.active is not None else []

    def rss_bytes(self) -> int:
        """The workers' resident memory: the serving one and the fork server (pages they share counted
        in both)."""
        return sum(p.rss_bytes() for p in (self.active, self.fork_server) if p is not None)

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the first worker to the event loop and start keeping the workers."""
        self.loop = loop
        self.wake = asyncio.Event()
        if self.active is not None:
            self.active.attach(loop, self._exited)
        self.keeper = loop.create_task(self._keep())

    async def _keep(self) -> None:
        """Start what is missing, one thing at a time, waiting the backoff between starts."""
        while not self.closing:
            fork_server_ok = self.fork_server is not None and self.fork_server.alive()
            if fork_server_ok and self.active is not None:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), HEALTH_CHECK_S)
                except TimeoutError:
                    pass
                continue
            delay = backoff_s(self.failures, self.first_backoff_s, self.max_backoff_s)
            if delay:
                await asyncio.sleep(delay)
            try:
                if not fork_server_ok:
                    if self.fork_server is not None:
                        self.fork_server_restarts += 1
                        await asyncio.to_thread(self.fork_server.close, 0.5)
                    self.fork_server = None
                    self.fork_server = await asyncio.to_thread(self.start_fork_server)
                    continue
                worker = await asyncio.to_thread(self.fork_server.fork, self.inference_cpus, self.return_ms)
            except WorkerGone as error:
                self.failures += 1
                self.last_error = str(error)
                continue
            if self.closing:
                await asyncio.to_thread(worker.close, 1.0)
                return
            worker.attach(self.loop, self._exited)
            self.active = worker
            self.active_since = time.monotonic()
            if self.down_since is not None:
                self.recoveries_s.append(time.monotonic() - self.down_since)
                self.down_since = None

    def _exited(self, worker: InferenceWorker) -> None:
        """A worker's pipe closed (on the event loop): fork its successor."""
        if self.closing or worker is not self.active:
            return
        self.restarts += 1
        self.last_error = worker.gone
        self.return_ms = worker.return_ms
        quick = time.monotonic() - self.active_since < self.stable_s
        self.failures = self.failures + 1 if quick else 0
        self.active = None
        self.down_since = time.monotonic()
        self.wake.set()

    async def close(self) -> None:
        self.closing = True
        if self.keeper is not None:
            self.keeper.cancel()
        closing = [(p, t) for p, t in ((self.active, 1.0), (self.fork_server, 1.0)) if p is not None]
        self.active, self.fork_server = None, None
        await asyncio.gather(*(asyncio.to_thread(p.close, t) for p, t in closing))
