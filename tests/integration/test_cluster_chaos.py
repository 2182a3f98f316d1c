"""What real clusters do, done to the local cluster (tests/cluster.py, one datacenter of
three servers and two client hosts): the Raft leader killed, a host cut off the fabric.

dcy in this test process talks to a client host's agent through a loopback forwarder, as a
service on that host would; the services run in their namespaces and their logs tell what
they did."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dcy import Dcy
from tasks._cluster import Cluster
from tests.cluster import (
    ONE_DC,
    TWO_DC,
    app_results,
    failed_cycles,
    leading_apps,
    local_cluster,
    sensor_published,
    sequence_numbers,
    stop_sensor,
)
from tests.harness import eventually, until

pytestmark = pytest.mark.integration
WATCHED = ("sensor", "worker", "app", "nsqd")
# Serf (LAN defaults) declares a silent member failed after its probes and the suspicion
# timeout: a few seconds for a handful of members; this bounds it generously.
SERF_DETECTION = 10.0
PROBE = "chaos-probe"
CHECK_INTERVAL = 1.0  # svc's --check-interval default


@pytest.fixture(params=["nsq", "http"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    with local_cluster(tmp_path, ONE_DC, request.param) as running:
        until(lambda: leading_apps(running), timeout=30, what="an app leading")
        yield running


@dataclass
class Lookups:
    """Every answer dcy gave for the watched names: (monotonic time, name, count, stale)."""

    answers: list[tuple[float, str, int, bool]] = field(default_factory=list)

    async def run(self, dcy: Dcy, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for name in WATCHED:
                lookup = await dcy.lookup(name)
                self.answers.append((time.monotonic(), name, len(lookup.instances), lookup.stale))
            await asyncio.sleep(0.05)

    def first_count(self, name: str, after: float, count: int | None = None) -> float | None:
        """When ``name`` was first answered with ``count`` instances (any other count than
        before ``after`` when None) after ``after``."""
        before = next((c for t, n, c, _ in reversed(self.answers) if n == name and t < after), -1)
        return next(
            (
                t
                for t, n, c, _ in self.answers
                if n == name and t >= after and (c == count if count is not None else c != before)
            ),
            None,
        )


async def test_leader_loss_keeps_answers_leadership_and_readings(cluster: Cluster) -> None:
    """SIGKILL of dc1's Raft leader while the app runs: a new leader is elected; the watches
    answer a change made once it is (an instance registered) within the election time + 1 s;
    no lookup is ever empty; the app keeps its leadership and every registration stays.
    NSQ mode: no reading lost or duplicated; HTTP mode: at most one failed cycle.

    (Nothing is marked stale: the agents hold the queries through an election this short,
    Consul's rpc_hold_timeout being 7 s, so no watch sees an error.)"""
    (leader_app,) = leading_apps(cluster)
    failed_before = failed_cycles(cluster)  # while the sensor was not passing yet at start
    forward = cluster.forward("dc1", "c1", 8500)
    ids_before = registered_ids(cluster)
    async with Dcy(f"127.0.0.1:{forward}") as dcy:
        lookups, stop = Lookups(), asyncio.Event()
        task = asyncio.create_task(lookups.run(dcy, stop))
        await asyncio.sleep(1.0)
        old = cluster.leader("dc1")
        assert old is not None
        survivor = next(h for h in ("s1", "s2", "s3") if h != old.name)
        killed_at = time.monotonic()
        cluster.kill("dc1", old.name, "consul")

        def new_leader() -> float | None:
            host = cluster.leader("dc1", via=survivor)
            return time.monotonic() if host is not None and host.name != old.name else None

        elected_at = await asyncio.to_thread(until, new_leader, timeout=30, what="a new leader")
        election = elected_at - killed_at

        # A change once there is a leader again: one more instance of app (no check, never
        # called: nothing resolves app). The watch showing it is the watch answering again.
        apps = len(ids_before["app"])
        agent_put(forward, "/v1/agent/service/register", {"ID": PROBE, "Name": "app", "Port": 1})
        with contextlib.suppress(AssertionError):  # asserted below, with the figures
            await eventually(
                lambda: lookups.first_count("app", elected_at, apps + 1) is not None,
                timeout=max(0.0, elected_at + 1.5 - time.monotonic()),
            )
        await asyncio.sleep(0.5)  # and not empty a moment later either
        stop.set()
        await task
    agent_put(forward, f"/v1/agent/service/deregister/{PROBE}", None)
    print(f"new leader after {election:.2f}s")
    empty = [(round(t - killed_at, 2), n, s) for t, n, c, s in lookups.answers if c == 0]
    assert not empty, f"empty lookups (s after the kill, name, stale): {empty[:10]}"
    seen = lookups.first_count("app", elected_at, apps + 1)
    assert seen is not None, "the watch never showed the instance registered after the election"
    print(f"the watch answered {seen - killed_at:.2f}s after the kill")
    assert seen - killed_at <= election + 1.0, (seen - killed_at, election)
    assert leading_apps(cluster) == [leader_app]
    assert all(
        "not leading any more" not in cluster.log(p.dc, p.host, p.name)
        for p in cluster.plan.processes
        if p.name == "app"
    )
    assert registered_ids(cluster, via=survivor) == ids_before
    if cluster.plan.mode == "nsq":
        assert_every_reading_once(cluster)
    else:
        assert failed_cycles(cluster) - failed_before <= 1


def agent_put(port: int, path: str, body: object) -> None:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="PUT")
    with urllib.request.urlopen(request, timeout=10):
        pass


def registered_ids(cluster: Cluster, via: str = "c1") -> dict[str, list[str]]:
    """The passing instances of sensor, worker and app, as an agent of dc1 sees them."""
    return {
        name: sorted(
            entry["Service"]["ID"]
            for entry in cluster.api("dc1", via, f"/v1/health/service/{name}?passing=1")
        )
        for name in ("sensor", "worker", "app")
    }


def assert_every_reading_once(cluster: Cluster) -> None:
    """Stop the sensor; every reading nsqd accepted from it reaches the apps, once."""
    published = stop_sensor(cluster, "dc1", "c3")
    until(
        lambda: set(sequence_numbers(app_results(cluster))) >= set(range(1, published + 1)),
        timeout=60,
        what=f"all {published} published readings at the apps",
    )
    numbers = sequence_numbers(app_results(cluster))
    assert numbers == list(range(1, published + 1)), "a reading lost or logged twice"


@pytest.mark.parametrize("cluster", ["nsq"], indirect=True)
def test_partition_isolates_a_host_and_heals(cluster: Cluster) -> None:
    """The host of the leading app cut off the fabric (its link down, from inside it): within
    the check interval plus serf's detection time its services are critical as the others see
    them; another app leads and uses only reachable workers; after the heal everything passes
    again and every reading published before the cut arrives exactly once."""
    ((_, cut, _),) = leading_apps(cluster)
    other = "c2" if cut == "c1" else "c1"
    before_cut = sensor_published(cluster, "dc1", "c3")
    cut_at = time.monotonic()
    cluster.partition("dc1", cut)

    def cut_host_critical() -> bool:
        """Its node check critical (Consul then passes none of its services) and none of
        its services among the passing ones, as s1's agent answers."""
        checks = cluster.api("dc1", "s1", f"/v1/health/node/{cut}")
        node = [c for c in checks if c["CheckID"] == "serfHealth"]
        passing = [
            e["Node"]["Node"]
            for name in ("worker", "app")
            for e in cluster.api("dc1", "s1", f"/v1/health/service/{name}?passing=1")
        ]
        return node[0]["Status"] == "critical" and cut not in passing

    until(cut_host_critical, timeout=CHECK_INTERVAL + SERF_DETECTION, what=f"{cut} critical")
    print(f"{cut} seen critical after {time.monotonic() - cut_at:.2f}s")
    until(lambda: leading_apps(cluster) and ("dc1", other, "app") in leading_apps(cluster),
          timeout=30, what=f"the app on {other} leading")  # fmt: skip
    after_cut = sensor_published(cluster, "dc1", "c3")
    until(
        lambda: max(sequence_numbers(app_results(cluster)), default=0) > after_cut + 3,
        timeout=30,
        what="readings published after the cut at the new leader",
    )
    cut_worker = cluster.pid("dc1", cut, "worker")  # results name it worker-<hostname>-<pid>
    late = [r for r in app_results(cluster) if int(r["id"].rsplit("-", 1)[1]) > after_cut]
    assert late and not [r for r in late if r["worker"].endswith(f"-{cut_worker}")], late
    print(f"new leader using reachable workers after {time.monotonic() - cut_at:.2f}s")
    cluster.heal("dc1", cut)
    until(cluster.all_passing, timeout=60, what="every service passing after the heal")
    print(f"all passing after {time.monotonic() - cut_at:.2f}s")
    published = stop_sensor(cluster, "dc1", "c3")
    until(
        lambda: set(sequence_numbers(app_results(cluster))) >= set(range(1, published + 1)),
        timeout=60,
        what=f"the {published} readings published, {before_cut} of them before the cut",
    )
    print(f"every reading arrived after {time.monotonic() - cut_at:.2f}s")
    numbers = sequence_numbers(app_results(cluster))
    assert numbers == list(range(1, published + 1)), "a reading logged twice"


def wait_server_back(cluster: Cluster, host: str) -> None:
    """``host``'s server answers again, knows a leader and counts every server as a peer."""
    servers = len(cluster.plan.inventory.datacenter("dc1").servers)

    def back() -> bool:
        try:
            peers = cluster.api("dc1", host, "/v1/status/peers", timeout=2)
        except (OSError, ValueError):
            return False
        return len(peers) == servers and cluster.leader("dc1", via=host) is not None

    until(back, timeout=60, what=f"the server on {host} back with a leader")


def test_rolling_restart_of_the_servers_loses_nothing(cluster: Cluster) -> None:
    """dc1's servers restarted one at a time (SIGTERM, start again, wait until it is back
    among the peers with a leader): no failed cycle (HTTP), every reading once (NSQ)."""
    failed_before = failed_cycles(cluster)  # while the sensor was not passing yet at start
    results_before = len(app_results(cluster))
    started = time.monotonic()
    for server in cluster.plan.inventory.datacenter("dc1").servers:
        cluster.stop_process("dc1", server.name, "consul")
        cluster.start_again("dc1", server.name, "consul")
        wait_server_back(cluster, server.name)
    print(f"3 servers restarted in {time.monotonic() - started:.2f}s")
    until(cluster.all_passing, timeout=60, what="every service passing after the restarts")
    if cluster.plan.mode == "nsq":
        assert_every_reading_once(cluster)
    else:
        assert failed_cycles(cluster) == failed_before
        assert len(app_results(cluster)) > results_before, "no cycle completed since"


@pytest.fixture
def two_datacenters(tmp_path: Path) -> Iterator[Cluster]:
    with local_cluster(tmp_path, TWO_DC, "http") as running:
        yield running


async def test_datacenter_loss_and_return(two_datacenters: Cluster) -> None:
    """All three servers of dc1 stopped: a client of dc2 asking for dc1's workers with
    ``datacenters=["dc2"]`` keeps resolving, through dc2's fresh answer (never an empty one);
    when dc1's servers return, its answers come from dc1 again, fresh, without a restart of
    the client."""
    cluster = two_datacenters
    inventory = cluster.plan.inventory

    def workers(dc: str) -> frozenset[str]:
        return frozenset(h.address for h in inventory.datacenter(dc).hosts if h.count("worker"))

    dc1_workers, dc2_workers = workers("dc1"), workers("dc2")
    servers = [h.name for h in inventory.datacenter("dc1").servers]
    answers: list[tuple[float, frozenset[str], bool]] = []
    async with Dcy(f"127.0.0.1:{cluster.forward('dc2', 's2', 8500)}") as dcy:

        async def ask() -> tuple[frozenset[str], bool]:
            lookup = await dcy.lookup("worker@dc1", datacenters=["dc2"])
            answers.append(
                (time.monotonic(), frozenset(i.address for i in lookup.instances), lookup.stale)
            )
            return answers[-1][1:]

        async def answered(expected: tuple[frozenset[str], bool]) -> bool:
            return await ask() == expected

        assert await ask() == (dc1_workers, False)
        lost_at = time.monotonic()
        for server in servers:
            cluster.stop_process("dc1", server, "consul")
        await eventually(
            lambda: answered((dc2_workers, False)), timeout=60, what="dc2's fresh answer"
        )
        for _ in range(20):
            assert await ask() == (dc2_workers, False)
            await asyncio.sleep(0.1)
        back_at = time.monotonic()
        for server in servers:
            cluster.start_again("dc1", server, "consul")
        await eventually(
            lambda: answered((dc1_workers, False)), timeout=60, what="dc1's fresh answer"
        )
    during = sorted({(tuple(sorted(a)), s) for t, a, s in answers if lost_at < t < back_at})
    print(f"answers during the loss: {during}")
    print(f"dc1 answered again {answers[-1][0] - back_at:.2f}s after its servers restarted")
    assert all(addresses for _, addresses, _ in answers), "an empty answer"
