"""A registration Consul refuses for good to keep (FakeConsul): lost, said once, not retried;
transient errors never lose it."""

from __future__ import annotations

import asyncio

from dcy import AclDenied, Backoff, Dcy, Registration, TtlCheck, WatchOptions
from dcy.testing import FakeConsul

OPTIONS = WatchOptions(
    wait=0.3, min_interval=0, backoff=Backoff(0.01, 0.05), first_answer_timeout=0.5
)


async def test_refused_heartbeat_loses_the_registration_once() -> None:
    """A heartbeat refused for lack of ACL: lost with that refusal, on_lost called once,
    no more heartbeats sent."""
    fake = FakeConsul()
    told: list[Registration] = []
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register(
            "job", 7000, check=TtlCheck(ttl=0.15), on_lost=told.append
        )
        fake.deny_methods = {"update_ttl", "deregister_service"}
        error = await asyncio.wait_for(registration.wait_lost(), 5)
        assert isinstance(error, AclDenied) and error.operation == "update_ttl"
        assert registration.lost.is_set() and registration.error is error
        beats = fake.calls["update_ttl"]
        await asyncio.sleep(0.3)
        assert fake.calls["update_ttl"] == beats
        assert told == [registration]


async def test_refused_watch_of_its_entry_loses_the_registration() -> None:
    """Without a TTL check, the watch that keeps the entry is what sees the refusal."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("api", 8080, check="http")
        fake.deny_methods = {"agent_service", "deregister_service"}
        error = await asyncio.wait_for(registration.wait_lost(), 5)
        assert isinstance(error, AclDenied) and error.operation == "agent_service"


async def test_refused_re_registration_loses_the_registration() -> None:
    """The agent forgot the service and refuses it back: lost, not retried forever."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("api", 8080, check=None)
        fake.deny_methods = {"register_service", "deregister_service"}
        fake.forget_everything()
        error = await asyncio.wait_for(registration.wait_lost(), 5)
        assert error.operation == "register_service"  # type: ignore[attr-defined]
        attempts = fake.calls["register_service"]
        await asyncio.sleep(0.3)
        assert fake.calls["register_service"] == attempts


async def test_unavailable_agent_does_not_lose_the_registration() -> None:
    """An agent that cannot answer for a while is waited out: still kept afterwards."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("job", 7000, check=TtlCheck(ttl=0.15))
        fake.unavailable = True
        await asyncio.sleep(0.4)
        fake.unavailable = False
        beats = fake.calls["update_ttl"]
        await asyncio.sleep(0.3)
        assert fake.calls["update_ttl"] > beats
        assert not registration.lost.is_set() and registration.error is None
