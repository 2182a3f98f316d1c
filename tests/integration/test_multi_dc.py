"""Two WAN-joined datacenters of real agents: names in another datacenter resolve, and pick
fails over to dc2 while dc1 has no healthy instance."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from dcy import Backoff, ConsulConfig, Dcy, NoHealthyInstances, WatchOptions
from dcy._consul import HttpConsul
from dcy._specs import DatacentersByDistanceSpec
from tests.harness import ConsulAgent, eventually
from tools.build import require_binary

pytestmark = pytest.mark.integration

FAST = WatchOptions(wait=2.0, backoff=Backoff(0.05, 0.5), first_answer_timeout=5.0)


@dataclass
class Wan:
    dc1: ConsulAgent
    dc2: ConsulAgent
    api1: HttpConsul
    api2: HttpConsul


@pytest.fixture
async def wan(consul_factory: Callable[..., ConsulAgent]) -> AsyncIterator[Wan]:
    """Agents of dc1 and dc2, WAN-joined, each with a seam of its own."""
    dc1 = consul_factory(datacenter="dc1")
    dc2 = consul_factory(datacenter="dc2")
    join = await asyncio.create_subprocess_exec(
        str(require_binary("consul")),
        "join",
        "-wan",
        f"-http-addr={dc1.http_addr}",
        dc2.serf_wan_addr,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(join.communicate(), 30)
    assert join.returncode == 0, output.decode()
    await eventually(
        lambda: sorted(dc1.api("/v1/catalog/datacenters")) == ["dc1", "dc2"],
        what="dc1 knows dc2",
    )
    api1 = HttpConsul(ConsulConfig.from_env(dc1.http_addr))
    api2 = HttpConsul(ConsulConfig.from_env(dc2.http_addr))
    try:
        yield Wan(dc1, dc2, api1, api2)
    finally:
        await api1.aclose()
        await api2.aclose()


def _worker(port: int, status: str) -> dict[str, Any]:
    return {
        "ID": f"worker-{port}",
        "Name": "worker",
        "Address": "127.0.0.1",
        "Port": port,
        "Check": {"CheckID": f"service:worker-{port}", "TTL": "300s", "Status": status},
    }


async def test_name_in_another_datacenter_resolves(wan: Wan) -> None:
    """From dc1, "worker@dc2" and its DNS form resolve to the instance registered in dc2."""
    await wan.api2.register_service(_worker(7702, "passing"))
    async with Dcy(wan.dc1.http_addr, watch_options=FAST) as dcy:
        (instance,) = await dcy.instances("worker@dc2")
        assert (instance.port, instance.datacenter) == (7702, "dc2")
        (same,) = await dcy.instances("worker.service.dc2.sd")
        assert same == instance
        assert await dcy.instances("worker") == ()


async def test_pick_fails_over_to_dc2_and_comes_back(wan: Wan) -> None:
    """While dc1's worker is critical, pick(datacenters=...) answers from dc2; once dc1's
    worker passes again, from dc1."""
    await wan.api1.register_service(_worker(7701, "critical"))
    await wan.api2.register_service(_worker(7702, "passing"))
    async with Dcy(wan.dc1.http_addr, watch_options=FAST) as dcy:
        with pytest.raises(NoHealthyInstances):
            await dcy.pick("worker")
        for datacenters in (["dc2"], "all"):
            picked = await dcy.pick("worker", datacenters=datacenters)
            assert (picked.port, picked.datacenter) == (7702, "dc2")
        distance = [w for w in dcy.engine.watches if isinstance(w.spec, DatacentersByDistanceSpec)]
        assert [w.snapshot.value for w in distance if w.snapshot] == [("dc2",)]
        await wan.api1.update_ttl("service:worker-7701", "passing")
        await eventually(lambda: _picked_port(dcy, ["dc2"]), what="dc1 healthy again", timeout=20)
        assert (await dcy.pick("worker", datacenters="all")).datacenter == "dc1"


async def _picked_port(dcy: Dcy, datacenters: list[str]) -> bool:
    return (await dcy.pick("worker", datacenters=datacenters)).port == 7701
