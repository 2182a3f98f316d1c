"""How fast a change in Consul reaches a subscriber: ``dcy.subscribe`` against the floor, a
bare aiohttp blocking-query loop, on the same agent in the same run.

One service instance with a TTL check; each change flips that check between passing and
warning with ``PUT /v1/agent/check/update/<id>`` from a separate kept-alive session. A sample
is the time from just before the PUT to the moment the subscriber holds a snapshot showing the
new status. Changes are paced (wait for the subscriber, then idle ``IDLE`` seconds) so the
watch's ``min_interval`` never holds a query back. The two watchers run one after the other,
never together, so neither steals the event loop from the other.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

import dcy
from bench._common import (
    agent_session,
    consul_agent,
    emit,
    note,
    parse_args,
    percentile,
    put,
    register,
    rounded,
    ttl_check_id,
)
from tests.harness import ConsulAgent

SERVICE = "bench-propagation"
SERVICE_ID = f"{SERVICE}-1"
CHECK_ID = ttl_check_id(SERVICE_ID)
IDLE = 0.03
WARMUP = 2
BLOCK = 25
CHANGE_TIMEOUT = 5.0


class Tracker:
    """Turns "a watcher saw status S" into the time the awaited change arrived."""

    def __init__(self) -> None:
        self._expected: str | None = None
        self._arrived: asyncio.Future[float] | None = None

    def expect(self, status: str) -> asyncio.Future[float]:
        self._expected = status
        self._arrived = asyncio.get_running_loop().create_future()
        return self._arrived

    def seen(self, status: str) -> None:
        now = time.perf_counter()
        if status == self._expected and self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(now)


Watcher = Callable[[ConsulAgent, Tracker], contextlib.AbstractAsyncContextManager[None]]


@contextlib.asynccontextmanager
async def dcy_watcher(agent: ConsulAgent, tracker: Tracker) -> AsyncIterator[None]:
    """dcy with default watch options; the subscriber reports the instance's status."""

    def on_snapshot(snapshot: dcy.Snapshot[Any]) -> None:
        for instance in snapshot.value:
            if instance.id == SERVICE_ID:
                tracker.seen(instance.status)

    async with dcy.Dcy(agent.http_addr) as client:
        subscription = client.subscribe(SERVICE, on_snapshot)
        await subscription.watch.first()
        try:
            yield
        finally:
            await subscription.aclose()


@contextlib.asynccontextmanager
async def raw_watcher(agent: ConsulAgent, tracker: Tracker) -> AsyncIterator[None]:
    """The floor: one blocking query after another on a kept-alive connection, nothing else."""
    url = f"{agent.url}/v1/health/service/{SERVICE}"
    ready = asyncio.Event()

    async def loop(session: aiohttp.ClientSession) -> None:
        index = "0"
        while True:
            params = {"index": index, "wait": "60s"} if index != "0" else {}
            async with session.get(url, params=params) as response:
                body = await response.read()
                new_index = response.headers["X-Consul-Index"]
            if new_index != index:
                index = new_index
                for entry in json.loads(body):
                    if entry["Service"]["ID"] == SERVICE_ID:
                        tracker.seen(_status(entry["Checks"]))
            ready.set()

    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(loop(session))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _status(checks: list[dict[str, Any]]) -> str:
    statuses = {check["Status"] for check in checks}
    for worst in ("critical", "warning"):
        if worst in statuses:
            return worst
    return "passing"


async def measure(
    agent: ConsulAgent, session: aiohttp.ClientSession, watcher: Watcher, changes: int
) -> tuple[list[float], list[float]]:
    """Seconds from just before each PUT to the watcher seeing its effect, and the PUTs' own
    round trips (the agent's share)."""
    tracker = Tracker()
    latencies: list[float] = []
    round_trips: list[float] = []
    status = "passing"
    async with watcher(agent, tracker):
        for i in range(WARMUP + changes):
            status = "warning" if status == "passing" else "passing"
            arrived = tracker.expect(status)
            started = time.perf_counter()
            await put(session, f"/v1/agent/check/update/{CHECK_ID}", {"Status": status})
            answered = time.perf_counter()
            done = await asyncio.wait_for(arrived, CHANGE_TIMEOUT)
            if i >= WARMUP:
                latencies.append(done - started)
                round_trips.append(answered - started)
            await asyncio.sleep(IDLE)
    # Leave the check passing for the next watcher.
    if status != "passing":
        await put(session, f"/v1/agent/check/update/{CHECK_ID}", {"Status": "passing"})
    return latencies, round_trips


def _ms(samples: list[float], pct: float) -> float:
    return rounded(percentile(samples, pct) * 1000)


async def run(agent: ConsulAgent, quick: bool) -> dict[str, float | int]:
    blocks = 2 if quick else 10
    watchers: dict[str, Watcher] = {"dcy": dcy_watcher, "raw": raw_watcher}
    latencies: dict[str, list[float]] = {label: [] for label in watchers}
    round_trips: list[float] = []
    async with agent_session(agent) as session:
        await register(session, SERVICE, SERVICE_ID, 21000, ttl_check=True)
        # Alternating blocks, so a slow spell of the machine falls on both sides alike.
        for block in range(blocks):
            note(f"block {block + 1}/{blocks}: {BLOCK} changes each for {', '.join(watchers)}")
            for label, watcher in watchers.items():
                block_latencies, block_round_trips = await measure(agent, session, watcher, BLOCK)
                latencies[label] += block_latencies
                round_trips += block_round_trips
    dcy_samples, raw_samples = latencies["dcy"], latencies["raw"]
    return {
        "changes": len(dcy_samples),
        "p50_ms": _ms(dcy_samples, 50),
        "p99_ms": _ms(dcy_samples, 99),
        "max_ms": _ms(dcy_samples, 100),
        "raw_longpoll_p50_ms": _ms(raw_samples, 50),
        "raw_longpoll_p99_ms": _ms(raw_samples, 99),
        "raw_longpoll_max_ms": _ms(raw_samples, 100),
        "put_roundtrip_p50_ms": _ms(round_trips, 50),
        "put_roundtrip_p99_ms": _ms(round_trips, 99),
    }


def main() -> None:
    args = parse_args(__doc__ or "")
    with consul_agent() as agent:
        figures = asyncio.run(run(agent, args.quick))
    emit({"bench": "propagation", **figures})


if __name__ == "__main__":
    main()
