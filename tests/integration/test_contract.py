"""One contract, two implementations: dcy.testing.FakeConsul must behave like a real agent
through the ConsulAPI seam, or unit tests built on the fake prove nothing."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dcy import (
    AclDenied,
    CheckCritical,
    ConsulConfig,
    ConsulError,
    ConsulUnavailable,
    SessionInvalid,
    UnknownCheck,
)
from dcy._answers import (
    CHECK_CRITICAL,
    INVALID_SESSION,
    INVALID_SESSION_TTL,
    MISSING_CHECK,
    REFUSALS,
    SESSION_NOT_FOUND,
    UNKNOWN_CHECK_ID,
    UNKNOWN_SERVICE_ID,
    Refusal,
    classify,
)
from dcy._consul import ConsulAPI, HttpConsul
from dcy.testing import FakeConsul
from tests.harness import ConsulAgent, eventually

pytestmark = pytest.mark.integration


@pytest.fixture(params=["fake", "real"])
async def api(request: pytest.FixtureRequest, consul: ConsulAgent) -> AsyncIterator[ConsulAPI]:
    impl: ConsulAPI
    if request.param == "fake":
        impl = FakeConsul(datacenter="dc1", node_name=consul.node_name)
    else:
        impl = HttpConsul(ConsulConfig.from_env(consul.http_addr))
    yield impl
    await impl.aclose()


def _definition(name: str, port: int, *, status: str = "passing") -> dict[str, Any]:
    return {
        "ID": f"{name}-{port}",
        "Name": name,
        "Address": "127.0.0.2",
        "Port": port,
        "Tags": ["a", "b"],
        "Meta": {"version": "1"},
        "Check": {
            "CheckID": f"service:{name}-{port}",
            "Name": f"{name} heartbeat",
            "Notes": "reports itself",
            "TTL": "30s",
            "Status": status,
        },
    }


async def test_agent_info(api: ConsulAPI, consul: ConsulAgent) -> None:
    """agent_info names the datacenter, the node and the DNS domain."""
    info = await api.agent_info()
    assert (info.datacenter, info.node_name, info.domain) == ("dc1", consul.node_name, "sd")
    assert info.node_address == "127.0.0.1"


async def test_registered_service_appears_in_health(api: ConsulAPI, unique_name: str) -> None:
    """A registration shows up in health_service with its fields and its check."""
    await api.register_service(_definition(unique_name, 9101))
    result = await api.health_service(unique_name)
    assert isinstance(result.index, int) and result.index > 0
    (entry,) = result.body
    service = entry["Service"]
    assert (service["ID"], service["Service"], service["Address"], service["Port"]) == (
        f"{unique_name}-9101",
        unique_name,
        "127.0.0.2",
        9101,
    )
    assert service["Tags"] == ["a", "b"] and service["Meta"] == {"version": "1"}
    checks = {c["CheckID"]: c for c in entry["Checks"]}
    check = checks[f"service:{unique_name}-9101"]
    assert (check["Name"], check["Status"], check["Notes"]) == (
        f"{unique_name} heartbeat",
        "passing",
        "reports itself",
    )
    assert entry["Node"]["Datacenter"] == "dc1"


async def test_check_and_checks_register_together(api: ConsulAPI, unique_name: str) -> None:
    """A registration with a Check and a Checks list (dcy's readiness and liveness checks)
    shows both under their IDs, each with its own status."""
    definition = _definition(unique_name, 9108)
    alive = {"CheckID": f"service:{unique_name}-9108:alive", "Name": "alive", "TTL": "30s"}
    await api.register_service(definition | {"Checks": [alive | {"Status": "critical"}]})
    (entry,) = (await api.health_service(unique_name)).body
    statuses = {c["CheckID"]: c["Status"] for c in entry["Checks"] if c["ServiceID"]}
    assert statuses == {
        f"service:{unique_name}-9108": "passing",
        f"service:{unique_name}-9108:alive": "critical",
    }
    await api.deregister_service(definition["ID"])


async def test_tag_filter(api: ConsulAPI, unique_name: str) -> None:
    """health_service with a tag returns only instances carrying it."""
    await api.register_service(_definition(unique_name, 9102))
    assert len((await api.health_service(unique_name, tag="a")).body) == 1
    assert (await api.health_service(unique_name, tag="zzz")).body == []


async def test_blocking_query_returns_on_change(api: ConsulAPI, unique_name: str) -> None:
    """A query at the current index waits, and returns a higher index when the service changes."""
    await api.register_service(_definition(unique_name, 9103))
    first = await api.health_service(unique_name)
    waiting = asyncio.ensure_future(api.health_service(unique_name, index=first.index, wait=20))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await api.update_ttl(f"service:{unique_name}-9103", "warning", "slow disk")
    result = await asyncio.wait_for(waiting, 15)
    assert isinstance(result.index, int) and result.index > first.index  # type: ignore[operator]
    (entry,) = result.body
    check = next(c for c in entry["Checks"] if c["CheckID"] == f"service:{unique_name}-9103")
    assert (check["Status"], check["Output"]) == ("warning", "slow disk")


async def test_blocking_query_times_out_with_same_index(api: ConsulAPI, unique_name: str) -> None:
    """Without a change the blocking query ends after wait, with the index unchanged."""
    await api.register_service(_definition(unique_name, 9104))
    first = await api.health_service(unique_name)
    again = await api.health_service(unique_name, index=first.index, wait=0.2)
    assert again.index == first.index and again.body == first.body


async def test_catalog_services_lists_names_and_tags(api: ConsulAPI, unique_name: str) -> None:
    """catalog_services maps each service name to its tags."""
    await api.register_service(_definition(unique_name, 9105))
    result = await api.catalog_services()
    assert sorted(result.body[unique_name]) == ["a", "b"]


async def test_agent_service_present_and_absent(api: ConsulAPI, unique_name: str) -> None:
    """agent_service returns the registration with a content hash, and None once gone;
    deregistering what is gone is no error."""
    await api.register_service(_definition(unique_name, 9106))
    present = await api.agent_service(f"{unique_name}-9106")
    assert present.body["ID"] == f"{unique_name}-9106" and present.index
    await api.deregister_service(f"{unique_name}-9106")
    absent = await api.agent_service(f"{unique_name}-9106")
    assert absent.body is None
    assert (await api.health_service(unique_name)).body == []
    await api.deregister_service(f"{unique_name}-9106")  # gone already: no error


async def test_agent_service_blocks_on_hash(api: ConsulAPI, unique_name: str) -> None:
    """A hash-blocking agent_service query returns when the registration changes."""
    await api.register_service(_definition(unique_name, 9107))
    present = await api.agent_service(f"{unique_name}-9107")
    waiting = asyncio.ensure_future(
        api.agent_service(f"{unique_name}-9107", index=present.index, wait=20)
    )
    await asyncio.sleep(0.3)
    assert not waiting.done()
    changed = _definition(unique_name, 9107)
    changed["Tags"] = ["c"]
    await api.register_service(changed)
    result = await asyncio.wait_for(waiting, 15)
    assert result.index != present.index and result.body["Tags"] == ["c"]


async def test_ttl_check_starts_critical_without_status(api: ConsulAPI, unique_name: str) -> None:
    """A check registered without Status starts critical, as Consul does."""
    definition = _definition(unique_name, 9108)
    del definition["Check"]["Status"]
    await api.register_service(definition)
    (entry,) = (await api.health_service(unique_name)).body
    statuses = {c["CheckID"]: c["Status"] for c in entry["Checks"]}
    assert statuses[f"service:{unique_name}-9108"] == "critical"


async def test_update_of_unknown_check_is_an_error(api: ConsulAPI, unique_name: str) -> None:
    """Reporting to a check the agent does not know raises ConsulError (so keepers re-register)."""
    with pytest.raises(ConsulError) as caught:
        await api.update_ttl(f"service:{unique_name}-nope", "passing")
    assert caught.value.status == 404


# -- KV and sessions ---------------------------------------------------------------------------
async def _session(api: ConsulAPI, name: str, **kwargs: Any) -> str:
    options: dict[str, Any] = {"ttl": 10.0, "lock_delay": 0.0} | kwargs
    return await api.session_create(name=name, **options)


async def test_kv_missing_key_and_prefix_are_none(api: ConsulAPI, unique_name: str) -> None:
    """A missing key and an empty prefix answer None (404) with a positive index."""
    missing = await api.kv_get(f"{unique_name}/nope")
    assert missing.body is None and isinstance(missing.index, int) and missing.index >= 1
    empty = await api.kv_get(f"{unique_name}/", recurse=True)
    assert empty.body is None and isinstance(empty.index, int) and empty.index >= 1


async def test_kv_roundtrip_bytes_flags_and_indexes(api: ConsulAPI, unique_name: str) -> None:
    """Values come back as the exact bytes written (binary, empty); flags and indexes follow
    Consul: a rewrite keeps CreateIndex, raises ModifyIndex, and resets unset flags to 0."""
    key = f"{unique_name}/odd key/ü?&"
    assert await api.kv_put(key, b"\xff\x00binary", flags=42)
    (entry,) = (await api.kv_get(key)).body
    assert (entry["Key"], entry["Value"], entry["Flags"]) == (key, b"\xff\x00binary", 42)
    assert (entry["Session"], entry["LockIndex"]) == (None, 0)
    assert entry["CreateIndex"] == entry["ModifyIndex"]
    assert await api.kv_put(key, b"")
    result = await api.kv_get(key)
    (again,) = result.body
    assert (again["Value"], again["Flags"]) == (b"", 0)
    assert again["CreateIndex"] == entry["CreateIndex"] < again["ModifyIndex"] == result.index


async def test_kv_recurse_lists_the_prefix_in_key_order(api: ConsulAPI, unique_name: str) -> None:
    """recurse returns every key under the prefix, sorted, with the newest ModifyIndex."""
    for key in ("cfg/b", "cfg/a", "cfg-other", "cfg/sub/c"):
        assert await api.kv_put(f"{unique_name}/{key}", key.encode())
    result = await api.kv_get(f"{unique_name}/cfg/", recurse=True)
    keys = [e["Key"] for e in result.body]
    assert keys == [f"{unique_name}/cfg/{k}" for k in ("a", "b", "sub/c")]
    assert result.index == max(e["ModifyIndex"] for e in result.body)
    assert await api.kv_delete(f"{unique_name}/cfg/", recurse=True)
    assert (await api.kv_get(f"{unique_name}/cfg/", recurse=True)).body is None
    assert (await api.kv_get(f"{unique_name}/cfg-other")).body is not None


async def test_kv_check_and_set(api: ConsulAPI, unique_name: str) -> None:
    """cas=0 writes only a new key; cas=N writes or deletes only at ModifyIndex N."""
    key = f"{unique_name}/counter"
    assert await api.kv_put(key, b"1", cas=0)
    assert not await api.kv_put(key, b"2", cas=0)
    (entry,) = (await api.kv_get(key)).body
    assert not await api.kv_put(key, b"2", cas=entry["ModifyIndex"] + 1000)
    assert await api.kv_put(key, b"2", cas=entry["ModifyIndex"])
    assert not await api.kv_put(key, b"3", cas=entry["ModifyIndex"])  # now stale
    (entry,) = (await api.kv_get(key)).body
    assert entry["Value"] == b"2"
    assert not await api.kv_delete(key, cas=entry["ModifyIndex"] - 1)
    assert await api.kv_delete(key, cas=entry["ModifyIndex"])
    assert (await api.kv_get(key)).body is None
    assert await api.kv_delete(key)  # deleting a missing key succeeds
    assert await api.kv_delete(key, cas=5)


async def test_kv_ambiguous_writes_are_refused(api: ConsulAPI, unique_name: str) -> None:
    """Combinations Consul would resolve silently (cas with acquire, recurse with cas) raise."""
    with pytest.raises(ValueError, match="at most one"):
        await api.kv_put(f"{unique_name}/x", b"", cas=0, acquire="someone")
    with pytest.raises(ValueError, match="recursive"):
        await api.kv_delete(f"{unique_name}/", recurse=True, cas=3)


async def test_kv_blocking_get_waits_for_the_key(api: ConsulAPI, unique_name: str) -> None:
    """A blocking read of a missing key returns when it is written, and again when deleted;
    without a change it returns the same index after wait."""
    key = f"{unique_name}/flag"
    missing = await api.kv_get(key)
    unchanged = await api.kv_get(key, index=missing.index, wait=0.2)
    assert unchanged.index == missing.index and unchanged.body is None
    waiting = asyncio.ensure_future(api.kv_get(key, index=missing.index, wait=20))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await api.kv_put(key, b"on")
    written = await asyncio.wait_for(waiting, 15)
    assert written.body[0]["Value"] == b"on" and written.index > missing.index  # type: ignore[operator]
    waiting = asyncio.ensure_future(api.kv_get(key, index=written.index, wait=20))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await api.kv_delete(key)
    deleted = await asyncio.wait_for(waiting, 15)
    assert deleted.body is None and deleted.index > written.index  # type: ignore[operator]


async def test_kv_blocking_prefix_waits_for_a_key_under_it(
    api: ConsulAPI, unique_name: str
) -> None:
    """A blocking recurse read returns when a key under the prefix appears."""
    first = await api.kv_get(f"{unique_name}/dir/", recurse=True)
    waiting = asyncio.ensure_future(
        api.kv_get(f"{unique_name}/dir/", recurse=True, index=first.index, wait=20)
    )
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await api.kv_put(f"{unique_name}/dir/new", b"1")
    result = await asyncio.wait_for(waiting, 15)
    assert [e["Key"] for e in result.body] == [f"{unique_name}/dir/new"]


async def test_session_lock_acquire_and_release(api: ConsulAPI, unique_name: str) -> None:
    """Only one session holds a lock; re-acquiring keeps LockIndex; a plain write keeps the
    holder; only the holder releases; the next holder raises LockIndex."""
    key = f"{unique_name}/lock"
    one, two = await _session(api, "one"), await _session(api, "two")
    try:
        assert await api.kv_put(key, b"one", acquire=one)
        assert not await api.kv_put(key, b"two", acquire=two)
        assert await api.kv_put(key, b"one again", acquire=one)
        (entry,) = (await api.kv_get(key)).body
        assert (entry["Session"], entry["LockIndex"], entry["Value"]) == (one, 1, b"one again")
        assert await api.kv_put(key, b"plain")
        assert (await api.kv_get(key)).body[0]["Session"] == one
        assert not await api.kv_put(key, b"", release=two)
        assert await api.kv_put(key, b"released", release=one)
        (entry,) = (await api.kv_get(key)).body
        assert (entry["Session"], entry["Value"]) == (None, b"released")
        assert await api.kv_put(key, b"two", acquire=two)
        (entry,) = (await api.kv_get(key)).body
        assert (entry["Session"], entry["LockIndex"]) == (two, 1)
    finally:
        await api.session_destroy(one)
        await api.session_destroy(two)


async def test_destroyed_session_releases_its_lock_after_lock_delay(
    api: ConsulAPI, unique_name: str
) -> None:
    """Invalidating a holder (behavior release) frees the key, wakes a blocking read, and
    refuses other sessions until its lock-delay has passed."""
    key = f"{unique_name}/leader"
    holder = await _session(api, "holder", lock_delay=3.0)
    other = await _session(api, "other")
    try:
        assert await api.kv_put(key, b"holder", acquire=holder)
        held = await api.kv_get(key)
        waiting = asyncio.ensure_future(api.kv_get(key, index=held.index, wait=20))
        await api.session_destroy(holder)
        (freed,) = (await asyncio.wait_for(waiting, 15)).body
        assert (freed["Session"], freed["Value"]) == (None, b"holder")
        assert not await api.kv_put(key, b"other", acquire=other)  # within the lock-delay
        await eventually(
            lambda: api.kv_put(key, b"other", acquire=other), what="acquire after lock-delay"
        )
        assert (await api.kv_get(key)).body[0]["Session"] == other
    finally:
        await api.session_destroy(holder)
        await api.session_destroy(other)


async def test_released_lock_has_no_lock_delay(api: ConsulAPI, unique_name: str) -> None:
    """Releasing before destroying the session (a graceful step-down) lets others in at once."""
    key = f"{unique_name}/leader"
    holder = await _session(api, "holder", lock_delay=30.0)
    other = await _session(api, "other")
    try:
        assert await api.kv_put(key, b"holder", acquire=holder)
        assert await api.kv_put(key, b"", release=holder)
        await api.session_destroy(holder)
        assert await api.kv_put(key, b"other", acquire=other)
    finally:
        await api.session_destroy(other)


async def test_session_behavior_delete_removes_held_keys(api: ConsulAPI, unique_name: str) -> None:
    """A session with behavior delete takes the keys it holds with it."""
    key = f"{unique_name}/ephemeral"
    session = await _session(api, "ephemeral", behavior="delete")
    assert await api.kv_put(key, b"x", acquire=session)
    await api.session_destroy(session)
    assert (await api.kv_get(key)).body is None


async def test_session_info_renew_and_destroy(
    api: ConsulAPI, unique_name: str, consul: ConsulAgent
) -> None:
    """A session reports its settings, renews while it exists, and is gone after destroy:
    renew raises SessionInvalid, info is None, and destroying it again is no error."""
    session = await _session(api, unique_name, ttl=15.0, lock_delay=2.0)
    info = await api.session_info(session)
    assert info is not None
    assert (info["ID"], info["Name"], info["Node"]) == (session, unique_name, consul.node_name)
    assert (info["TTL"], info["LockDelay"], info["Behavior"]) == ("15s", 2_000_000_000, "release")
    assert info["NodeChecks"] == ["serfHealth"]
    await api.session_renew(session)
    await api.session_destroy(session)
    assert await api.session_info(session) is None
    with pytest.raises(SessionInvalid) as refused:
        await api.session_renew(session)
    assert refused.value.session_id == session
    await api.session_destroy(session)


async def test_session_refusals_are_consul_errors(api: ConsulAPI, unique_name: str) -> None:
    """Acquiring with an unknown session, a TTL under 10s or an unknown node check are
    refusals (ConsulError), not outages to retry."""
    with pytest.raises(ConsulError, match="invalid session") as caught:
        await api.kv_put(f"{unique_name}/k", b"", acquire="00000000-0000-0000-0000-000000000000")
    assert not isinstance(caught.value, ConsulUnavailable)
    with pytest.raises(ConsulError, match="TTL"):
        await _session(api, "short", ttl=5.0)
    with pytest.raises(ConsulError, match="Missing check"):
        await _session(api, "unchecked", node_checks=("no-such-check",))
    with pytest.raises(ValueError, match="behavior"):
        await _session(api, "odd", behavior="explode")


async def test_session_bound_to_service_checks(api: ConsulAPI, unique_name: str) -> None:
    """ServiceChecks: refused while the check is critical, listed by session_info, kept on a
    warning and on re-registration, invalidated (lock released) when the check goes critical
    or is deregistered."""
    definition = _definition(unique_name, 9401)
    del definition["Check"]["Status"]  # a new TTL check starts critical
    check_id = definition["Check"]["CheckID"]
    await api.register_service(definition)
    key = f"{unique_name}/leader"
    try:
        with pytest.raises(ConsulError, match=f"Check '{check_id}' is in critical state"):
            await _session(api, "bound", service_checks=(check_id,))
        await api.update_ttl(check_id, "passing")
        session = await _session(api, "bound", service_checks=(check_id,))
        info = await api.session_info(session)
        assert info is not None
        assert [c["ID"] for c in info["ServiceChecks"]] == [check_id]
        assert info["NodeChecks"] == ["serfHealth"]
        assert await api.kv_put(key, b"bound", acquire=session)
        await api.update_ttl(check_id, "warning")
        assert await api.session_info(session) is not None
        await api.update_ttl(check_id, "passing")
        await api.register_service(definition)  # the agent keeps the check's status
        changed = {**definition, "Check": {**definition["Check"], "TTL": "40s"}}
        await api.register_service(changed)  # even with the check changed
        assert await api.session_info(session) is not None
        held = await api.kv_get(key)
        waiting = asyncio.ensure_future(api.kv_get(key, index=held.index, wait=20))
        await api.update_ttl(check_id, "critical")
        (freed,) = (await asyncio.wait_for(waiting, 15)).body
        assert freed["Session"] is None
        assert await api.session_info(session) is None

        await api.update_ttl(check_id, "passing")
        again = await _session(api, "bound again", service_checks=(check_id,))
        await api.deregister_service(definition["ID"])
        await eventually(
            lambda: _gone(api, again), what="session ended with its check's deregistration"
        )
    finally:
        await api.deregister_service(definition["ID"])


async def _gone(api: ConsulAPI, session: str) -> bool:
    return await api.session_info(session) is None


# -- health states and datacenters -------------------------------------------------------------


def _checks_of(body: Any, service: str) -> dict[str, dict[str, Any]]:
    return {c["CheckID"]: c for c in body if c["ServiceName"] == service}


async def test_health_state_lists_every_check_with_its_fields(
    api: ConsulAPI, unique_name: str, consul: ConsulAgent
) -> None:
    """health_state("any") holds each service check with node, service, status and output."""
    await api.register_service(_definition(unique_name, 9201))
    await api.update_ttl(f"service:{unique_name}-9201", "warning", "slow disk")
    result = await api.health_state("any")
    assert isinstance(result.index, int) and result.index > 0
    (check,) = _checks_of(result.body, unique_name).values()
    assert (check["CheckID"], check["Name"], check["Notes"]) == (
        f"service:{unique_name}-9201",
        f"{unique_name} heartbeat",
        "reports itself",
    )
    assert (check["Status"], check["Output"]) == ("warning", "slow disk")
    assert (check["Node"], check["ServiceID"]) == (consul.node_name, f"{unique_name}-9201")


async def test_health_state_filters_by_state(api: ConsulAPI, unique_name: str) -> None:
    """health_state("critical") lists only critical checks, "passing" only passing ones; an
    unknown state is a ValueError before anything reaches Consul."""
    await api.register_service(_definition(unique_name, 9202))
    await api.register_service(_definition(unique_name, 9203, status="critical"))
    critical = _checks_of((await api.health_state("critical")).body, unique_name)
    passing = _checks_of((await api.health_state("passing")).body, unique_name)
    assert list(critical) == [f"service:{unique_name}-9203"]
    assert list(passing) == [f"service:{unique_name}-9202"]
    with pytest.raises(ValueError, match="bogus"):
        await api.health_state("bogus")


async def test_health_state_blocks_until_a_check_changes(api: ConsulAPI, unique_name: str) -> None:
    """A health_state query at the current index returns a higher index once a check changes."""
    await api.register_service(_definition(unique_name, 9204))
    first = await api.health_state("any")
    waiting = asyncio.ensure_future(api.health_state("any", index=first.index, wait=20))
    # Let the query reach the agent and park. Not asserted: other tests' checks on this
    # shared agent may legitimately wake it (followed below).
    await asyncio.sleep(0.3)
    await api.update_ttl(f"service:{unique_name}-9204", "critical", "gone")
    result = await asyncio.wait_for(waiting, 15)
    assert isinstance(result.index, int) and result.index > first.index  # type: ignore[operator]
    # Other checks of the shared agent may have moved the index first: follow it to ours.
    while _checks_of(result.body, unique_name)[f"service:{unique_name}-9204"]["Status"] != (
        "critical"
    ):
        result = await api.health_state("any", index=result.index, wait=5)
    assert _checks_of(result.body, unique_name)[f"service:{unique_name}-9204"]["Output"] == "gone"


async def test_catalog_datacenters_lists_the_local_one(api: ConsulAPI) -> None:
    """A lone agent knows exactly one datacenter: its own."""
    assert await api.catalog_datacenters() == ["dc1"]


async def test_coordinate_datacenters_gives_servers_coordinates(api: ConsulAPI) -> None:
    """coordinate_datacenters has the local datacenter, its server at an 8-dimensional
    coordinate with a height and an adjustment."""
    areas = await eventually(api.coordinate_datacenters, what="coordinates")
    (area,) = areas
    assert (area["Datacenter"], area["AreaID"]) == ("dc1", "wan")
    (server,) = area["Coordinates"]
    coordinate = server["Coord"]
    assert len(coordinate["Vec"]) == 8 and coordinate["Height"] >= 0
    assert isinstance(coordinate["Adjustment"], int | float)


# -- Consul's refusals, classified once (dcy._answers) -----------------------------------------
UNKNOWN_SESSION = "3e5e4a3c-1b2d-4a5e-9f0a-111111111111"


async def _provoke(api: ConsulAPI, refusal: Refusal, name: str) -> None:
    """Make the seam meet ``refusal``."""
    if refusal is SESSION_NOT_FOUND:
        await api.session_renew(UNKNOWN_SESSION)
    elif refusal is INVALID_SESSION:
        await api.kv_put(f"{name}/lock", b"", acquire=UNKNOWN_SESSION)
    elif refusal is MISSING_CHECK:
        await _session(api, name, node_checks=("serfHealth",), service_checks=("nope",))
    elif refusal is CHECK_CRITICAL:
        await api.register_service(_definition(name, 9140, status="critical"))
        await _session(api, name, service_checks=(f"service:{name}-9140",))
    elif refusal is UNKNOWN_CHECK_ID:
        await api.update_ttl("nope", "passing")
    elif refusal is INVALID_SESSION_TTL:
        await _session(api, name, ttl=5.0)
    else:
        raise AssertionError(f"no provocation for {refusal}")


# What each refusal becomes, with the field it carries (the one the seam swallows aside).
EXPECTED: dict[Refusal, tuple[type[ConsulError], str, str]] = {
    SESSION_NOT_FOUND: (SessionInvalid, "session_id", UNKNOWN_SESSION),
    INVALID_SESSION: (SessionInvalid, "session_id", UNKNOWN_SESSION),
    MISSING_CHECK: (UnknownCheck, "check_id", "nope"),
    CHECK_CRITICAL: (CheckCritical, "check_id", "service:{name}-9140"),
    UNKNOWN_CHECK_ID: (UnknownCheck, "check_id", "nope"),
    INVALID_SESSION_TTL: (ConsulError, "", ""),
}


def test_every_refusal_of_the_table_is_provoked_here() -> None:
    """A refusal added to the table comes with its provocation (the seam swallows only
    UNKNOWN_SERVICE_ID: deregistering an unknown service is no error)."""
    assert set(REFUSALS) == {*EXPECTED, UNKNOWN_SERVICE_ID}


@pytest.mark.parametrize("refusal", list(EXPECTED), ids=lambda r: r.core.split("{")[0].strip())
async def test_refusals_raise_their_typed_error(
    api: ConsulAPI, refusal: Refusal, unique_name: str
) -> None:
    """Through the seam, fake and real raise the same class with the same field, and never
    an outage (which would be retried)."""
    error, field, value = EXPECTED[refusal]
    with pytest.raises(ConsulError) as caught:
        await _provoke(api, refusal, unique_name)
    assert type(caught.value) is error and not caught.value.transient
    assert caught.value.status == refusal.status
    if field:
        assert getattr(caught.value, field) == value.format(name=unique_name)


def _raw(consul: ConsulAgent, method: str, path: str, body: Any = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(consul.url + path, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_table_words_refusals_as_the_real_agent_does(
    consul: ConsulAgent, unique_name: str
) -> None:
    """Each refusal of the table, provoked on a real agent over plain HTTP: the status and the
    text are exactly the table's (so the fake says what Consul says), and classify() turns
    the answer into the table's error with its field filled in."""
    check = f"service:{unique_name}-9141"
    _raw(
        consul,
        "PUT",
        "/v1/agent/service/register",
        _definition(unique_name, 9141, status="critical"),
    )
    cases: list[tuple[Refusal, tuple[str, str, Any], dict[str, str]]] = [
        (SESSION_NOT_FOUND, ("PUT", f"/v1/session/renew/{UNKNOWN_SESSION}", None),
         {"session_id": UNKNOWN_SESSION}),
        (INVALID_SESSION, ("PUT", f"/v1/kv/{unique_name}?acquire={UNKNOWN_SESSION}", "x"),
         {"session_id": UNKNOWN_SESSION}),
        (MISSING_CHECK, ("PUT", "/v1/session/create", {"ServiceChecks": [{"ID": "nope"}]}),
         {"check_id": "nope"}),
        (CHECK_CRITICAL, ("PUT", "/v1/session/create", {"ServiceChecks": [{"ID": check}]}),
         {"check_id": check}),
        (UNKNOWN_CHECK_ID, ("PUT", "/v1/agent/check/update/nope", {"Status": "passing"}),
         {"check_id": "nope"}),
        (UNKNOWN_SERVICE_ID, ("PUT", "/v1/agent/service/deregister/nope", None),
         {"service_id": "nope"}),
        (INVALID_SESSION_TTL, ("PUT", "/v1/session/create", {"TTL": "5s"}),
         {"nanoseconds": "5000000000"}),
    ]  # fmt: skip
    assert {refusal for refusal, _, _ in cases} == set(REFUSALS)
    for refusal, (method, path, body), fields in cases:
        status, text = _raw(consul, method, path, body)
        assert (status, text.strip()) == (refusal.status, refusal.answer(**fields)), refusal
        error = classify(status, text, operation=f"{method} {path}", address=consul.http_addr)
        assert type(error) is refusal.error
        for name, value in fields.items():
            if hasattr(error, name):
                assert getattr(error, name) == value


def test_statuses_outside_the_table_are_classified_by_status() -> None:
    """Elections and overload are outages (retried); ACL refusals and bad requests are not."""
    cases = [
        (500, "No cluster leader", ConsulUnavailable),
        (500, "rpc error making call: dial tcp 127.0.0.1:8300: connect: connection refused",
         ConsulUnavailable),
        (429, "Your IP is issuing too many concurrent connections", ConsulUnavailable),
        (503, "", ConsulUnavailable),
        (403, "Permission denied: token lacks permission 'key:read' on \"x\"", AclDenied),
        (403, "ACL not found", AclDenied),
        (400, "Missing service name", ConsulError),
        (404, "no such thing", ConsulError),
    ]  # fmt: skip
    for status, text, expected in cases:
        error = classify(status, text, operation="GET /v1/x", address="127.0.0.1:18500")
        assert type(error) is expected, (status, text)
        assert error.transient is (expected is ConsulUnavailable)
        assert getattr(error, "status", None) == status
