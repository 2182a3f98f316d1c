"""The HTTP client's pure logic: which hosts are services, retry rules, ejection, choice."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

import dcy._http_routing as routing
from dcy import (
    AllInstancesFailed,
    Backoff,
    Dcy,
    InvalidName,
    NoHealthyInstances,
    ServiceNotFound,
    ServiceQuery,
    WatchOptions,
)
from dcy._http_balancing import Endpoint, Outliers, Pool
from dcy._http_retry import may_retry, replayable
from dcy._http_routing import Route, Router, route_for, split_origin
from dcy.testing import FakeConsul
from tests.harness import eventually

FAST = WatchOptions(wait=0.3, min_interval=0, backoff=Backoff(0.01, 0.05))

# -- which hosts name a service --------------------------------------------------------------


def _route(query: str, prefix: str) -> Route:
    return Route(ServiceQuery.parse(query), prefix)


@pytest.mark.parametrize(
    ("origin", "route"),
    [
        ("http://worker", _route("worker", "http://")),
        ("https://worker", _route("worker", "https://")),
        ("HTTP://Worker", _route("worker", "http://")),
        ("http://user:secret@worker", _route("worker", "http://user:secret@")),
        ("http://worker.service.sd", _route("worker", "http://")),
        ("http://worker.service.sd.", _route("worker", "http://")),
        ("http://worker.service.dc2.sd", _route("worker@dc2", "http://")),
        ("http://v2.worker.service.sd", _route("v2.worker", "http://")),
        ("http://_worker._tcp.service.sd", _route("worker", "http://")),
        ("http://nsq-lookupd-1", _route("nsq-lookupd-1", "http://")),
    ],
)
def test_service_hosts_route_to_their_query(origin: str, route: Route) -> None:
    """Single labels and the Consul DNS form name a service, tag and datacenter included."""
    assert route_for(origin, domain="sd") == route


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost",
        "http://LOCALHOST",
        "http://localhost.localdomain",
        "http://example.com",
        "http://v2.worker",  # a real hostname too: tags need the DNS form
        "http://127.0.0.1",
        "http://10.1.2.3:7102",
        "http://[::1]",
        "http://[::1]:8080",
        "http://worker:7102",  # explicit port: an address (docker-compose style)
        "http://2130706433",  # integer IPv4
        "http://under_score",  # not a hostname
        "http://-dash",
        "http://worker.service.consul",  # another domain than the agent's
        "ftp://worker",
        "",
    ],
)
def test_real_hosts_pass_through(origin: str) -> None:
    """Dotted names, IPs, explicit ports, localhost, other schemes and domains are untouched."""
    assert route_for(origin, domain="sd") is None


def test_the_agent_domain_decides_the_dns_form() -> None:
    """With domain "consul", worker.service.consul is the service and .sd is a real host."""
    assert route_for("http://worker.service.consul", domain="consul") == _route("worker", "http://")
    assert route_for("http://worker.service.sd", domain="consul") is None


def test_external_hosts_are_never_services() -> None:
    """Names listed in external_hosts pass through, like localhost."""
    router = Router(domain="sd", external_hosts=["Consul", "nsqd."])
    assert router.route("http://consul/v1/status/leader") is None
    assert router.route("http://nsqd/ping") is None
    assert router.route("http://worker/x") == (_route("worker", "http://"), "/x")


def test_malformed_dns_service_name_raises() -> None:
    """A host that can only mean a service but is malformed fails loudly, not in DNS."""
    with pytest.raises(InvalidName, match=r"a\.b\.c\.service\.sd"):
        route_for("http://a.b.c.service.sd", domain="sd")


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("http://worker/square?x=3#top", ("http://worker", "/square?x=3#top")),
        ("http://worker", ("http://worker", "")),
        ("http://worker?x=1", ("http://worker", "?x=1")),
        ("http://worker#frag", ("http://worker", "#frag")),
        ("http://u:p@worker/a/b", ("http://u:p@worker", "/a/b")),
        ("/relative/path", ("", "/relative/path")),
    ],
)
def test_split_origin(url: str, parts: tuple[str, str]) -> None:
    """A URL splits into scheme://authority and the rest, whatever follows the host."""
    assert split_origin(url) == parts


def test_router_classifies_each_origin_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many URLs on one origin parse the host once: the route is memoised."""
    calls: list[str] = []
    real = routing.route_for

    def counting(origin: str, **kwargs: Any) -> Route | None:
        calls.append(origin)
        return real(origin, **kwargs)

    monkeypatch.setattr(routing, "route_for", counting)
    router = Router(domain="sd")
    routes = [router.route(f"http://worker/square?x={i}") for i in range(100)]
    assert calls == ["http://worker"]
    assert routes[0] is not None and all(r is not None and r[0] is routes[0][0] for r in routes)
    assert routes[7] is not None and routes[7][1] == "/square?x=7"


# -- retry rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE", "get"])
def test_idempotent_methods_may_be_retried_after_sending(method: str) -> None:
    """Idempotent methods may be sent again even when the first try reached the wire."""
    assert may_retry(method, {}, sent=True) and may_retry(method, {}, sent=False)


@pytest.mark.parametrize("method", ["POST", "PATCH", "post", "CONNECT"])
def test_non_idempotent_methods_retry_only_when_nothing_was_sent(method: str) -> None:
    """POST and PATCH are retried after a failed connect, never once the request was sent."""
    assert may_retry(method, {"json": [1]}, sent=False)
    assert not may_retry(method, {"json": [1]}, sent=True)


def test_only_bodies_that_can_be_sent_twice_are_replayable() -> None:
    """Bytes, text, forms and json bodies can be re-sent; a stream cannot."""
    assert replayable({}) and replayable({"json": {"a": 1}})
    assert replayable({"data": b"x"}) and replayable({"data": "x"})
    assert replayable({"data": {"k": "v"}}) and replayable({"data": [("k", "v")]})

    async def stream() -> AsyncIterator[bytes]:
        yield b"x"

    body = stream()
    assert not replayable({"data": body})
    assert not may_retry("PUT", {"data": body}, sent=False)


# -- outlier ejection -------------------------------------------------------------------------


def _pool(*hostports: str) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(h) for h in hostports)


def test_ejected_after_consecutive_failures_for_a_while() -> None:
    """eject_after consecutive failures eject an endpoint until eject_for has passed."""
    a, b = pool = _pool("a:1", "b:1")
    rule = Outliers(eject_after=3, eject_for=10.0)
    assert not rule.failed(a, pool, now=100.0)
    assert not rule.failed(a, pool, now=100.1)
    assert rule.failed(a, pool, now=100.2)
    assert a.ejected_until == pytest.approx(110.2)
    assert not rule.failed(a, pool, now=101.0)  # already out: the clock does not restart
    assert a.ejected_until == pytest.approx(110.2) and b.ejected_until == 0.0


def test_a_success_resets_the_failure_count() -> None:
    """Failures must be consecutive: one success in between starts the count again."""
    a, _ = pool = _pool("a:1", "b:1")
    rule = Outliers(eject_after=2, eject_for=5.0)
    rule.failed(a, pool, now=1.0)
    Outliers.succeeded(a)
    assert not rule.failed(a, pool, now=2.0)
    assert rule.failed(a, pool, now=3.0)


def test_the_last_available_endpoint_is_never_ejected() -> None:
    """With every other endpoint ejected, the last one stays in rotation however it fails."""
    a, b = pool = _pool("a:1", "b:1")
    rule = Outliers(eject_after=1, eject_for=5.0)
    assert rule.failed(a, pool, now=1.0)
    assert not rule.failed(b, pool, now=1.0)
    assert not rule.failed(b, pool, now=1.5)
    assert b.ejected_until == 0.0
    (single,) = _pool("c:1")
    assert not rule.failed(single, (single,), now=1.0)


def test_a_returning_endpoint_that_fails_again_is_ejected_at_once() -> None:
    """After its ejection ends, one more failure ejects it again; a success clears it."""
    a, _ = pool = _pool("a:1", "b:1")
    rule = Outliers(eject_after=3, eject_for=1.0)
    for t in (0.0, 0.1, 0.2):
        rule.failed(a, pool, now=t)
    assert rule.failed(a, pool, now=1.5)
    Outliers.succeeded(a)
    assert a.failures == 0 and a.ejected_until == 0.0


def test_outlier_settings_are_validated() -> None:
    """Nonsense thresholds fail at construction with the bad value quoted."""
    with pytest.raises(ValueError, match="eject_after"):
        Outliers(eject_after=0)
    with pytest.raises(ValueError, match="inf"):
        Outliers(eject_for=float("inf"))


# -- choosing an endpoint ---------------------------------------------------------------------


def _filled(*hostports: str) -> Pool:
    pool = Pool()
    pool.endpoints = _pool(*hostports)
    return pool


def test_round_robin_cycles_and_skips_ejected_and_excluded() -> None:
    """Round robin visits each endpoint in turn, passing over ejected and already-tried ones."""
    pool = _filled("a:1", "b:1", "c:1")
    assert [pool.choose("round_robin", (), 0.0) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    pool.endpoints[1].ejected_until = 10.0
    assert [pool.choose("round_robin", (), 0.0) for _ in range(4)] == [0, 2, 2, 0]
    assert pool.choose("round_robin", (pool.endpoints[0], pool.endpoints[2]), 0.0) == 1
    assert pool.choose("round_robin", pool.endpoints, 0.0) == -1


def test_all_ejected_falls_back_to_an_ejected_endpoint() -> None:
    """When every endpoint is ejected, one of them is still chosen: never none."""
    pool = _filled("a:1", "b:1")
    for endpoint in pool.endpoints:
        endpoint.ejected_until = 10.0
    assert pool.choose("round_robin", (), 0.0) in (0, 1)
    assert pool.choose("least_outstanding", (pool.endpoints[0],), 0.0) == 1
    assert pool.choose("round_robin", (), 11.0) in (0, 1)  # ejection over


def test_least_outstanding_prefers_the_idlest() -> None:
    """least_outstanding picks the endpoint with the fewest requests in flight."""
    pool = _filled("a:1", "b:1", "c:1")
    a, b, c = pool.endpoints
    a.in_flight, b.in_flight, c.in_flight = 4, 1, 2
    assert {pool.choose("least_outstanding", (), 0.0) for _ in range(5)} == {1}
    b.ejected_until = 5.0
    assert pool.choose("least_outstanding", (), 0.0) == 2
    assert pool.choose("least_outstanding", (c,), 0.0) == 0


def test_least_outstanding_spreads_ties_in_turn() -> None:
    """Equally idle endpoints take turns instead of the first one taking everything."""
    pool = _filled("a:1", "b:1", "c:1")
    assert [pool.choose("least_outstanding", (), 0.0) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_random_only_chooses_allowed_endpoints() -> None:
    """Random choice never returns an excluded or ejected endpoint while others remain."""
    pool = _filled("a:1", "b:1", "c:1", "d:1")
    pool.endpoints[0].ejected_until = 9.0
    excluded = (pool.endpoints[1],)
    seen = {pool.choose("random", excluded, 0.0) for _ in range(200)}
    assert seen == {2, 3}


# -- the client over FakeConsul ---------------------------------------------------------------


def _closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def fake_dcy() -> AsyncIterator[tuple[FakeConsul, Dcy]]:
    fake = FakeConsul()
    async with Dcy(api=fake, watch_options=FAST) as client:
        yield fake, client


async def test_unknown_service_raises_service_not_found(
    fake_dcy: tuple[FakeConsul, Dcy],
) -> None:
    """A URL naming a service Consul does not know raises ServiceNotFound, like pick()."""
    _, dcy = fake_dcy
    async with dcy.http_client() as client:
        with pytest.raises(ServiceNotFound, match="nosuch"):
            await client.get("http://nosuch/x")


async def test_no_passing_instance_raises_no_healthy_instances(
    fake_dcy: tuple[FakeConsul, Dcy],
) -> None:
    """A service whose only instance is critical raises NoHealthyInstances."""
    fake, dcy = fake_dcy
    fake.add_service("sick", port=_closed_port(), status="critical")
    async with dcy.http_client() as client:
        with pytest.raises(NoHealthyInstances, match="sick"):
            await client.get("http://sick/x")


async def test_refused_everywhere_raises_all_instances_failed(
    fake_dcy: tuple[FakeConsul, Dcy],
) -> None:
    """A POST refused by every instance is tried on each once, then AllInstancesFailed."""
    fake, dcy = fake_dcy
    ports = {_closed_port() for _ in range(3)}
    for port in ports:
        fake.add_service("gone", port=port, address="127.0.0.1")
    async with dcy.http_client(attempts=5) as client:
        with pytest.raises(AllInstancesFailed, match="'gone'") as caught:
            await client.post("http://gone/x", json={"n": 1})
    assert caught.value.service == "gone"
    assert sorted(i.port for i in caught.value.instances) == sorted(ports)
    assert caught.value.__cause__ is caught.value.attempts[-1][1]


async def test_pass_through_urls_never_ask_consul(fake_dcy: tuple[FakeConsul, Dcy]) -> None:
    """localhost and IP URLs go straight to aiohttp: no health query is made."""
    fake, dcy = fake_dcy
    before = sum(fake.calls.values())
    port = _closed_port()
    async with dcy.http_client() as client:
        for url in (f"http://localhost:{port}/", f"http://127.0.0.1:{port}/"):
            with pytest.raises(OSError):  # aiohttp's own ClientConnectorError
                await client.get(url)
    assert sum(fake.calls.values()) == before


async def test_client_options_are_validated(fake_dcy: tuple[FakeConsul, Dcy]) -> None:
    """A bad strategy, attempt count or budget fails at construction, quoting the value."""
    _, dcy = fake_dcy
    with pytest.raises(ValueError, match="'fastest'"):
        dcy.http_client(strategy="fastest")
    with pytest.raises(ValueError, match="attempts"):
        dcy.http_client(attempts=0)
    with pytest.raises(ValueError, match="budget"):
        dcy.http_client(budget=-1)


async def test_the_client_follows_the_resolver_cache(
    fake_dcy: tuple[FakeConsul, Dcy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance added in Consul is among those tried once the pool refreshes."""
    fake, dcy = fake_dcy
    monkeypatch.setattr("dcy._http_policy.REFRESH_EVERY", 0.0)
    first, second = _closed_port(), _closed_port()
    fake.add_service("growing", port=first, address="127.0.0.1")

    async def ports_tried() -> set[int]:
        with pytest.raises(AllInstancesFailed) as caught:
            await client.get("http://growing/x")
        return {i.port for i in caught.value.instances}

    async with dcy.http_client() as client:
        assert await ports_tried() == {first}
        fake.add_service("growing", port=second, address="127.0.0.1")

        async def both() -> bool:
            return await ports_tried() == {first, second}

        await eventually(both, what="the second instance tried")
