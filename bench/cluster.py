"""Leader kills on the local cluster: how long dc1 is without a Raft leader, and how long dcy's
watches take to answer again, with the services running.

The inventory of the chaos tests (tests/cluster.py: three servers, two hosts with a worker and
an app, one with the sensor) runs as a local cluster (network namespaces: needs root), once in
NSQ mode and once in HTTP mode. In each, the Raft leader's Consul is SIGKILLed 5 times (once
with --quick), each time while a dcy client on a client host looks up sensor, worker,
app and nsqd every 50 ms; the killed server is started again and back among the peers before
the next kill. Per kill:

* ``new_leader_s``: from the SIGKILL until a surviving server names another leader;
* ``fresh_watch_s``: from the SIGKILL until dcy's watch shows an instance registered once the
  new leader was seen (the first answer that needed the new leader).

Over the whole run: ``empty_lookups`` (must be 0), ``failed_cycles`` of the HTTP app after the
first kill, and in NSQ mode the readings the sensor published that reached the apps never
(``readings_lost``) or twice (``readings_duplicated``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
import json
import os
import statistics
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

from bench._common import emit, note, parse_args, rounded
from dcy import Dcy
from tasks._cluster import Cluster
from tests.cluster import (
    ONE_DC,
    app_results,
    failed_cycles,
    leading_apps,
    local_cluster,
    sequence_numbers,
    stop_sensor,
)
from tests.harness import eventually, until

WATCHED = ("sensor", "worker", "app", "nsqd")
PROBE = "bench-probe"


def agent_put(port: int, path: str, body: object) -> None:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="PUT")
    with urllib.request.urlopen(request, timeout=10):
        pass


class Looker:
    """Lookups of every watched name every 50 ms: counts, and when each count changed."""

    def __init__(self, dcy: Dcy) -> None:
        self.dcy = dcy
        self.empty = 0
        self.lookups = 0
        self.counts: dict[str, int] = {}
        self.changed: dict[str, float] = {}
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            for name in WATCHED:
                count = len((await self.dcy.lookup(name)).instances)
                self.lookups += 1
                self.empty += count == 0
                if self.counts.get(name) != count:
                    self.counts[name] = count
                    self.changed[name] = time.monotonic()
            await asyncio.sleep(0.05)


async def kill_leader(cluster: Cluster, looker: Looker, forward: int) -> tuple[float, float]:
    old = cluster.leader("dc1")
    assert old is not None
    survivor = next(h.name for h in cluster.plan.inventory.datacenter("dc1").servers if h != old)
    apps = looker.counts["app"]
    killed_at = time.monotonic()
    cluster.kill("dc1", old.name, "consul")

    def new_leader() -> float | None:
        host = cluster.leader("dc1", via=survivor)
        return time.monotonic() if host is not None and host.name != old.name else None

    elected_at = await asyncio.to_thread(until, new_leader, timeout=60, what="a new leader")
    agent_put(forward, "/v1/agent/service/register", {"ID": PROBE, "Name": "app", "Port": 1})
    await eventually(lambda: looker.counts["app"] == apps + 1, timeout=30, interval=0.01,
                     what="the registered instance in the watch")  # fmt: skip
    fresh_at = looker.changed["app"]
    agent_put(forward, f"/v1/agent/service/deregister/{PROBE}", None)
    cluster.start_again("dc1", old.name, "consul")
    await asyncio.to_thread(
        until,
        lambda: cluster.leader("dc1", via=old.name) is not None and cluster.all_passing(),
        timeout=60,
        what="the killed server back, every service passing",
    )
    await eventually(lambda: looker.counts["app"] == apps, timeout=30, what="the probe gone")
    return elected_at - killed_at, fresh_at - killed_at


@dataclass
class ModeFigures:
    elections: list[float] = field(default_factory=list)
    fresh: list[float] = field(default_factory=list)
    lookups: int = 0
    empty: int = 0
    failed: int = 0
    published: int = 0
    lost: int = 0
    duplicated: int = 0


async def run_mode(mode: str, kills: int, workdir: Path) -> ModeFigures:
    with local_cluster(workdir, ONE_DC, mode) as cluster:
        await asyncio.to_thread(until, lambda: leading_apps(cluster), timeout=60, what="a leader")
        forward = cluster.forward("dc1", "c1", 8500)
        failed_before = failed_cycles(cluster)
        figures = ModeFigures()
        async with Dcy(f"127.0.0.1:{forward}") as dcy:
            looker = Looker(dcy)
            task = asyncio.create_task(looker.run())
            await asyncio.sleep(1.0)
            for kill in range(kills):
                election, answer = await kill_leader(cluster, looker, forward)
                figures.elections.append(election)
                figures.fresh.append(answer)
                note(f"{mode} kill {kill + 1}/{kills}: leader {election:.2f}s, watch {answer:.2f}s")
            looker.stop.set()
            await task
        figures.lookups, figures.empty = looker.lookups, looker.empty
        figures.failed = failed_cycles(cluster) - failed_before
        if mode == "nsq":
            published = stop_sensor(cluster, "dc1", "c3")
            expected = set(range(1, published + 1))
            until(lambda: set(sequence_numbers(app_results(cluster))) >= expected,
                  timeout=60, interval=0.5, what="every reading at the apps")  # fmt: skip
            numbers = sequence_numbers(app_results(cluster))
            figures.lost = len(expected - set(numbers))
            figures.duplicated = len(numbers) - len(set(numbers))
            figures.published = published
        return figures


def main() -> None:
    args = parse_args(__doc__ or "")
    kills = 1 if args.quick else 5
    if os.geteuid() != 0:
        raise SystemExit("bench/cluster.py needs root: it runs the cluster in network namespaces")
    with tempfile.TemporaryDirectory(prefix="dcy-bench-cluster-") as tmp:
        nsq = asyncio.run(run_mode("nsq", kills, Path(tmp) / "nsq"))
        http = asyncio.run(run_mode("http", kills, Path(tmp) / "http"))
    elections = [*nsq.elections, *http.elections]
    fresh = [*nsq.fresh, *http.fresh]
    emit(
        {
            "bench": "cluster",
            "kills": len(elections),
            "new_leader_p50_s": rounded(statistics.median(elections)),
            "new_leader_max_s": rounded(max(elections)),
            "fresh_watch_p50_s": rounded(statistics.median(fresh)),
            "fresh_watch_max_s": rounded(max(fresh)),
            "lookups": nsq.lookups + http.lookups,
            "empty_lookups": nsq.empty + http.empty,
            "failed_cycles": http.failed,
            "readings_published": nsq.published,
            "readings_lost": nsq.lost,
            "readings_duplicated": nsq.duplicated,
        }
    )


if __name__ == "__main__":
    main()
