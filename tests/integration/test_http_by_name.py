"""The HTTP client by service name against real Consul and real server processes.

Each instance is ``_echo_server.py`` in its own process, so a test can SIGKILL it mid-flight.
Instances that must stay "passing" in Consul after they die (to show what the client does
before Consul notices) use TTL checks, whose heartbeat comes from the test process.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dcy import (
    AllInstancesFailed,
    Backoff,
    Dcy,
    HttpCheck,
    HttpClient,
    Registration,
    TtlCheck,
    WatchOptions,
)
from tests.harness import ConsulAgent, ManagedProcess, eventually
from tests.integration._sync_servers import EchoServer, launch_echo_server

pytestmark = pytest.mark.integration

FAST = WatchOptions(wait=2.0, backoff=Backoff(0.05, 0.5), first_answer_timeout=3.0)
# The test process heartbeats these, so a killed server stays "passing" until a test says not.
KEEP_PASSING = TtlCheck(ttl=30)


StartServer = Callable[..., Awaitable[EchoServer]]


@pytest.fixture
async def dcy(consul: ConsulAgent) -> AsyncIterator[Dcy]:
    async with Dcy(consul.http_addr, watch_options=FAST) as client:
        yield client


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    """Start echo servers as processes; each is stopped (only it) after the test."""
    started: list[ManagedProcess] = []

    async def start(server_id: str, *extra: str) -> EchoServer:
        process, listening = launch_echo_server(tmp_path, server_id, extra)
        started.append(process)
        server: EchoServer = await eventually(listening, what=f"echo server {server_id} listening")
        return server

    yield start
    for process in started:
        process.stop()


def attempts_by_port() -> tuple[aiohttp.TraceConfig, Counter[int]]:
    """A trace config counting the requests aiohttp starts, by target port: one per attempt."""
    counts: Counter[int] = Counter()

    async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        counts[params.url.port or 0] += 1

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    return trace, counts


async def register(
    dcy: Dcy, name: str, server: EchoServer, check: Any = KEEP_PASSING, **kwargs: Any
) -> Registration:
    return await dcy.register(
        name, server.port, service_id=f"{name}-{server.id}", check=check, **kwargs
    )


async def passing(dcy: Dcy, name: str, count: int) -> None:
    async def enough() -> bool:
        return len(await dcy.instances(name)) == count

    await eventually(enough, what=f"{count} passing instance(s) of {name}")


async def answer_id(client: HttpClient, url: str, method: str = "GET", **kwargs: Any) -> str:
    async with client.request(method, url, **kwargs) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["id"])


async def stats(server: EchoServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(server.url("/stats")) as response:
        result: dict[str, Any] = await response.json()
        return result


# -- load balancing ---------------------------------------------------------------------------


async def test_round_robin_spreads_evenly_over_kept_alive_connections(
    dcy: Dcy, start_server: StartServer, unique_name: str
) -> None:
    """30 GETs by name reach 3 instances 10 times each, over one connection per instance."""
    servers = [await start_server(sid) for sid in "abc"]
    for server in servers:
        await register(dcy, unique_name, server, HttpCheck(interval=0.5, timeout=0.5))
    await passing(dcy, unique_name, 3)
    connections: list[object] = []

    async def on_connection(*_: Any) -> None:
        connections.append(object())

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_connection)
    async with dcy.http_client(trace_configs=[trace]) as client:
        ids = [await answer_id(client, f"http://{unique_name}/whoami") for _ in range(30)]
    assert Counter(ids) == {"a": 10, "b": 10, "c": 10}
    assert len(connections) == 3
    assert [(await stats(s))["counts"]["/whoami"] for s in servers] == [10, 10, 10]


async def test_dns_form_hosts_resolve_with_tag_and_datacenter(
    dcy: Dcy, start_server: StartServer, unique_name: str
) -> None:
    """worker.service.sd, worker.service.dc1.sd and blue.worker.service.sd all resolve."""
    blue, green = await start_server("blue"), await start_server("green")
    await register(dcy, unique_name, blue, tags=["blue"])
    await register(dcy, unique_name, green, tags=["green"])
    await passing(dcy, unique_name, 2)
    async with dcy.http_client() as client:
        everywhere = {
            await answer_id(client, f"http://{host}/whoami")
            for host in [f"{unique_name}.service.sd"] * 2 + [f"{unique_name}.service.dc1.sd"] * 2
        }
        tagged = {
            await answer_id(client, f"http://blue.{unique_name}.service.sd/whoami")
            for _ in range(4)
        }
    assert everywhere == {"blue", "green"}
    assert tagged == {"blue"}


async def test_least_outstanding_prefers_the_idle_instance(
    dcy: Dcy, start_server: StartServer, unique_name: str
) -> None:
    """With a slow request in flight on one instance, new requests all go to the idle one."""
    servers = [await start_server("a"), await start_server("b")]
    for server in servers:
        await register(dcy, unique_name, server)
    await passing(dcy, unique_name, 2)
    async with dcy.http_client(strategy="least_outstanding") as client:
        slow = asyncio.create_task(answer_id(client, f"http://{unique_name}/slow"))

        async def busy_server() -> EchoServer | None:
            for server in servers:
                if (await stats(server))["waiting"]:
                    return server
            return None

        busy = await eventually(busy_server, what="the slow request waiting")
        ids = [await answer_id(client, f"http://{unique_name}/whoami") for _ in range(6)]
        for server in servers:
            async with client.post(server.url("/release")) as response:
                assert response.status == 200
        assert await slow == busy.id
    idle = next(s for s in servers if s is not busy)
    assert ids == [idle.id] * 6


# -- failures ---------------------------------------------------------------------------------


async def test_killed_instance_is_ejected_then_dropped_by_consul(
    dcy: Dcy, start_server: StartServer, unique_name: str
) -> None:
    """After a SIGKILL, GETs still succeed; the dead instance is ejected, then Consul drops it."""
    servers = [await start_server(sid) for sid in "abc"]
    registrations = [await register(dcy, unique_name, s) for s in servers]
    await passing(dcy, unique_name, 3)
    victim, survivors = servers[0], {s.id for s in servers[1:]}
    url = f"http://{unique_name}/whoami"
    trace, attempts = attempts_by_port()
    async with dcy.http_client(eject_after=2, eject_for=120, trace_configs=[trace]) as client:
        assert {await answer_id(client, url) for _ in range(9)} == {"a", "b", "c"}
        victim.kill()
        first_burst = await asyncio.gather(*(answer_id(client, url) for _ in range(30)))
        assert set(first_burst) <= survivors
        tried_while_failing = attempts[victim.port]
        assert tried_while_failing > 3  # the 3 warm-up requests, then at least one failure
        second_burst = await asyncio.gather(*(answer_id(client, url) for _ in range(30)))
        assert set(second_burst) <= survivors
        assert attempts[victim.port] == tried_while_failing  # ejected: not tried again
    await registrations[0].set_status("critical", "killed by the test")
    await passing(dcy, unique_name, 2)
    fresh_trace, fresh_attempts = attempts_by_port()
    async with dcy.http_client(trace_configs=[fresh_trace]) as client:
        ids = await asyncio.gather(*(answer_id(client, url) for _ in range(30)))
    assert Counter(ids) == {"b": 15, "c": 15}
    assert fresh_attempts[victim.port] == 0 and sum(fresh_attempts.values()) == 30


async def test_post_that_reached_a_dying_server_is_not_replayed(
    dcy: Dcy, start_server: StartServer, unique_name: str, tmp_path: Path
) -> None:
    """A POST whose server dies after reading it fails with AllInstancesFailed, sent once."""
    journal = tmp_path / "received"
    servers = [await start_server(sid, "--journal", str(journal)) for sid in "ab"]
    for server in servers:
        await register(dcy, unique_name, server)
    await passing(dcy, unique_name, 2)
    async with dcy.http_client(budget=60) as client:
        post = asyncio.create_task(
            answer_id(client, f"http://{unique_name}/hold", "POST", data=b"x")
        )
        lines = await eventually(lambda: journal.exists() and journal.read_text().splitlines())
        receiver = next(s for s in servers if lines == [f"{s.id} POST"])
        receiver.kill()
        with pytest.raises(AllInstancesFailed, match="not retried") as caught:
            await post
    assert [i.port for i in caught.value.instances] == [receiver.port]
    assert isinstance(caught.value.__cause__, aiohttp.ClientError)
    assert journal.read_text().splitlines() == [f"{receiver.id} POST"]
    other = next(s for s in servers if s is not receiver)
    assert "/hold" not in (await stats(other))["counts"]


async def test_post_refused_by_its_first_instance_goes_to_another(
    dcy: Dcy, start_server: StartServer, unique_name: str
) -> None:
    """A POST whose chosen instance refuses the connection is sent to the next instance."""
    live, dead = await start_server("live"), await start_server("dead")
    for server in (live, dead):
        await register(dcy, unique_name, server)
    await passing(dcy, unique_name, 2)
    dead.kill()  # nothing listens on its port any more: connections are refused
    trace, attempts = attempts_by_port()
    async with dcy.http_client(trace_configs=[trace]) as client:
        ids = [
            await answer_id(client, f"http://{unique_name}/whoami", "POST", json={"n": n})
            for n in range(2)
        ]
    assert ids == ["live", "live"]
    assert attempts[dead.port] == 1  # round robin chose it first once: refused, moved on
    assert (await stats(live))["counts"]["/whoami"] == 2


async def test_bad_gateway_statuses_retry_get_but_not_post(
    dcy: Dcy, start_server: StartServer, unique_name: str
) -> None:
    """A 503 from one instance sends a GET on to another; a POST gets the 503 as its answer."""
    draining = await start_server("draining", "--fail-status", "503")
    healthy = await start_server("healthy")
    for server in (draining, healthy):
        await register(dcy, unique_name, server)
    await passing(dcy, unique_name, 2)
    url = f"http://{unique_name}/whoami"
    async with dcy.http_client(eject_after=100) as client:
        gets = [await answer_id(client, url) for _ in range(4)]
        statuses = []
        for _ in range(2):
            async with client.post(url, data=b"once") as response:
                statuses.append(response.status)
    assert gets == ["healthy"] * 4
    assert sorted(statuses) == [200, 503]
    # 2 of the 4 GETs tried the draining instance first; one POST was answered by it.
    assert (await stats(draining))["counts"]["/whoami"] == 3


async def test_all_instances_dead_raises_all_instances_failed(
    dcy: Dcy, start_server: StartServer, unique_name: str
) -> None:
    """With every instance killed, a GET raises AllInstancesFailed naming service and instances."""
    servers = [await start_server(sid) for sid in "abc"]
    for server in servers:
        await register(dcy, unique_name, server)
    await passing(dcy, unique_name, 3)
    async with dcy.http_client() as client:
        assert {await answer_id(client, f"http://{unique_name}/whoami") for _ in range(3)} == {
            "a",
            "b",
            "c",
        }
        for server in servers:
            server.kill()
        with pytest.raises(AllInstancesFailed, match=unique_name) as caught:
            await client.get(f"http://{unique_name}/whoami")
    error = caught.value
    assert error.service == unique_name
    assert sorted(i.port for i in error.instances) == sorted(s.port for s in servers)
    assert all(isinstance(e, aiohttp.ClientError) for _, e in error.attempts)


async def test_external_urls_pass_through_untouched(
    dcy: Dcy, start_server: StartServer, unique_name: str
) -> None:
    """http://127.0.0.1:PORT/ and http://localhost:PORT/ go to that server as written."""
    server = await start_server("plain")
    trace, attempts = attempts_by_port()
    urls = [server.url("/whoami"), f"http://localhost:{server.port}/whoami?x=1"]
    seen: list[str] = []

    async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        seen.append(str(params.url))

    trace.on_request_start.append(on_start)
    async with dcy.http_client(trace_configs=[trace]) as client:
        assert [await answer_id(client, url) for url in urls] == ["plain", "plain"]
        response = await client.get(urls[0])  # awaited, not entered: the caller releases
        assert response.status == 200 and (await response.json())["id"] == "plain"
        response.release()
    assert seen == [*urls, urls[0]]
    assert attempts == {server.port: 3}
