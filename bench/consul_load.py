"""What 200 watched services cost Consul, counted at a proxy between dcy and the agent.

200 services are registered with the agent directly; dcy, pointed at a counting proxy
(bench/_proxy.py), subscribes to each once. Once every subscriber has its first snapshot:

(a) K services change one at a time (a second instance registered with the agent directly);
    ``requests_per_change`` is the requests for the changed service's query from its change
    until the next one: ideally exactly 1, the blocking query that follows the answer.
    ``total_requests_per_change`` divides every request of the phase by K, so it includes the
    renewals of other watches that fell into the phase (``unrelated_requests_during_changes``;
    watches started together renew together, so that is often 0 or a burst of ~200).
(b) Idle for ``IDLE`` seconds with ``WatchOptions(wait=5s)``: every watch should renew its
    blocking query once per wait, i.e. 60/5 = 12 times a minute (Consul adds up to wait/16 of
    jitter, so slightly fewer). ``max_connections`` is the most client connections the proxy
    ever had open at once: one per watch is what a blocking query needs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
import time
from collections.abc import Callable
from typing import Any

import dcy
from bench._common import agent_session, consul_agent, emit, note, parse_args, register, rounded
from bench._proxy import CountingProxy
from tests.harness import ConsulAgent

SERVICES = 200
WAIT = 5.0
SETTLE = 0.03  # idle after each change reached its subscriber
CHANGE_TIMEOUT = 10.0
# 200 watches hold 200 blocking queries, all from the proxy's one address: Consul's default
# limits.http_max_conns_per_client (200) would refuse the rest of them.
AGENT_HCL = ["limits { http_max_conns_per_client = 1000 }"]
HEALTH = "/v1/health/service/"


class Subscribers:
    """How many instances each subscriber last saw; lets the driver wait for a count."""

    def __init__(self) -> None:
        self.instances: dict[str, int] = {}
        self._waiting: dict[str, tuple[int, asyncio.Future[float]]] = {}

    def callback(self, name: str) -> Callable[[dcy.Snapshot[Any]], None]:
        def on_snapshot(snapshot: dcy.Snapshot[Any]) -> None:
            count = len(snapshot.value)
            self.instances[name] = count
            waiting = self._waiting.get(name)
            if waiting is not None and waiting[0] == count and not waiting[1].done():
                waiting[1].set_result(time.perf_counter())

        return on_snapshot

    def expect(self, name: str, count: int) -> asyncio.Future[float]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[name] = (count, future)
        return future


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g}s")
        await asyncio.sleep(0.05)


async def run(agent: ConsulAgent, quick: bool) -> dict[str, float | int]:
    changes = 10 if quick else 50
    idle = 6.0 if quick else 40.0
    names = [f"bench-load-{i:03d}" for i in range(SERVICES)]
    proxy = await CountingProxy("127.0.0.1", agent.http_port).start()
    subscribers = Subscribers()
    try:
        async with agent_session(agent) as session:
            note(f"registering {SERVICES} services")
            for i, name in enumerate(names):
                await register(session, name, f"{name}-a", 22000 + i)
            async with dcy.Dcy(proxy.address, watch_options=dcy.WatchOptions(wait=WAIT)) as client:
                subscriptions = [
                    client.subscribe(name, subscribers.callback(name)) for name in names
                ]
                await wait_for(
                    lambda: len(subscribers.instances) == SERVICES, 60, "first snapshots"
                )
                note(f"all {SERVICES} subscribers have a snapshot; {changes} changes")
                # Every watch must be back in its blocking query before the count starts.
                await asyncio.sleep(0.5)
                attributable, phase_start, phase_end = 0, time.perf_counter(), 0.0
                windows: list[tuple[str, float]] = []
                for name in names[:changes]:
                    arrived = subscribers.expect(name, 2)
                    windows.append((name, time.perf_counter()))
                    await register(session, name, f"{name}-b", 23000)
                    await asyncio.wait_for(arrived, CHANGE_TIMEOUT)
                    await asyncio.sleep(SETTLE)
                phase_end = time.perf_counter()
                for (name, start), (_, end) in zip(
                    windows, [*windows[1:], ("", phase_end)], strict=True
                ):
                    attributable += proxy.count(HEALTH + name, since=start, until=end)
                total = proxy.count(since=phase_start, until=phase_end)

                note(f"idle for {idle:g}s with wait={WAIT:g}s")
                await asyncio.sleep(1.0)
                idle_start = time.perf_counter()
                await asyncio.sleep(idle)
                idle_end = time.perf_counter()
                idle_requests = proxy.count(HEALTH, since=idle_start, until=idle_end)
                for subscription in subscriptions:
                    await subscription.aclose()
    finally:
        await proxy.aclose()
    if proxy.errors:
        raise RuntimeError(f"proxy errors: {proxy.errors[:3]}")
    phase = phase_end - phase_start
    minutes = (idle_end - idle_start) / 60
    return {
        "services": SERVICES,
        "changes": changes,
        "wait_s": WAIT,
        "requests_per_change": rounded(attributable / changes),
        "total_requests_per_change": rounded(total / changes),
        "change_phase_s": rounded(phase),
        "unrelated_requests_during_changes": total - attributable,
        "idle_s": rounded(idle_end - idle_start),
        "idle_requests_per_query_per_min": rounded(idle_requests / SERVICES / minutes),
        "expected_idle_per_query_per_min": rounded(60 / WAIT),
        "max_connections": proxy.max_connections,
    }


def main() -> None:
    args = parse_args(__doc__ or "")
    with consul_agent(AGENT_HCL) as agent:
        figures = asyncio.run(run(agent, args.quick))
    emit({"bench": "consul_load", **figures})


if __name__ == "__main__":
    main()
