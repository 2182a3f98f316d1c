"""Issue 16: 300 watched services through an agent with Consul's default limits (200
connections per client address): every change seen, at most 32 connections, and a probe
client on the same address never refused; over HTTP (change detectors past the budget) and
over HTTPS (HTTP/2: every query a blocking stream of its own, two connections in all)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from dcy import Dcy, Snapshot
from dcy._specs import HealthServiceSpec
from tests.harness import ConsulAgent, eventually
from tests.scale_series import (
    BUDGET,
    SERVICES,
    Agent,
    ConnectionSampler,
    Probe,
    Row,
    Writer,
    default_limits_agent,
    run_series,
)


@pytest.fixture
def agent(consul_factory: Callable[..., ConsulAgent]) -> Agent:
    return default_limits_agent(consul_factory)


@pytest.fixture
def tls_agent(consul_factory: Callable[..., ConsulAgent], tmp_path: Path) -> Agent:
    return default_limits_agent(consul_factory, tmp_path / "tls")


async def watch_three_hundred(agent: Agent, *, multiplexed: bool = False, **tls: str) -> None:
    """``multiplexed``: the agent speaks HTTP/2 (HTTPS), so every query keeps a blocking
    query of its own, as streams over a couple of connections, and no detector is needed."""
    latest: dict[str, Snapshot[Any]] = {}

    def recorder(name: str) -> Callable[[Snapshot[Any]], None]:
        def record(snapshot: Snapshot[Any]) -> None:
            latest[name] = snapshot

        return record

    def view() -> Mapping[str, Sequence[Row]]:
        return {
            name: [(i.id, i.node, i.port, i.status, i.tags) for i in snapshot.value]
            for name, snapshot in latest.items()
        }

    writer = Writer(agent)
    try:
        with Probe(agent) as probe, ConnectionSampler(agent) as connections:
            async with Dcy(agent.url, **tls) as client:  # type: ignore[arg-type]
                engine = client.engine
                for number in range(SERVICES):
                    name = f"svc{number}"
                    engine.subscribe(HealthServiceSpec(name), recorder(name))
                await eventually(lambda: len(latest) == SERVICES, what="first answers", timeout=60)
                if multiplexed:
                    assert client.api.streams_per_connection > 1
                    assert not engine.wide
                    assert engine.blocking_queries >= SERVICES
                else:
                    assert engine.wide
                await run_series(writer, view)
                if multiplexed:
                    assert engine.detector_wakeups == 0
                else:
                    assert engine.detector_wakeups >= 5
    finally:
        writer.close()
    # Counted for this whole process: the writer's keep-alive connection and the probe's
    # one GET at a time are in it too. Over HTTP/2, 300 streams fit in two connections.
    assert connections.samples > 0
    assert 0 < connections.most <= (2 if multiplexed else BUDGET) + 2
    assert probe.answers > 0
    assert probe.failures == []


async def test_three_hundred_services_within_the_budget_and_nobody_refused(agent: Agent) -> None:
    await watch_three_hundred(agent)


async def test_the_same_over_https_with_http2(tls_agent: Agent) -> None:
    tls = tls_agent.tls
    assert tls is not None
    await watch_three_hundred(
        tls_agent,
        multiplexed=True,
        ca_file=str(tls.ca),
        client_cert=str(tls.client_cert),
        client_key=str(tls.client_key),
    )


async def test_a_check_less_instance_past_the_budget_is_attributed_not_swept(agent: Agent) -> None:
    # Registered and deregistered without a check: only the catalog's index moves (not its
    # names nor tags, and no check), so only /v1/internal/ui/services says which service.
    latest: dict[str, Snapshot[Any]] = {}

    def count(name: str) -> int:
        return len(latest[name].value) if name in latest else 0

    writer = Writer(agent)
    try:
        async with Dcy(agent.url) as client:
            engine = client.engine
            for number in range(SERVICES):
                name = f"svc{number}"
                engine.subscribe(HealthServiceSpec(name), partial(latest.__setitem__, name))
            await eventually(lambda: len(latest) == SERVICES, what="first answers", timeout=60)
            assert engine.wide
            api: Any = engine.api
            requests, sweeps = api.requests, engine.detectors.sweeps
            extra = {"Node": "host1", "Address": "10.0.0.2"}
            service = {"ID": "svc7-extra", "Service": "svc7", "Port": 9007}
            writer.put("/v1/catalog/register", {**extra, "Service": service})
            await eventually(lambda: count("svc7") == 2, what="check-less instance added")
            writer.put("/v1/catalog/deregister", {**extra, "ServiceID": "svc7-extra"})
            await eventually(lambda: count("svc7") == 1, what="check-less instance removed")
            assert engine.detectors.sweeps == sweeps
            # A sweep asks every one of the 300 services again; attributing a change asks
            # a few things (whether a check was written, the services list, svc7 twice).
            assert api.requests - requests < 30
    finally:
        writer.close()
