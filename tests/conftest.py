"""Fixtures that start real Consul and NSQ processes on free ports.

``consul`` is one dev agent per test module: tests on it use their own service names.
``consul_factory`` starts agents a test owns outright (to restart, stop, configure ACL/TLS).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.harness import ConsulAgent, NsqCluster

# Property tests run on a 2-core machine next to real agents, under pytest-xdist: a wall-clock
# deadline or the "too slow" health check would fail them for the machine's load, not for a
# bug. CI (the default profile) also derandomizes, so a red run repeats the same examples;
# HYPOTHESIS_PROFILE=explore searches with fresh random examples and more of them.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_names = itertools.count()


@pytest.fixture(scope="module")
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(tmp_path_factory.mktemp("consul")).start()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def consul_factory(tmp_path: Path) -> Iterator[Callable[..., ConsulAgent]]:
    started: list[ConsulAgent] = []

    def start(**kwargs: Any) -> ConsulAgent:
        agent = ConsulAgent(tmp_path / f"agent{len(started)}", **kwargs).start()
        started.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in reversed(started):
            agent.stop()


@pytest.fixture
def nsq(tmp_path: Path) -> Iterator[NsqCluster]:
    cluster = NsqCluster(tmp_path / "nsq")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A service name no other test on a shared agent uses."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    return f"{base}-{next(_names)}"
