"""Failover to other datacenters (pick/instances with ``datacenters=``) and the Vivaldi
distance that orders ``datacenters="all"``."""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import pytest

from dcy import Backoff, Dcy, NoHealthyInstances, ServiceNotFound, WatchOptions
from dcy._coordinates import Coordinate, datacenters_by_distance, median_rtt, rtt
from dcy._specs import DatacentersByDistanceSpec, HealthServiceSpec
from dcy.testing import FakeConsul

OPTIONS = WatchOptions(
    wait=0.3, min_interval=0, backoff=Backoff(0.01, 0.05), first_answer_timeout=0.5
)


async def eventually(condition: Callable[[], Any], *, timeout: float = 5.0) -> None:
    """Poll until ``condition()`` (sync or async) is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


async def failover_lookup(dcy: Dcy) -> tuple[list[int], bool]:
    """The ports and staleness of the answer for "worker" with dc2 as its failover."""
    lookup = await dcy.lookup("worker", datacenters=["dc2"])
    return [i.port for i in lookup.instances], lookup.stale


def _at(*vec: float, height: float = 0.0, adjustment: float = 0.0) -> Coordinate:
    return Coordinate(vec=tuple(vec), height=height, adjustment=adjustment)


# -- coordinates -------------------------------------------------------------------------------


def test_rtt_is_euclidean_distance_plus_heights_plus_adjustments() -> None:
    """rtt() = |a - b| + both heights + both adjustments, in seconds."""
    a, b = _at(0.0, 0.0, height=0.001, adjustment=0.002), _at(0.03, 0.04, height=0.002)
    assert rtt(a, b) == pytest.approx(0.05 + 0.003 + 0.002)
    assert rtt(a, b) == rtt(b, a)


def test_rtt_ignores_adjustments_that_would_make_it_non_positive() -> None:
    """A negative adjustment larger than the distance is dropped, as Consul does."""
    a, b = _at(0.0, height=0.001, adjustment=-0.5), _at(0.01, height=0.001)
    assert rtt(a, b) == pytest.approx(0.012)


def test_rtt_of_different_dimensions_is_infinite() -> None:
    """Coordinates of different dimensions cannot be compared: infinitely far."""
    assert rtt(_at(0.0, 0.0), _at(0.0)) == math.inf


def test_median_rtt_over_every_pair_of_servers() -> None:
    """The distance to a datacenter is the median over all (local, remote) server pairs."""
    local = [_at(0.0)]
    remote = [_at(0.01), _at(0.02), _at(0.09)]
    assert median_rtt(local, remote) == pytest.approx(0.02)
    assert median_rtt(local, []) == math.inf


def test_datacenters_by_distance_nearest_first_unknown_last() -> None:
    """Other datacenters sort by distance; those without coordinates keep catalog order, last."""
    coordinates = {"dc1": [_at(0.0)], "far": [_at(0.2)], "near": [_at(0.01)]}
    known = ["dc1", "nocoords", "far", "near"]
    assert datacenters_by_distance("dc1", known, coordinates) == ("near", "far", "nocoords")


async def test_fake_orders_catalog_datacenters_by_coordinates() -> None:
    """FakeConsul lists its own datacenter first, then the others nearest first."""
    fake = FakeConsul()
    fake.add_datacenter("dc2", vec=(0.2,) + (0.0,) * 7)
    fake.add_datacenter("dc3", vec=(0.05,) + (0.0,) * 7)
    assert await fake.catalog_datacenters() == ["dc1", "dc3", "dc2"]
    areas = {a["Datacenter"]: a for a in await fake.coordinate_datacenters()}
    assert set(areas) == {"dc1", "dc2", "dc3"}
    assert areas["dc2"]["Coordinates"][0]["Coord"]["Vec"][0] == 0.2


# -- failover ----------------------------------------------------------------------------------


async def test_local_healthy_instance_wins() -> None:
    """With a passing local instance, pick never asks the failover datacenters."""
    fake = FakeConsul()
    fake.add_service("worker", port=1)
    fake.add_service("worker", port=2, datacenter="dc2")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        assert (await dcy.pick("worker", datacenters=["dc2"])).port == 1
        assert [str(w.spec) for w in dcy.engine.watches] == ["health worker"]


async def test_fails_over_when_local_has_no_healthy_instance() -> None:
    """A critical local instance makes pick use the next datacenter, through the engine."""
    fake = FakeConsul()
    local = fake.add_service("worker", port=1, status="critical")
    fake.add_service("worker", port=2, datacenter="dc2")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        picked = await dcy.pick("worker", datacenters=["dc2"])
        assert (picked.port, picked.datacenter) == (2, "dc2")
        specs = {w.spec for w in dcy.engine.watches}
        assert HealthServiceSpec("worker", None, "dc2") in specs
        with pytest.raises(NoHealthyInstances):
            await dcy.pick("worker")  # without datacenters=: local only, as before
        fake.set_status(local, "passing")
        await eventually(lambda: dcy.instances("worker"))
        assert (await dcy.pick("worker", datacenters=["dc2"])).port == 1


async def stale(dcy: Dcy, name: str) -> bool:
    return (await dcy.lookup(name)).stale


async def fresh(dcy: Dcy, name: str) -> bool:
    return not (await dcy.lookup(name)).stale


async def test_stale_home_answer_gives_way_to_a_fresh_datacenter_and_comes_back() -> None:
    """Home's servers lost: its kept answer is stale, so pick and lookup with ``datacenters=``
    use dc2's fresh one; without ``datacenters=`` the stale answer still serves; when home is
    reachable again, answers come from home, fresh, without a new client."""
    fake = FakeConsul()
    fake.add_service("worker", port=1)
    fake.add_service("worker", port=2, datacenter="dc2")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        assert (await dcy.pick("worker", datacenters=["dc2"])).port == 1
        fake.set_datacenter_reachable("dc1", False)
        await eventually(lambda: stale(dcy, "worker"))
        picked = await dcy.pick("worker", datacenters=["dc2"])
        assert (picked.port, picked.datacenter) == (2, "dc2")
        assert await failover_lookup(dcy) == ([2], False)
        assert (await dcy.pick("worker")).port == 1  # no failover asked: the kept answer
        fake.set_datacenter_reachable("dc1", True)
        await eventually(lambda: fresh(dcy, "worker"))
        assert await failover_lookup(dcy) == ([1], False)


async def test_stale_home_answer_wins_over_a_stale_elsewhere() -> None:
    """When every datacenter is unreachable, the home answer kept from before is used."""
    fake = FakeConsul()
    fake.add_service("worker", port=1)
    fake.add_service("worker", port=2, datacenter="dc2")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        assert (await dcy.instances("worker", datacenters=["dc2"]))[0].port == 1
        fake.set_datacenter_reachable("dc1", False)
        await eventually(lambda: stale(dcy, "worker"))
        assert (await dcy.pick("worker", datacenters=["dc2"])).port == 2
        fake.set_datacenter_reachable("dc2", False)
        await eventually(lambda: stale(dcy, "worker@dc2"))
        assert await failover_lookup(dcy) == ([1], True)


async def test_fails_over_when_local_has_no_instance_at_all() -> None:
    """A service unknown locally is found in the failover datacenter."""
    fake = FakeConsul()
    fake.add_service("worker", port=2, datacenter="dc2")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        assert (await dcy.pick("worker", datacenters=["dc2"])).port == 2


async def test_failover_datacenters_are_tried_in_order() -> None:
    """The first datacenter of the list with a match answers, not a later one."""
    fake = FakeConsul()
    fake.add_service("worker", port=2, datacenter="dc2", status="critical")
    fake.add_service("worker", port=3, datacenter="dc3")
    fake.add_service("worker", port=4, datacenter="dc4")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        assert (await dcy.pick("worker", datacenters=["dc2", "dc3", "dc4"])).port == 3
        assert (await dcy.pick("worker", datacenters=["dc4", "dc3"])).port == 4


async def test_failover_honours_tag_and_states() -> None:
    """The query's tag and health states apply in every datacenter."""
    fake = FakeConsul()
    fake.add_service("worker", port=2, datacenter="dc2", tags=["v1"])
    fake.add_service("worker", port=3, datacenter="dc2", tags=["v2"], status="warning")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        assert (await dcy.pick("v2.worker|passing,warning", datacenters=["dc2"])).port == 3
        with pytest.raises(NoHealthyInstances):
            await dcy.pick("v2.worker", datacenters=["dc2"])


async def test_nothing_anywhere_raises_with_every_datacenter_named() -> None:
    """No match in any datacenter raises NoHealthyInstances (some exist) naming them all."""
    fake = FakeConsul()
    fake.add_service("worker", status="critical")
    fake.add_service("worker", datacenter="dc2", status="critical")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        with pytest.raises(NoHealthyInstances, match=r"2 instance\(s\) of 'worker' in dc1, dc2"):
            await dcy.pick("worker", datacenters=["dc2"])
        with pytest.raises(ServiceNotFound, match="in dc1, dc2"):
            await dcy.pick("nobody", datacenters=["dc2"])


async def test_all_datacenters_nearest_first() -> None:
    """datacenters="all" tries every known datacenter, the nearest by coordinates first."""
    fake = FakeConsul()
    fake.add_datacenter("dc1")
    fake.add_datacenter("far", vec=(0.3,) + (0.0,) * 7)
    fake.add_datacenter("near", vec=(0.02,) + (0.0,) * 7)
    fake.add_service("worker", port=8, datacenter="far")
    fake.add_service("worker", port=9, datacenter="near")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        assert (await dcy.pick("worker", datacenters="all")).datacenter == "near"
        distance = [w for w in dcy.engine.watches if isinstance(w.spec, DatacentersByDistanceSpec)]
        assert [w.snapshot.value for w in distance if w.snapshot] == [("near", "far")]


async def test_instances_and_lookup_fail_over_and_say_where() -> None:
    """instances()/lookup() with datacenters answer from the first datacenter with a match."""
    fake = FakeConsul()
    fake.add_service("worker", port=2, datacenter="dc2")
    fake.add_service("worker", port=3, datacenter="dc2")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        assert await dcy.instances("worker") == ()
        instances = await dcy.instances("worker", datacenters=["dc2"])
        assert sorted(i.port for i in instances) == [2, 3]
        lookup = await dcy.lookup("worker", datacenters=["dc2"])
        assert lookup.query.datacenter == "dc2" and not lookup.stale
        empty = await dcy.lookup("nobody", datacenters=["dc2"])
        assert empty.instances == () and empty.query.datacenter is None


async def test_name_with_datacenter_starts_there_then_fails_over_to_local() -> None:
    """ "worker@dc2" with datacenters="all" tries dc2 first, then the local datacenter."""
    fake = FakeConsul()
    fake.add_datacenter("dc2", vec=(0.1,) + (0.0,) * 7)
    fake.add_service("worker", port=1)
    fake.add_service("worker", port=2, datacenter="dc2", status="critical")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        assert (await dcy.pick("worker@dc2", datacenters="all")).port == 1


async def test_a_single_datacenter_string_is_refused() -> None:
    """datacenters="dc2" (a string, not a list) raises ValueError instead of trying d, c, 2."""
    fake = FakeConsul()
    fake.add_service("worker")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        with pytest.raises(ValueError, match="'dc2'"):
            await dcy.pick("worker", datacenters="dc2")


async def test_round_robin_within_the_failover_datacenter() -> None:
    """Picks in the failover datacenter rotate over its instances."""
    fake = FakeConsul()
    fake.add_service("worker", port=2, datacenter="dc2")
    fake.add_service("worker", port=3, datacenter="dc2")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        ports = [(await dcy.pick("worker", datacenters=["dc2"])).port for _ in range(4)]
        assert sorted(ports) == [2, 2, 3, 3] and ports[0] != ports[1]
