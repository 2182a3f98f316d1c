"""HTTP/2 to an HTTPS agent (dcy._h2): blocking queries as streams over a few connections,
each answered when its own data changes; cancelled streams give their place back; a restarted
agent is reached again; an HTTPS server without HTTP/2 is spoken to in HTTP/1.1."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from aiohttp import web

from dcy._config import ConsulConfig
from dcy._consul import HttpConsul
from dcy._errors import ConsulUnavailable
from tests.harness import ConsulAgent, TlsFiles, eventually
from tests.outage_proxy import OutageProxy


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return TlsFiles.create(tmp_path / "tls")


@pytest.fixture
def agent(consul_factory: Callable[..., ConsulAgent], tls: TlsFiles) -> ConsulAgent:
    return consul_factory(hcl=[tls.agent_hcl()], tls_client=tls)


def config_for(url: str, tls: TlsFiles) -> ConsulConfig:
    return ConsulConfig.from_env(
        url,
        ca_file=str(tls.ca),
        client_cert=str(tls.client_cert),
        client_key=str(tls.client_key),
        environ={},
    )


@pytest.fixture
async def api(agent: ConsulAgent, tls: TlsFiles) -> AsyncIterator[HttpConsul]:
    consul = HttpConsul(config_for(agent.https_url, tls), max_connections=8)
    try:
        yield consul
    finally:
        await consul.aclose()


async def test_a_change_wakes_only_its_own_stream_on_a_shared_connection(
    api: HttpConsul,
) -> None:
    keys = [f"h2/key{n}" for n in range(5)]
    for key in keys:
        await api.kv_put(key, b"0")
    indexes = {key: (await api.kv_get(key)).index for key in keys}
    waiting = {
        key: asyncio.ensure_future(api.kv_get(key, index=indexes[key], wait=30.0)) for key in keys
    }
    await asyncio.sleep(0.5)  # every query is waiting at the agent
    assert api.streams_per_connection > 1
    assert api.open_connections == 1
    assert not any(task.done() for task in waiting.values())

    await api.kv_put(keys[3], b"changed")
    answer = await asyncio.wait_for(waiting[keys[3]], timeout=5)
    assert answer.body is not None and answer.body[0]["Key"] == keys[3]
    # The others keep waiting: their data did not change.
    await asyncio.sleep(0.3)
    assert [key for key, task in waiting.items() if task.done()] == [keys[3]]

    await api.kv_put(keys[0], b"changed too")
    await asyncio.wait_for(waiting[keys[0]], timeout=5)
    for task in waiting.values():
        task.cancel()
    await asyncio.gather(*waiting.values(), return_exceptions=True)


async def test_cancelled_blocking_queries_give_their_streams_back(api: HttpConsul) -> None:
    await api.kv_put("h2/idle", b"x")
    index = (await api.kv_get("h2/idle")).index
    streams = api.streams_per_connection
    assert streams > 1

    async def hold(count: int) -> list[asyncio.Future[object]]:
        tasks: list[asyncio.Future[object]] = [
            asyncio.ensure_future(api.kv_get("h2/idle", index=index, wait=30.0))
            for _ in range(count)
        ]
        await asyncio.sleep(0.5)
        return tasks

    first = await hold(streams)
    assert api.open_connections == 1  # a full connection's worth of streams
    for task in first:
        task.cancel()
    await asyncio.gather(*first, return_exceptions=True)
    # Reset streams leave the connection's limit free again: the same number fits in it.
    second = await hold(streams)
    assert api.open_connections == 1
    one_more = await hold(1)
    assert api.open_connections == 2  # past a connection's limit, a second one
    for task in [*second, *one_more]:
        task.cancel()
    await asyncio.gather(*second, *one_more, return_exceptions=True)


async def test_the_connection_budget_bounds_the_connections(
    agent: ConsulAgent, tls: TlsFiles
) -> None:
    # One connection's worth of streams for blocking queries, one more connection at most.
    consul = HttpConsul(config_for(agent.https_url, tls), max_connections=2, blocking_connections=1)
    try:
        await consul.kv_put("h2/budget", b"x")
        index = (await consul.kv_get("h2/budget")).index
        streams = consul.streams_per_connection
        tasks = [
            asyncio.ensure_future(consul.kv_get("h2/budget", index=index, wait=30.0))
            for _ in range(streams + 5)
        ]
        await asyncio.sleep(0.5)
        assert consul.open_connections == 1
        assert not any(task.done() for task in tasks)
        # Five wait for a stream; the write is not held up by them, and wakes everybody.
        await asyncio.wait_for(consul.kv_put("h2/budget", b"y"), timeout=5)
        answers = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        assert len(answers) == streams + 5
        assert {answer.body[0]["Value"] for answer in answers if answer.body} == {b"y"}
        assert consul.open_connections is not None and consul.open_connections <= 2
    finally:
        await consul.aclose()


async def test_a_restarted_agent_is_reached_again(agent: ConsulAgent, api: HttpConsul) -> None:
    await api.kv_put("h2/restart", b"before")
    index = (await api.kv_get("h2/restart")).index
    waiting = asyncio.ensure_future(api.kv_get("h2/restart", index=index, wait=30.0))
    await asyncio.sleep(0.3)
    agent.stop()
    # A stopping agent answers its blocking queries at once, or its connection drops.
    outcome = await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 15)
    assert not isinstance(outcome[0], BaseException) or isinstance(outcome[0], ConsulUnavailable)
    with pytest.raises(ConsulUnavailable):
        await api.kv_get("h2/restart")
    agent.start()

    async def answers() -> bool:
        try:
            await api.kv_put("h2/restart", b"after")
        except ConsulUnavailable:
            return False
        return True

    await eventually(answers, what="the restarted agent answers over HTTP/2", timeout=30)
    result = await api.kv_get("h2/restart")
    assert result.body is not None and result.body[0]["Value"]
    assert api.streams_per_connection > 1


async def test_an_https_server_without_http2_is_spoken_to_in_http11(tls: TlsFiles) -> None:
    seen: list[str] = []

    async def key(request: web.Request) -> web.Response:
        seen.append(f"HTTP/{request.version.major}.{request.version.minor}")
        body = b'[{"Key":"k","Value":"dg==","Flags":0,"CreateIndex":1,"ModifyIndex":7}]'
        return web.Response(body=body, headers={"X-Consul-Index": "7"})

    app = web.Application()
    app.router.add_get("/v1/kv/k", key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
    context.set_alpn_protocols(["http/1.1"])
    runner = web.AppRunner(app)
    await runner.setup()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    site = web.SockSite(runner, listener, ssl_context=context)
    await site.start()
    consul = HttpConsul(config_for(f"https://127.0.0.1:{port}", tls), max_connections=4)
    # The test CA's server certificate names server.dc1.sd and localhost.
    try:
        first = await consul.kv_get("k")
        second = await consul.kv_get("k")
    finally:
        await consul.aclose()
        await runner.cleanup()
    assert first.index == second.index == 7
    assert first.body is not None and first.body[0]["Value"] == b"v"
    assert seen == ["HTTP/1.1", "HTTP/1.1"]
    assert consul.streams_per_connection == 1


class GoingAwayAgent:
    """An HTTP/2 server standing in for an agent that shuts down gracefully: it answers
    ``/v1/kv/now`` at once, holds ``/v1/kv/held``, and on ``go_away`` answers the first held
    stream and sends GOAWAY naming it as the last it handled."""

    def __init__(self) -> None:
        self.connections: list[tuple[h2.connection.H2Connection, asyncio.Transport]] = []
        self.held: list[int] = []

    def protocol(self) -> asyncio.Protocol:
        agent = self

        class Connection(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.transport = transport
                self.conn = h2.connection.H2Connection(
                    h2.config.H2Configuration(client_side=False, header_encoding=None)
                )
                self.conn.initiate_connection()
                transport.write(self.conn.data_to_send())
                agent.connections.append((self.conn, transport))

            def data_received(self, data: bytes) -> None:
                for event in self.conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        path = dict(event.headers or ())[b":path"]
                        if path.startswith(b"/v1/kv/held"):
                            agent.held.append(event.stream_id or 0)
                        else:
                            agent.answer(self.conn, event.stream_id or 0)
                self.transport.write(self.conn.data_to_send())

        return Connection()

    @staticmethod
    def answer(conn: h2.connection.H2Connection, stream_id: int) -> None:
        body = b'[{"Key":"k","Value":"dg==","Flags":0,"CreateIndex":1,"ModifyIndex":9}]'
        conn.send_headers(stream_id, [(b":status", b"200"), (b"x-consul-index", b"9")])
        conn.send_data(stream_id, body, end_stream=True)

    def go_away(self) -> None:
        conn, transport = self.connections[-1]
        first = min(self.held)
        self.answer(conn, first)
        conn.close_connection(last_stream_id=first)
        transport.write(conn.data_to_send())


async def test_streams_an_agent_going_away_never_saw_are_retried_elsewhere(
    tls: TlsFiles,
) -> None:
    server = GoingAwayAgent()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
    context.set_alpn_protocols(["h2"])
    listener = await asyncio.get_running_loop().create_server(
        server.protocol, "127.0.0.1", 0, ssl=context
    )
    port = listener.sockets[0].getsockname()[1]
    consul = HttpConsul(config_for(f"https://127.0.0.1:{port}", tls), max_connections=4)
    try:
        await consul.kv_get("now")
        held = [asyncio.ensure_future(consul.kv_get("held", index=1, wait=30.0)) for _ in range(2)]
        await eventually(lambda: len(server.held) == 2, what="both queries held")
        server.go_away()
        first, second = await asyncio.wait_for(
            asyncio.gather(*held, return_exceptions=True), timeout=5
        )
        # The stream the agent said it would finish is answered; the one after it fails as
        # a lost connection does (ConsulUnavailable, retried by a watch).
        assert not isinstance(first, BaseException) and first.index == 9
        assert isinstance(second, ConsulUnavailable)
        # The next request goes on a new connection.
        assert (await consul.kv_get("now")).index == 9
        assert len(server.connections) == 2
    finally:
        await consul.aclose()
        listener.close()


async def test_a_connection_that_stopped_answering_is_dropped(
    agent: ConsulAgent, tls: TlsFiles
) -> None:
    proxy = await OutageProxy(f"127.0.0.1:{agent.ports['https']}").start()
    consul = HttpConsul(config_for(f"https://{proxy.address}", tls), max_connections=4)
    try:
        await consul.kv_put("h2/hung", b"x")
        proxy.stall()  # the open connection is never answered again
        with pytest.raises(ConsulUnavailable):
            await consul.kv_get("h2/hung")  # given up on after the call timeout
        proxy.resume()

        async def answers() -> bool:
            try:
                await asyncio.wait_for(consul.kv_get("h2/hung"), timeout=2)
            except (ConsulUnavailable, TimeoutError):
                return False
            return True

        # The PING the timeout sent went unanswered: the hung connection is dropped, and a
        # new one (through the resumed proxy) answers.
        await eventually(answers, what="a new connection", timeout=15)
    finally:
        await consul.aclose()
        await proxy.aclose()


async def test_bodies_beyond_the_connections_window_wait_for_it(api: HttpConsul) -> None:
    # The agent lets a connection send 1 MB before it acknowledges; four 500 kB values at
    # once on one connection must wait for its window updates, and all arrive whole.
    values = {f"h2/large{n}": bytes([n]) * 500_000 for n in range(4)}
    await asyncio.gather(*(api.kv_put(key, value) for key, value in values.items()))
    assert api.open_connections == 1
    for key, value in values.items():
        result = await api.kv_get(key)
        assert result.body is not None and result.body[0]["Value"] == value
