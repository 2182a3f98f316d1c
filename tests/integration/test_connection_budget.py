"""Issue 16: 300 watched services through an agent with Consul's default limits (200
connections per client address): every change seen, at most 32 connections, and a probe
client on the same address never refused."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dcy import Dcy, Snapshot
from dcy._sockets import count_connections
from dcy._specs import HealthServiceSpec
from tests.harness import ConsulAgent
from tools.build import require_binary

SERVICES = 300


class Probe:
    """Another program on the same address: the Consul CLI and plain GETs, in a loop."""

    def __init__(self, agent: ConsulAgent) -> None:
        self.agent = agent
        self.failures: list[str] = []
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        consul = str(require_binary("consul"))
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(f"{self.agent.url}/v1/catalog/services", timeout=5):
                    pass
                for command in ("members", "catalog services"):
                    done = subprocess.run(
                        [consul, *command.split(), f"-http-addr={self.agent.url}"],
                        capture_output=True,
                        timeout=10,
                    )
                    if done.returncode != 0:
                        self.failures.append(f"consul {command}: {done.stderr[-300:]!r}")
                self.answers += 1
            except Exception as exc:
                self.failures.append(repr(exc))
            self._stop.wait(0.05)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def register_all(agent: ConsulAgent) -> None:
    """300 services on two extra nodes (node checks passing), one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=10)
    try:
        for number in range(SERVICES):
            node = f"host{number % 2}"
            put(connection, "/v1/catalog/register", registration(node, f"svc{number}", 0))
    finally:
        connection.close()


def registration(
    node: str, name: str, instance: int, *, status: str = "passing", tags: tuple[str, ...] = ()
) -> dict[str, Any]:
    service_id = f"{name}-{instance}"
    return {
        "Node": node,
        "Address": "10.0.0.1" if node == "host0" else "10.0.0.2",
        "Service": {"ID": service_id, "Service": name, "Port": 8000 + instance, "Tags": tags},
        "Checks": [
            {"CheckID": f"node-{node}", "Name": "node", "Status": "passing"},
            {
                "CheckID": f"check-{service_id}",
                "Name": "service",
                "Status": status,
                "ServiceID": service_id,
            },
        ],
    }


def put(connection: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> None:
    connection.request("PUT", path, body=json.dumps(body).encode())
    response = connection.getresponse()
    response.read()
    assert response.status == 200, response.status


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout}s: {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def agent(consul_factory: Callable[..., ConsulAgent]) -> Iterator[ConsulAgent]:
    # Consul's defaults: the harness adds no `limits` stanza.
    started = consul_factory()
    assert "limits" not in " ".join(started.hcl)
    register_all(started)
    yield started


async def test_three_hundred_services_within_the_budget_and_nobody_refused(
    agent: ConsulAgent,
) -> None:
    latest: dict[str, Snapshot[Any]] = {}

    def recorder(name: str) -> Callable[[Snapshot[Any]], None]:
        def record(snapshot: Snapshot[Any]) -> None:
            latest[name] = snapshot

        return record

    most = 0
    connection = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=10)

    def change(path: str, body: dict[str, Any]) -> None:
        put(connection, path, body)

    with Probe(agent) as probe:
        async with Dcy(agent.http_addr) as client:
            engine = client.engine
            for number in range(SERVICES):
                name = f"svc{number}"
                engine.subscribe(HealthServiceSpec(name), recorder(name))
            await eventually(lambda: len(latest) == SERVICES, "first answers", 60)

            def connections() -> int:
                nonlocal most
                count = count_connections(agent.url) or 0
                most = max(most, count)
                return count

            connections()
            assert engine.wide
            # Instance added.
            change("/v1/catalog/register", registration("host1", "svc7", 1))
            await eventually(lambda: len(latest["svc7"].value) == 2, "instance added")
            connections()
            # Instance removed.
            change("/v1/catalog/deregister", {"Node": "host1", "ServiceID": "svc7-1"})
            await eventually(lambda: len(latest["svc7"].value) == 1, "instance removed")
            # Check critical and back.
            change("/v1/catalog/register", registration("host0", "svc10", 0, status="critical"))
            await eventually(lambda: latest["svc10"].value[0].status == "critical", "critical")
            change("/v1/catalog/register", registration("host0", "svc10", 0))
            await eventually(lambda: latest["svc10"].value[0].status == "passing", "passing")
            connections()
            # Tags changed.
            change("/v1/catalog/register", registration("host1", "svc21", 0, tags=("blue",)))
            await eventually(lambda: latest["svc21"].value[0].tags == ("blue",), "tags")
            # Node check failing: every service on host1 (the odd ones).
            failing = registration("host1", "svc1", 0)
            failing["Checks"][0]["Status"] = "critical"
            change("/v1/catalog/register", failing)
            await eventually(
                lambda: all(
                    latest[f"svc{n}"].value[0].status == "critical" for n in range(1, SERVICES, 2)
                ),
                "node check failing",
            )
            assert all(
                latest[f"svc{n}"].value[0].status == "passing" for n in range(0, SERVICES, 2)
            )
            connections()
            assert engine.detector_wakeups >= 5
    connection.close()
    assert 0 < most <= 32
    assert probe.answers > 0
    assert probe.failures == []
