"""A counting TCP proxy for HTTP/1.1: what a client really asks of Consul.

Every client connection gets its own upstream connection; bytes pass through untouched. On the
client→server stream the proxy reads request heads as they go by, so each request on a
kept-alive connection is counted, with its time, method and path. It also counts open client
connections and the most that were ever open at once.

Request bodies are skipped by ``Content-Length``; chunked request bodies are not supported
(the connection is closed and counted in ``errors``): dcy's reads carry no body at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

_HEAD_END = b"\r\n\r\n"
_MAX_HEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class ProxiedRequest:
    at: float  # time.perf_counter() when its head had fully arrived
    method: str
    path: str
    query: str


class UnsupportedRequest(Exception):
    """A request the counter cannot delimit (chunked body, oversized or malformed head)."""


class RequestHeadReader:
    """Finds each request head in a client→server byte stream, skipping bodies."""

    def __init__(self, on_request: Callable[[str, str], None]) -> None:
        self._on_request = on_request
        self._buffer = bytearray()
        self._body_left = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer:
            if self._body_left:
                taken = min(self._body_left, len(self._buffer))
                del self._buffer[:taken]
                self._body_left -= taken
                continue
            # Stray empty lines between requests are allowed (RFC 9112 §2.2).
            while self._buffer[:2] == b"\r\n":
                del self._buffer[:2]
            end = self._buffer.find(_HEAD_END)
            if end < 0:
                if len(self._buffer) > _MAX_HEAD:
                    raise UnsupportedRequest("request head larger than 64 KiB")
                return
            head = bytes(self._buffer[:end])
            del self._buffer[: end + len(_HEAD_END)]
            self._body_left = self._read_head(head)

    def _read_head(self, head: bytes) -> int:
        request_line, *header_lines = head.split(b"\r\n")
        parts = request_line.decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise UnsupportedRequest(f"not an HTTP/1.x request line: {request_line[:100]!r}")
        length = 0
        for line in header_lines:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding" and value.strip().lower() != b"identity":
                raise UnsupportedRequest("chunked request bodies are not supported")
        self._on_request(parts[0], parts[1])
        return length


class CountingProxy:
    """Listens on a free port of 127.0.0.1 and forwards to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.requests: list[ProxiedRequest] = []
        self.connections = 0
        self.max_connections = 0
        self.errors: list[str] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> CountingProxy:
        # A listen backlog like a Go server's (the kernel's somaxconn) rather than asyncio's
        # 100: a client opening 200 connections at once would otherwise see SYNs dropped and
        # retried a second later, a delay the agent itself never causes.
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in tuple(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def count(
        self, prefix: str = "/", *, since: float = float("-inf"), until: float = float("inf")
    ) -> int:
        """Requests whose path starts with ``prefix`` and that arrived in [since, until)."""
        return sum(1 for r in self.requests if since <= r.at < until and r.path.startswith(prefix))

    def _record(self, method: str, target: str) -> None:
        path, _, query = target.partition("?")
        self.requests.append(ProxiedRequest(time.perf_counter(), method, path, query))

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        self.max_connections = max(self.max_connections, self.connections)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            heads = RequestHeadReader(self._record)
            pumps = {
                asyncio.create_task(self._pump(client_reader, upstream_writer, heads.feed)),
                asyncio.create_task(self._pump(upstream_reader, client_writer, None)),
            }
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
            for pump in done:
                if isinstance(pump.exception(), UnsupportedRequest):
                    self.errors.append(str(pump.exception()))
        except OSError as exc:
            self.errors.append(f"upstream {self.upstream}: {exc}")
        except asyncio.CancelledError:
            # Cancelled by aclose(): end quietly, as asyncio's stream server logs a handler
            # task that ends cancelled as an error.
            pass
        finally:
            self.connections -= 1
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
            self._handlers.discard(task)

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        inspect: Callable[[bytes], None] | None,
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if inspect is not None:
                    inspect(data)
                writer.write(data)
                await writer.drain()
