"""The inference worker: a separate process that owns the zoo's models and
makes every decision, so the HTTP event loop and inference never share a GIL.

Sharing one process, the event loop (parsing, decoding, replying) and an
inference thread contend for the GIL at every torch op, and a busy loop
delays the model by up to Python's 5 ms switch interval; a process of its
own also lets the model have a CPU to itself (`cpus`).

The pipe carries plain bytes in both directions (a struct header and float32
arrays; no pickle). The worker drains the pipe before each decision, so it
knows how many requests wait behind the one it serves. Time runs on
time.perf_counter (CLOCK_MONOTONIC, shared by both processes): the deadline
counts from the request's arrival in the server, and the server sends with
each request the time it measured for getting an answer back (pipe and event
loop, a high quantile of recent ones), which the worker adds to its plan.
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import json
import multiprocessing
import os
import signal
import struct
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ..allocator import keep_freed_memory
from ..measure.latency import quantile
from ..zoo.runtime import Runtime

# Tags of the messages (first byte).
PREDICT, PING, QUIT = b"P", b"N", b"Q"
STARTED, RESULT, PONG, FAILED = b"S", b"R", b"O", b"E"
REQUEST_HEADER = struct.Struct("<Qddd")      # id, arrival (perf_counter s), deadline (ms), return overhead (ms)
RESULT_HEADER = struct.Struct("<Qiidi?")     # id, model index (-1: refused), label, ready (perf_counter s), classes, fits
RETURN_WINDOW = 200                          # recent answer hand-backs the overhead quantile covers
RETURN_QUANTILE = 0.9


class WorkerGone(RuntimeError):
    """The worker process exited or failed a request."""


@dataclass
class Answer:
    model_index: int | None
    label: int
    probabilities: list[float]
    fits: bool
    expected_ms: list[float]   # each model's expected time in the worker after this request


def serve_forever(conn, zoo: str, policy: str, fixed: str | None, threads: int | None,
                  plan_quantile: float | None, blocking_risk: float | None, cpus: list[int] | None) -> None:
    """The worker process's main loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the server stops it with QUIT or by closing the pipe
    keep_freed_memory()   # each answer's activations reuse the last one's memory: no page faults
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        runtime = Runtime(zoo, policy=policy, fixed=fixed, threads=threads, plan_quantile=plan_quantile,
                          blocking_risk=blocking_risk)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which exits with it
        conn.send_bytes(FAILED + f"{type(exc).__name__}: {exc}".encode())
        return
    channels, height, width = runtime.input_shape
    conn.send_bytes(STARTED + json.dumps({"names": runtime.names, "input_shape": list(runtime.input_shape),
                                          "expected_ms": runtime.expected_ms()}).encode())
    gc.collect()
    gc.freeze()   # the models' objects are never collected; keep the collector's passes short
    queue: deque[bytes] = deque()
    while True:
        try:
            if not queue:
                conn.poll(None)
            while conn.poll(0):
                queue.append(conn.recv_bytes())
        except (EOFError, OSError):
            return
        message = queue.popleft()
        tag = message[:1]
        if tag == QUIT:
            return
        if tag == PING:
            conn.send_bytes(PONG + message[1:9] + struct.pack("<d", time.perf_counter()))
            continue
        request_id, arrival, deadline_ms, return_ms = REQUEST_HEADER.unpack_from(message, 1)
        try:
            image = torch.frombuffer(bytearray(message[1 + REQUEST_HEADER.size:]), dtype=torch.float32)
            runtime.set_overhead(return_ms)
            prediction = runtime.predict(image.view(channels, height, width), deadline_ms, arrival,
                                         waiting=sum(1 for m in queue if m[:1] == PREDICT))
        except Exception as exc:  # noqa: BLE001 - one failed request must not stop the worker
            conn.send_bytes(FAILED + struct.pack("<Q", request_id) + f"{type(exc).__name__}: {exc}".encode())
            continue
        index = -1 if prediction.model is None else runtime.names.index(prediction.model)
        probabilities = np.asarray(prediction.probabilities, dtype=np.float32)
        conn.send_bytes(RESULT + RESULT_HEADER.pack(request_id, index, prediction.label, time.perf_counter(),
                                                    len(probabilities), prediction.expected_to_fit)
                        + probabilities.tobytes() + np.asarray(runtime.expected_ms(), dtype=np.float32).tobytes())


class InferenceWorker:
    """The server's handle on the worker process: `await predict(...)` from the event loop."""

    def __init__(self, zoo: str, *, policy: str = "fastest", fixed: str | None = None, threads: int | None = None,
                 plan_quantile: float | None = None, blocking_risk: float | None = None,
                 cpus: list[int] | None = None, start_timeout_s: float = 300.0) -> None:
        context = multiprocessing.get_context("spawn")   # no fork of a process with torch's threads
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=serve_forever, args=(child, str(zoo), policy, fixed, threads, plan_quantile, blocking_risk, cpus),
                                       name="leancnn-infer", daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(start_timeout_s):
            self.process.kill()
            raise WorkerGone(f"the inference worker did not start within {start_timeout_s:.0f} s")
        try:
            message = self.conn.recv_bytes()
        except EOFError:
            raise WorkerGone("the inference worker exited while loading the zoo") from None
        if message[:1] != STARTED:
            raise WorkerGone(f"the inference worker could not load the zoo: {message[1:].decode()}")
        info = json.loads(message[1:])
        self.names: list[str] = info["names"]
        self.input_shape: tuple[int, ...] = tuple(info["input_shape"])
        self.expected_ms: list[float] = info["expected_ms"]
        self.ids = itertools.count()
        self.pending: dict[int, asyncio.Future] = {}
        self.return_ms: deque[float] = deque(maxlen=RETURN_WINDOW)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.gone: str | None = None
        self.measure_return()

    def measure_return(self, repeats: int = 30) -> None:
        """Seed the hand-back overhead with round trips of an empty message (before the event loop runs)."""
        for request_id in range(repeats):
            self.conn.send_bytes(PING + struct.pack("<Q", request_id))
            reply = self.conn.recv_bytes()
            (ready,) = struct.unpack_from("<d", reply, 9)
            self.return_ms.append(1e3 * (time.perf_counter() - ready))

    def overhead_ms(self) -> float:
        return quantile(self.return_ms, RETURN_QUANTILE) if self.return_ms else 0.0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.conn.fileno(), self._readable)

    async def predict(self, image: np.ndarray, deadline_ms: float, arrival: float) -> Answer:
        if self.gone:
            raise WorkerGone(self.gone)
        request_id = next(self.ids)
        future = self.loop.create_future()
        self.pending[request_id] = future
        header = REQUEST_HEADER.pack(request_id, arrival, deadline_ms, self.overhead_ms())
        try:
            self.conn.send_bytes(PREDICT + header + np.ascontiguousarray(image, dtype=np.float32).tobytes())
        except OSError:
            self._fail_all("the inference worker exited")
            raise WorkerGone(self.gone) from None
        return await future

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._dispatch(self.conn.recv_bytes())
        except (EOFError, OSError):
            self._fail_all("the inference worker exited")

    def _dispatch(self, message: bytes) -> None:
        tag = message[:1]
        if tag == FAILED:
            (request_id,) = struct.unpack_from("<Q", message, 1)
            future = self.pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(WorkerGone(message[9:].decode()))
            return
        request_id, index, label, ready, count, fits = RESULT_HEADER.unpack_from(message, 1)
        self.return_ms.append(1e3 * (time.perf_counter() - ready))
        body = np.frombuffer(message, dtype=np.float32, offset=1 + RESULT_HEADER.size)
        self.expected_ms = [float(v) for v in body[count:]]
        future = self.pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(Answer(None if index < 0 else index, label, [round(float(p), 6) for p in body[:count]],
                                     fits, self.expected_ms))

    def _fail_all(self, reason: str) -> None:
        if self.gone:
            return
        self.gone = reason
        if self.loop is not None:
            self.loop.remove_reader(self.conn.fileno())
        for future in self.pending.values():
            if not future.done():
                future.set_exception(WorkerGone(reason))
        self.pending.clear()

    def close(self, timeout_s: float = 5.0) -> None:
        if self.loop is not None and not self.gone:
            self.loop.remove_reader(self.conn.fileno())
        try:
            self.conn.send_bytes(QUIT)
        except OSError:
            pass
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()
