"""Per-call cost of finding an instance: dcy's cached pick against asking Consul each time.

Same run, same agent, same service (three passing instances):

* ``pick_us``: ``await dcy.pick(name)`` once the watch has its first answer (warm cache);
* ``pick_nowait_us``: the synchronous ``dcy.pick_nowait(name)``;
* ``http_query_us``: ``GET /v1/health/service/<name>?passing=1`` over one kept-alive aiohttp
  session, body read and JSON-decoded (what a caller needs before it can choose);
* ``dns_query_us``: an SRV query with dnspython over UDP straight to the agent's DNS port,
  answer parsed (UDP is the cheapest DNS path, so this is the kindest baseline for DNS).

``pick_over_http`` and ``pick_over_dns`` say how many times faster pick is. Each figure is the
median over a few rounds, with the collector paused inside the timed loops.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import dns.asyncquery
import dns.message
import dns.rdatatype

import dcy
from bench._common import (
    agent_session,
    consul_agent,
    emit,
    gc_paused,
    note,
    parse_args,
    register,
    rounded,
)
from tests.harness import ConsulAgent

SERVICE = "bench-resolve"
INSTANCES = 3
ROUNDS = 5


def _median_per_call_us(rounds: list[float], calls: int) -> float:
    return statistics.median(rounds) / calls * 1e6


async def _time_async(call: Callable[[], Awaitable[object]], calls: int) -> float:
    """Seconds for ``calls`` sequential awaits of ``call()``."""
    with gc_paused():
        start = time.perf_counter()
        for _ in range(calls):
            await call()
        return time.perf_counter() - start


async def measure_pick(client: dcy.Dcy, calls: int) -> tuple[float, float]:
    """(pick µs, pick_nowait µs) per call, warm cache."""
    pick, pick_nowait = client.pick, client.pick_nowait
    instance = await pick(SERVICE)  # the first answer; everything after is the cache
    assert instance.name == SERVICE
    await _time_async(lambda: pick(SERVICE), 1000)
    pick_rounds = [await _time_async(lambda: pick(SERVICE), calls) for _ in range(ROUNDS)]

    def time_nowait() -> float:
        with gc_paused():
            start = time.perf_counter()
            for _ in range(calls):
                pick_nowait(SERVICE)
            return time.perf_counter() - start

    nowait_rounds = [time_nowait() for _ in range(ROUNDS)]
    return _median_per_call_us(pick_rounds, calls), _median_per_call_us(nowait_rounds, calls)


async def measure_http(agent: ConsulAgent, calls: int) -> float:
    """µs per health query over one kept-alive connection."""
    path = f"/v1/health/service/{SERVICE}"
    params = {"passing": "1"}
    async with agent_session(agent) as session:

        async def query() -> None:
            async with session.get(path, params=params) as response:
                entries = json.loads(await response.read())
            if len(entries) != INSTANCES:
                raise RuntimeError(f"health query saw {len(entries)} instances")

        await _time_async(query, 100)
        rounds = [await _time_async(query, calls // ROUNDS) for _ in range(ROUNDS)]
    return _median_per_call_us(rounds, calls // ROUNDS)


async def measure_dns(agent: ConsulAgent, calls: int) -> float:
    """µs per SRV query over UDP to the agent's DNS port."""
    qname = f"{SERVICE}.service.sd."

    async def query() -> None:
        message = dns.message.make_query(qname, dns.rdatatype.SRV)
        response = await dns.asyncquery.udp(message, "127.0.0.1", timeout=2, port=agent.dns_port)
        if not response.answer or len(response.answer[0]) != INSTANCES:
            raise RuntimeError(f"SRV query got {response.answer}")

    await _time_async(query, 100)
    rounds = [await _time_async(query, calls // ROUNDS) for _ in range(ROUNDS)]
    return _median_per_call_us(rounds, calls // ROUNDS)


async def run(agent: ConsulAgent, quick: bool) -> dict[str, float | int]:
    pick_calls = 20_000 if quick else 200_000
    query_calls = 250 if quick else 2_500
    async with agent_session(agent) as session:
        for i in range(INSTANCES):
            await register(session, SERVICE, f"{SERVICE}-{i}", 20000 + i)
    async with dcy.Dcy(agent.http_addr) as client:
        note(f"pick: {ROUNDS} rounds of {pick_calls} calls")
        pick_us, nowait_us = await measure_pick(client, pick_calls)
        note(f"http: {query_calls} queries")
        http_us = await measure_http(agent, query_calls)
        note(f"dns: {query_calls} queries")
        dns_us = await measure_dns(agent, query_calls)
    return {
        "pick_calls": pick_calls * ROUNDS,
        "query_calls": query_calls,
        "pick_us": rounded(pick_us),
        "pick_nowait_us": rounded(nowait_us),
        "http_query_us": rounded(http_us),
        "dns_query_us": rounded(dns_us),
        "pick_over_http": round(http_us / pick_us, 1),
        "pick_over_dns": round(dns_us / pick_us, 1),
    }


def main() -> None:
    args = parse_args(__doc__ or "")
    with consul_agent() as agent:
        figures = asyncio.run(run(agent, args.quick))
    emit({"bench": "resolve", **figures})


if __name__ == "__main__":
    main()
