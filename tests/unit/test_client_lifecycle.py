"""Opening and closing a Dcy client: waiting for the agent, and releasing everything."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dcy import AclDenied, Backoff, ConsulUnavailable, Dcy, WatchOptions
from dcy.testing import FakeConsul
from tests.harness import eventually

FAST = WatchOptions(wait=0.3, min_interval=0, backoff=Backoff(0.01, 0.05))


async def test_open_waits_for_an_agent_that_comes_up() -> None:
    """wait_for_agent: an agent answering after a while is waited for, not given up on."""
    fake = FakeConsul()
    fake.set_unavailable()
    asyncio.get_running_loop().call_later(0.3, fake.set_unavailable, False)
    async with Dcy(api=fake, wait_for_agent=5, watch_options=FAST) as dcy:
        assert dcy.agent is not None and fake.calls["agent_info"] > 1


async def test_open_gives_up_after_wait_for_agent() -> None:
    """An agent that never answers: ConsulUnavailable after about wait_for_agent seconds."""
    fake = FakeConsul()
    fake.set_unavailable()
    started = asyncio.get_running_loop().time()
    with pytest.raises(ConsulUnavailable, match=r"within 0\.3s"):
        await Dcy(api=fake, wait_for_agent=0.3).open()
    assert asyncio.get_running_loop().time() - started < 2


async def test_open_does_not_wait_out_an_acl_refusal() -> None:
    """An ACL refusal at open is raised at once, however long the client would wait."""
    fake = FakeConsul()
    fake.deny = True
    with pytest.raises(AclDenied):
        await asyncio.wait_for(Dcy(api=fake, wait_for_agent=None).open(), 2)
    assert fake.calls["agent_info"] == 1


def test_wait_for_agent_must_be_positive_or_none() -> None:
    """A wait of zero or less is a mistake, refused before anything connects."""
    with pytest.raises(ValueError, match="wait_for_agent"):
        Dcy(api=FakeConsul(), wait_for_agent=0)


async def test_aclose_releases_everything_even_when_consul_refuses() -> None:
    """With every request refused, aclose still stops the leadership, the health watch, the
    registrations' keepers and every watch, and closes nothing it did not open."""
    fake = FakeConsul()
    dcy = Dcy(api=fake, watch_options=FAST)
    await dcy.open()
    first = await dcy.register("web", 8001, check="ttl")
    await dcy.register("web", 8002, check="ttl")
    leadership = dcy.leadership("jobs", lock_delay=0)
    await leadership.__aenter__()
    health = dcy.watch_health("web")
    await eventually(lambda: fake.calls["health_service"] > 0, what="watches running")
    engine = dcy.engine
    fake.deny = True  # every request from now on: AclDenied
    await dcy.aclose()
    assert leadership.lost.is_set() and not leadership.is_leader
    assert engine.watches == ()
    assert first.service_id in {s["Service"]["ID"] for s in (await _entries(fake, "web"))}
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("dcy-")]
    assert not fake.closed  # given by the caller: the caller closes it
    with pytest.raises(RuntimeError, match="not open"):
        _ = dcy.api
    del health


async def _entries(fake: FakeConsul, name: str) -> list[dict[str, Any]]:
    fake.deny = False
    result = await fake.health_service(name)
    return list(result.body or [])
