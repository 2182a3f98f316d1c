"""dcy.kv and dcy.leadership against FakeConsul: values, watches, election and its losses."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dcy import (
    AclDenied,
    Backoff,
    ConsulError,
    Dcy,
    HttpCheck,
    KeyValue,
    Leadership,
    SessionInvalid,
    Snapshot,
    WatchOptions,
)
from dcy._leader import LEADER_PREFIX
from dcy.testing import FakeConsul
from tests.harness import eventually

FAST = WatchOptions(wait=0.5, min_interval=0, backoff=Backoff(0.01, 0.05), first_answer_timeout=0.5)


@pytest.fixture
def fake() -> FakeConsul:
    return FakeConsul(node_name="node-a")


@pytest.fixture
async def dcy(fake: FakeConsul) -> AsyncIterator[Dcy]:
    async with Dcy(api=fake, watch_options=FAST) as client:
        yield client


class Recorder:
    """A watch callback keeping every snapshot it is given."""

    def __init__(self) -> None:
        self.seen: list[Snapshot[Any]] = []

    def __call__(self, snapshot: Snapshot[Any]) -> None:
        self.seen.append(snapshot)


# -- KV ----------------------------------------------------------------------------------------
async def test_put_get_text_and_bytes(dcy: Dcy) -> None:
    """Text is stored as UTF-8 and read back as text; bytes come back untouched."""
    assert await dcy.kv.put("app/greeting", "grüß dich")
    assert await dcy.kv.get("app/greeting") == "grüß dich"
    assert await dcy.kv.get_bytes("app/greeting") == "grüß dich".encode()
    assert await dcy.kv.put("app/blob", b"\x00\xff\xfe")
    assert await dcy.kv.get_bytes("app/blob") == b"\x00\xff\xfe"
    assert await dcy.kv.get("app/missing", "fallback") == "fallback"
    assert await dcy.kv.get_bytes("app/missing") is None


async def test_binary_value_read_as_text_names_the_key(dcy: Dcy) -> None:
    """Reading a non-UTF-8 value as text raises UnicodeDecodeError naming the key."""
    await dcy.kv.put("app/blob", b"\xff\x00")
    with pytest.raises(UnicodeDecodeError, match=r"'app/blob' is not UTF-8 text \(read \.raw\)"):
        await dcy.kv.get("app/blob")
    entry = await dcy.kv.entry("app/blob")
    assert entry is not None and entry.raw == b"\xff\x00"


async def test_entry_carries_flags_and_indexes(dcy: Dcy) -> None:
    """entry() returns flags and the indexes a check-and-set needs."""
    await dcy.kv.put("app/x", "1", flags=7)
    entry = await dcy.kv.entry("app/x")
    assert entry is not None
    assert (entry.key, entry.value, entry.flags, entry.session) == ("app/x", "1", 7, None)
    assert entry.modify_index == entry.create_index > 0
    assert await dcy.kv.entry("app/none") is None


async def test_check_and_set(dcy: Dcy) -> None:
    """cas 0 creates only; cas N updates only at ModifyIndex N; a stale index is refused."""
    assert await dcy.kv.cas("app/counter", "1", 0)
    assert not await dcy.kv.cas("app/counter", "1", 0)
    entry = await dcy.kv.entry("app/counter")
    assert entry is not None
    assert await dcy.kv.cas("app/counter", "2", entry.modify_index)
    assert not await dcy.kv.put("app/counter", "3", cas=entry.modify_index)
    assert await dcy.kv.get("app/counter") == "2"


async def test_list_prefix_in_key_order_without_folders(dcy: Dcy, fake: FakeConsul) -> None:
    """list(prefix) maps each key under the prefix to its entry, in key order, leaving out
    folder placeholders; list() lists everything."""
    await fake.kv_put("cfg/", b"")  # what the Consul UI's "create folder" writes
    for key in ("cfg/b", "cfg/a", "cfgx", "other"):
        await dcy.kv.put(key, key.upper())
    listed = await dcy.kv.list("cfg/")
    assert list(listed) == ["cfg/a", "cfg/b"]
    assert listed["cfg/b"].value == "CFG/B"
    with pytest.raises(TypeError):
        listed["new"] = listed["cfg/a"]  # type: ignore[index]
    assert set(await dcy.kv.list()) == {"cfg/a", "cfg/b", "cfgx", "other"}


async def test_delete_key_and_prefix(dcy: Dcy) -> None:
    """delete removes a key, recurse a whole prefix; deleting everything is refused."""
    for key in ("a/1", "a/2", "b"):
        await dcy.kv.put(key, "x")
    assert await dcy.kv.delete("b")
    assert await dcy.kv.get("b") is None
    assert await dcy.kv.delete("a/", recurse=True)
    assert dict(await dcy.kv.list()) == {}
    with pytest.raises(ValueError, match="whole KV store"):
        await dcy.kv.delete("", recurse=True)


async def test_invalid_keys_and_values_fail_before_consul(dcy: Dcy, fake: FakeConsul) -> None:
    """Bad keys, values and flags raise before anything reaches Consul."""
    with pytest.raises(ValueError, match="must not start with '/'"):
        await dcy.kv.put("/abs", "x")
    with pytest.raises(ValueError, match="must not be empty"):
        await dcy.kv.get("")
    with pytest.raises(TypeError, match="must be str or bytes, got int"):
        await dcy.kv.put("n", 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flags"):
        await dcy.kv.put("n", "5", flags=-1)
    assert fake.calls["kv_put"] == fake.calls["kv_get"] == 0


async def test_key_watch_sees_each_change_once(dcy: Dcy) -> None:
    """A key watch delivers the missing key, then each new value once; rewriting the same
    value wakes nobody."""
    seen = Recorder()
    subscription = dcy.kv.watch("app/level", seen)
    await eventually(lambda: len(seen.seen) == 1, what="first snapshot")
    assert seen.seen[0].value is None
    await dcy.kv.put("app/level", "debug")
    await eventually(lambda: len(seen.seen) == 2, what="the put")
    await dcy.kv.put("app/level", "debug")
    await dcy.kv.put("app/level", "info")
    await eventually(lambda: len(seen.seen) == 3, what="the second value")
    assert [s.value.value if s.value else None for s in seen.seen] == [None, "debug", "info"]
    assert isinstance(seen.seen[-1].value, KeyValue)
    await dcy.kv.delete("app/level")
    await eventually(lambda: len(seen.seen) == 4 and seen.seen[-1].value is None, what="delete")
    await subscription.aclose()


async def test_prefix_watch_sees_keys_come_and_go(dcy: Dcy) -> None:
    """A prefix watch (trailing '/') delivers the whole mapping as keys are added and removed."""
    async with dcy.kv.watch("limits/") as updates:
        await dcy.kv.put("limits/cpu", "2")
        await dcy.kv.put("limits/mem", "512")
        await dcy.kv.put("elsewhere", "x")
        async for snapshot in updates:
            if set(snapshot.value) == {"limits/cpu", "limits/mem"}:
                break
        await dcy.kv.delete("limits/cpu")
        async for snapshot in updates:
            if set(snapshot.value) == {"limits/mem"}:
                assert snapshot.value["limits/mem"].value == "512"
                break


async def test_key_watch_keeps_value_through_outage(dcy: Dcy, fake: FakeConsul) -> None:
    """While Consul is away a key watch keeps the last value, marked stale, never None."""
    await dcy.kv.put("app/level", "warn")
    seen = Recorder()
    subscription = dcy.kv.watch_key("app/level", seen)
    await eventually(lambda: bool(seen.seen), what="first snapshot")
    fake.set_unavailable()
    await eventually(lambda: seen.seen[-1].stale, what="stale mark")
    value = seen.seen[-1].value
    assert value is not None and value.value == "warn"
    fake.set_unavailable(False)
    await eventually(lambda: not seen.seen[-1].stale, what="fresh again")
    await subscription.aclose()


# -- leadership --------------------------------------------------------------------------------
async def _lock_entry(fake: FakeConsul, name: str) -> dict[str, Any] | None:
    result = await fake.kv_get(LEADER_PREFIX + name)
    return result.body[0] if result.body else None


async def test_single_contender_leads_and_steps_down(dcy: Dcy, fake: FakeConsul) -> None:
    """Alone, a contender leads at once; its lock names it; leaving releases the lock and
    destroys the session."""
    async with dcy.leadership("jobs", service_id="app-1", lock_delay=1) as leader:
        assert leader.is_leader and not leader.lost.is_set()
        entry = await _lock_entry(fake, "jobs")
        assert entry is not None and entry["Session"] == leader.session_id
        identity = json.loads(entry["Value"])
        assert identity["node"] == "node-a" and identity["pid"] == os.getpid()
        assert identity["service_id"] == "app-1"
        session_id = leader.session_id
        assert session_id is not None
        info = await fake.session_info(session_id)
        assert info is not None
        assert (info["Behavior"], info["NodeChecks"], info["TTL"]) == (
            "release",
            ["serfHealth"],
            "10s",
        )
    assert not leader.is_leader and leader.lost.is_set() and leader.lost_reason == "stepped down"
    entry = await _lock_entry(fake, "jobs")
    assert entry is not None and entry["Session"] is None
    assert await fake.session_info(session_id) is None


async def test_second_contender_waits_without_polling(dcy: Dcy, fake: FakeConsul) -> None:
    """A second contender waits on a blocking read of the lock (no acquire attempts, few
    reads) and leads as soon as the first steps down."""
    first = dcy.leadership("jobs", lock_delay=5)
    await first.__aenter__()
    second = dcy.leadership("jobs", lock_delay=5)
    waiting = asyncio.create_task(second.__aenter__())
    await eventually(lambda: second.holder is not None, what="the holder seen")
    await eventually(lambda: fake.in_flight >= 1, what="a blocking read")
    puts, gets = fake.calls["kv_put"], fake.calls["kv_get"]
    await asyncio.sleep(1.2)  # a few blocking waits of 0.5s, and nothing else
    assert not waiting.done()
    assert fake.calls["kv_put"] == puts
    assert fake.calls["kv_get"] - gets <= 4
    assert second.holder is not None and second.holder["pid"] == os.getpid()
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(waiting, 5)  # released, not invalidated: no lock-delay
    assert second.is_leader
    await second.__aexit__(None, None, None)


async def test_invalidated_session_loses_and_other_takes_over_after_lock_delay(
    dcy: Dcy, fake: FakeConsul
) -> None:
    """An invalidated session ends leadership (lost set, on_lost called, lock freed); the
    next contender leads once the lock-delay has passed."""
    calls: list[str | None] = []
    first = dcy.leadership(
        "jobs", lock_delay=0.3, on_lost=lambda lead: calls.append(lead.lost_reason)
    )
    await first.__aenter__()
    second = dcy.leadership("jobs")
    waiting = asyncio.create_task(second.__aenter__())
    assert first.session_id is not None
    fake.expire_session(first.session_id)
    reason = await asyncio.wait_for(first.wait_lost(), 5)
    assert "released" in reason and not first.is_leader
    await eventually(lambda: calls == [reason], what="on_lost")
    await asyncio.wait_for(waiting, 5)
    assert second.is_leader
    await first.__aexit__(None, None, None)
    await second.__aexit__(None, None, None)


async def test_deleted_lock_key_ends_leadership(dcy: Dcy, fake: FakeConsul) -> None:
    """Deleting the lock key (an operator's hand) tells the holder it lost leadership."""
    async with dcy.leadership("jobs", lock_delay=0) as leader:
        await dcy.kv.delete(leader.key)
        reason = await asyncio.wait_for(leader.wait_lost(), 5)
        assert "deleted" in reason


async def test_an_outage_shorter_than_the_validity_keeps_leadership(
    dcy: Dcy, fake: FakeConsul
) -> None:
    """An unreachable agent only marks the lock stale: renewals are retried, and a holder
    whose renewal succeeds again within the session's validity never loses leadership."""
    leader = Leadership(
        dcy.api, dcy.engine, fake_agent(dcy), "jobs", renew_interval=0.05, validity=2.0
    )
    async with leader:
        renewals = fake.calls["session_renew"]
        fake.set_unavailable()
        await eventually(lambda: fake.calls["session_renew"] >= renewals + 3, what="retries")
        assert leader.is_leader and not leader.lost.is_set()
        fake.set_unavailable(False)
        back = fake.calls["session_renew"]
        await eventually(lambda: fake.calls["session_renew"] > back + 2, what="renewed again")
        # Past the validity counted from the last renewal before the outage: still leading.
        await asyncio.sleep(leader.validity)
        assert leader.is_leader and not leader.lost.is_set()


async def test_an_outage_longer_than_the_validity_ends_leadership(
    dcy: Dcy, fake: FakeConsul
) -> None:
    """With no renewal for the session's validity, the holder can no longer be sure it
    holds the lock: it loses leadership, saying why."""
    leader = Leadership(
        dcy.api, dcy.engine, fake_agent(dcy), "jobs", renew_interval=0.05, validity=0.5
    )
    async with leader:
        fake.set_unavailable()
        reason = await asyncio.wait_for(leader.wait_lost(), 5)
        assert "no renewal" in reason and "unavailable" in reason
        fake.set_unavailable(False)


async def test_a_refused_renewal_ends_leadership_at_once(dcy: Dcy, fake: FakeConsul) -> None:
    """An ACL refusal of a renewal is never retried: the holder loses at once."""
    leader = Leadership(
        dcy.api, dcy.engine, fake_agent(dcy), "jobs", renew_interval=0.05, validity=60.0
    )
    async with leader:
        fake.deny_methods = {"session_renew"}
        reason = await asyncio.wait_for(leader.wait_lost(), 5)
        assert "refused to renew" in reason
        fake.deny_methods = set()


async def test_failed_node_check_ends_leadership(dcy: Dcy, fake: FakeConsul) -> None:
    """serfHealth going critical invalidates the session: the holder loses, and no new
    session can be made until the node is healthy again."""
    async with dcy.leadership("jobs", lock_delay=0) as leader:
        fake.fail_node()
        reason = await asyncio.wait_for(leader.wait_lost(), 5)
        assert "released" in reason
        with pytest.raises(ConsulError, match="critical state"):
            async with dcy.leadership("jobs"):
                pass
        fake.heal_node()
        async with dcy.leadership("jobs") as again:
            assert again.is_leader


async def test_session_bound_to_a_service_check(dcy: Dcy, fake: FakeConsul) -> None:
    """A leadership bound to its instance's check waits while the check is critical, leads
    once it passes, and loses as soon as the check fails; another contender then leads
    after the lock-delay, long before the session's TTL would have run out."""
    registration = await dcy.register("jobs-runner", 9311, check=HttpCheck(interval=1.0))
    (check_id,) = registration.check_ids  # critical until the agent's first check
    bound = dcy.leadership(
        "jobs", lock_delay=0.2, service_id=registration.service_id, checks=registration.check_ids
    )
    other = dcy.leadership("jobs")
    entering = asyncio.create_task(bound.__aenter__())
    waiting: asyncio.Task[Leadership] | None = None
    try:
        await asyncio.sleep(0.3)  # the window: at least one refused bid, retried, not raised
        assert not entering.done() and bound.session_id is None  # waits, does not fail
        fake.set_status(registration.service_id, "passing")
        await asyncio.wait_for(entering, 5)
        assert bound.is_leader and bound.session_id is not None
        session = fake.sessions[bound.session_id]
        assert session["ServiceChecks"] == [{"ID": check_id, "Namespace": ""}]
        waiting = asyncio.create_task(other.__aenter__())
        fake.set_status(registration.service_id, "warning")  # Consul keeps the session
        await asyncio.sleep(0.2)  # the window: the fake applies a status change at once
        assert bound.is_leader and not waiting.done()
        fake.set_status(registration.service_id, "critical")
        reason = await asyncio.wait_for(bound.wait_lost(), 5)
        assert "released" in reason
        await asyncio.wait_for(waiting, 5)
        assert other.is_leader and other.holder is not None
    finally:
        for task in (entering, waiting):
            if task is not None:
                task.cancel()
        await bound.__aexit__(None, None, None)
        await other.__aexit__(None, None, None)
        await registration.deregister()


async def test_unknown_bound_check_fails_at_once(dcy: Dcy) -> None:
    """A check ID the agent does not know is a mistake to report, not a state to wait out."""
    with pytest.raises(ConsulError, match="Missing check 'service:nope'"):
        async with dcy.leadership("jobs", checks=["service:nope"]):
            pass
    with pytest.raises(TypeError, match="sequence of check IDs"):
        dcy.leadership("jobs", checks="service:nope")


async def test_acl_denied_election_fails_at_once(dcy: Dcy, fake: FakeConsul) -> None:
    """Without permission to make sessions, entering raises AclDenied instead of waiting."""
    fake.deny = True
    with pytest.raises(AclDenied):
        async with dcy.leadership("jobs"):
            pass


class VanishingSessions(FakeConsul):
    """A fake whose sessions vanish without touching the KV: only a renewal can tell."""

    async def session_renew(self, session_id: str) -> None:
        self._enter("session_renew")
        raise SessionInvalid("the session is gone", session_id=session_id)


async def test_failed_renewal_ends_leadership() -> None:
    """A renewal answering that the session is gone ends leadership."""
    fake = VanishingSessions()
    async with Dcy(api=fake, watch_options=FAST) as dcy:
        assert dcy.agent is not None
        leader = Leadership(dcy.api, dcy.engine, dcy.agent, "jobs", renew_interval=0.05)
        async with leader:
            reason = await asyncio.wait_for(leader.wait_lost(), 5)
            assert "invalidated" in reason


async def test_cancelled_contender_destroys_its_session(dcy: Dcy, fake: FakeConsul) -> None:
    """Giving up while waiting (cancel, timeout) leaves no session behind."""
    async with dcy.leadership("jobs", lock_delay=0):
        second = dcy.leadership("jobs")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await second.__aenter__()
        assert second.session_id is None and not second.is_leader
        assert len(fake.sessions) == 1


async def test_contender_recreates_a_session_it_lost_while_waiting(
    dcy: Dcy, fake: FakeConsul
) -> None:
    """A waiting contender whose session expired gets a new one and still wins later."""
    first = dcy.leadership("jobs", lock_delay=0)
    await first.__aenter__()
    second = Leadership(dcy.api, dcy.engine, fake_agent(dcy), "jobs", renew_interval=0.05)
    waiting = asyncio.create_task(second.__aenter__())
    await eventually(lambda: second.session_id is not None, what="second session")
    old = second.session_id
    assert old is not None
    fake.expire_session(old)
    await eventually(lambda: second.session_id not in (None, old), what="a new session")
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(waiting, 5)
    assert second.is_leader
    await second.__aexit__(None, None, None)


def fake_agent(dcy: Dcy) -> Any:
    assert dcy.agent is not None
    return dcy.agent


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "/jobs"}, "invalid leadership name"),
        ({"name": "a b"}, "invalid leadership name"),
        ({"name": "jobs", "ttl": 5}, "from 10s to 24h"),
        ({"name": "jobs", "lock_delay": 61}, "0 to 60"),
    ],
)
async def test_invalid_leadership_arguments(dcy: Dcy, kwargs: dict[str, Any], message: str) -> None:
    """Bad names, TTLs and lock-delays raise ValueError before anything reaches Consul."""
    with pytest.raises(ValueError, match=message):
        dcy.leadership(**kwargs)


async def test_a_lock_that_cannot_be_watched_ends_the_bid_and_the_leadership(
    dcy: Dcy, fake: FakeConsul
) -> None:
    """An ACL refusal of the lock's watch is raised to a contender (not waited on forever),
    and ends a held leadership with that reason."""
    async with dcy.leadership("jobs", lock_delay=0) as leader:
        fake.deny_methods = {"kv_get"}
        reason = await asyncio.wait_for(leader.wait_lost(), 5)
        assert "watch of the lock" in reason and "Permission denied" in reason
    with pytest.raises(AclDenied, match="kv_get"):
        await asyncio.wait_for(dcy.leadership("other").__aenter__(), 5)
    fake.deny_methods = set()
