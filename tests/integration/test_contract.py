"""One contract, two implementations: dcy.testing.FakeConsul must behave like a real agent
through the ConsulAPI seam, or unit tests built on the fake prove nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dcy import ConsulAPI, ConsulConfig, ConsulError, HttpConsul
from dcy.testing import FakeConsul
from tests.harness import ConsulAgent

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
    """agent_service returns the registration with a content hash, and None once gone."""
    await api.register_service(_definition(unique_name, 9106))
    present = await api.agent_service(f"{unique_name}-9106")
    assert present.body["ID"] == f"{unique_name}-9106" and present.index
    await api.deregister_service(f"{unique_name}-9106")
    absent = await api.agent_service(f"{unique_name}-9106")
    assert absent.body is None
    assert (await api.health_service(unique_name)).body == []


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
