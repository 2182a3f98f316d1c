"""Resolution by name against FakeConsul: pick strategies, health filters, errors, eviction."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from dcy import (
    Backoff,
    ConsulUnavailable,
    Dcy,
    LookupFailed,
    NoHealthyInstances,
    ServiceNotFound,
    WatchOptions,
)
from dcy.testing import FakeConsul

OPTIONS = WatchOptions(
    wait=0.3, min_interval=0, backoff=Backoff(0.01, 0.05), first_answer_timeout=0.5
)


async def eventually(condition: Callable[[], Any], *, timeout: float = 5.0) -> None:
    """Poll until ``condition()`` is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def _fleet() -> tuple[FakeConsul, dict[str, str]]:
    """A fake with workers in every health state, by status."""
    fake = FakeConsul()
    ids = {
        "passing-a": fake.add_service("worker", port=7101),
        "passing-b": fake.add_service("worker", port=7102),
        "passing-c": fake.add_service("worker", port=7103),
        "warning": fake.add_service("worker", port=7104, status="warning"),
        "critical": fake.add_service("worker", port=7105, status="critical"),
    }
    return fake, ids


async def test_round_robin_cycles_evenly_through_passing_instances() -> None:
    """round_robin visits every passing instance in turn, each equally often."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        picks = [(await dcy.pick("worker")).port for _ in range(300)]
        assert Counter(picks) == {7101: 100, 7102: 100, 7103: 100}
        assert len(set(picks[:3])) == 3
        assert picks[:3] == picks[3:6]


async def test_random_picks_only_candidates() -> None:
    """random picks among the passing instances only, and reaches all of them."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        ports = {(await dcy.pick("worker", "random")).port for _ in range(300)}
        assert ports == {7101, 7102, 7103}


async def test_unknown_strategy_is_a_value_error() -> None:
    """A strategy other than round_robin or random raises ValueError naming it."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        with pytest.raises(ValueError, match="'closest'"):
            await dcy.pick("worker", "closest")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("query", "ports"),
    [
        ("worker", {7101, 7102, 7103}),
        ("worker|passing", {7101, 7102, 7103}),
        ("worker|passing,warning", {7101, 7102, 7103, 7104}),
        ("worker|warning", {7104}),
        ("worker|critical", {7105}),
        ("worker|any", {7101, 7102, 7103, 7104, 7105}),
    ],
)
async def test_states_filter(query: str, ports: set[int]) -> None:
    """The |states part of a query selects instances by health."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        lookup = await dcy.lookup(query)
        assert {i.port for i in lookup.instances} == ports
        assert lookup.known == 5


async def test_state_variants_share_one_watch() -> None:
    """worker, worker|any and worker.service.sd are served by one loop."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        await dcy.pick("worker")
        await dcy.pick("worker|any")
        await dcy.pick("worker.service.sd")
        assert len(dcy.engine.watches) == 1
        assert fake.calls["health_service"] - fake.blocking_calls["health_service"] == 1


async def test_maintenance_instances_only_match_maintenance_or_any() -> None:
    """An instance in maintenance mode is excluded unless maintenance (or any) is asked for."""
    fake = FakeConsul()
    await fake.register_service(
        {
            "ID": "worker-m",
            "Name": "worker",
            "Port": 7109,
            "Checks": [
                {"CheckID": "service:worker-m", "Status": "passing"},
                {"CheckID": "_service_maintenance:worker-m", "Status": "critical"},
            ],
        }
    )
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        with pytest.raises(NoHealthyInstances):
            await dcy.pick("worker")
        assert (await dcy.pick("worker|maintenance")).port == 7109
        assert (await dcy.pick("worker|any")).port == 7109


async def test_unknown_service_is_service_not_found() -> None:
    """A name with no instance at all raises ServiceNotFound carrying the query."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        with pytest.raises(ServiceNotFound) as caught:
            await dcy.pick("nosuch")
        assert caught.value.query == "nosuch"
        assert isinstance(caught.value, LookupFailed)
        assert (await dcy.lookup("nosuch")).instances == ()


async def test_unhealthy_service_is_no_healthy_instances() -> None:
    """Instances that exist but miss the wanted states raise NoHealthyInstances."""
    fake = FakeConsul()
    fake.add_service("db", status="critical")
    fake.add_service("db", status="warning")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        with pytest.raises(NoHealthyInstances, match="2 instance") as caught:
            await dcy.pick("db")
        assert caught.value.query == "db"
        assert isinstance(caught.value, LookupFailed)
        assert not isinstance(caught.value, ServiceNotFound)


async def test_tag_and_datacenter_select_instances() -> None:
    """A tag or datacenter in the query narrows the instances to those."""
    fake = FakeConsul()
    fake.add_service("web", port=1, tags=["v1"])
    fake.add_service("web", port=2, tags=["v2"])
    fake.add_service("web", port=3, datacenter="dc2")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        assert (await dcy.pick("v2.web")).port == 2
        assert (await dcy.pick("web@dc2")).port == 3
        assert (await dcy.pick("web.service.dc2.sd")).port == 3
        assert {i.port for i in await dcy.instances("web")} == {1, 2}


async def test_pick_nowait_before_and_after_the_first_answer() -> None:
    """pick_nowait raises LookupFailed until the name is resolved, then picks from cache."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        with pytest.raises(LookupFailed, match="not resolved yet"):
            dcy.pick_nowait("worker")
        # The failed call started the lookup in the background.
        await eventually(lambda: fake.calls["health_service"] >= 1)
        await dcy.lookup("worker")
        ports = {dcy.pick_nowait("worker").port for _ in range(3)}
        assert ports == {7101, 7102, 7103}
        assert fake.calls["health_service"] - fake.blocking_calls["health_service"] == 1


async def test_invalid_name_is_refused_by_pick() -> None:
    """A malformed name raises ValueError from pick, lookup and pick_nowait."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        with pytest.raises(ValueError):
            await dcy.pick("bad name")
        with pytest.raises(ValueError):
            await dcy.lookup("worker|healthy")
        with pytest.raises(ValueError):
            dcy.pick_nowait("worker@")
        assert dcy.engine.watches == ()


async def test_lookup_reports_staleness_during_an_outage() -> None:
    """lookup keeps answering during an outage, marked stale with an age; fresh again after."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        fresh = await dcy.lookup("worker")
        assert not fresh.stale and fresh.age >= 0
        await eventually(lambda: fake.in_flight == 1)
        fake.set_unavailable()
        lookups = []

        async def stale_now() -> bool:
            lookups.append(await dcy.lookup("worker"))
            return lookups[-1].stale

        deadline = time.monotonic() + 5
        while not await stale_now():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        stale = lookups[-1]
        assert stale.instances == fresh.instances
        assert stale.age > 0
        assert (await dcy.pick("worker")).port in {7101, 7102, 7103}
        fake.set_unavailable(False)
        lookups.clear()
        while await stale_now():
            assert time.monotonic() < deadline + 5
            await asyncio.sleep(0.005)


async def test_lookup_timeout_argument_bounds_the_first_answer() -> None:
    """lookup(timeout=...) bounds the wait for a first answer instead of the default."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        fake.set_unavailable()
        with pytest.raises(ConsulUnavailable, match=r"within 0\.1s"):
            await dcy.lookup("worker", timeout=0.1)


async def test_critical_instance_leaves_the_rotation() -> None:
    """An instance whose check turns critical is no longer picked; back when passing."""
    fake, ids = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        await dcy.pick("worker")
        fake.set_status(ids["passing-b"], "critical")

        def without_b() -> bool:
            return all(dcy.pick_nowait("worker").port != 7102 for _ in range(6))

        await eventually(without_b)
        assert {dcy.pick_nowait("worker").port for _ in range(20)} == {7101, 7103}
        fake.set_status(ids["passing-b"], "passing")
        await eventually(
            lambda: {dcy.pick_nowait("worker").port for _ in range(6)} == {7101, 7102, 7103}
        )


async def test_removed_instances_lead_to_service_not_found() -> None:
    """When the last instance is removed, pick raises ServiceNotFound."""
    fake = FakeConsul()
    sid = fake.add_service("solo")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        await dcy.pick("solo")
        fake.remove_service(sid)

        def gone() -> bool:
            try:
                dcy.pick_nowait("solo")
            except ServiceNotFound:
                return True
            return False

        await eventually(gone)


async def test_idle_lookups_are_evicted_and_their_watch_stops() -> None:
    """A name not used for lookup_idle_timeout lets go of its watch; the loop stops."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS, lookup_idle_timeout=0.2) as dcy:
        await dcy.pick("worker")
        assert len(dcy.engine.watches) == 1
        await eventually(lambda: dcy.engine.watches == ())
        await eventually(lambda: fake.in_flight == 0)
        with pytest.raises(LookupFailed, match="not resolved yet"):
            dcy.pick_nowait("worker")
        assert (await dcy.pick("worker")).port in {7101, 7102, 7103}
        assert fake.calls["health_service"] - fake.blocking_calls["health_service"] == 2


async def test_subscriber_keeps_the_watch_alive_after_lookup_eviction() -> None:
    """Evicting an idle lookup does not stop a loop that a subscription still uses."""
    fake, _ = _fleet()
    async with Dcy(api=fake, watch_options=OPTIONS, lookup_idle_timeout=0.2) as dcy:
        await dcy.pick("worker")
        (watch,) = dcy.engine.watches
        async with dcy.subscribe("worker"):
            assert watch.users == 2
            await eventually(lambda: watch.users == 1)
            assert dcy.engine.watches == (watch,)
        assert len(dcy.engine.watches) == 0
