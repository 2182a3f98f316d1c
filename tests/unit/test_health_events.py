"""Health-state subscriptions: diffing check lists into transitions, debounce, HealthWatch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from dcy import Backoff, Check, Dcy, Transition, WatchOptions
from dcy._health_events import HealthStateSpec, TransitionTracker
from dcy._specs import HealthServiceSpec
from dcy.testing import FakeConsul

OPTIONS = WatchOptions(
    wait=0.3, min_interval=0, backoff=Backoff(0.01, 0.05), first_answer_timeout=0.5
)


def check(
    status: str, *, check_id: str = "service:web-1", node: str = "n1", output: str = ""
) -> Check:
    return Check(
        check_id=check_id,
        name="web HTTP /health",
        status=status,
        node=node,
        service_id="web-1" if check_id.startswith("service:") else "",
        service_name="web" if check_id.startswith("service:") else "",
        output=output,
        notes="GET /health",
    )


async def eventually(condition: Callable[[], object], *, timeout: float = 5.0) -> None:
    """Poll until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


# -- the tracker, step by step ---------------------------------------------------------------


def test_baseline_is_not_reported() -> None:
    """The first check list is the baseline: a check already critical is not a transition."""
    tracker = TransitionTracker()
    tracker.observe([check("critical")], now=0, at=100)
    assert tracker.due(0) == [] and tracker.next_deadline() is None


def test_state_change_is_reported_with_the_checks_data() -> None:
    """passing → critical yields one Transition carrying name, node, service, output, notes."""
    tracker = TransitionTracker()
    tracker.observe([check("passing")], now=0, at=100)
    tracker.observe([check("critical", output="HTTP 503")], now=1, at=101)
    assert tracker.due(1) == [
        Transition(
            check_id="service:web-1",
            name="web HTTP /health",
            node="n1",
            service_id="web-1",
            service_name="web",
            old_status="passing",
            new_status="critical",
            output="HTTP 503",
            notes="GET /health",
            at=101,
        )
    ]
    assert tracker.due(2) == []


def test_flap_inside_the_window_reports_nothing() -> None:
    """critical and back to passing within the debounce window is never reported."""
    tracker = TransitionTracker(debounce=10)
    tracker.observe([check("passing")], now=0, at=0)
    tracker.observe([check("critical")], now=1, at=1)
    assert tracker.next_deadline() == 11
    tracker.observe([check("passing")], now=5, at=5)
    assert tracker.next_deadline() is None
    assert tracker.due(100) == []


def test_state_is_reported_once_it_has_held_for_the_window() -> None:
    """A new state is reported only after debounce seconds, with the latest output."""
    tracker = TransitionTracker(debounce=10)
    tracker.observe([check("passing")], now=0, at=0)
    tracker.observe([check("critical", output="first")], now=1, at=1001)
    tracker.observe([check("critical", output="second")], now=5, at=1005)
    assert tracker.due(10.9) == []
    (transition,) = tracker.due(11)
    assert (transition.old_status, transition.new_status) == ("passing", "critical")
    assert transition.output == "second" and transition.at == 1001


def test_chain_inside_the_window_restarts_it_and_reports_where_it_settles() -> None:
    """passing → warning → critical inside the window reports only passing → critical."""
    tracker = TransitionTracker(debounce=10)
    tracker.observe([check("passing")], now=0, at=0)
    tracker.observe([check("warning")], now=1, at=1)
    tracker.observe([check("critical")], now=5, at=5)
    assert tracker.due(14) == []
    assert [(t.old_status, t.new_status) for t in tracker.due(15)] == [("passing", "critical")]


def test_recovery_is_a_transition_too() -> None:
    """After a reported critical, passing again is reported as critical → passing."""
    tracker = TransitionTracker()
    tracker.observe([check("passing")], now=0, at=0)
    tracker.observe([check("critical")], now=1, at=1)
    tracker.due(1)
    tracker.observe([check("passing")], now=2, at=2)
    assert [(t.old_status, t.new_status) for t in tracker.due(2)] == [("critical", "passing")]


def test_new_passing_check_is_silent_and_new_failing_one_is_reported() -> None:
    """A check appearing passing is adopted silently; one appearing critical is absent →
    critical."""
    tracker = TransitionTracker()
    tracker.observe([], now=0, at=0)
    tracker.observe([check("passing", check_id="service:a")], now=1, at=1)
    assert tracker.due(1) == []
    tracker.observe(
        [check("passing", check_id="service:a"), check("critical", check_id="service:b")],
        now=2,
        at=2,
    )
    (transition,) = tracker.due(2)
    assert (transition.check_id, transition.old_status, transition.new_status) == (
        "service:b",
        "absent",
        "critical",
    )


def test_new_check_that_heals_inside_the_window_is_silent() -> None:
    """A new TTL check starting critical and passing within the window reports nothing."""
    tracker = TransitionTracker(debounce=5)
    tracker.observe([], now=0, at=0)
    tracker.observe([check("critical")], now=1, at=1)
    tracker.observe([check("passing")], now=2, at=2)
    assert tracker.due(100) == []


def test_removed_check_is_reported_as_deregistered() -> None:
    """A check that vanishes is reported with its last data and new status deregistered."""
    tracker = TransitionTracker()
    tracker.observe([check("warning", output="slow")], now=0, at=0)
    tracker.observe([], now=1, at=1)
    (transition,) = tracker.due(1)
    assert (transition.old_status, transition.new_status) == ("warning", "deregistered")
    assert transition.output == "slow"
    tracker.observe([], now=2, at=2)
    assert tracker.due(2) == []


def test_reregistration_inside_the_window_is_silent() -> None:
    """Removed and registered again within the window (an agent restart) reports nothing."""
    tracker = TransitionTracker(debounce=5)
    tracker.observe([check("passing")], now=0, at=0)
    tracker.observe([], now=1, at=1)
    tracker.observe([check("critical")], now=2, at=2)
    tracker.observe([check("passing")], now=3, at=3)
    assert tracker.due(100) == []


def test_checks_are_told_apart_by_node() -> None:
    """The same check ID on two nodes is two checks (serfHealth exists on every node)."""
    tracker = TransitionTracker()
    tracker.observe([check("passing", check_id="serfHealth", node=n) for n in "ab"], now=0, at=0)
    tracker.observe(
        [
            check("critical", check_id="serfHealth", node="a"),
            check("passing", check_id="serfHealth", node="b"),
        ],
        now=1,
        at=1,
    )
    assert [(t.node, t.check_id) for t in tracker.due(1)] == [("a", "serfHealth")]


def test_negative_debounce_is_refused() -> None:
    """debounce below zero raises ValueError quoting it."""
    with pytest.raises(ValueError, match="-1"):
        TransitionTracker(debounce=-1)


def test_transition_reads_as_one_line_and_as_a_dict() -> None:
    """str() gives one human-readable line; as_dict() every field, for JSON."""
    transition = Transition(
        "service:web-1", "web", "n1", "web-1", "web", "passing", "critical", "a\nb", "", 0.0
    )
    line = str(transition)
    assert "\n" not in line
    assert line.startswith("1970-01-01T00:00:00Z passing -> critical: service web (web-1) on n1")
    assert line.endswith(": a")
    assert transition.as_dict()["new_status"] == "critical" and len(transition.as_dict()) == 10


# -- HealthWatch through Dcy and the watch engine -------------------------------------------


async def test_watch_health_reports_every_service_and_recovery() -> None:
    """watch_health() without a service reports transitions of any service, in order."""
    fake = FakeConsul()
    web = fake.add_service("web")
    fake.add_service("db")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        watch = dcy.watch_health()
        await watch.ready()
        seen: list[Transition] = []

        async def collect() -> None:
            async for transition in watch:
                seen.append(transition)

        collector = asyncio.create_task(collect())
        fake.set_status(web, "critical", "HTTP 503")
        await eventually(lambda: len(seen) == 1)
        fake.set_status(web, "passing", "ok")
        await eventually(lambda: len(seen) == 2)
        assert [(t.service_name, t.old_status, t.new_status, t.output) for t in seen] == [
            ("web", "passing", "critical", "HTTP 503"),
            ("web", "critical", "passing", "ok"),
        ]
        await watch.aclose()
        await asyncio.wait_for(collector, 5)  # closing ends the `async for`
        assert not any(isinstance(w.spec, HealthStateSpec) for w in dcy.engine.watches)


async def test_watch_health_of_one_service_ignores_the_others() -> None:
    """watch_health("web") shares the resolver's health watch and sees only web's checks."""
    fake = FakeConsul()
    web = fake.add_service("web")
    db = fake.add_service("db")
    seen: list[Transition] = []
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        await dcy.pick("web")
        watch = dcy.watch_health("web", seen.append)
        await watch.ready()
        assert [str(w.spec) for w in dcy.engine.watches] == ["health web"]
        fake.set_status(db, "critical")
        fake.set_status(web, "warning")
        await eventually(lambda: seen)
        assert [(t.service_name, t.new_status) for t in seen] == [("web", "warning")]


async def test_debounced_watch_drops_a_flap_and_reports_a_held_change() -> None:
    """With debounce, a flap reports nothing while a change that holds is reported."""
    fake = FakeConsul()
    flappy = fake.add_service("flappy")
    steady = fake.add_service("steady")
    seen: list[Transition] = []
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        watch = dcy.watch_health(None, seen.append, debounce=0.3)
        await watch.ready()
        fake.set_status(flappy, "critical")
        await eventually(lambda: watch._tracker.next_deadline() is not None)
        fake.set_status(flappy, "passing")
        await eventually(lambda: watch._tracker.next_deadline() is None)
        fake.set_status(steady, "critical")
        # The flap's window ended before this one began: had it been reported, it came first.
        await eventually(lambda: seen)
        assert [(t.service_name, t.new_status) for t in seen] == [("steady", "critical")]


async def test_failing_callback_does_not_end_the_watch() -> None:
    """A callback that raises is logged; later transitions still reach it."""
    fake = FakeConsul()
    web = fake.add_service("web")
    calls: list[str] = []

    def callback(transition: Transition) -> None:
        calls.append(transition.new_status)
        if len(calls) == 1:
            raise RuntimeError("boom")

    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        await dcy.watch_health("web", callback).ready()
        fake.set_status(web, "critical")
        await eventually(lambda: calls == ["critical"])
        fake.set_status(web, "passing")
        await eventually(lambda: calls == ["critical", "passing"])


async def test_outage_reports_nothing_and_changes_after_it_are_reported() -> None:
    """While Consul is away nothing is reported; a change made meanwhile arrives after it."""
    fake = FakeConsul()
    web = fake.add_service("web")
    seen: list[Transition] = []
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        watch = dcy.watch_health(None, seen.append)
        await watch.ready()
        (engine_watch,) = dcy.engine.watches
        fake.set_unavailable()
        await eventually(lambda: engine_watch.snapshot is not None and engine_watch.snapshot.stale)
        fake.set_status(web, "critical")
        assert seen == []
        fake.set_unavailable(False)
        await eventually(lambda: seen)
        assert [(t.old_status, t.new_status) for t in seen] == [("passing", "critical")]


async def test_watch_health_in_another_datacenter() -> None:
    """datacenter= watches that datacenter's checks only."""
    fake = FakeConsul()
    fake.add_service("web")
    remote = fake.add_service("web", datacenter="dc2")
    seen: list[Transition] = []
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        watch = dcy.watch_health(None, seen.append, datacenter="dc2")
        await watch.ready()
        assert watch.spec == HealthStateSpec("dc2")
        fake.set_status(remote, "warning")
        await eventually(lambda: seen)
        assert [(t.service_id, t.new_status) for t in seen] == [(remote, "warning")]
        tagged = dcy.watch_health("v2.web@dc2")
        assert tagged.spec == HealthServiceSpec("web", "v2", "dc2")


async def test_closing_dcy_closes_its_health_watches() -> None:
    """Dcy.aclose ends every health watch it made: an `async for` over one finishes."""
    fake = FakeConsul()
    fake.add_service("web")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        watch = dcy.watch_health()
        await watch.ready()

        async def first_transition() -> Transition | None:
            async for transition in watch:
                return transition
            return None

        iterating = asyncio.create_task(first_transition())
        await asyncio.sleep(0)
    assert await asyncio.wait_for(iterating, 5) is None
