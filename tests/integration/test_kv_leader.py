"""dcy.kv and dcy.leadership against real Consul agents, contenders in separate processes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dcy import Backoff, ConsulConfig, Dcy, Snapshot, WatchOptions
from dcy._consul import HttpConsul, QueryResult
from dcy._leader import LEADER_PREFIX
from tests.harness import ConsulAgent, eventually

pytestmark = pytest.mark.integration

FAST = WatchOptions(wait=2.0, backoff=Backoff(0.05, 0.5), first_answer_timeout=3.0)
ROOT = Path(__file__).resolve().parents[2]
TTL, LOCK_DELAY = 10.0, 1.0
# A takeover's bound beyond what Consul's rules allow: the other's bid (its back-off is capped
# at 1 s) plus the scheduling of three processes on a loaded 2-core CI machine.
TAKEOVER_SLACK = 4.0
# Long enough that a handover which waited for it could not pass for a prompt one.
HANDOVER_LOCK_DELAY = 8.0


@pytest.fixture
async def dcy(consul: ConsulAgent) -> AsyncIterator[Dcy]:
    async with Dcy(consul.http_addr, watch_options=FAST) as client:
        yield client


class Recorder:
    """A watch callback keeping every snapshot it is given."""

    def __init__(self) -> None:
        self.seen: list[Snapshot[Any]] = []

    def __call__(self, snapshot: Snapshot[Any]) -> None:
        self.seen.append(snapshot)


# -- KV ----------------------------------------------------------------------------------------
async def test_kv_roundtrip(dcy: Dcy, unique_name: str) -> None:
    """Text, binary (non-UTF-8) and empty values, listing, check-and-set and deletes
    round-trip through a real agent."""
    base = f"{unique_name}/"
    assert await dcy.kv.put(f"{base}text", "grüß dich")
    assert await dcy.kv.put(f"{base}binary", b"\xff\xfe\x00")
    assert await dcy.kv.put(f"{base}empty", b"")
    assert await dcy.kv.get(f"{base}text") == "grüß dich"
    assert await dcy.kv.get_bytes(f"{base}binary") == b"\xff\xfe\x00"
    with pytest.raises(UnicodeDecodeError, match="binary' is not UTF-8"):
        await dcy.kv.get(f"{base}binary")
    assert await dcy.kv.get(f"{base}empty") == ""
    assert await dcy.kv.get(f"{base}missing") is None
    listed = await dcy.kv.list(base)
    assert list(listed) == [f"{base}binary", f"{base}empty", f"{base}text"]
    assert listed[f"{base}binary"].raw == b"\xff\xfe\x00"
    entry = await dcy.kv.entry(f"{base}text")
    assert entry is not None
    assert not await dcy.kv.cas(f"{base}text", "stale", entry.modify_index - 1)
    assert await dcy.kv.cas(f"{base}text", "fresh", entry.modify_index)
    assert not await dcy.kv.cas(f"{base}text", "again", 0)
    assert await dcy.kv.get(f"{base}text") == "fresh"
    assert await dcy.kv.delete(f"{base}text")
    assert await dcy.kv.get(f"{base}text") is None
    assert await dcy.kv.delete(base, recurse=True)
    assert dict(await dcy.kv.list(base)) == {}


async def test_kv_watch_sees_each_put_once(dcy: Dcy, unique_name: str) -> None:
    """A key watch delivers the missing key, each new value once (a rewrite of the same
    value is not a change), and the deletion."""
    key = f"{unique_name}/level"
    seen = Recorder()
    subscription = dcy.kv.watch(key, seen)
    await eventually(lambda: len(seen.seen) == 1, what="first snapshot")
    await dcy.kv.put(key, "debug")
    await eventually(lambda: len(seen.seen) == 2, what="the put")
    await dcy.kv.put(key, "debug")
    await dcy.kv.put(key, b"\xffinfo")
    await eventually(lambda: len(seen.seen) == 3, what="the binary put")
    await dcy.kv.delete(key)
    await eventually(lambda: len(seen.seen) == 4, what="the delete")
    values = [s.value.raw if s.value is not None else None for s in seen.seen]
    assert values == [None, b"debug", b"\xffinfo", None]
    await subscription.aclose()


async def test_prefix_watch_sees_keys_added_and_removed(dcy: Dcy, unique_name: str) -> None:
    """A prefix watch delivers the mapping of keys as keys appear and disappear."""
    prefix = f"{unique_name}/limits/"
    seen = Recorder()
    subscription = dcy.kv.watch(prefix, seen)
    await dcy.kv.put(f"{prefix}cpu", "2")
    await dcy.kv.put(f"{prefix}mem", "512")
    await dcy.kv.put(f"{unique_name}/outside", "x")
    both = {f"{prefix}cpu", f"{prefix}mem"}
    await eventually(lambda: seen.seen and set(seen.seen[-1].value) == both, what="two keys")
    await dcy.kv.delete(f"{prefix}cpu")
    await eventually(lambda: set(seen.seen[-1].value) == {f"{prefix}mem"}, what="one key left")
    assert seen.seen[-1].value[f"{prefix}mem"].value == "512"
    await subscription.aclose()


# -- leader election across processes ---------------------------------------------------------
class Contenders:
    """Contender processes (tests/integration/_contender.py) this test started, each with
    its own events file."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(
        self, agent: ConsulAgent, name: str, *options: str
    ) -> tuple[subprocess.Popen[bytes], Path]:
        events = self.workdir / f"contender{len(self.processes)}.events"
        log = (self.workdir / f"contender{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.integration._contender"),
                *(agent.http_addr, name, str(events)),
                *("--ttl", str(TTL), "--lock-delay", str(LOCK_DELAY)),
                *options,
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes.append(process)
        return process, events

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def contenders(tmp_path: Path) -> Iterator[Contenders]:
    started = Contenders(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def _events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _leads(path: Path) -> bool:
    return any(line.startswith("leader ") for line in _events(path))


def _holder_pid(agent: ConsulAgent, name: str) -> int | None:
    try:
        (entry,) = agent.api(f"/v1/kv/{LEADER_PREFIX}{name}")
    except OSError:  # 404: no lock key yet
        return None
    if not entry.get("Session"):
        return None
    return int(json.loads(base64.b64decode(entry["Value"]))["pid"])


async def _two_contenders(
    contenders: Contenders, agent: ConsulAgent, name: str, *options: str
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], Path]:
    """Start a holder, then a second contender; return (holder, other, other's events)."""
    holder, holder_events = contenders.start(agent, name, *options)
    await eventually(lambda: _leads(holder_events), timeout=30, what="first leader")
    other, other_events = contenders.start(agent, name, *options)
    await eventually(lambda: _events(other_events), timeout=30, what="second contender up")
    # Its session exists once it waits; give its first read time to reach the agent.
    await eventually(
        lambda: len(agent.api("/v1/session/list")) >= 2, timeout=30, what="two sessions"
    )
    assert not _leads(other_events)
    assert _holder_pid(agent, name) == holder.pid
    return holder, other, other_events


async def _kill_until_taken_over(
    agent: ConsulAgent,
    name: str,
    holder: subprocess.Popen[bytes],
    other: subprocess.Popen[bytes],
    other_events: Path,
    *,
    timeout: float,
) -> float:
    """SIGKILL the holder, wait for the other to lead and hold the lock; the seconds it took."""
    holder.kill()
    killed_at = time.monotonic()
    await eventually(lambda: _leads(other_events), timeout=timeout, what="takeover")
    took = time.monotonic() - killed_at
    assert _holder_pid(agent, name) == other.pid
    return took


async def test_sigkilled_holder_is_replaced_after_session_expiry(
    consul: ConsulAgent,
    contenders: Contenders,
    unique_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A holder killed with SIGKILL never releases: the other process leads once Consul
    expires the dead session (2 x TTL after its last renewal) and the lock-delay passes."""
    holder, other, other_events = await _two_contenders(contenders, consul, unique_name)
    took = await _kill_until_taken_over(
        consul, unique_name, holder, other, other_events, timeout=2 * TTL + LOCK_DELAY + 40
    )
    with capsys.disabled():
        print(
            f"\n[measured] takeover after SIGKILL of the holder: {took:.1f}s "
            f"(ttl {TTL:g}s, lock-delay {LOCK_DELAY:g}s)"
        )
    # The holder renewed at most TTL/3 before it died and Consul expires a session no sooner
    # than TTL after its last renewal: a takeover sooner than that came from something else.
    # Consul allows itself up to 2 x TTL, then the lock-delay, then one bid of the other.
    assert TTL - TTL / 3 <= took <= 2 * TTL + LOCK_DELAY + TAKEOVER_SLACK


async def test_sigkilled_holder_bound_to_its_check_is_replaced_once_the_check_fails(
    consul: ConsulAgent,
    contenders: Contenders,
    unique_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Sessions bound to each contender's own TTL check: SIGKILL the holder, its check goes
    critical, Consul ends the session, and the other leads. The sessions' TTL is 60s, so the
    dead session could not have expired (2 x 60s) before the wait below gives up."""
    bound = ("--ttl", "60", "--check-ttl", "2")
    holder, other, other_events = await _two_contenders(contenders, consul, unique_name, *bound)
    (session,) = [s for s in consul.api("/v1/session/list") if f"pid {holder.pid}" in s["Name"]]
    assert [c["ID"] for c in session["ServiceChecks"]] == [f"service:leader-contender-{holder.pid}"]
    took = await _kill_until_taken_over(
        consul, unique_name, holder, other, other_events, timeout=60
    )
    with capsys.disabled():
        print(
            f"\n[measured] takeover after SIGKILL of a holder bound to its 2s TTL check: "
            f"{took:.1f}s (lock-delay {LOCK_DELAY:g}s)"
        )
    # The check goes critical at most 2 s after the last heartbeat; the lock-delay runs from
    # the session's end, so the takeover can be no sooner than it.
    assert LOCK_DELAY <= took <= 2 + LOCK_DELAY + TAKEOVER_SLACK


async def test_sigtermed_holder_hands_over_at_once(
    consul: ConsulAgent,
    contenders: Contenders,
    unique_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A holder that exits normally releases the lock first, so the other leads without
    waiting for a TTL or a lock-delay."""
    slow = ("--lock-delay", str(HANDOVER_LOCK_DELAY))
    holder, other, other_events = await _two_contenders(contenders, consul, unique_name, *slow)
    holder.terminate()
    stopped_at = time.monotonic()
    await eventually(lambda: _leads(other_events), timeout=30, what="handover")
    took = time.monotonic() - stopped_at
    assert holder.wait(10) == 0
    assert _holder_pid(consul, unique_name) == other.pid
    with capsys.disabled():
        print(f"\n[measured] handover after SIGTERM of the holder: {took:.2f}s")
    # Sooner than the lock-delay: the holder released the lock before its session ended.
    assert took < HANDOVER_LOCK_DELAY


async def test_stopped_agent_tells_the_holder_it_lost(
    consul_factory: Callable[..., ConsulAgent], unique_name: str
) -> None:
    """When the holder's agent goes away, the holder learns that it no longer leads."""
    agent = consul_factory()
    calls: list[str | None] = []
    async with Dcy(agent.http_addr, watch_options=FAST) as dcy:
        leadership = dcy.leadership(
            unique_name, lock_delay=LOCK_DELAY, on_lost=lambda lead: calls.append(lead.lost_reason)
        )
        async with leadership as leader:
            assert leader.is_leader
            agent.stop()
            reason = await asyncio.wait_for(leader.wait_lost(), 30)
            assert "lost contact" in reason or "renew" in reason
            assert not leader.is_leader
            await eventually(lambda: calls == [reason], what="on_lost")


class CountingConsul(HttpConsul):
    """The real seam, counting KV reads and writes."""

    reads = 0
    writes = 0

    async def kv_get(self, key: str, **kwargs: Any) -> QueryResult:
        self.reads += 1
        return await super().kv_get(key, **kwargs)

    async def kv_put(self, key: str, value: bytes, **kwargs: Any) -> bool:
        self.writes += 1
        return await super().kv_put(key, value, **kwargs)


async def test_waiting_contender_blocks_instead_of_polling(
    consul: ConsulAgent, dcy: Dcy, unique_name: str
) -> None:
    """A contender waiting for a held lock makes almost no requests (one blocking read
    in flight, no acquire attempts), then leads when the holder steps down."""
    api = CountingConsul(ConsulConfig.from_env(consul.http_addr))
    try:
        async with Dcy(api=api, watch_options=WatchOptions(wait=30)) as waiting_client:
            holder = dcy.leadership(unique_name, lock_delay=LOCK_DELAY)
            await holder.__aenter__()
            contender = waiting_client.leadership(unique_name, lock_delay=LOCK_DELAY)
            entering = asyncio.create_task(contender.__aenter__())
            await eventually(lambda: contender.holder is not None, what="holder seen")
            reads, writes = api.reads, api.writes
            await asyncio.sleep(3)  # the measurement window: what does waiting cost?
            assert not entering.done()
            assert api.writes == writes and api.reads - reads <= 1
            await holder.__aexit__(None, None, None)
            await asyncio.wait_for(entering, 15)
            assert contender.is_leader
            await contender.__aexit__(None, None, None)
    finally:
        await api.aclose()
