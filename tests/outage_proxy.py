"""A TCP forwarder in front of a Consul agent that a test can cut and restore: an agent
outage as its clients see it (connections refused and broken), while the agent itself, and
so everything Consul's servers know about its node and sessions, stays up.

``stall()`` is the other kind of outage: an agent that accepts connections and reads requests
but never answers (a hung process, a half-open connection). Connections in flight stop
forwarding without being closed, new ones are accepted and read, nothing is ever written
back; ``resume()`` forwards new connections again (stalled ones stay stalled, as they would
be after a real hang)."""

from __future__ import annotations

import asyncio
import contextlib

from tests.harness import free_ports


class OutageProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` (``host:port``); ``cut()`` closes the
    listener and every connection, ``restore()`` listens again on the same port."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self.port = free_ports(1)[0]
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stalled = False
        self.stalled_connections = 0  # connections taken in and never answered

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> OutageProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    restore = start

    def stall(self) -> None:
        """Answer nothing from now on, on open connections and new ones alike."""
        self._stalled = True
        for task in list(self._tasks):
            task.cancel()

    def resume(self) -> None:
        """Forward new connections again."""
        self._stalled = False

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    aclose = cut

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stalled:
            await self._swallow(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
                self._tasks.discard(task)
            self._writers.discard(up_writer)
            up_writer.transport.abort()
            if not self._stalled:
                self._writers.discard(writer)
                writer.transport.abort()
        if self._stalled:
            await self._swallow(reader, writer)

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read whatever the client sends, answer nothing, until it gives up or cut()."""
        self._writers.add(writer)
        self.stalled_connections += 1
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while await reader.read(65536):
                    pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
