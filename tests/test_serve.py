"""The server on loopback with a tiny zoo: requests end to end, the supervised
worker (killed -> forked again, in-flight requests 503 with Retry-After; the fork
server killed too -> restarting, then serving), expired
requests, graceful shutdown on SIGTERM, the bearer token, and the command's
bad options."""
from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from leancnn.serve.app import create_app  # noqa: E402
from leancnn.serve.supervisor import Supervisor, backoff_s  # noqa: E402
from leancnn.serve.worker import EXPIRED, PREDICT, REQUEST_HEADER, expire_waiting  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOOD_HEADERS = {"content-type": "image/png", "x-deadline-ms": "1000"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """The real server (uvicorn) on a loopback port, in a thread."""
    import uvicorn

    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(200):
        if instance.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = png(np.zeros((16, 16), dtype=np.uint8))


@pytest.fixture(scope="module")
def server(tiny_zoo):
    zoo, _ = tiny_zoo
    with serving(create_app(zoo, threads=1, max_pending=8, max_bytes=4096)) as url:
        yield url


def wait_for(condition, timeout_s: float, step_s: float = 0.05):
    """Poll `condition()` until it returns something true; that value, or None after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step_s)
    return None


def test_server_end_to_end(server, tiny_zoo):
    _, manifest = tiny_zoo
    image = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    good = png(image)
    with httpx.Client(base_url=server, timeout=30) as client:
        before = client.get("/metrics").json()
        ok = client.post("/predict", content=good, headers=GOOD_HEADERS)
        assert ok.status_code == 200, ok.text
        answer = ok.json()
        assert 0 <= answer["class"] < 4 and abs(sum(answer["probabilities"]) - 1) < 1e-4
        assert answer["model"] == manifest["models"][-1]["name"]  # a generous deadline: the most accurate
        assert answer["deadline_met"] and answer["time_ms"] > 0
        assert answer["refused"] is False and answer["expired"] is False

        npy = io.BytesIO()
        np.save(npy, image)
        for body, kind in ((npy.getvalue(), "application/x-npy"), (image.tobytes(), "application/octet-stream")):
            response = client.post("/predict?deadline_ms=1000", content=body, headers={"content-type": kind})
            assert response.status_code == 200 and response.json()["class"] == answer["class"], kind
        as_json = client.post("/predict", json={"image": base64.b64encode(good).decode(), "deadline_ms": 1000})
        assert as_json.status_code == 200 and as_json.json()["class"] == answer["class"]

        # A deadline already past when the worker picks the request up (1 us): answered expired, no model.
        expired = client.post("/predict", content=good, headers={**GOOD_HEADERS, "x-deadline-ms": "0.001"})
        assert expired.status_code == 200
        assert expired.json()["expired"] is True and expired.json()["model"] is None
        assert expired.json()["class"] == -1 and not expired.json()["deadline_met"]

        rgb = np.zeros((16, 16, 3), dtype=np.uint8)
        malformed = {
            "not an image": (b"hello, not a png", "image/png", "100", 400),
            "truncated": (good[: len(good) // 2], "image/png", "100", 400),
            "wrong size": (png(np.zeros((20, 16), dtype=np.uint8)), "image/png", "100", 422),
            "wrong channels": (png(rgb), "image/png", "100", 422),
            "too large": (b"\x00" * 5000, "application/octet-stream", "100", 413),
            "missing deadline": (good, "image/png", None, 400),
            "negative deadline": (good, "image/png", "-5", 400),
            "text deadline": (good, "image/png", "soon", 400),
            "wrong content type": (good, "text/plain", "100", 415),
            "raw wrong length": (b"\x00" * 100, "application/octet-stream", "100", 422),
        }
        for kind, (body, content_type, deadline, status) in malformed.items():
            headers = {"content-type": content_type}
            if deadline is not None:
                headers["x-deadline-ms"] = deadline
            response = client.post("/predict", content=body, headers=headers)
            assert response.status_code == status, (kind, response.status_code, response.text)
            reason = response.json()["error"]
            assert reason and "\n" not in reason, kind
        bad_label = client.post("/predict", content=good, headers={**GOOD_HEADERS, "x-label": "shirt"})
        assert bad_label.status_code == 400 and "X-Label must be a class index" in bad_label.json()["error"]

        # Effective accuracy by hand: three labelled requests; the first right and on time, the second
        # answered on time with a wrong label, the third right but expired. Delivered 1/2, effective 1/3.
        wrong = (answer["class"] + 1) % 4
        for label, deadline in ((answer["class"], "1000"), (wrong, "1000"), (answer["class"], "0.001")):
            client.post("/predict", content=good, headers={**GOOD_HEADERS, "x-label": str(label),
                                                           "x-deadline-ms": deadline})
        assert client.post("/predict", content=good, headers=GOOD_HEADERS).status_code == 200
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["models"] == [m["name"] for m in manifest["models"]]
        metrics = client.get("/metrics").json()
        ran = metrics["answered"] - before["answered"] - (metrics["expired"] - before["expired"])
        assert metrics["answered"] - before["answered"] == 9 and metrics["expired"] - before["expired"] == 2
        assert sum(metrics["per_model"].values()) - sum(before["per_model"].values()) == ran == 7
        assert sum(metrics["rejected"].values()) - sum(before["rejected"].values()) == len(malformed) + 1
        assert metrics["labelled"] - before["labelled"] == 3
        if before["labelled"] == 0:
            assert metrics["delivered_accuracy"] == 0.5
            assert metrics["effective_accuracy"] == pytest.approx(1 / 3, abs=1e-6)
        assert metrics["latency_ms"]["p50"] is not None and metrics["worker"]["restarts"] == 0


def test_runtime_answers_an_expired_request_without_running_a_model(tiny_zoo):
    from leancnn.zoo.runtime import Runtime

    zoo, _ = tiny_zoo
    runtime = Runtime(zoo, threads=1)
    calls = []
    for model in runtime.models:
        model.register_forward_hook(lambda *_: calls.append(1))
    samples = [len(s) for s in runtime.samples]
    late = runtime.predict(torch.rand(1, 16, 16), deadline_ms=5.0, arrival=time.perf_counter() - 0.010)
    assert late.expired and late.model is None and late.label == -1 and not late.deadline_met
    assert late.time_ms >= 10.0 and calls == [] and [len(s) for s in runtime.samples] == samples
    # Not expired, but nothing fits: the fastest model runs and the answer says the deadline was missed.
    tight = runtime.predict(torch.rand(1, 16, 16), deadline_ms=1e-6)
    assert not tight.expired and tight.model == runtime.names[0] and not tight.deadline_met and calls == [1]


class RecordingPipe:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)


class ExpiringRuntime:
    def __init__(self) -> None:
        self.expired: list[tuple[float, float]] = []

    def expire(self, arrival: float, deadline_ms: float) -> None:
        self.expired.append((arrival, deadline_ms))


def test_the_worker_answers_every_expired_request_in_its_queue_at_once():
    now = time.perf_counter()

    def request(request_id: int, age_ms: float, deadline_ms: float) -> bytes:
        return PREDICT + REQUEST_HEADER.pack(request_id, now - age_ms / 1e3, deadline_ms, 0.0) + b"\x00" * 8

    queue = deque([request(0, 5, 50), request(1, 30, 20), b"N" + struct.pack("<Q", 9), request(2, 100, 99),
                   request(3, 1, 1000)])
    pipe, runtime = RecordingPipe(), ExpiringRuntime()
    kept = expire_waiting(queue, runtime, pipe)
    assert pipe.sent == [EXPIRED + struct.pack("<Q", 1), EXPIRED + struct.pack("<Q", 2)]
    assert [m[:1] for m in kept] == [PREDICT, b"N", PREDICT]
    assert [REQUEST_HEADER.unpack_from(m, 1)[0] for m in kept if m[:1] == PREDICT] == [0, 3]
    assert [deadline for _, deadline in runtime.expired] == [20, 99]


def test_backoff_doubles_up_to_its_cap():
    assert [backoff_s(n, 0.5, 30.0) for n in range(9)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


class FakeWorker:
    names, input_shape, expected_ms, gone = ["a", "b"], (1, 16, 16), [1.0, 2.0], "killed"

    def __init__(self) -> None:
        self.return_ms = deque([0.1, 0.2])


def test_supervisor_counts_quick_deaths_and_waits_for_a_fork():
    import asyncio

    first = FakeWorker()
    supervisor = Supervisor(None, start_fork_server=None, first=first, stable_s=5.0)
    supervisor.wake = asyncio.Event()
    assert supervisor.status == "ok" and supervisor.expected_ms() == [1.0, 2.0]
    supervisor._exited(first)                       # died 0 s after it started: a quick death
    assert supervisor.active is None and supervisor.status == "restarting" and supervisor.expected_ms() == []
    assert supervisor.restarts == 1 and supervisor.failures == 1 and supervisor.wake.is_set()
    assert supervisor.down_since is not None and supervisor.last_error == "killed"
    assert supervisor.return_ms is first.return_ms   # the successor's hand-back times start from these
    second = FakeWorker()
    supervisor.active, supervisor.active_since = second, time.monotonic() - 10.0   # it served 10 s
    supervisor._exited(FakeWorker())                # not the serving worker: nothing changes
    assert supervisor.restarts == 1 and supervisor.active is second
    supervisor._exited(second)
    assert supervisor.restarts == 2 and supervisor.failures == 0   # not quick: the backoff starts over


def metrics_of(client) -> dict:
    return client.get("/metrics").json()


def test_a_killed_worker_is_replaced_within_a_second_and_held_requests_get_503(tiny_zoo):
    zoo, _ = tiny_zoo
    app = create_app(zoo, threads=1)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/predict", content=GOOD, headers=GOOD_HEADERS).status_code == 200
        first = metrics_of(client)["worker"]
        os.kill(first["pid"], signal.SIGSTOP)       # hold requests in the worker, then kill it
        results: list[httpx.Response] = []
        posts = [threading.Thread(target=lambda: results.append(
            httpx.post(url + "/predict", content=GOOD, headers=GOOD_HEADERS, timeout=30))) for _ in range(3)]
        for post in posts:
            post.start()
        assert wait_for(lambda: len(app.state.supervisor.active.pending) == 3, 10)
        killed = time.monotonic()
        os.kill(first["pid"], signal.SIGKILL)
        for post in posts:
            post.join(30)
        assert [r.status_code for r in results] == [503] * 3
        assert all(r.headers.get("retry-after") == "1" and "exited" in r.json()["error"] for r in results)
        served = wait_for(lambda: client.post("/predict", content=GOOD, headers=GOOD_HEADERS).status_code == 200, 30)
        assert served and time.monotonic() - killed < 2.0   # forked, not loaded: no start-up from scratch
        metrics = metrics_of(client)
        assert metrics["worker"]["pid"] not in (None, first["pid"]) and metrics["worker"]["restarts"] == 1
        assert metrics["worker"]["fork_server_pid"] == first["fork_server_pid"]
        assert client.get("/health").json()["status"] == "ok"


def test_with_the_fork_server_gone_too_the_server_says_restarting_then_serves_again(tiny_zoo):
    zoo, _ = tiny_zoo
    app = create_app(zoo, threads=1)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        first = metrics_of(client)["worker"]
        os.kill(first["fork_server_pid"], signal.SIGKILL)
        os.kill(first["pid"], signal.SIGKILL)
        restarting = wait_for(lambda: (lambda r: r if r.status_code == 503 else None)(client.get("/health")), 10)
        assert restarting is not None and restarting.json()["status"] == "restarting"
        assert restarting.headers["retry-after"] == "1"
        during = client.post("/predict", content=GOOD, headers=GOOD_HEADERS)
        assert during.status_code == 503 and during.headers["retry-after"] == "1"
        assert wait_for(lambda: client.get("/health").status_code == 200, 120), "never served again"
        assert client.post("/predict", content=GOOD, headers=GOOD_HEADERS).status_code == 200
        worker = metrics_of(client)["worker"]
        assert worker["pid"] != first["pid"] and worker["fork_server_pid"] != first["fork_server_pid"]
        assert worker["restarts"] == 1 and worker["fork_server_restarts"] == 1 and worker["recoveries_s"]


def test_a_token_guards_predict_and_metrics_but_not_health(tiny_zoo):
    zoo, _ = tiny_zoo
    with serving(create_app(zoo, threads=1, token="s3cret-token")) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-token"}):
            denied = client.post("/predict", content=GOOD, headers={**GOOD_HEADERS, **headers})
            assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
            assert client.get("/metrics", headers=headers).status_code == 401
        allowed = {"authorization": "Bearer s3cret-token"}
        assert client.post("/predict", content=GOOD, headers={**GOOD_HEADERS, **allowed}).status_code == 200
        metrics = client.get("/metrics", headers=allowed)
        assert metrics.status_code == 200 and metrics.json()["rejected"]["401"] == 6   # 3 on /predict, 3 on /metrics
        assert client.get("/health").status_code == 200


def start_serve(zoo: Path, *options: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "leancnn.cli", "serve", str(zoo), "--port", str(port),
                                "--threads", "1", *options], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"serve exited: {process.stdout.read()}")
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    assert wait_for(up, 120, 0.1), "serve did not start"
    return process, url


def test_sigterm_drains_held_requests_and_exits_0(tiny_zoo):
    zoo, _ = tiny_zoo
    process, url = start_serve(zoo, env={"LEANCNN_SERVE_TOKEN": "t0ken"})
    auth = {"authorization": "Bearer t0ken"}
    try:
        worker = httpx.get(url + "/metrics", headers=auth).json()["worker"]["pid"]
        os.kill(worker, signal.SIGSTOP)             # three requests wait in the worker when SIGTERM comes
        results: list[httpx.Response] = []
        posts = [threading.Thread(target=lambda: results.append(httpx.post(
            url + "/predict", content=GOOD, headers={**GOOD_HEADERS, **auth}, timeout=30))) for _ in range(3)]
        for post in posts:
            post.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = httpx.post(url + "/predict", content=GOOD, headers={**GOOD_HEADERS, **auth}, timeout=30)
        assert late.status_code == 503 and late.headers["retry-after"] == "1", late.text
        assert "shutting down" in late.json()["error"] and late.headers["connection"] == "close"
        started = time.monotonic()
        os.kill(worker, signal.SIGCONT)
        for post in posts:
            post.join(30)
        assert [r.status_code for r in results] == [200] * 3   # held requests are answered, not dropped
        assert process.wait(10) == 0
        assert time.monotonic() - started < 5.0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("options, message", [
    (["--quantile", "2"], "--quantile must be median, pNN (p90, p99) or a fraction in (0, 1], got '2'"),
    (["--quantile", "p200"], "--quantile must be median, pNN (p90, p99) or a fraction in (0, 1], got 'p200'"),
    (["--blocking-risk", "1.5"], "--blocking-risk must be in [0, 1)"),
    (["--inference-cpus", "999"], "--inference-cpus names CPU(s) [999] this process cannot use"),
    (["--inference-cpus", "one"], "--inference-cpus must be CPU ids separated by commas"),
    (["--drain-s", "-2"], "--drain-s must be 0 or more seconds, got -2.0"),
    (["--token-file", "/nonexistent/token"], "--token-file /nonexistent/token does not exist"),
])
def test_serve_rejects_bad_options_in_one_line(tiny_zoo, options, message, capsys):
    from leancnn.cli import main

    zoo, _ = tiny_zoo
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["serve", str(zoo), *options]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_token_file_and_loopback_rules(tmp_path, monkeypatch):
    from leancnn.commands.serve import TOKEN_VARIABLE, is_loopback, read_token
    from leancnn.errors import LeancnnError

    token = tmp_path / "token"
    token.write_text("  abc123  \n")
    assert read_token(str(token)) == "abc123"
    token.write_text("\n")
    with pytest.raises(LeancnnError, match="must hold one non-empty line"):
        read_token(str(token))
    monkeypatch.setenv(TOKEN_VARIABLE, "from-env")
    assert read_token(None) == "from-env"
    monkeypatch.delenv(TOKEN_VARIABLE)
    assert read_token(None) is None
    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost", "0.0.0.0", "10.1.2.3", "::",
                                     "example.com")] == [True, True, True, True, False, False, False, False]


def test_serving_beyond_loopback_without_a_token_warns(tiny_zoo, monkeypatch, capsys):
    import leancnn.commands.serve as serve_command
    from leancnn.cli import main
    from leancnn.errors import LeancnnError

    def stop_before_serving(*args, **kwargs):
        raise LeancnnError("stopped before serving")

    monkeypatch.setattr(serve_command, "create_app", stop_before_serving)
    monkeypatch.delenv(serve_command.TOKEN_VARIABLE, raising=False)
    zoo, _ = tiny_zoo
    assert main(["serve", str(zoo), "--host", "0.0.0.0"]) == 2
    assert "warning: serving on 0.0.0.0 without a token" in capsys.readouterr().err
    assert main(["serve", str(zoo), "--host", "127.0.0.1"]) == 2
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv(serve_command.TOKEN_VARIABLE, "t")
    assert main(["serve", str(zoo), "--host", "0.0.0.0"]) == 2
    assert "warning" not in capsys.readouterr().err
