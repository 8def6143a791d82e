"""Running the app under uvicorn with a graceful shutdown.

On SIGTERM (or a first Ctrl-C) the server stops taking requests (503 with
Retry-After and Connection: close), lets the worker answer what it holds, then
closes: at least `linger_s` and at most `drain_s` of draining, `graceful_s`
for the replies to go out, and the workers' exit, so it ends with status 0
within a few seconds. A second Ctrl-C quits at once, as uvicorn's does.
"""
from __future__ import annotations

import signal
from types import FrameType

import uvicorn
from starlette.applications import Starlette


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Starlette, drain_s: float, linger_s: float) -> None:
        super().__init__(config)
        self.leancnn_app = app
        self.drain_s, self.linger_s = drain_s, min(linger_s, drain_s)
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded as captured: uvicorn would raise it again after shutdown and the process
        # would end killed by SIGTERM (status 143) instead of exiting 0 after a clean drain.
        if self.draining:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self.draining = True
        self.leancnn_app.state.begin_drain()

    async def on_tick(self, counter: int) -> bool:
        if self.draining and self.leancnn_app.state.drained(self.drain_s, self.linger_s):
            self.should_exit = True
        return await super().on_tick(counter)


def run_server(app: Starlette, host: str, port: int, *, log_level: str = "warning", drain_s: float = 2.0,
               linger_s: float = 0.5, graceful_s: float = 1.0) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_s)
    DrainingServer(config, app, drain_s, linger_s).run()
