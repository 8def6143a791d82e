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

Workers are forked from a fork server (a zygote, as Android and gunicorn's
preload do it): a process that imported torch, loaded the zoo, planned and
warmed its models once, and then only forks. A new worker is ready in tens of
milliseconds instead of the ~6-10 s that importing torch, loading and planning
take (the deploy plans alone were 3.9 s for three models here), so a killed
worker is replaced within the 2 s a restart may take, without loading
anything on the CPU the server's event loop needs. The fork server runs no
torch op after it has started (one thread, no OpenMP team, nothing in flight),
which is what makes forking it safe; its children share its weights' pages.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import multiprocessing
import os
import signal
import struct
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Callable

import numpy as np
import torch

from ..allocator import keep_freed_memory
from ..measure.latency import quantile
from ..zoo.runtime import Runtime, has_expired

# Tags of the messages (first byte).
PREDICT, PING, FORK, QUIT = b"P", b"N", b"F", b"Q"
STARTED, RESULT, EXPIRED, PONG, FORKED, FAILED = b"S", b"R", b"X", b"O", b"K", b"E"
REQUEST_HEADER = struct.Struct("<Qddd")      # id, arrival (perf_counter s), deadline (ms), return overhead (ms)
RESULT_HEADER = struct.Struct("<Qiidi?")     # id, model index (-1: refused), label, ready (perf_counter s), classes, fits
RETURN_WINDOW = 200                          # recent answer hand-backs the overhead quantile covers
RETURN_QUANTILE = 0.9


class WorkerGone(RuntimeError):
    """The worker process exited or failed a request."""


class WorkerExited(WorkerGone):
    """The worker process is gone (killed, crashed): the request may be retried on its successor."""


@dataclass
class Answer:
    model_index: int | None
    label: int
    probabilities: list[float]
    fits: bool
    expected_ms: list[float]   # each model's expected time in the worker after this request
    expired: bool = False      # past its deadline when the worker picked it up: no model ran


def pin_threads(cpus: list[int]) -> None:
    """Move every thread of this process (torch's pool included) to `cpus`; sched_setaffinity(0)
    alone moves only the calling thread."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except OSError:   # a thread that has just exited
            pass


def process_rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process now (Linux; 0 where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def expire_waiting(queue: deque[bytes], runtime: Runtime, conn) -> deque[bytes]:
    """Answer every queued request already past its deadline (no model runs) and return the rest:
    the plan's count of requests waiting behind the next one then leaves them out."""
    now = time.perf_counter()
    kept: deque[bytes] = deque()
    for message in queue:
        if message[:1] == PREDICT:
            request_id, arrival, deadline_ms, _ = REQUEST_HEADER.unpack_from(message, 1)
            if has_expired(arrival, deadline_ms, now):
                runtime.expire(arrival, deadline_ms)
                conn.send_bytes(EXPIRED + struct.pack("<Q", request_id))
                continue
        kept.append(message)
    return kept


def started_message(runtime: Runtime) -> bytes:
    return STARTED + json.dumps({"names": runtime.names, "input_shape": list(runtime.input_shape),
                                 "expected_ms": runtime.expected_ms()}).encode()


def fork_server_main(control, zoo: str, policy: str, fixed: str | None, plan_quantile: float | None,
                     blocking_risk: float | None, cpus: list[int] | None) -> None:
    """The fork server's main loop: load the zoo once, then fork a worker for each FORK request.
    It runs torch on one thread: forking after an OpenMP team has run can leave the child waiting
    on threads it does not have; a worker that wants more threads starts its team after the fork."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the server stops it with QUIT or by closing the pipe
    keep_freed_memory()   # each answer's activations reuse the last one's memory: no page faults
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        runtime = Runtime(zoo, policy=policy, fixed=fixed, threads=1, plan_quantile=plan_quantile,
                          blocking_risk=blocking_risk)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which exits with it
        control.send_bytes(FAILED + f"{type(exc).__name__}: {exc}".encode())
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # its workers are reaped by the kernel when they exit
    control.send_bytes(started_message(runtime))
    gc.collect()
    gc.freeze()   # the models' objects are never collected; keep the collector's passes short
    while True:
        try:
            message = control.recv_bytes()
        except (EOFError, OSError):
            return
        if message[:1] != FORK:
            return
        ours, theirs = multiprocessing.Pipe(duplex=True)
        pid = os.fork()
        if pid == 0:
            control.close()
            ours.close()
            request = json.loads(message[1:])
            run_forked_worker(theirs, runtime, request["cpus"], request["threads"])
        theirs.close()
        control.send_bytes(FORKED + struct.pack("<q", pid))
        reduction.send_handle(control, ours.fileno(), 0)   # the server's end of the worker's pipe
        ours.close()


def run_forked_worker(conn, runtime: Runtime, cpus: list[int], threads: int) -> None:
    """In the forked child: onto the inference CPUs with its threads, the model times measured
    there, then serve."""
    code = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if cpus:
            pin_threads(cpus)
        torch.set_num_threads(threads)
        runtime.reseed()
        conn.send_bytes(started_message(runtime))
        serve_requests(conn, runtime)
    except BaseException:  # noqa: BLE001 - a forked child must never return into the fork server's loop
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def serve_requests(conn, runtime: Runtime) -> None:
    """A worker's loop: answer requests in arrival order until QUIT or the pipe closes."""
    channels, height, width = runtime.input_shape
    queue: deque[bytes] = deque()
    while True:
        try:
            if not queue:
                conn.poll(None)
            while conn.poll(0):
                queue.append(conn.recv_bytes())
        except (EOFError, OSError):
            return
        queue = expire_waiting(queue, runtime, conn)
        if not queue:
            continue
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
        if prediction.expired:   # expired between the queue's sweep and the decision
            conn.send_bytes(EXPIRED + struct.pack("<Q", request_id))
            continue
        index = -1 if prediction.model is None else runtime.names.index(prediction.model)
        probabilities = np.asarray(prediction.probabilities, dtype=np.float32)
        conn.send_bytes(RESULT + RESULT_HEADER.pack(request_id, index, prediction.label, time.perf_counter(),
                                                    len(probabilities), prediction.expected_to_fit)
                        + probabilities.tobytes() + np.asarray(runtime.expected_ms(), dtype=np.float32).tobytes())


def read_started(conn, timeout_s: float, what: str) -> dict:
    """Wait for a process's STARTED message; WorkerGone with its reason otherwise."""
    if not conn.poll(timeout_s):
        raise WorkerGone(f"the {what} did not start within {timeout_s:.0f} s")
    try:
        message = conn.recv_bytes()
    except (EOFError, OSError):
        raise WorkerGone(f"the {what} exited while starting") from None
    if message[:1] != STARTED:
        raise WorkerGone(f"the {what} could not load the zoo: {message[1:].decode(errors='replace')}")
    return json.loads(message[1:])


class ForkServer:
    """The server's handle on the fork server: `fork(cpus)` returns a started InferenceWorker."""

    def __init__(self, zoo: str, *, policy: str = "fastest", fixed: str | None = None, threads: int | None = None,
                 plan_quantile: float | None = None, blocking_risk: float | None = None,
                 cpus: list[int] | None = None, start_timeout_s: float = 300.0) -> None:
        """Starts the process and waits until it has loaded the zoo (blocking: seconds). `cpus`: where
        it loads (the CPUs the event loop does not need most)."""
        self.threads = threads or 1
        context = multiprocessing.get_context("spawn")   # the fork server itself: a clean process
        self.control, child = context.Pipe(duplex=True)
        self.process = context.Process(target=fork_server_main,
                                       args=(child, str(zoo), policy, fixed, plan_quantile, blocking_risk, cpus),
                                       name="leancnn-forkserver", daemon=True)
        self.process.start()
        child.close()
        try:
            info = read_started(self.control, start_timeout_s, "fork server")
        except WorkerGone:
            self.process.kill()
            raise
        self.names: list[str] = info["names"]
        self.input_shape: tuple[int, ...] = tuple(info["input_shape"])

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def rss_bytes(self) -> int:
        return process_rss_bytes(self.pid)

    def fork(self, cpus: list[int] | None, return_ms: deque[float] | None = None,
             timeout_s: float = 60.0) -> InferenceWorker:
        """A new worker on `cpus` (None: where the fork server is), started and warm (blocking: tens of ms).
        `return_ms`: the hand-back times its predecessor measured (they are the event loop's, not the
        worker's); without them it measures its own with round trips."""
        try:
            self.control.send_bytes(FORK + json.dumps({"cpus": cpus or [], "threads": self.threads}).encode())
            if not self.control.poll(timeout_s):
                raise WorkerGone(f"the fork server did not fork within {timeout_s:.0f} s")
            message = self.control.recv_bytes()
            (pid,) = struct.unpack_from("<q", message, 1)
            handle = reduction.recv_handle(self.control)
        except (EOFError, OSError) as error:
            raise WorkerGone(f"the fork server is gone ({type(error).__name__})") from None
        return InferenceWorker(Connection(handle), pid, timeout_s, return_ms)

    def close(self, timeout_s: float = 2.0) -> None:
        try:
            self.control.send_bytes(QUIT)
        except OSError:
            pass
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
        self.control.close()


class InferenceWorker:
    """The server's handle on one worker process (forked by a ForkServer): `await predict(...)` from the
    event loop."""

    def __init__(self, conn: Connection, pid: int, start_timeout_s: float = 60.0,
                 return_ms: deque[float] | None = None) -> None:
        self.conn = conn
        self.pid = pid
        try:
            info = read_started(conn, start_timeout_s, "inference worker")
        except WorkerGone:
            self.kill()
            raise
        self.names: list[str] = info["names"]
        self.input_shape: tuple[int, ...] = tuple(info["input_shape"])
        self.expected_ms: list[float] = info["expected_ms"]
        self.ids = itertools.count()
        self.pending: dict[int, asyncio.Future] = {}
        self.return_ms: deque[float] = deque(maxlen=RETURN_WINDOW)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_exit: Callable[[InferenceWorker], None] | None = None
        self.gone: str | None = None
        if return_ms:
            # Round trips from a thread while the event loop serves wait for the GIL at each step
            # (0.5-1 s for 30 under load here): the predecessor's window is the same event loop's.
            self.return_ms.extend(return_ms)
        else:
            self.measure_return()

    def rss_bytes(self) -> int:
        return process_rss_bytes(self.pid)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def measure_return(self, repeats: int = 30) -> None:
        """Seed the hand-back overhead with round trips of an empty message (before the event loop runs)."""
        for request_id in range(repeats):
            self.conn.send_bytes(PING + struct.pack("<Q", request_id))
            reply = self.conn.recv_bytes()
            (ready,) = struct.unpack_from("<d", reply, 9)
            self.return_ms.append(1e3 * (time.perf_counter() - ready))

    def overhead_ms(self) -> float:
        return quantile(self.return_ms, RETURN_QUANTILE) if self.return_ms else 0.0

    def attach(self, loop: asyncio.AbstractEventLoop,
               on_exit: Callable[[InferenceWorker], None] | None = None) -> None:
        """Answers are read on `loop`; `on_exit(self)` runs there once the process is found gone."""
        self.loop = loop
        self.on_exit = on_exit
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
            raise WorkerExited(self.gone) from None
        return await future

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._dispatch(self.conn.recv_bytes())
        except (EOFError, OSError):
            self._fail_all("the inference worker exited")

    def _dispatch(self, message: bytes) -> None:
        tag = message[:1]
        if tag == EXPIRED:
            (request_id,) = struct.unpack_from("<Q", message, 1)
            future = self.pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(Answer(None, -1, [], False, self.expected_ms, expired=True))
            return
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
        self.fail_pending(WorkerExited(reason))
        if self.on_exit is not None:
            self.on_exit(self)

    def fail_pending(self, error: Exception) -> None:
        """Answer every request still with the worker with `error` (its death, or a shutdown's deadline)."""
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()

    def close(self, timeout_s: float = 5.0) -> None:
        """QUIT after what it holds; killed if it has not exited (its pipe closed) within `timeout_s`."""
        if self.loop is not None and not self.gone:
            self.gone = "closed"
            self.loop.remove_reader(self.conn.fileno())
        try:
            self.conn.send_bytes(QUIT)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.conn.poll(max(0.0, deadline - time.monotonic())):
                self.conn.recv_bytes()   # answers nobody waits for any more, then EOF when it exits
            self.kill()
        except (EOFError, OSError):
            pass
        self.conn.close()
