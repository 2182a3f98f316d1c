"""Fixtures that start real Consul and NSQ processes on free ports.

``consul`` is one dev agent per test module: tests on it use their own service names.
``consul_factory`` starts agents a test owns outright (to restart, stop, configure ACL/TLS).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ConsulAgent, NsqCluster

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
