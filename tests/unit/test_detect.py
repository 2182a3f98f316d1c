"""Past the connection budget: change detectors and targeted re-fetches, against FakeConsul."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

from dcy import AclDenied, Backoff, DcyError, Snapshot, WatchOptions
from dcy._array_delta import changed_entries
from dcy._detect import common_root
from dcy._kv_specs import KeySpec
from dcy._specs import HealthServiceSpec
from dcy._watch import WatchEngine
from dcy.testing import FakeConsul
from tests.harness import eventually

# 10 blocking connections, 4 of them for detectors: past 6 watched queries, detect.
SMALL = WatchOptions(
    wait=5.0,
    min_interval=0,
    quiet_interval=0.0,
    backoff=Backoff(0.01, 0.05),
    first_answer_timeout=2.0,
    max_connections=12,
    reserved_connections=2,
)
SERVICES = 20
CHECK6 = {"CheckID": "service:s6-1006-6", "Name": "s6 check", "TTL": "10s"}


async def quiet() -> None:
    """Let every task triggered by a change run to its end."""
    for _ in range(5):
        await asyncio.sleep(0.02)


class Seen:
    def __init__(self) -> None:
        self.snapshots: dict[str, list[Snapshot[Any]]] = {}

    def callback(self, name: str) -> Callable[[Snapshot[Any]], None]:
        def record(snapshot: Snapshot[Any]) -> None:
            self.snapshots.setdefault(name, []).append(snapshot)

        return record

    def last(self, name: str) -> Any:
        return self.snapshots[name][-1].value


async def instances_seen(seen: Seen, name: str, count: int) -> None:
    """Wait until ``name``'s last answer holds ``count`` instances, then for every task the
    change set off."""
    await eventually(lambda: len(seen.last(name)) == count, what=f"{count} of {name}")
    await quiet()


@pytest.fixture
async def watched() -> AsyncIterator[tuple[FakeConsul, WatchEngine, Seen]]:
    fake = FakeConsul()
    for number in range(SERVICES):
        fake.add_service(f"s{number}", port=1000 + number, node="n1" if number % 2 else "fake-node")
    engine = WatchEngine(fake, SMALL)
    seen = Seen()
    for number in range(SERVICES):
        engine.subscribe(HealthServiceSpec(f"s{number}"), seen.callback(f"s{number}"))
    await eventually(lambda: len(seen.snapshots) == SERVICES)
    await quiet()
    try:
        yield fake, engine, seen
    finally:
        await engine.aclose()


def refetched(engine: WatchEngine, before: dict[str, int]) -> set[str]:
    return {
        str(w.spec.name)
        for w in engine.watches
        if isinstance(w.spec, HealthServiceSpec) and w.queries > before[w.spec.name]
    }


async def refetched_when_seen(
    engine: WatchEngine, seen: Seen, before: dict[str, int], name: str, count: int
) -> set[str]:
    """The services re-fetched since ``before``, once ``name`` shows ``count`` instances."""
    await instances_seen(seen, name, count)
    return refetched(engine, before)


def queries(engine: WatchEngine) -> dict[str, int]:
    return {w.spec.name: w.queries for w in engine.watches if isinstance(w.spec, HealthServiceSpec)}


async def test_past_the_budget_only_the_detectors_block(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, _ = watched
    assert engine.wide
    # The detectors' catalog query is the engine's own watch of it (shared with any user of
    # catalog services); it blocks, as every query not detected does.
    assert [str(w.spec) for w in engine.watches if w.detector is None] == ["catalog services"]
    assert engine.blocking_queries == 1
    blocking_before = sum(fake.blocking_calls.values())
    await asyncio.sleep(0.1)
    assert fake.in_flight == 2  # health state and catalog services
    assert set(fake.blocking_calls) == {"health_state", "catalog_services"}
    assert sum(fake.blocking_calls.values()) == blocking_before


async def test_a_check_change_refetches_only_its_service(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, seen = watched
    before, wakeups = queries(engine), engine.detector_wakeups
    fake.set_status("s3-1003-3", "critical")
    await eventually(lambda: seen.last("s3")[0].status == "critical")
    await quiet()
    assert refetched(engine, before) == {"s3"}
    assert engine.detector_wakeups > wakeups
    assert engine.detectors.sweeps == 0


async def test_an_instance_with_a_check_added_and_removed_is_attributed(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, seen = watched
    before = queries(engine)
    added = fake.add_service("s5", port=2000, node="n1")
    assert await refetched_when_seen(engine, seen, before, "s5", 2) == {"s5"}
    before = queries(engine)
    fake.remove_service(added)
    assert await refetched_when_seen(engine, seen, before, "s5", 1) == {"s5"}
    assert engine.detectors.sweeps == 0


async def test_changed_tags_are_attributed_by_the_catalog(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, seen = watched
    before = queries(engine)
    # Same ID, same check: only the catalog (its tags) changes.
    await fake.register_service(
        {"ID": "s6-1006-6", "Name": "s6", "Port": 1006, "Tags": ["blue"], "Check": CHECK6}
    )
    await eventually(lambda: seen.last("s6")[0].tags == ("blue",))
    await quiet()
    assert refetched(engine, before) == {"s6"}
    assert engine.detectors.sweeps == 0


async def test_a_node_check_refetches_the_services_on_that_node(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, seen = watched
    before = queries(engine)
    fake.set_node_check("n1", "critical")
    odd = {f"s{n}" for n in range(1, SERVICES, 2)}
    await eventually(lambda: all(seen.last(name)[0].status == "critical" for name in odd))
    await quiet()
    assert refetched(engine, before) == odd
    assert all(seen.last(f"s{n}")[0].status == "passing" for n in range(0, SERVICES, 2))


async def test_a_change_nobody_can_attribute_is_found_by_a_sweep(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, seen = watched
    # The same instance on another port, its check unchanged: no check written, and the
    # catalog's names and tags are the same.
    await fake.register_service({"ID": "s6-1006-6", "Name": "s6", "Port": 1999, "Check": CHECK6})
    await eventually(lambda: seen.last("s6")[0].port == 1999)
    assert engine.detectors.sweeps == 1
    # Every other query was asked again, and none of them woke its subscriber.
    await quiet()
    assert all(len(seen.snapshots[f"s{n}"]) == 1 for n in range(SERVICES) if n != 6)


async def test_back_within_the_budget_every_query_blocks_again(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, seen = watched
    for subscription in [s for w in engine.watches for s in tuple(w._subscribers)][:17]:
        await subscription.aclose()
    await eventually(lambda: not engine.wide)
    await eventually(lambda: fake.in_flight == 3)  # one blocking query per watched service
    assert engine.blocking_queries == 3
    name = next(w.spec.name for w in engine.watches if isinstance(w.spec, HealthServiceSpec))
    service_id = next(i.id for i in seen.last(name))
    fake.set_status(service_id, "warning")
    await eventually(lambda: seen.last(name)[0].status == "warning")


async def test_kv_keys_past_the_budget_refetch_only_the_written_key() -> None:
    fake = FakeConsul()
    engine = WatchEngine(fake, SMALL)
    seen = Seen()
    try:
        for number in range(10):
            await fake.kv_put(f"app/config/k{number}", b"0")
            engine.subscribe(KeySpec(f"app/config/k{number}"), seen.callback(f"k{number}"))
        await eventually(lambda: len(seen.snapshots) == 10)
        await quiet()
        assert engine.wide and fake.in_flight == 1
        before = {w.spec: w.queries for w in engine.watches}
        await fake.kv_put("app/config/k4", b"1")
        await eventually(lambda: seen.last("k4").value == "1")
        await quiet()
        assert {w.spec for w in engine.watches if w.queries > before[w.spec]} == {
            KeySpec("app/config/k4")
        }
        await fake.kv_delete("app/config/k2")
        await eventually(lambda: seen.last("k2") is None)
    finally:
        await engine.aclose()


def test_the_kv_detector_watches_the_common_folder() -> None:
    assert common_root(["app/config/a", "app/config/b"]) == "app/config/"
    assert common_root(["app/config/a", "app/other"]) == "app/"
    assert common_root(["app/x"]) == "app/x"
    assert common_root(["a", "b"]) == ""


def test_the_budget_must_leave_room_for_blocking_queries() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        WatchOptions(max_connections=10, reserved_connections=4)
    with pytest.raises(ValueError, match="reserved_connections"):
        WatchOptions(reserved_connections=0)


async def test_writes_of_other_tables_in_between_cause_no_sweep(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, seen = watched
    # KV writes (on a busy cluster: keys, sessions, coordinates) share the Raft index with
    # the catalog. Between two catalog answers they are not catalog writes to look for: a
    # new instance with its check is attributed, and nothing is swept.
    for number in range(5):
        await fake.kv_put(f"noise/{number}", b"x")
    fake.add_service("s5", port=2000, node="n1")
    await instances_seen(seen, "s5", 2)
    assert engine.detectors.sweeps == 0


async def test_a_check_less_change_hidden_by_a_later_write_is_seen_within_a_wait(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, _engine, seen = watched
    # Two catalog writes between two answers of the catalog: s6 on another port (its check
    # unchanged: nothing written to the checks), then a new instance of s5 with a check.
    # The catalog's index is the second's, a check write: the first is left to the
    # per-`wait` re-fetch of every query (the documented bound), not lost.
    await fake.register_service({"ID": "s6-1006-6", "Name": "s6", "Port": 1999, "Check": CHECK6})
    fake.add_service("s5", port=2000, node="n1")
    await eventually(lambda: len(seen.last("s5")) == 2)
    await eventually(lambda: seen.last("s6")[0].port == 1999, timeout=SMALL.wait + 2.0)


async def test_a_check_less_change_beside_a_tag_change_is_seen_within_a_wait(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, _engine, seen = watched
    # The catalog's diff names s6 (its tags); s8's new port is in the same interval, earlier.
    check8 = {"CheckID": "service:s8-1008-8", "Name": "s8 check", "TTL": "10s"}
    await fake.register_service({"ID": "s8-1008-8", "Name": "s8", "Port": 1888, "Check": check8})
    await fake.register_service(
        {"ID": "s6-1006-6", "Name": "s6", "Port": 1006, "Tags": ["blue"], "Check": CHECK6}
    )
    await eventually(lambda: seen.last("s6")[0].tags == ("blue",))
    await eventually(lambda: seen.last("s8")[0].port == 1888, timeout=SMALL.wait + 2.0)


async def test_a_detector_refused_for_good_ends_the_queries_it_covers() -> None:
    fake = FakeConsul()
    fake.deny_methods = {"health_state"}
    for number in range(SERVICES):
        fake.add_service(f"s{number}", port=1000 + number)
    engine = WatchEngine(fake, SMALL)
    ended: dict[str, DcyError] = {}

    def on_end(name: str) -> Callable[[DcyError], None]:
        def record(error: DcyError) -> None:
            ended[name] = error

        return record

    try:
        iterated = engine.subscribe(HealthServiceSpec("s0"))
        for number in range(1, SERVICES):
            name = f"s{number}"
            engine.subscribe(HealthServiceSpec(name), lambda _: None, on_end=on_end(name))
        await eventually(lambda: len(ended) == SERVICES - 1)
        assert all(isinstance(error, AclDenied) for error in ended.values())
        assert not engine.watches
        # An iterating subscriber gets the refusal raised.
        with pytest.raises(AclDenied):
            async with asyncio.timeout(2.0):
                async for _ in iterated:
                    pass
    finally:
        await engine.aclose()


def full_health_reads(fake: FakeConsul) -> int:
    """Reads of every check outside the health loop's blocking ones."""
    return fake.calls["health_state"] - fake.blocking_calls["health_state"]


async def test_a_check_less_instance_added_and_removed_is_attributed_without_a_sweep(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, seen = watched
    before, full_reads = queries(engine), full_health_reads(fake)
    # No check: the checks table does not move, the catalog's index does, and its body
    # (names and tags) stays the same. /v1/internal/ui/services shows s5's new instance.
    await fake.register_service({"ID": "s5-extra", "Name": "s5", "Port": 2000})
    assert await refetched_when_seen(engine, seen, before, "s5", 2) == {"s5"}
    # The checks table's index said no check was written: they were not read again.
    assert fake.calls["health_state_index"] == 1
    assert full_health_reads(fake) == full_reads
    before = queries(engine)
    await fake.deregister_service("s5-extra")  # moves the checks table, changes no check
    assert await refetched_when_seen(engine, seen, before, "s5", 1) == {"s5"}
    assert engine.detectors.sweeps == 0


async def test_a_check_less_change_is_proven_by_the_watched_querys_own_refetch(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, seen = watched
    for number, instances in ((5, 2), (5, 1), (8, 2)):
        asked = fake.calls["health_service"]
        if instances == 2:
            await fake.register_service({"ID": f"s{number}-x", "Name": f"s{number}", "Port": 9})
        else:
            await fake.deregister_service(f"s{number}-x")
        await instances_seen(seen, f"s{number}", instances)
        # s5's index, which explains the catalog's move, is that of s5's re-fetch: the
        # service is not asked a second time for it.
        assert fake.calls["health_service"] == asked + 1
    assert engine.detectors.sweeps == 0


async def test_a_check_less_instance_of_a_service_nobody_watches_wakes_nobody(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, _ = watched
    asked, refetches = fake.calls["health_service"], engine.refetches
    # A new name: the catalog's diff names it, its own index proves it.
    await fake.register_service({"ID": "other-1", "Name": "other", "Port": 2000})
    await eventually(lambda: fake.calls["health_service"] == asked + 1)
    # Its second instance: named by /v1/internal/ui/services.
    await fake.register_service({"ID": "other-2", "Name": "other", "Port": 2001})
    await eventually(lambda: fake.calls["ui_services"] == 2)
    await quiet()
    assert engine.detectors.sweeps == 0
    assert engine.refetches == refetches


async def test_without_the_ui_services_endpoint_a_check_less_change_is_swept(
    watched: tuple[FakeConsul, WatchEngine, Seen],
) -> None:
    fake, engine, seen = watched
    fake.ui_services_endpoint = False  # another Consul: 404
    await fake.register_service({"ID": "s5-extra", "Name": "s5", "Port": 2000})
    await eventually(lambda: len(seen.last("s5")) == 2)
    assert engine.detectors.sweeps == 1
    await fake.register_service({"ID": "s7-extra", "Name": "s7", "Port": 2000})
    await eventually(lambda: len(seen.last("s7")) == 2)
    assert engine.detectors.sweeps == 2
    assert fake.calls["ui_services"] == 2  # the baseline, then the 404: not asked again


Deltas = list[tuple[list[Any], list[Any]] | None]


@pytest.fixture
def deltas(monkeypatch: pytest.MonkeyPatch) -> Deltas:
    """Every delta the detectors computed (None: they decoded the whole answer)."""
    found: Deltas = []

    def recorded(old: bytes, new: bytes) -> tuple[list[Any], list[Any]] | None:
        found.append(changed_entries(old, new))
        return found[-1]

    monkeypatch.setattr("dcy._detect.changed_entries", recorded)
    return found


@pytest.mark.parametrize("pretty", [False, True], ids=["compact", "pretty"])
async def test_health_wake_ups_decode_only_the_checks_that_changed(
    pretty: bool, deltas: Deltas
) -> None:
    fake = FakeConsul()
    fake.pretty_json = pretty  # as a dev agent answers; any other agent answers compact
    for number in range(SERVICES):
        fake.add_service(f"s{number}", port=1000 + number, node="n1" if number % 2 else "n0")
    engine = WatchEngine(fake, SMALL)
    seen = Seen()
    try:
        for number in range(SERVICES):
            engine.subscribe(HealthServiceSpec(f"s{number}"), seen.callback(f"s{number}"))
        await eventually(lambda: len(seen.snapshots) == SERVICES)
        await quiet()
        before = queries(engine)
        fake.set_status("s3-1003-3", "critical")
        await eventually(lambda: seen.last("s3")[0].status == "critical")
        added = fake.add_service("s0", port=2000, node="n0")  # the first entries
        await eventually(lambda: len(seen.last("s0")) == 2)
        fake.remove_service(added)
        await eventually(lambda: len(seen.last("s0")) == 1)
        fake.set_status("s18-1018-18", "warning")  # the last ones
        await eventually(lambda: seen.last("s18")[0].status == "warning")
        await quiet()
        assert refetched(engine, before) == {"s0", "s3", "s18"}
        fake.set_node_check("n1", "critical")
        odd = {f"s{n}" for n in range(1, SERVICES, 2)}
        await eventually(lambda: all(seen.last(name)[0].status == "critical" for name in odd))
        assert len(deltas) >= 5
        assert all(delta is not None for delta in deltas)
        # Around each change a few checks were decoded, never the whole answer.
        assert max(len(d[0]) + len(d[1]) for d in deltas if d is not None) <= 4
        assert engine.detectors.sweeps == 0
    finally:
        await engine.aclose()


@pytest.mark.parametrize("pretty", [False, True], ids=["compact", "pretty"])
async def test_kv_wake_ups_decode_only_the_keys_that_changed(pretty: bool, deltas: Deltas) -> None:
    fake = FakeConsul()
    fake.pretty_json = pretty
    engine = WatchEngine(fake, SMALL)
    seen = Seen()
    try:
        for number in range(10):
            await fake.kv_put(f"app/k{number}", b'{"x": "}\\","}')
            engine.subscribe(KeySpec(f"app/k{number}"), seen.callback(f"k{number}"))
        await eventually(lambda: len(seen.snapshots) == 10)
        await quiet()
        assert engine.wide
        before = {w.spec: w.queries for w in engine.watches}
        await fake.kv_put("app/k0", b"first")
        await eventually(lambda: seen.last("k0").value == "first")
        await fake.kv_put("app/k9", b"last")
        await eventually(lambda: seen.last("k9").value == "last")
        await fake.kv_delete("app/k5")
        await eventually(lambda: seen.last("k5") is None)
        await fake.kv_put("app/k5", b"again")
        await eventually(lambda: seen.last("k5") is not None)
        await quiet()
        assert {w.spec for w in engine.watches if w.queries > before[w.spec]} == {
            KeySpec("app/k0"),
            KeySpec("app/k5"),
            KeySpec("app/k9"),
        }
        assert len(deltas) >= 4
        assert all(delta is not None for delta in deltas)
        assert max(len(d[0]) + len(d[1]) for d in deltas if d is not None) <= 4
    finally:
        await engine.aclose()


async def test_a_check_less_change_right_after_another_is_not_held_back_by_pacing() -> None:
    # A catalog answer that changed nothing waits `quiet_interval` before the next query
    # (a rolling deploy wakes it for every instance): not when the detector acts on it.
    options = replace(SMALL, quiet_interval=2.0)
    fake = FakeConsul()
    for number in range(SERVICES):
        fake.add_service(f"s{number}", port=1000 + number)
    engine = WatchEngine(fake, options)
    seen = Seen()
    try:
        for number in range(SERVICES):
            engine.subscribe(HealthServiceSpec(f"s{number}"), seen.callback(f"s{number}"))
        await eventually(lambda: len(seen.snapshots) == SERVICES)
        # Past the start-up's pacing: the catalog query blocks.
        await eventually(lambda: fake.blocking_calls["catalog_services"] == 1, timeout=10.0)
        for extra in range(3):
            await fake.register_service({"ID": f"s5-{extra}", "Name": "s5", "Port": 2000 + extra})
            await instances_seen(seen, "s5", 2 + extra)
            # Asked again at once, not `quiet_interval` after the last one.
            assert fake.blocking_calls["catalog_services"] == 2 + extra
        assert engine.detectors.sweeps == 0
    finally:
        await engine.aclose()
