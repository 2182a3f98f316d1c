"""An nsqd that misbehaves on purpose, for the consumer's failure paths a real nsqd never
takes: malformed frames, a connection that goes silent, a lookupd that never answers.

:class:`FakeNsqd` speaks the real TCP protocol (magic, IDENTIFY with feature negotiation,
SUB, RDY, FIN, REQ, TOUCH, NOP, CLS) far enough for a reader to subscribe, sends heartbeats
at the interval the client asked for, and then runs the test's ``script`` for each
connection. Its HTTP side answers ``/lookup`` as an nsqlookupd naming only itself, and
``/config/max_msg_size`` as nsqd does. Everything listens on free loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from svc._nsq_frames import FRAME_RESPONSE, encode_frame, encode_message

Script = Callable[["FakeClient"], Coroutine[Any, Any, None]]


@dataclass
class FakeClient:
    """One consumer connection as the fake nsqd sees it."""

    number: int  # 0 for the first connection the fake accepted
    writer: asyncio.StreamWriter
    commands: list[bytes] = field(default_factory=list)
    identify: dict[str, object] = field(default_factory=dict)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    heartbeats_on: bool = True
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def send_message(self, message_id: bytes, body: bytes) -> None:
        self.send(encode_message(message_id, body))

    def finished(self) -> list[bytes]:
        return [c.split(b" ", 1)[1] for c in self.commands if c.startswith(b"FIN ")]


class FakeNsqd:
    def __init__(self, script: Script, *, max_msg_size: int = 4096) -> None:
        self.script = script
        self.max_msg_size = max_msg_size
        self.clients: list[FakeClient] = []
        self.tcp_port = 0
        self.http_port = 0
        self._server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def lookupd_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self) -> FakeNsqd:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.tcp_port = self._server.sockets[0].getsockname()[1]
        app = web.Application()
        app.router.add_get("/lookup", self._lookup)
        app.router.add_get("/config/max_msg_size", self._max_msg_size)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.http_port = int(self._runner.addresses[-1][1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in self.clients:
            client.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    def subscribed(self) -> list[FakeClient]:
        return [c for c in self.clients if c.subscribed.is_set()]

    async def _lookup(self, _: web.Request) -> web.Response:
        producer = {
            "broadcast_address": "127.0.0.1",
            "tcp_port": self.tcp_port,
            "http_port": self.http_port,
        }
        return web.json_response({"channels": [], "producers": [producer]})

    async def _max_msg_size(self, _: web.Request) -> web.Response:
        return web.json_response(self.max_msg_size)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = FakeClient(len(self.clients), writer)
        self.clients.append(client)
        background: list[asyncio.Task[None]] = []
        try:
            if await reader.readexactly(4) != b"  V2":
                return
            while True:
                line = (await reader.readline()).rstrip(b"\n")
                if not line:
                    return
                client.commands.append(line)
                verb = line.split(b" ", 1)[0]
                if verb == b"IDENTIFY":
                    (size,) = struct.unpack(">l", await reader.readexactly(4))
                    client.identify = json.loads(await reader.readexactly(size))
                    answer = {
                        "max_rdy_count": 2500,
                        "msg_timeout": 60000,
                        "max_msg_timeout": 900000,
                    }
                    client.send(encode_frame(FRAME_RESPONSE, json.dumps(answer).encode()))
                elif verb == b"SUB":
                    client.send(encode_frame(FRAME_RESPONSE, b"OK"))
                    client.subscribed.set()
                    background.append(asyncio.create_task(self._heartbeats(client)))
                    background.append(asyncio.create_task(self.script(client)))
                elif verb == b"CLS":
                    client.send(encode_frame(FRAME_RESPONSE, b"CLOSE_WAIT"))
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            client.closed.set()
            for job in background:
                job.cancel()
            writer.close()
            self._tasks.discard(task)

    async def _heartbeats(self, client: FakeClient) -> None:
        interval = int(str(client.identify.get("heartbeat_interval", 30000))) / 1000
        while True:
            await asyncio.sleep(interval)
            if client.heartbeats_on:
                client.send(encode_frame(FRAME_RESPONSE, b"_heartbeat_"))


class SilentServer:
    """A TCP server that accepts connections, reads what comes and never answers: an
    nsqlookupd that hangs."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self.open = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> SilentServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self._writers.append(writer)
        try:
            while await reader.read(4096):
                pass
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            with contextlib.suppress(Exception):
                writer.close()
