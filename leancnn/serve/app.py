"""The HTTP server: POST /predict, GET /health, GET /metrics.

One inference worker (a single thread; torch's own threads inside it) serves
requests in arrival order; at most `max_pending` wait, the rest get 503. The
time left for a request is its deadline minus the time since it arrived,
queueing included, taken when the worker picks it up.
"""
from __future__ import annotations

import asyncio
import io
import os
import statistics
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..zoo.runtime import Prediction, Runtime
from .decode import RequestError, parse_request

LATENCY_WINDOW = 10_000  # the metrics' quantiles cover the most recent requests


def rss_bytes() -> int:
    """Resident memory now (Linux), for the metrics' steady-memory check."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class Metrics:
    def __init__(self) -> None:
        self.requests = 0
        self.answered = 0
        self.rejected: Counter[int] = Counter()
        self.deadline_met = 0
        self.deadline_missed = 0
        self.refused = 0
        self.per_model: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def record(self, prediction: Prediction) -> None:
        self.answered += 1
        self.latencies.append(prediction.time_ms)
        if prediction.model is None:
            self.refused += 1
        else:
            self.per_model[prediction.model] += 1
        if prediction.deadline_met:
            self.deadline_met += 1
        else:
            self.deadline_missed += 1

    def as_dict(self) -> dict:
        ordered = sorted(self.latencies)

        def q(fraction: float) -> float | None:
            return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 4) if ordered else None

        return {"requests": self.requests, "answered": self.answered,
                "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
                "deadline_met": self.deadline_met, "deadline_missed": self.deadline_missed, "refused": self.refused,
                "per_model": dict(self.per_model),
                "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "window": len(ordered)},
                "rss_bytes": rss_bytes()}


def measure_overhead(runtime: Runtime, executor: ThreadPoolExecutor, repeats: int = 50) -> float:
    """Median ms of decoding a typical request and handing it to the worker and back."""
    from PIL import Image

    channels, height, width = runtime.input_shape
    array = np.random.default_rng(0).integers(0, 255, (height, width, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if channels == 1 else array).save(buffer, format="PNG")
    body = buffer.getvalue()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        parse_request(body, "image/png", "100", None, runtime.input_shape)
        executor.submit(lambda: None).result()
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def create_app(runtime: Runtime, *, max_pending: int = 32, max_bytes: int = 1 << 20) -> Starlette:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leancnn-infer")
    metrics = Metrics()
    state = {"pending": 0}
    runtime.set_overhead(measure_overhead(runtime, executor))

    def reject(status: int, reason: str) -> JSONResponse:
        metrics.rejected[status] += 1
        return JSONResponse({"error": reason}, status_code=status)

    async def predict(request: Request) -> JSONResponse:
        arrival = time.perf_counter()
        metrics.requests += 1
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return reject(413, f"payload of {length} bytes is over the limit of {max_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                return reject(413, f"payload is over the limit of {max_bytes} bytes")
        try:
            parsed = parse_request(bytes(body), request.headers.get("content-type", ""),
                                   request.headers.get("x-deadline-ms"), request.query_params.get("deadline_ms"),
                                   runtime.input_shape)
        except RequestError as error:
            return reject(error.status, error.reason)
        if state["pending"] >= max_pending:
            return reject(503, f"busy: {max_pending} requests already waiting")
        state["pending"] += 1
        try:
            loop = asyncio.get_running_loop()
            prediction = await loop.run_in_executor(executor, lambda: runtime.predict(
                parsed.image, parsed.deadline_ms, arrival, waiting=state["pending"] - 1))
        finally:
            state["pending"] -= 1
        metrics.record(prediction)
        answer = asdict(prediction)
        answer["class"] = answer.pop("label")
        answer["refused"] = prediction.model is None
        return JSONResponse(answer)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": runtime.names, "overhead_ms": round(runtime.overhead_ms, 4),
                             "policy": runtime.fixed or f"adaptive ({runtime.policy} when nothing fits)"})

    async def metrics_endpoint(request: Request) -> JSONResponse:
        return JSONResponse(metrics.as_dict())

    @asynccontextmanager
    async def lifespan(app):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health),
                             Route("/metrics", metrics_endpoint)], lifespan=lifespan)
