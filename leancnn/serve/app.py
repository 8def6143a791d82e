"""The HTTP server: POST /predict, GET /health, GET /metrics.

The event loop reads and decodes requests; one inference worker process
(serve/worker.py) serves them in arrival order and chooses each one's model.
At most `max_pending` requests are with the worker, the rest get 503. The time
left for a request is its deadline minus the time since it arrived in the
server, queueing included; its time and whether it met the deadline are taken
when the answer is back in the server.
"""
from __future__ import annotations

import asyncio
import gc
import io
import os
import time
from collections import Counter, deque
from contextlib import asynccontextmanager
from dataclasses import asdict

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..measure.latency import quantile
from ..zoo.runtime import Prediction
from .decode import RequestError, parse_request
from .worker import InferenceWorker, WorkerGone

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
        def q(fraction: float) -> float | None:
            return round(quantile(list(self.latencies), fraction), 4) if self.latencies else None

        return {"requests": self.requests, "answered": self.answered,
                "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
                "deadline_met": self.deadline_met, "deadline_missed": self.deadline_missed, "refused": self.refused,
                "per_model": dict(self.per_model),
                "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "window": len(self.latencies)},
                "rss_bytes": rss_bytes()}


def warm_up_decoding(shape: tuple[int, ...]) -> None:
    """Decode one PNG and one JPEG before serving: the first decode imports and initialises the
    image plug-ins, and the first request of a fresh server took 57 ms instead of ~5."""
    from PIL import Image

    channels, height, width = shape
    image = Image.new("L" if channels == 1 else "RGB", (width, height))
    for kind in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        image.save(buffer, format=kind)
        parse_request(buffer.getvalue(), f"image/{kind.lower()}", "1", None, shape)


def create_app(zoo: str, *, policy: str = "fastest", fixed: str | None = None, threads: int | None = None,
               plan_quantile: float | None = None, blocking_risk: float | None = None,
               inference_cpus: list[int] | None = None,
               max_pending: int = 32, max_bytes: int = 1 << 20) -> Starlette:
    """The app, with its inference worker already started and warm (a few seconds: it loads torch and the zoo).
    `inference_cpus` pins the worker to those CPUs and this process (the event loop) to the others."""
    worker = InferenceWorker(str(zoo), policy=policy, fixed=fixed, threads=threads, plan_quantile=plan_quantile,
                             blocking_risk=blocking_risk, cpus=inference_cpus)
    if inference_cpus:
        rest = os.sched_getaffinity(0) - set(inference_cpus)
        if rest:
            os.sched_setaffinity(0, rest)
    metrics = Metrics()
    warm_up_decoding(worker.input_shape)

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
                                   worker.input_shape)
        except RequestError as error:
            return reject(error.status, error.reason)
        if len(worker.pending) >= max_pending:
            return reject(503, f"busy: {max_pending} requests already waiting")
        try:
            answer = await worker.predict(parsed.image.numpy(), parsed.deadline_ms, arrival)
        except WorkerGone as error:
            return reject(500, f"inference failed: {error}")
        spent = 1e3 * (time.perf_counter() - arrival)
        refused = answer.model_index is None
        prediction = Prediction(-1 if refused else answer.label, answer.probabilities,
                                None if refused else worker.names[answer.model_index], round(spent, 4),
                                parsed.deadline_ms, not refused and spent <= parsed.deadline_ms, answer.fits)
        metrics.record(prediction)
        reply = asdict(prediction)
        reply["class"] = reply.pop("label")
        reply["refused"] = refused
        return JSONResponse(reply)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok" if not worker.gone else f"failing: {worker.gone}",
                             "models": worker.names, "overhead_ms": round(worker.overhead_ms(), 4),
                             "policy": fixed or f"adaptive ({policy} when nothing fits)"},
                            status_code=200 if not worker.gone else 500)

    async def metrics_endpoint(request: Request) -> JSONResponse:
        values = metrics.as_dict()
        values["expected_ms"] = dict(zip(worker.names, (round(t, 4) for t in worker.expected_ms)))
        values["overhead_ms"] = round(worker.overhead_ms(), 4)
        return JSONResponse(values)

    @asynccontextmanager
    async def lifespan(app):
        worker.attach(asyncio.get_running_loop())
        # torch and the web stack leave ~10^5 long-lived objects that a full collection walks;
        # frozen, the collector skips them (the always-fastest p99 at 50/s went from 52 to 9 ms).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            worker.close()

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health),
                            Route("/metrics", metrics_endpoint)], lifespan=lifespan)
    app.state.worker = worker
    return app
