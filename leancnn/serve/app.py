"""The HTTP server: POST /predict, GET /health, GET /metrics.

The event loop reads and decodes requests; one inference worker process
(serve/worker.py) serves them in arrival order and chooses each one's model,
and a supervisor (serve/supervisor.py) forks a new one from the fork server
when it dies. At most `max_pending` requests are with the worker, the rest get 503. The
time left for a request is its deadline minus the time since it arrived in the
server, queueing included; its time and whether it met the deadline are taken
when the answer is back in the server. A request still waiting when its
deadline passes is answered `expired` without running a model.

Every 503 carries Retry-After (the worker restarting, busy, or the server
draining for shutdown); with a token set, /predict and /metrics need
`Authorization: Bearer TOKEN` (401 otherwise); /health stays open for probes.
"""
from __future__ import annotations

import asyncio
import gc
import hmac
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
from .decode import RequestError, parse_label, parse_request
from .supervisor import Supervisor
from .worker import ForkServer, WorkerExited, WorkerGone, process_rss_bytes

LATENCY_WINDOW = 10_000  # the metrics' quantiles cover the most recent requests
RETRY_AFTER_S = "1"      # what a 503 tells the client to wait: a standby takes over well within it


class Metrics:
    def __init__(self) -> None:
        self.requests = 0
        self.answered = 0
        self.rejected: Counter[int] = Counter()
        self.deadline_met = 0
        self.deadline_missed = 0
        self.refused = 0
        self.expired = 0
        self.per_model: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        # Requests that came with their true class (X-Label: a load test): effective accuracy is the
        # share of them answered correctly within the deadline, counting every one that was not
        # (refused, expired, late, shed with 503) as wrong (Model-Switching, HotCloud 2020).
        self.labelled = 0
        self.labelled_answered = 0
        self.labelled_correct = 0
        self.labelled_correct_on_time = 0

    def record(self, prediction: Prediction, label: int | None) -> None:
        self.answered += 1
        if prediction.expired:
            self.expired += 1
        elif prediction.model is None:
            self.refused += 1
        else:   # the latency quantiles are of answers a model gave (no instant refusals in them)
            self.per_model[prediction.model] += 1
            self.latencies.append(prediction.time_ms)
        if prediction.deadline_met:
            self.deadline_met += 1
        else:
            self.deadline_missed += 1
        if label is not None and prediction.model is not None:
            self.labelled_answered += 1
            if prediction.label == label:
                self.labelled_correct += 1
                self.labelled_correct_on_time += prediction.deadline_met

    def as_dict(self) -> dict:
        def q(fraction: float) -> float | None:
            return round(quantile(list(self.latencies), fraction), 4) if self.latencies else None

        return {"requests": self.requests, "answered": self.answered,
                "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
                "deadline_met": self.deadline_met, "deadline_missed": self.deadline_missed, "refused": self.refused,
                "expired": self.expired, "per_model": dict(self.per_model),
                "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "window": len(self.latencies)},
                "labelled": self.labelled, "labelled_answered": self.labelled_answered,
                "labelled_correct": self.labelled_correct, "labelled_correct_on_time": self.labelled_correct_on_time,
                "delivered_accuracy": (round(self.labelled_correct / self.labelled_answered, 6)
                                       if self.labelled_answered else None),
                "effective_accuracy": (round(self.labelled_correct_on_time / self.labelled, 6)
                                       if self.labelled else None),
                "rss_bytes": process_rss_bytes()}


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
               inference_cpus: list[int] | None = None, token: str | None = None,
               max_pending: int = 32, max_bytes: int = 1 << 20) -> Starlette:
    """The app, with its inference worker already started and warm (a few seconds: it loads torch and the zoo).
    `inference_cpus` pins the worker to those CPUs, and this process (the event loop) and the fork server to
    the others; `token`, when given, is required as `Authorization: Bearer TOKEN` on /predict and /metrics.

    `app.state.begin_drain()` starts a graceful shutdown: new requests get 503, those with the worker are
    answered; `app.state.drained(timeout_s)` says when the server may stop (serve/run.py polls it)."""
    rest = sorted(os.sched_getaffinity(0) - set(inference_cpus)) if inference_cpus else []

    def start_fork_server() -> ForkServer:
        return ForkServer(str(zoo), policy=policy, fixed=fixed, threads=threads, plan_quantile=plan_quantile,
                          blocking_risk=blocking_risk, cpus=rest or None)

    fork_server = start_fork_server()
    first = fork_server.fork(inference_cpus)
    if rest:
        os.sched_setaffinity(0, rest)
    supervisor = Supervisor(fork_server, start_fork_server, first, inference_cpus=inference_cpus)
    metrics = Metrics()
    warm_up_decoding(supervisor.input_shape)
    expected_authorization = None if token is None else f"Bearer {token}".encode("latin-1")
    draining_since: list[float] = []   # set once, when a shutdown begins (perf_counter s)

    def reject(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.rejected[status] += 1
        return JSONResponse({"error": reason}, status_code=status, headers=headers)

    def unavailable(reason: str, close: bool = False) -> JSONResponse:
        headers = {"Retry-After": RETRY_AFTER_S}
        if close:   # draining: the client's next request opens a new connection, which shutdown refuses
            headers["Connection"] = "close"
        return reject(503, reason, headers)

    def authorized(request: Request) -> bool:
        if expected_authorization is None:
            return True
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        return hmac.compare_digest(given, expected_authorization)   # constant time: no timing oracle

    def unauthorized() -> JSONResponse:
        return reject(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                      {"WWW-Authenticate": "Bearer"})

    async def predict(request: Request) -> JSONResponse:
        arrival = time.perf_counter()
        metrics.requests += 1
        if not authorized(request):
            return unauthorized()
        if draining_since:
            return unavailable("shutting down: not taking new requests", close=True)
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
                                   supervisor.input_shape)
            label = parse_label(request.headers.get("x-label"))
        except RequestError as error:
            return reject(error.status, error.reason)
        metrics.labelled += label is not None
        worker = supervisor.active
        if worker is None:
            return unavailable("the inference worker is restarting")
        if len(worker.pending) >= max_pending:
            return unavailable(f"busy: {max_pending} requests already waiting")
        try:
            answer = await worker.predict(parsed.image.numpy(), parsed.deadline_ms, arrival)
        except WorkerExited as error:
            return unavailable(f"{error} during this request; a new one is taking over")
        except WorkerGone as error:
            return reject(500, f"inference failed: {error}")
        spent = 1e3 * (time.perf_counter() - arrival)
        ran = answer.model_index is not None
        prediction = Prediction(answer.label if ran else -1, answer.probabilities,
                                worker.names[answer.model_index] if ran else None, round(spent, 4),
                                parsed.deadline_ms, ran and spent <= parsed.deadline_ms, answer.fits,
                                expired=answer.expired)
        metrics.record(prediction, label)
        reply = asdict(prediction)
        reply["class"] = reply.pop("label")
        reply["refused"] = not ran and not answer.expired
        return JSONResponse(reply)

    def status() -> str:
        return "draining" if draining_since else supervisor.status

    async def health(request: Request) -> JSONResponse:
        now = status()
        return JSONResponse({"status": now, "models": supervisor.names, "restarts": supervisor.restarts,
                             "overhead_ms": round(supervisor.active.overhead_ms(), 4) if supervisor.active else None,
                             "policy": fixed or f"adaptive ({policy} when nothing fits)"},
                            status_code=200 if now == "ok" else 503,
                            headers=None if now == "ok" else {"Retry-After": RETRY_AFTER_S})

    async def metrics_endpoint(request: Request) -> JSONResponse:
        if not authorized(request):
            return unauthorized()
        values = metrics.as_dict()
        worker = supervisor.active
        values["status"] = status()
        values["expected_ms"] = dict(zip(supervisor.names, (round(t, 4) for t in supervisor.expected_ms())))
        values["overhead_ms"] = round(worker.overhead_ms(), 4) if worker else None
        fork_server = supervisor.fork_server
        values["worker"] = {"pid": worker.pid if worker else None,
                            "fork_server_pid": fork_server.pid if fork_server else None,
                            "restarts": supervisor.restarts, "fork_server_restarts": supervisor.fork_server_restarts,
                            "last_error": supervisor.last_error,
                            "recoveries_s": [round(t, 3) for t in supervisor.recoveries_s[-20:]],
                            "rss_bytes": supervisor.rss_bytes()}
        return JSONResponse(values)

    def begin_drain() -> None:
        if not draining_since:
            draining_since.append(time.perf_counter())

    def drained(timeout_s: float, linger_s: float = 0.0) -> bool:
        """True once nothing is with the worker and `linger_s` has passed since the drain began (new
        requests meanwhile get 503 and their connections closed, so few keep-alive connections are
        left for the final close to race with), or `timeout_s` after the drain began (what is still
        with the worker then is answered 503: no request is left without an answer)."""
        worker = supervisor.active
        waited = time.perf_counter() - draining_since[0]
        if worker is None or not worker.pending:
            return waited >= linger_s
        if waited < timeout_s:
            return False
        worker.fail_pending(WorkerExited("the server shut down before this request was served"))
        return True

    @asynccontextmanager
    async def lifespan(app):
        supervisor.start(asyncio.get_running_loop())
        # torch and the web stack leave ~10^5 long-lived objects that a full collection walks;
        # frozen, the collector skips them (the always-fastest p99 at 50/s went from 52 to 9 ms).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await supervisor.close()

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health),
                            Route("/metrics", metrics_endpoint)], lifespan=lifespan)
    app.state.supervisor = supervisor
    app.state.begin_drain = begin_drain
    app.state.drained = drained
    return app
