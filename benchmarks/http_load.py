"""A small HTTP/1.1 client for load tests on loopback: keep-alive connections,
one request at a time on each. The only retry is the one every HTTP client
makes: a reused keep-alive connection that the server had closed while it was
idle (uvicorn closes them after 5 s) gave no byte back, so the request is sent
once more on a new connection; it was never seen by the server.

httpx spent several milliseconds of CPU per request here, so on a 2-core
machine where the load generator shares a CPU with the server's event loop it
could not offer more than ~80 requests/s (asked for 300/s, it sent 76/s); this
one writes prepared bytes and reads the status line, headers and a
Content-Length body, which is all the server sends.
"""
from __future__ import annotations

import asyncio
import json


class ConnectFailed(Exception):
    """The server refused the connection (not listening): the request was never accepted."""


class StaleConnection(Exception):
    """The connection was closed before any byte of the answer came back."""


class NoAnswer(Exception):
    """The connection broke or timed out after the request was sent: the request got no answer."""


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


class LoadClient:
    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _connection(self, reuse: bool = True):
        while reuse and self.idle:
            reader, writer = self.idle.pop()
            if not (reader.at_eof() or writer.is_closing()):
                return reader, writer, True
            writer.close()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            return reader, writer, False
        except OSError as error:
            raise ConnectFailed(repr(error)) from None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Response:
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        message = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        reader, writer, reused = await self._connection()
        try:
            response = await self._exchange(reader, writer, message)
        except StaleConnection as error:
            if not reused:
                raise NoAnswer(str(error)) from None
            reader, writer, _ = await self._connection(reuse=False)
            try:
                response = await self._exchange(reader, writer, message)
            except StaleConnection as error:
                raise NoAnswer(str(error)) from None
        if response.headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return response

    async def _exchange(self, reader, writer, message: bytes) -> Response:
        try:
            writer.write(message)
            return await asyncio.wait_for(self._read(reader), self.timeout_s)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as error:
            writer.close()
            if isinstance(error, asyncio.IncompleteReadError) and error.partial:
                raise NoAnswer(f"the answer broke off: {error!r}") from None
            raise StaleConnection(repr(error)) from None
        except (OSError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError) as error:
            writer.close()
            raise NoAnswer(repr(error)) from None

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> Response:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return Response(status, headers, body)

    async def post(self, path: str, content: bytes, headers: dict[str, str]) -> Response:
        return await self.request("POST", path, content, headers)

    async def get(self, path: str) -> Response:
        return await self.request("GET", path)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()
