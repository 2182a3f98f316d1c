"""A leadership outlives what a production datacenter goes through every week: a Consul
server election (SIGKILL of the Raft leader of a real 3-server cluster) and seconds without
its agent. It ends only when its session can no longer be valid, or Consul says it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcy import Backoff, ConsulConfig, Dcy, DcyError, WatchOptions
from dcy._consul import HttpConsul
from dcy._leader import Leadership
from tests.harness import ConsulAgent, ConsulCluster, eventually
from tests.outage_proxy import OutageProxy

pytestmark = pytest.mark.integration

FAST = WatchOptions(wait=5.0, backoff=Backoff(0.05, 0.5), first_answer_timeout=10.0)
TTL = 15.0


class RenewalLog(HttpConsul):
    """The real seam, noting when each renewal was sent and what came of it."""

    def __init__(self, config: ConsulConfig) -> None:
        super().__init__(config)
        self.renewals: list[tuple[float, DcyError | None]] = []

    async def session_renew(self, session_id: str) -> None:
        sent = time.monotonic()
        try:
            await super().session_renew(session_id)
        except DcyError as exc:
            self.renewals.append((sent, exc))
            raise
        self.renewals.append((sent, None))

    def succeeded_after(self, moment: float) -> bool:
        return any(sent > moment and error is None for sent, error in self.renewals)

    def failed_between(self, start: float, end: float) -> list[DcyError]:
        return [e for sent, e in self.renewals if start <= sent <= end and e is not None]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ConsulCluster]:
    started = ConsulCluster(tmp_path / "cluster").start()
    try:
        yield started
    finally:
        started.stop()


async def test_leadership_survives_a_raft_leader_election(
    cluster: ConsulCluster, unique_name: str
) -> None:
    """SIGKILL of the Raft leader: renewals fail while the servers elect a new one (500 "No
    cluster leader", RPC errors) and are retried; the leadership (TTL 15 s) is never lost,
    its session renews again after the election, and lookups never answer empty."""
    # Dcy leaves an api it was given open: the test owns (and closes) it.
    async with (
        contextlib.aclosing(RenewalLog(ConsulConfig.from_env(cluster.client.http_addr))) as api,
        Dcy(api=api, watch_options=FAST) as dcy,
    ):
        assert dcy.agent is not None
        await dcy.register(unique_name, 7300, check="ttl")
        await eventually(lambda: dcy.instances(unique_name), what="registered")
        # Renewing every second puts renewals inside the election window, which is the point.
        leader = Leadership(dcy.api, dcy.engine, dcy.agent, unique_name, ttl=TTL, renew_interval=1)
        async with leader:
            old = cluster.leader()
            killed_at = time.monotonic()
            await asyncio.to_thread(old.proc.stop, signal.SIGKILL)  # type: ignore[union-attr]
            empty_lookups = 0

            async def new_leader() -> bool:
                nonlocal empty_lookups
                empty_lookups += not await dcy.instances(unique_name)
                try:
                    return await asyncio.to_thread(cluster.leader) is not old
                except Exception:  # no leader yet, or the killed one still named
                    return False

            await eventually(new_leader, timeout=30, interval=0.1, what="a new Raft leader")
            elected_at = time.monotonic()
            await eventually(
                lambda: api.succeeded_after(elected_at), timeout=TTL, what="a renewal after"
            )
            assert leader.is_leader and not leader.lost.is_set(), leader.lost_reason
            assert empty_lookups == 0
            failed = api.failed_between(killed_at, elected_at)
            assert failed and all(e.transient for e in failed), failed
            entry = await dcy.kv.entry(leader.key)
            assert entry is not None and entry.session == leader.session_id
        assert leader.lost_reason == "stepped down"


async def test_leadership_survives_a_five_second_agent_outage(
    consul: ConsulAgent, unique_name: str
) -> None:
    """The agent unreachable for 5 s (connections refused and broken), starting just
    before a renewal is due: renewals fail and are retried, the lock watch goes stale, and
    the leadership (TTL 15 s, default renewal interval) holds; afterwards its session is
    renewed at once and still holds the lock."""
    proxy = await OutageProxy(consul.http_addr).start()
    try:
        async with (
            contextlib.aclosing(RenewalLog(ConsulConfig.from_env(proxy.address))) as api,
            Dcy(api=api, watch_options=FAST) as dcy,
            dcy.leadership(unique_name, ttl=TTL) as leader,
        ):
            await eventually(
                lambda: api.renewals, timeout=TTL, interval=0.1, what="a first renewal"
            )
            last_sent, _ = api.renewals[-1]
            due = last_sent + leader.renew_interval
            await asyncio.sleep(max(0.0, due - 0.5 - time.monotonic()))
            cut_at = time.monotonic()
            await proxy.cut()
            await asyncio.sleep(5.0)
            assert leader.is_leader and not leader.lost.is_set(), leader.lost_reason
            await proxy.restore()
            restored_at = time.monotonic()
            assert api.failed_between(cut_at, restored_at), "no renewal hit the outage"
            await eventually(
                lambda: api.succeeded_after(restored_at),
                timeout=3,
                what="a renewal right after the outage",
            )
            assert leader.is_leader and not leader.lost.is_set(), leader.lost_reason
            entry = await dcy.kv.entry(leader.key)
            assert entry is not None and entry.session == leader.session_id
    finally:
        await proxy.aclose()
