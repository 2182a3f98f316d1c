"""Registration against FakeConsul: validation first, payloads, heartbeats, staying registered."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from dcy import (
    AgentInfo,
    Backoff,
    Dcy,
    HttpCheck,
    InvalidName,
    NoHealthyInstances,
    ServiceNotFound,
    TcpCheck,
    TtlCheck,
    WatchOptions,
)
from dcy._register import define_service
from dcy.testing import FakeConsul

OPTIONS = WatchOptions(
    wait=0.3, min_interval=0, backoff=Backoff(0.01, 0.05), first_answer_timeout=0.5
)
AGENT = AgentInfo(
    datacenter="dc1",
    node_name="node1",
    domain="sd",
    dns_port=18600,
    dns_address="127.0.0.1",
    version="1.14.11",
    node_address="10.0.0.5",
)


async def eventually(condition: Callable[[], Any], *, timeout: float = 5.0) -> None:
    """Poll until ``condition()`` is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


async def eventually_async(condition: Callable[[], Any], *, timeout: float = 5.0) -> None:
    """Poll an async ``condition()`` until it returns truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "bad name"}, "invalid service name"),
        ({"name": "-worker"}, "invalid service name"),
        ({"name": "x" * 64}, "invalid service name"),
        ({"port": 0}, "invalid port"),
        ({"port": 65536}, "invalid port"),
        ({"port": True}, "invalid port"),
        ({"port": "80"}, "invalid port"),
        ({"port": 80.0}, "invalid port"),
        ({"check": "grpc"}, "unknown check type 'grpc'"),
        ({"check": object()}, "unknown check"),
        ({"deregister_after": 59.9}, "at least 60"),
        ({"deregister_after": float("nan")}, "deregister_after"),
        ({"deregister_after": float("inf")}, "deregister_after"),
        ({"tags": "v2"}, "tags"),
        ({"tags": ["v2", ""]}, "tags"),
        ({"tags": ["v2", 3]}, "tags"),
        ({"meta": {"zone": 1}}, "meta"),
        ({"meta": {"": "a"}}, "meta"),
        ({"liveness": TtlCheck()}, "liveness=.*use TcpCheck"),
        ({"liveness": "tcp"}, "liveness=.*use TcpCheck"),
    ],
)
async def test_invalid_registration_fails_before_reaching_consul(
    kwargs: dict[str, Any], fragment: str
) -> None:
    """Bad arguments raise ValueError naming the problem, and nothing is sent to Consul."""
    fake = FakeConsul()
    arguments: dict[str, Any] = {"name": "worker", "port": 9002} | kwargs
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        before = Counter(fake.calls)
        with pytest.raises(ValueError, match=fragment):
            await dcy.register(arguments.pop("name"), arguments.pop("port"), **arguments)
        assert fake.calls == before
        assert dcy.engine.watches == ()


def test_invalid_name_is_an_invalid_name_error() -> None:
    """A bad service name raises InvalidName, the ValueError subclass for names."""
    with pytest.raises(InvalidName, match="'under_score'"):
        define_service("under_score", 80, agent=AGENT)


# -- payloads ----------------------------------------------------------------------------------


def test_http_check_payload() -> None:
    """The default http check GETs /health on the instance and deregisters after 60s."""
    definition = define_service("web", 8080, agent=AGENT, tags=["v2"], meta={"zone": "a"})
    payload = definition.payload
    assert payload["ID"] == "web-node1-8080" == definition.service_id
    assert (payload["Name"], payload["Address"], payload["Port"]) == ("web", "10.0.0.5", 8080)
    assert (payload["Tags"], payload["Meta"]) == (["v2"], {"zone": "a"})
    check = payload["Check"]
    assert check["CheckID"] == "service:web-node1-8080" == definition.check_id
    assert check["HTTP"] == "http://10.0.0.5:8080/health"
    assert (check["Interval"], check["Timeout"]) == ("5000ms", "2000ms")
    assert check["DeregisterCriticalServiceAfter"] == "60000ms"
    assert check["Name"] and check["Notes"]


def test_http_check_with_url_and_custom_timing() -> None:
    """An HttpCheck url is used verbatim, with its own interval and timeout."""
    check = define_service(
        "web",
        8080,
        agent=AGENT,
        check=HttpCheck(url="https://web.internal/ready", interval=10, timeout=1.5),
        deregister_after=120,
    ).payload["Check"]
    assert check["HTTP"] == "https://web.internal/ready"
    assert (check["Interval"], check["Timeout"]) == ("10000ms", "1500ms")
    assert check["DeregisterCriticalServiceAfter"] == "120000ms"
    assert "https://web.internal/ready" in check["Name"]


def test_tcp_check_payload_brackets_ipv6() -> None:
    """A tcp check connects to address:port, bracketing an IPv6 address."""
    definition = define_service("db", 5432, agent=AGENT, address="::1", check="tcp")
    check = definition.payload["Check"]
    assert check["TCP"] == "[::1]:5432"
    assert check["DeregisterCriticalServiceAfter"] == "60000ms"
    assert check["Name"] and check["Notes"]
    assert "HTTP" not in check and "TTL" not in check
    assert isinstance(definition.check, TcpCheck)


def test_ttl_check_payload_starts_passing() -> None:
    """A ttl check carries its TTL, starts passing and still deregisters after a while."""
    check = define_service("job", 7000, agent=AGENT, check=TtlCheck(ttl=30)).payload["Check"]
    assert check["TTL"] == "30000ms"
    assert check["Status"] == "passing"
    assert check["DeregisterCriticalServiceAfter"] == "60000ms"
    assert check["Name"] and check["Notes"]


def test_liveness_check_payload_is_a_second_check() -> None:
    """liveness adds a TCP check beside the readiness check, under its own ID, passing from
    the start (the process registering it is there) and reaped like the other."""
    definition = define_service(
        "app", 9003, agent=AGENT, check=HttpCheck(interval=1), liveness=TcpCheck(interval=1)
    )
    ready = definition.payload["Check"]
    (alive,) = definition.payload["Checks"]
    assert ready["CheckID"] == "service:app-node1-9003"
    assert alive["CheckID"] == "service:app-node1-9003:alive"
    assert (alive["TCP"], alive["Interval"], alive["Status"]) == (
        "10.0.0.5:9003",
        "1000ms",
        "passing",
    )
    assert alive["DeregisterCriticalServiceAfter"] == "60000ms"
    assert "liveness" in alive["Name"] and "HTTP" in ready
    assert "Checks" not in define_service("app", 9003, agent=AGENT).payload


async def test_liveness_check_ids_and_health() -> None:
    """Both checks reach the agent: the instance is passing only when both pass, and
    liveness_check_ids names the one a leadership binds to."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("app", 9003, check="ttl", liveness=TcpCheck())
        sid = registration.service_id
        assert registration.liveness_check_ids == (f"service:{sid}:alive",)
        assert registration.check_ids == (f"service:{sid}", f"service:{sid}:alive")
        assert (await dcy.pick("app")).id == sid
        plain = await dcy.register("plain", 9004, check="ttl")
        assert plain.liveness_check_ids == () and plain.check_ids == (
            f"service:{plain.service_id}",
        )


def test_no_check_and_explicit_id_and_address() -> None:
    """check=None registers without a check; explicit id and address are kept."""
    definition = define_service(
        "web", 8080, agent=AGENT, check=None, service_id="web-a", address="10.9.9.9"
    )
    assert "Check" not in definition.payload
    assert (definition.service_id, definition.address) == ("web-a", "10.9.9.9")


# -- lifecycle against the fake ----------------------------------------------------------------


async def test_registered_service_is_visible_through_pick() -> None:
    """After register, pick finds the instance at the registered address and port."""
    fake = FakeConsul(node_address="10.1.1.1")
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("api", 8080, check=None, tags=["v1"])
        instance = await dcy.pick("api")
        assert instance.id == registration.service_id
        assert (instance.address, instance.port, instance.tags) == ("10.1.1.1", 8080, ("v1",))
        assert (await dcy.pick("v1.api")).id == registration.service_id


async def test_http_check_starts_critical_until_consul_checks_it() -> None:
    """A fresh http-checked instance is registered but not yet healthy (Consul's rule)."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        await dcy.register("api", 8080)
        with pytest.raises(NoHealthyInstances):
            await dcy.pick("api")
        assert (await dcy.pick("api|any")).port == 8080


async def test_ttl_heartbeat_keeps_the_check_passing() -> None:
    """The heartbeat reports passing every ttl/3, repairing a check that went critical."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("job", 7000, check=TtlCheck(ttl=0.3))
        await eventually(lambda: fake.calls["update_ttl"] >= 1)
        fake.set_status(registration.service_id, "critical", "missed a beat")

        async def healthy_again() -> bool:
            (instance,) = (await dcy.lookup("job|any")).instances
            return instance.status == "passing" and instance.checks[0].output == "alive"

        await eventually_async(healthy_again)
        beats = fake.calls["update_ttl"]
        await eventually(lambda: fake.calls["update_ttl"] >= beats + 2)


async def test_set_status_reports_and_keeps_reporting() -> None:
    """set_status on a TTL registration changes the check now and on later heartbeats."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("job", 7000, check=TtlCheck(ttl=0.3))
        await registration.set_status("warning", "backlog")
        beats = fake.calls["update_ttl"]
        await eventually(lambda: fake.calls["update_ttl"] >= beats + 2)
        (instance,) = (await dcy.lookup("job|warning")).instances
        assert instance.checks[0].output == "backlog"
        with pytest.raises(NoHealthyInstances):
            await dcy.pick("job")
        with pytest.raises(ValueError, match="invalid status"):
            await registration.set_status("ok")  # type: ignore[arg-type]


async def test_set_status_without_ttl_check_raises() -> None:
    """set_status on a registration without a TTL check is a ValueError, sent nowhere."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("api", 8080, check="http")
        with pytest.raises(ValueError, match="no TTL check"):
            await registration.set_status("passing")
        assert fake.calls["update_ttl"] == 0


async def test_forgotten_registration_comes_back() -> None:
    """When the agent forgets every service (a restart), the registration is sent again."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("api", 8080, check=None)
        await dcy.pick("api")
        fake.forget_everything()
        await eventually(lambda: registration.registrations == 2)
        assert fake.calls["register_service"] == 2
        assert (await dcy.pick("api")).id == registration.service_id


async def test_forgotten_ttl_registration_comes_back() -> None:
    """A TTL-checked registration also comes back after the agent forgot it."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("job", 7000, check=TtlCheck(ttl=0.3))
        fake.forget_everything()
        await eventually(lambda: registration.registrations >= 2)

        async def healthy() -> bool:
            return bool((await dcy.lookup("job")).instances)

        await eventually_async(healthy)


async def test_close_deregisters_and_stops_keeping() -> None:
    """Leaving `async with Dcy` deregisters every registration and stops its watch."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("api", 8080, check=TtlCheck(ttl=0.3))
        await dcy.register("api", 8081, check=None)
        assert len((await dcy.lookup("api|any")).instances) == 2
    assert fake.calls["deregister_service"] == 2
    assert (await fake.health_service("api")).body == []
    async with Dcy(api=fake, watch_options=OPTIONS) as other:
        with pytest.raises(ServiceNotFound):
            await other.pick("api")
    registrations = registration.registrations
    beats = fake.calls["update_ttl"]
    await asyncio.sleep(0.2)  # longer than a heartbeat period: none may follow
    assert (registration.registrations, fake.calls["update_ttl"]) == (registrations, beats)


async def test_deregister_is_idempotent() -> None:
    """Deregistering twice sends one deregistration."""
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=OPTIONS) as dcy:
        registration = await dcy.register("api", 8080, check=None)
        await registration.deregister()
        await registration.deregister()
        assert fake.calls["deregister_service"] == 1
        with pytest.raises(ServiceNotFound):
            await dcy.pick("api")
    assert fake.calls["deregister_service"] == 1
