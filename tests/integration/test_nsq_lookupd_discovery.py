"""svc._nsq.start_consumer follows the ``nsqlookupd`` service in a real Consul agent: a
lookupd registered later is polled (its nsqd consumed) and one deregistered is dropped,
without restarting the reader."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from dcy import Dcy
from svc._nsq import start_consumer
from tests.harness import ConsulAgent, NsqCluster, eventually

pytestmark = pytest.mark.integration
TOPIC, CHANNEL = "readings", "tests"


@pytest.fixture
def two_nsq(tmp_path: Path) -> Iterator[tuple[NsqCluster, NsqCluster]]:
    """Two independent nsqlookupd + nsqd pairs."""
    started: list[NsqCluster] = []
    try:
        for name in ("a", "b"):
            started.append(NsqCluster(tmp_path / name).start())
        yield started[0], started[1]
    finally:
        for cluster in started:
            cluster.stop()


def register_lookupd(agent: ConsulAgent, service_id: str, nsq: NsqCluster) -> None:
    port = int(nsq.lookupd_http.rsplit(":", 1)[1])
    definition = {"ID": service_id, "Name": "nsqlookupd", "Address": "127.0.0.1", "Port": port}
    request = urllib.request.Request(
        f"{agent.url}/v1/agent/service/register", data=json.dumps(definition).encode(), method="PUT"
    )
    urllib.request.urlopen(request, timeout=5).close()


def deregister(agent: ConsulAgent, service_id: str) -> None:
    request = urllib.request.Request(
        f"{agent.url}/v1/agent/service/deregister/{service_id}", method="PUT"
    )
    urllib.request.urlopen(request, timeout=5).close()


async def test_lookupds_come_and_go_through_consul(
    consul_factory: Callable[..., ConsulAgent], two_nsq: tuple[NsqCluster, NsqCluster]
) -> None:
    """Only lookupd A is in Consul at the start: the reader consumes A's nsqd. B registers:
    B's nsqd is consumed too, and its messages arrive. A deregisters: the reader stops
    polling it (and keeps B)."""
    agent = consul_factory()
    first, second = two_nsq
    got: list[bytes] = []
    async with aiohttp.ClientSession() as http, Dcy(agent.http_addr) as dcy:
        await first.create_channel(http, TOPIC, CHANNEL)
        await second.create_channel(http, TOPIC, CHANNEL)
        register_lookupd(agent, "lookupd-a", first)
        reader = await start_consumer(dcy, TOPIC, CHANNEL, got.extend, lookupd_poll_interval=0.5)
        try:
            await eventually(lambda: reader.connected == 1, what="A's nsqd consumed")
            register_lookupd(agent, "lookupd-b", second)
            await eventually(lambda: reader.connected == 2, what="B's nsqd consumed too")
            async with http.post(
                f"http://{second.nsqd_http}/pub", params={"topic": TOPIC}, data=b"via b"
            ) as response:
                assert response.status == 200
            await eventually(lambda: got == [b"via b"], what="the message from B's nsqd")
            deregister(agent, "lookupd-a")
            await eventually(
                lambda: reader.lookupds == [f"http://{second.lookupd_http}"],
                what="lookupd A dropped",
            )
            assert reader.connects == 2  # nothing was restarted
        finally:
            await reader.close()
