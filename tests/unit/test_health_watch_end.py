"""A health watch Consul refuses for good (FakeConsul): it ends, says why, and an iterator
raises the refusal after what was already reported."""

from __future__ import annotations

import asyncio

import pytest

from dcy import AclDenied, Backoff, Dcy, Transition, WatchOptions
from dcy.testing import FakeConsul
from tests.harness import eventually

OPTIONS = WatchOptions(
    wait=0.3, min_interval=0, backoff=Backoff(0.01, 0.05), first_answer_timeout=0.5
)


async def test_refused_watch_ends_with_the_refusal() -> None:
    """wait_ended() returns the AclDenied; `async for` yields the transition seen before,
    then raises it."""
    fake = FakeConsul()
    web = fake.add_service("web")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        watch = dcy.watch_health("web")
        await watch.ready()
        seen: list[Transition] = []

        async def collect() -> None:
            async for transition in watch:
                seen.append(transition)

        collector = asyncio.create_task(collect())
        fake.set_status(web, "critical", "HTTP 503")
        await eventually(lambda: bool(seen), what="a transition")
        fake.deny_methods = {"health_service"}
        error = await asyncio.wait_for(watch.wait_ended(), 5)
        assert isinstance(error, AclDenied) and error.operation == "health_service"
        assert watch.error is error
        with pytest.raises(AclDenied):
            await asyncio.wait_for(collector, 5)
        assert [t.new_status for t in seen] == ["critical"]


async def test_outage_does_not_end_the_watch() -> None:
    """An agent that cannot answer for a while is waited out: the watch goes on."""
    fake = FakeConsul()
    web = fake.add_service("web")
    seen: list[Transition] = []
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        watch = dcy.watch_health("web", seen.append)
        await watch.ready()
        fake.unavailable = True
        await asyncio.sleep(0.3)
        fake.unavailable = False
        fake.set_status(web, "critical", "down")
        await eventually(lambda: bool(seen), what="a transition")
        assert watch.error is None
