"""The httpx transports by service name against a real agent and real worker processes:
``httpx.Client`` on a SyncDcy, ``httpx.AsyncClient`` on the caller's loop and async Dcy.

Workers are ``_echo_server.py`` processes registered with TTL checks that the test's client
heartbeats, so a killed worker stays "passing" in Consul: only the transport's failover can
avoid it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from dcy import (
    AllInstancesFailed,
    AsyncHttpxTransport,
    Backoff,
    Dcy,
    HttpxTransport,
    SyncDcy,
    TtlCheck,
    WatchOptions,
)
from tests.harness import ConsulAgent, eventually, until
from tests.integration._sync_servers import EchoServer, echo_servers

pytestmark = pytest.mark.integration

FAST = WatchOptions(wait=2.0, backoff=Backoff(0.05, 0.5), first_answer_timeout=3.0)
KEEP_PASSING = TtlCheck(ttl=30)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[EchoServer]]:
    with echo_servers(tmp_path, "a", "b") as servers:
        yield servers


# -- httpx.Client ----------------------------------------------------------------------------


@pytest.fixture
def sync_http(
    consul: ConsulAgent, workers: list[EchoServer], unique_name: str
) -> Iterator[httpx.Client]:
    with SyncDcy(consul.http_addr, watch_options=FAST) as client:
        for server in workers:
            client.register(
                unique_name,
                server.port,
                service_id=f"{unique_name}-{server.id}",
                check=KEEP_PASSING,
            )
        until(lambda: len(client.instances(unique_name)) == 2, what="both workers passing")
        with httpx.Client(transport=HttpxTransport(client), timeout=10) as http:
            yield http


def test_sync_client_calls_by_name_and_passes_real_hosts_through(
    sync_http: httpx.Client, workers: list[EchoServer], unique_name: str
) -> None:
    """Round robin over both workers; a real host is sent as it is."""
    ids = [sync_http.get(f"http://{unique_name}/whoami").json()["id"] for _ in range(4)]
    assert Counter(ids) == {"a": 2, "b": 2}
    posted = sync_http.post(f"http://{unique_name}/whoami", json={"x": 1}).json()
    assert posted["method"] == "POST" and posted["body"] == '{"x":1}'
    direct = sync_http.get(workers[0].url("/whoami"))
    assert direct.json()["id"] == "a" and str(direct.url) == workers[0].url("/whoami")


def test_sync_client_fails_over_from_a_killed_worker(
    sync_http: httpx.Client, workers: list[EchoServer], unique_name: str
) -> None:
    workers[0].kill()
    ids = [sync_http.get(f"http://{unique_name}/whoami").json()["id"] for _ in range(6)]
    assert ids == ["b"] * 6


def test_sync_client_raises_all_instances_failed(
    sync_http: httpx.Client, workers: list[EchoServer], unique_name: str
) -> None:
    for worker in workers:
        worker.kill()
    with pytest.raises(AllInstancesFailed) as caught:
        sync_http.get(f"http://{unique_name}/whoami")
    assert sorted(i.port for i in caught.value.instances) == sorted(w.port for w in workers)
    assert all(isinstance(e, httpx.ConnectError) for _, e in caught.value.attempts)


def test_sync_client_retries_a_503_elsewhere_and_records_it(
    consul: ConsulAgent, workers: list[EchoServer], unique_name: str, tmp_path: Path
) -> None:
    """A GET answered 503 goes to the other instance: every call answers 200, though the
    failing instance was asked (and, with ejection off, asked again)."""
    with (
        echo_servers(tmp_path / "bad", "bad", extra=["--fail-status", "503"]) as (bad,),
        SyncDcy(consul.http_addr, watch_options=FAST) as client,
    ):
        for server in (workers[0], bad):
            client.register(
                unique_name,
                server.port,
                service_id=f"{unique_name}-{server.id}",
                check=KEEP_PASSING,
            )
        until(lambda: len(client.instances(unique_name)) == 2, what="both passing")
        with httpx.Client(transport=HttpxTransport(client, eject_after=100), timeout=10) as http:
            answers = [http.get(f"http://{unique_name}/whoami") for _ in range(4)]
            assert [(a.status_code, a.json()["id"]) for a in answers] == [(200, "a")] * 4
            tried = httpx.get(bad.url("/stats")).json()["counts"]["/whoami"]
    assert tried == 2  # round robin chose it for two of the four calls


# -- httpx.AsyncClient -----------------------------------------------------------------------


@pytest.fixture
async def async_http(
    consul: ConsulAgent, workers: list[EchoServer], unique_name: str
) -> AsyncIterator[httpx.AsyncClient]:
    async with Dcy(consul.http_addr, watch_options=FAST) as dcy:
        for server in workers:
            await dcy.register(
                unique_name,
                server.port,
                service_id=f"{unique_name}-{server.id}",
                check=KEEP_PASSING,
            )

        async def both() -> bool:
            return len(await dcy.instances(unique_name)) == 2

        await eventually(both, what="both workers passing")
        transport = AsyncHttpxTransport(dcy)
        async with httpx.AsyncClient(transport=transport, timeout=10) as http:
            yield http


async def test_async_client_calls_by_name(async_http: httpx.AsyncClient, unique_name: str) -> None:
    ids = [(await async_http.get(f"http://{unique_name}/whoami")).json()["id"] for _ in range(4)]
    assert Counter(ids) == {"a": 2, "b": 2}


async def test_async_client_fails_over_from_a_killed_worker(
    async_http: httpx.AsyncClient, workers: list[EchoServer], unique_name: str
) -> None:
    workers[1].kill()
    ids = [(await async_http.get(f"http://{unique_name}/whoami")).json()["id"] for _ in range(6)]
    assert ids == ["a"] * 6


async def test_async_client_raises_all_instances_failed(
    async_http: httpx.AsyncClient, workers: list[EchoServer], unique_name: str
) -> None:
    for worker in workers:
        worker.kill()
    with pytest.raises(AllInstancesFailed) as caught:
        await async_http.get(f"http://{unique_name}/whoami")
    assert sorted(i.port for i in caught.value.instances) == sorted(w.port for w in workers)


async def test_async_client_does_not_replay_a_streamed_body(
    async_http: httpx.AsyncClient, workers: list[EchoServer], unique_name: str
) -> None:
    """A PUT whose body is a generator cannot be sent twice: when its instance is dead it
    fails there (nothing was sent, but the body is the caller's stream), naming one instance;
    the same PUT with bytes goes to the live one."""
    workers[0].kill()

    async def body() -> AsyncIterator[bytes]:
        yield b"streamed"

    outcomes: list[str] = []
    for _ in range(2):
        try:
            answer = await async_http.put(f"http://{unique_name}/whoami", content=body())
            outcomes.append(answer.json()["id"])
        except AllInstancesFailed as error:
            assert len(error.instances) == 1 and error.instances[0].port == workers[0].port
            outcomes.append("failed")
    assert sorted(outcomes) == ["b", "failed"]
    replayable = await async_http.put(f"http://{unique_name}/whoami", content=b"bytes")
    assert replayable.json() == {"id": "b", "method": "PUT", "body": "bytes"}
