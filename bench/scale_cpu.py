"""CPU and requests per change past the connection budget (issue 16), at 10, 300 and 1,000
watched services: over HTTP every service query driven by the change detectors; with
``--https`` each one a blocking query of its own, as HTTP/2 streams. One check flipped at a
time, each change waited for before the next. CPU is this process's (time.process_time:
the watcher, not the agent); requests are the client's.

    .venv/bin/python bench/scale_cpu.py [--quick] [--https]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
import random
import tempfile
import time
from typing import Any

from bench._common import agent_session, consul_agent, emit, note, parse_args, put, rounded
from dcy import Dcy, Snapshot, WatchOptions
from dcy._specs import HealthServiceSpec
from tests.harness import ConsulAgent, TlsFiles, eventually

# The smallest budget dcy accepts: past 4 watched queries the detectors drive them, so 10
# services are measured the same way as 1,000.
OPTIONS = WatchOptions(max_connections=16, reserved_connections=8, quiet_interval=0.0)


def registration(number: int, status: str) -> dict[str, Any]:
    node = f"host{number % 2}"
    service_id = f"svc{number}-0"
    return {
        "Node": node,
        "Address": f"10.0.0.{1 + number % 2}",
        "Service": {"ID": service_id, "Service": f"svc{number}", "Port": 8000},
        "Checks": [
            {"CheckID": f"node-{node}", "Name": "node", "Status": "passing"},
            {
                "CheckID": f"check-{service_id}",
                "Name": "s",
                "Status": status,
                "ServiceID": service_id,
            },
        ],
    }


async def measure(services: int, changes: int, https: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="dcy-bench-tls-") as folder:
        tls = TlsFiles.create(Path(folder)) if https else None
        hcl = [tls.agent_hcl(verify_incoming=False)] if tls is not None else []
        with consul_agent(hcl, https=https) as agent:
            return await measure_on(agent, tls, services, changes)


async def measure_on(
    agent: ConsulAgent, tls: TlsFiles | None, services: int, changes: int
) -> dict[str, float]:
    # Over HTTPS the client speaks HTTP/2 (dcy._h2): every query blocks on a stream of
    # its own; over HTTP the detectors drive them past the budget.
    address, ca = (agent.https_url, str(tls.ca)) if tls is not None else (agent.http_addr, None)
    async with agent_session(agent) as session:
        for number in range(services):
            await put(session, "/v1/catalog/register", registration(number, "passing"))
        latest: dict[str, Snapshot[Any]] = {}
        async with Dcy(address, ca_file=ca, watch_options=OPTIONS) as client:
            engine = client.engine

            def record(name: str) -> Any:
                return lambda snapshot: latest.__setitem__(name, snapshot)

            for number in range(services):
                engine.subscribe(HealthServiceSpec(f"svc{number}"), record(f"svc{number}"))
            await eventually(lambda: len(latest) == services, what="first answers", timeout=120)
            await asyncio.sleep(0.5)
            assert engine.wide == (tls is None)
            api: Any = engine.api
            requests, cpu, wall = api.requests, time.process_time(), time.monotonic()
            rng = random.Random(16)
            state: dict[int, str] = {}
            for _ in range(changes):
                number = rng.randrange(services)
                status = "critical" if state.get(number, "passing") == "passing" else "passing"
                state[number] = status
                await put(session, "/v1/catalog/register", registration(number, status))
                name = f"svc{number}"
                await eventually(
                    lambda: latest[name].value[0].status == status,  # noqa: B023
                    what="the change",
                )
                await asyncio.sleep(0.05)  # let the re-fetches of this change end
            return {
                "cpu_ms_per_change": rounded(1000 * (time.process_time() - cpu) / changes),
                "requests_per_change": rounded((api.requests - requests) / changes),
                "seconds_per_change": rounded((time.monotonic() - wall) / changes),
                "sweeps": engine.detectors.sweeps,
            }


async def main() -> None:
    args = parse_args(__doc__ or "", {"--https": "over HTTPS (HTTP/2) instead of HTTP/1.1"})
    changes = 20 if args.quick else 100
    figures: dict[str, Any] = {"bench": "scale_cpu", "transport": "https" if args.https else "http"}
    cpu: dict[int, float] = {}
    for services in (10, 300, 1000):
        result = await measure(services, changes, args.https)
        note(f"{services} services: {result}")
        cpu[services] = result["cpu_ms_per_change"]
        figures.update({f"{name}_{services}": value for name, value in result.items()})
    figures["cpu_ratio_1000_to_10"] = rounded(cpu[1000] / cpu[10])
    emit(figures)


if __name__ == "__main__":
    asyncio.run(main())
