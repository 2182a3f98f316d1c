"""Watch pacing (dcy._pacing): at once after news, a pause for answers without news, and a
token bucket for sustained changes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from dcy import Backoff, WatchOptions
from dcy._consul import ConsulAPI, Index, QueryResult
from dcy._pacing import QueryPacer
from dcy._watch import WatchEngine
from dcy.testing import FakeConsul


def test_the_query_after_news_goes_out_at_once() -> None:
    """However soon an answer with news came back, the next query is not held."""
    pacer = QueryPacer(min_interval=0.01, burst=5, quiet_interval=0.1)
    now = 0.0
    for _ in range(4):  # within the burst
        pacer.spend(now)
        now += 0.001
        assert pacer.delay(now, sent_at=now - 0.001, news=True) == 0.0


def test_sustained_news_is_held_to_min_interval_after_the_burst() -> None:
    """Past ``burst`` back-to-back queries, changes are followed one per min_interval."""
    pacer = QueryPacer(min_interval=0.01, burst=3, quiet_interval=0.1)
    now = 0.0
    delays = []
    for _ in range(10):
        pacer.spend(now)
        delay = pacer.delay(now, sent_at=now, news=True)
        delays.append(delay)
        now += delay
    assert delays[:2] == [0.0, 0.0]
    assert all(d == pytest.approx(0.01, abs=1e-9) for d in delays[3:])
    now += 1.0  # quiet for a while: the bucket refills, back-to-back again
    pacer.spend(now)
    assert pacer.delay(now, sent_at=now, news=True) == 0.0


def test_answers_without_news_wait_out_the_quiet_interval() -> None:
    """An answer that changed nothing and came back quickly delays the next query until
    quiet_interval after its send; one that took longer (a wait ran out) does not."""
    pacer = QueryPacer(min_interval=0.0, burst=1, quiet_interval=0.1)
    pacer.spend(10.0)
    assert pacer.delay(10.004, sent_at=10.0, news=False) == pytest.approx(0.096)
    pacer.spend(20.0)
    assert pacer.delay(80.0, sent_at=20.0, news=False) == 0.0


class _SameEveryTime:
    """A spec whose every answer comes at once with a new index and the same content."""

    def __init__(self) -> None:
        self.sent: list[float] = []

    async def fetch(self, api: ConsulAPI, index: Index, wait: float) -> QueryResult:
        self.sent.append(time.monotonic())
        return QueryResult(len(self.sent), ["same"])

    def decode(self, body: Any) -> Any:
        return tuple(body)


async def test_a_loop_answered_without_news_is_not_a_hot_loop() -> None:
    """Against an endpoint that answers at once with nothing new, a loop sends about one
    query per quiet_interval, not as many as Consul can answer."""
    options = WatchOptions(min_interval=0, quiet_interval=0.05, backoff=Backoff(0.01, 0.05))
    engine = WatchEngine(FakeConsul(), options)
    spec = _SameEveryTime()
    try:
        watch = engine.acquire(spec)
        await watch.first()
        await asyncio.sleep(0.5)
        assert 6 <= len(spec.sent) <= 14, len(spec.sent)
    finally:
        await engine.aclose()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"burst": 0}, "burst"), ({"burst": 1.5}, "burst"), ({"quiet_interval": -1}, "quiet")],
)
def test_pacing_options_are_checked(kwargs: dict[str, Any], message: str) -> None:
    """Pacing values that could not work are refused at construction."""
    with pytest.raises(ValueError, match=message):
        WatchOptions(**kwargs)
