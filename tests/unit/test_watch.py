"""WatchEngine against FakeConsul: shared loops, index rules, outages, backoff, subscribers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from dcy import AclDenied, Backoff, ConsulUnavailable, Dcy, Snapshot, Subscription, WatchOptions
from dcy._consul import Index, QueryResult
from dcy._specs import HealthServiceSpec
from dcy._watch import WatchEngine
from dcy.testing import FakeConsul

OPTIONS = WatchOptions(
    wait=0.3, min_interval=0, backoff=Backoff(0.01, 0.05), first_answer_timeout=0.5
)
WORKER = HealthServiceSpec("worker")


async def eventually(condition: Callable[[], bool], *, timeout: float = 5.0) -> None:
    """Poll until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


async def settle() -> None:
    """Let every ready task run (a woken subscriber needs one or two loop turns)."""
    for _ in range(20):
        await asyncio.sleep(0)


class Recorder:
    """A subscriber callback that keeps every snapshot it is given."""

    def __init__(self) -> None:
        self.seen: list[Snapshot[Any]] = []

    def __call__(self, snapshot: Snapshot[Any]) -> None:
        self.seen.append(snapshot)

    @property
    def last(self) -> Snapshot[Any]:
        return self.seen[-1]


async def in_blocking_query(fake: FakeConsul, engine: WatchEngine) -> Recorder:
    """A Recorder subscribed to WORKER, once it has its first snapshot and the loop's
    blocking query is in flight."""
    recorder = Recorder()
    engine.subscribe(WORKER, recorder)
    await eventually(lambda: len(recorder.seen) == 1)
    await eventually(lambda: fake.in_flight == 1)
    return recorder


class ScriptedConsul(FakeConsul):
    """A FakeConsul that logs each health query and can lie about the next answer's index."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[Index, float | None]] = []
        self.next_index: Index | None = None

    async def health_service(
        self,
        name: str,
        *,
        tag: str | None = None,
        datacenter: str | None = None,
        index: Index = 0,
        wait: float | None = None,
    ) -> QueryResult:
        self.requests.append((index, wait))
        result = await super().health_service(
            name, tag=tag, datacenter=datacenter, index=index, wait=wait
        )
        if self.next_index is not None:
            result, self.next_index = QueryResult(self.next_index, result.body), None
        return result


def _statuses(snapshot: Snapshot[Any]) -> list[str]:
    return [instance.status for instance in snapshot.value]


# -- one loop per spec -------------------------------------------------------------------------


async def test_fifty_concurrent_picks_share_one_loop() -> None:
    """50 concurrent first picks of one name start exactly one loop and one initial query."""
    fake = FakeConsul()
    fake.add_service("worker", port=9702)
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        picked = await asyncio.gather(*(dcy.pick("worker") for _ in range(50)))
        assert {instance.port for instance in picked} == {9702}
        (watch,) = dcy.engine.watches
        await eventually(lambda: fake.in_flight == 1)
        non_blocking = fake.calls["health_service"] - fake.blocking_calls["health_service"]
        assert non_blocking == 1
        assert fake.calls["health_service"] == watch.queries
        assert fake.max_in_flight == 1


async def test_equal_specs_share_a_loop_and_different_ones_do_not() -> None:
    """acquire() returns the same watch for equal specs and a new one for another spec."""
    fake = FakeConsul()
    engine = WatchEngine(fake, OPTIONS)
    try:
        first = engine.acquire(HealthServiceSpec("worker"))
        assert engine.acquire(HealthServiceSpec("worker")) is first
        other = engine.acquire(HealthServiceSpec("worker", tag="v2"))
        assert other is not first
        assert first.users == 2 and len(engine.watches) == 2
    finally:
        await engine.aclose()


async def test_loop_stops_when_the_last_subscriber_leaves() -> None:
    """Closing the last subscription removes the watch and cancels its query; no more calls."""
    fake = FakeConsul()
    fake.add_service("worker")
    engine = WatchEngine(fake, OPTIONS)
    try:
        one = engine.subscribe(WORKER)
        two = engine.subscribe(WORKER)
        (watch,) = engine.watches
        await watch.first()
        await eventually(lambda: fake.in_flight == 1)
        await one.aclose()
        assert engine.watches == (watch,)
        await two.aclose()
        assert len(engine.watches) == 0
        await eventually(lambda: fake.in_flight == 0)
        calls = fake.calls["health_service"]
        fake.add_service("worker", port=9999)
        await settle()
        assert fake.calls["health_service"] == calls
    finally:
        await engine.aclose()


# -- index rules -------------------------------------------------------------------------------


async def test_same_index_wakes_nobody() -> None:
    """Answers with an unchanged index, or changes to another service, wake no subscriber."""
    fake = FakeConsul()
    fake.add_service("worker")
    engine = WatchEngine(fake, OPTIONS)
    try:
        recorder = Recorder()
        engine.subscribe(WORKER, recorder)
        (watch,) = engine.watches
        await eventually(lambda: len(recorder.seen) == 1)
        queries = watch.queries
        fake.add_service("other")
        # Several waits run out with the index unchanged.
        await eventually(lambda: watch.queries >= queries + 3)
        await settle()
        assert len(recorder.seen) == 1
        assert watch.snapshot is not None
        assert watch.snapshot.contacted_at >= recorder.last.contacted_at
    finally:
        await engine.aclose()


async def test_index_moving_without_a_change_wakes_nobody() -> None:
    """An index that moved while the value stayed equal updates the snapshot silently."""
    fake = FakeConsul()
    sid = fake.add_service("worker")
    engine = WatchEngine(fake, OPTIONS)
    try:
        recorder = Recorder()
        engine.subscribe(WORKER, recorder)
        (watch,) = engine.watches
        await eventually(lambda: len(recorder.seen) == 1)
        before = recorder.last.index
        fake.set_status(sid, "passing")  # same status: Consul's index moves, the value does not
        await eventually(lambda: watch.snapshot is not None and watch.snapshot.index != before)
        await settle()
        assert len(recorder.seen) == 1
    finally:
        await engine.aclose()


async def test_change_reaches_the_subscriber() -> None:
    """A real change is published: the callback gets a snapshot with the new value."""
    fake = FakeConsul()
    sid = fake.add_service("worker")
    engine = WatchEngine(fake, OPTIONS)
    try:
        recorder = Recorder()
        engine.subscribe(WORKER, recorder)
        await eventually(lambda: len(recorder.seen) == 1)
        assert _statuses(recorder.last) == ["passing"]
        fake.set_status(sid, "critical")
        await eventually(lambda: len(recorder.seen) == 2)
        assert _statuses(recorder.last) == ["critical"]
        fake.add_service("worker", port=9703)
        await eventually(lambda: len(recorder.seen) == 3)
        assert sorted(i.port for i in recorder.last.value) == [8080, 9703]
        indexes = [int(snapshot.index) for snapshot in recorder.seen]
        assert indexes == sorted(set(indexes))
    finally:
        await engine.aclose()


async def test_index_going_backwards_resets_the_loop() -> None:
    """After an answer with a lower index, the next query is non-blocking with index 0."""
    fake = ScriptedConsul()
    sid = fake.add_service("worker")
    for _ in range(5):
        fake.set_status(sid, "passing")  # push the index well above 1
    engine = WatchEngine(fake, OPTIONS)
    try:
        recorder = await in_blocking_query(fake, engine)
        sent = len(fake.requests)
        current = fake.requests[-1][0]  # the blocking query in flight
        assert isinstance(current, int) and current > 2
        fake.next_index = 2
        fake.set_status(sid, "warning")
        await eventually(lambda: len(fake.requests) >= sent + 2)
        # The query after the reset is non-blocking; the one after blocks on the real index.
        assert fake.requests[sent] == (0, OPTIONS.wait)
        assert fake.requests[sent + 1][0] == current + 1
        assert _statuses(recorder.last) == ["warning"]
    finally:
        await engine.aclose()


async def test_index_zero_is_treated_as_one() -> None:
    """An answer with index 0 is stored as index 1, and the next query blocks on 1."""
    fake = ScriptedConsul()
    fake.add_service("worker")
    fake.next_index = 0
    engine = WatchEngine(fake, OPTIONS)
    try:
        recorder = Recorder()
        engine.subscribe(WORKER, recorder)
        await eventually(lambda: len(recorder.seen) == 1 and len(fake.requests) >= 2)
        assert recorder.seen[0].index == 1
        assert fake.requests[0][0] == 0
        assert fake.requests[1] == (1, OPTIONS.wait)
    finally:
        await engine.aclose()


# -- errors ------------------------------------------------------------------------------------


async def test_outage_marks_the_snapshot_stale_and_keeps_the_value() -> None:
    """During an outage subscribers get the last value marked stale; recovery clears it."""
    fake = FakeConsul()
    fake.add_service("worker", port=9702)
    engine = WatchEngine(fake, OPTIONS)
    try:
        recorder = await in_blocking_query(fake, engine)
        good = recorder.last
        fake.set_unavailable()
        await eventually(lambda: recorder.last.stale)
        stale = recorder.last
        assert stale.value == good.value and len(stale.value) == 1
        assert stale.index == good.index
        assert stale.error is not None and "fake Consul" in stale.error
        assert stale.age > 0
        failed_queries = fake.calls["health_service"]
        await eventually(lambda: fake.calls["health_service"] >= failed_queries + 3)
        assert all(s.value == good.value for s in recorder.seen)
        fake.set_unavailable(False)
        await eventually(lambda: not recorder.last.stale)
        assert recorder.last.error is None
        assert recorder.last.value == good.value
    finally:
        await engine.aclose()


async def test_first_lookup_during_an_outage_raises_consul_unavailable() -> None:
    """Without any answer, a first lookup gives up after first_answer_timeout."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        fake.set_unavailable()
        with pytest.raises(ConsulUnavailable, match=r"within 0\.5s") as caught:
            await dcy.lookup("worker")
        assert isinstance(caught.value.__cause__, ConsulUnavailable)
        assert fake.calls["health_service"] >= 2  # it kept retrying meanwhile


async def test_acl_denied_is_raised_at_once() -> None:
    """An ACL refusal on the first lookup is raised without waiting for the timeout."""
    fake = FakeConsul()
    options = WatchOptions(
        wait=0.3, min_interval=0, backoff=Backoff(0.01, 0.05), first_answer_timeout=60
    )
    async with Dcy(api=fake, watch_options=options) as dcy:
        fake.deny = True
        async with asyncio.timeout(10):
            with pytest.raises(AclDenied):
                await dcy.lookup("worker")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"wait": 0},
        {"first_answer_timeout": 0},
        {"min_interval": -0.1},
    ],
)
def test_watch_options_refuse_non_positive_times(kwargs: dict[str, Any]) -> None:
    """WatchOptions validates its times at construction."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        WatchOptions(**kwargs)


# -- subscribers -------------------------------------------------------------------------------


async def test_slow_subscriber_neither_delays_others_nor_sees_stale_intermediates() -> None:
    """A blocked subscriber does not hold up the loop or others; unblocked, it sees the newest."""
    fake = FakeConsul()
    sid = fake.add_service("worker")
    engine = WatchEngine(fake, OPTIONS)
    gate = asyncio.Event()
    slow_seen: list[Snapshot[Any]] = []

    async def slow(snapshot: Snapshot[Any]) -> None:
        slow_seen.append(snapshot)
        await gate.wait()

    try:
        fast = Recorder()
        engine.subscribe(WORKER, slow)
        engine.subscribe(WORKER, fast)
        await eventually(lambda: len(fast.seen) == 1 and len(slow_seen) == 1)
        for status in ("warning", "critical", "passing", "warning"):
            fake.set_status(sid, status)
            expected = [status]
            # Polled to completion before the loop rebinds `expected`.
            await eventually(lambda: _statuses(fast.last) == expected)  # noqa: B023
        assert len(fast.seen) == 5
        assert len(slow_seen) == 1
        gate.set()
        await eventually(lambda: len(slow_seen) == 2)
        await settle()
        assert len(slow_seen) == 2
        assert slow_seen[1] is fast.last
    finally:
        await engine.aclose()


async def test_raising_subscriber_stays_subscribed(caplog: pytest.LogCaptureFixture) -> None:
    """A callback that raises is logged and still called on later changes."""
    fake = FakeConsul()
    sid = fake.add_service("worker")
    engine = WatchEngine(fake, OPTIONS)
    calls: list[Snapshot[Any]] = []

    def broken(snapshot: Snapshot[Any]) -> None:
        calls.append(snapshot)
        raise RuntimeError("subscriber bug")

    try:
        engine.subscribe(WORKER, broken)
        await eventually(lambda: len(calls) == 1)
        fake.set_status(sid, "critical")
        await eventually(lambda: len(calls) == 2)
        fake.set_status(sid, "passing")
        await eventually(lambda: len(calls) == 3)
        assert _statuses(calls[-1]) == ["passing"]
        assert "stays subscribed" in caplog.text
    finally:
        await engine.aclose()


async def test_async_subscriber_callbacks_are_awaited() -> None:
    """An async callback is awaited for each snapshot it is given."""
    fake = FakeConsul()
    sid = fake.add_service("worker")
    engine = WatchEngine(fake, OPTIONS)
    done: list[list[str]] = []

    async def callback(snapshot: Snapshot[Any]) -> None:
        await asyncio.sleep(0)
        done.append(_statuses(snapshot))

    try:
        engine.subscribe(WORKER, callback)
        await eventually(lambda: done == [["passing"]])
        fake.set_status(sid, "warning")
        await eventually(lambda: done == [["passing"], ["warning"]])
    finally:
        await engine.aclose()


async def test_async_iterator_yields_current_snapshot_then_changes() -> None:
    """Iterating a subscription gives the current snapshot first, then each change."""
    fake = FakeConsul()
    sid = fake.add_service("worker")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        await dcy.lookup("worker")  # a snapshot exists before the subscription
        async with dcy.subscribe("worker") as updates:
            iterator = aiter(updates)
            async with asyncio.timeout(5):
                current = await anext(iterator)
                assert _statuses(current) == ["passing"]
                fake.set_status(sid, "critical")
                changed = await anext(iterator)
        assert _statuses(changed) == ["critical"]
        assert int(changed.index) > int(current.index)


async def test_async_for_ends_when_the_subscription_or_client_closes() -> None:
    """A consumer waiting in `async for` finishes once its subscription or the Dcy is closed."""
    fake = FakeConsul()
    fake.add_service("worker")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        seen: list[Snapshot[Any]] = []

        async def consume(updates: Subscription[Any]) -> None:
            async for snapshot in updates:
                seen.append(snapshot)

        own = dcy.subscribe("worker")
        first = asyncio.create_task(consume(own))
        second = asyncio.create_task(consume(dcy.subscribe("worker")))
        await eventually(lambda: len(seen) == 2)
        await own.aclose()
        async with asyncio.timeout(5):
            await first
        assert not second.done()
    async with asyncio.timeout(5):
        await second
    assert len(seen) == 2


async def test_subscriber_added_later_gets_the_current_snapshot() -> None:
    """A late subscriber is handed the snapshot other consumers already have."""
    fake = FakeConsul()
    fake.add_service("worker")
    engine = WatchEngine(fake, OPTIONS)
    try:
        early, late = Recorder(), Recorder()
        engine.subscribe(WORKER, early)
        await eventually(lambda: len(early.seen) == 1)
        engine.subscribe(WORKER, late)
        await eventually(lambda: len(late.seen) == 1)
        assert late.last is early.last
        assert fake.calls["health_service"] == engine.watches[0].queries
    finally:
        await engine.aclose()


async def test_engine_close_stops_every_loop() -> None:
    """aclose() stops all loops and refuses new watches."""
    fake = FakeConsul()
    engine = WatchEngine(fake, OPTIONS)
    engine.subscribe(WORKER)
    engine.subscribe(HealthServiceSpec("other"))
    await eventually(lambda: fake.in_flight == 2)
    await engine.aclose()
    assert engine.watches == ()
    await eventually(lambda: fake.in_flight == 0)
    with pytest.raises(RuntimeError, match="closed"):
        engine.acquire(WORKER)


async def test_an_acl_refusal_ends_the_loop_and_is_not_retried() -> None:
    """A refusal that will not heal stops the loop at once (no retries), iterating
    subscribers get the last snapshot marked stale and then the error, and the engine
    forgets the watch so that a later user starts afresh."""
    fake = FakeConsul()
    fake.add_service("worker", port=7401)
    engine = WatchEngine(fake, OPTIONS)
    seen: list[Snapshot[Any]] = []
    try:
        subscription = engine.subscribe(WORKER)
        iterator = aiter(subscription)
        seen.append(await anext(iterator))
        fake.deny = True
        fake.add_service("worker", port=7402)  # wakes the blocking query, which is refused
        with pytest.raises(AclDenied):
            while True:
                seen.append(await asyncio.wait_for(anext(iterator), 5))
        assert seen[-1].stale and "Permission denied" in (seen[-1].error or "")
        calls = fake.calls["health_service"]
        await asyncio.sleep(0.2)  # several backoff periods: a retrying loop would ask again
        assert fake.calls["health_service"] == calls
        assert engine.watches == ()
        fake.deny = False
        again = engine.acquire(WORKER)
        snapshot = await again.first()
        assert {i.port for i in snapshot.value} == {7401, 7402}
        engine.release(again)
        await subscription.aclose()
    finally:
        await engine.aclose()


async def test_a_returning_agent_is_seen_at_once_whatever_the_backoff() -> None:
    """Loops whose back-off has a long first delay (1.5-3 s) still see an agent that gave no
    answer as soon as it answers again: the engine's probe wakes them within its own cap."""
    fake = FakeConsul()
    fake.add_service("worker", port=9702)
    options = WatchOptions(wait=0.3, min_interval=0, backoff=Backoff(3.0, 60.0))
    engine = WatchEngine(fake, options)
    try:
        recorder = await in_blocking_query(fake, engine)
        fake.set_unavailable()
        await eventually(lambda: recorder.last.stale)
        probes = fake.calls["agent_info"]
        await eventually(lambda: fake.calls["agent_info"] > probes)  # it saw the agent away
        fake.set_unavailable(False)
        returned = time.monotonic()
        await eventually(lambda: not recorder.last.stale, timeout=1.0)
        assert time.monotonic() - returned < 1.0
        assert recorder.last.value == recorder.seen[0].value
    finally:
        await engine.aclose()


class QueriesUnanswered(FakeConsul):
    """An agent that answers who it is, but whose health queries get no answer at all."""

    async def health_service(self, name: str, **kwargs: Any) -> QueryResult:
        self.calls["health_service"] += 1
        raise ConsulUnavailable("connection reset while reading the answer", address="fake")


async def test_a_probe_answered_at_once_wakes_nobody() -> None:
    """When the agent answers the probe at once, the failure was the query's own: the loop
    keeps its back-off (0.25-0.5 s here) instead of retrying at the probe's pace."""
    fake = QueriesUnanswered()
    engine = WatchEngine(fake, WatchOptions(wait=0.3, min_interval=0, backoff=Backoff(0.5, 0.5)))
    try:
        engine.subscribe(WORKER, Recorder())
        await asyncio.sleep(1.5)
        assert fake.calls["agent_info"] >= 2  # probed after each failure...
        assert fake.calls["health_service"] <= 7  # ...but not woken by it
    finally:
        await engine.aclose()
