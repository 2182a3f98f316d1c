"""dcy core against real Consul agents: registration, resolution, watches, failures, ACL, TLS."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from dcy import (
    AclDenied,
    Backoff,
    ConsulUnavailable,
    Dcy,
    HttpCheck,
    Instance,
    NoHealthyInstances,
    ServiceNotFound,
    Snapshot,
    TlsError,
    TtlCheck,
    WatchOptions,
)
from dcy._consul import HttpConsul, Index, QueryResult
from tests.harness import ConsulAgent, HealthServer, eventually
from tools.build import require_binary

pytestmark = pytest.mark.integration

# Short waits and backoff so failure tests finish in seconds, not minutes.
FAST = WatchOptions(wait=2.0, backoff=Backoff(0.05, 0.5), first_answer_timeout=3.0)


@pytest.fixture
async def dcy(consul: ConsulAgent) -> AsyncIterator[Dcy]:
    async with Dcy(consul.http_addr, watch_options=FAST) as client:
        yield client


@pytest.fixture
async def health_server() -> AsyncIterator[HealthServer]:
    server = await HealthServer().start()
    yield server
    await server.stop()


async def test_register_then_resolve(
    dcy: Dcy, health_server: HealthServer, unique_name: str
) -> None:
    """A service registered with an HTTP check resolves by name once Consul sees it passing."""
    registration = await dcy.register(unique_name, health_server.port, tags=["v1"], meta={"k": "v"})
    instance = await eventually(lambda: _first(dcy, unique_name), what="passing instance")
    assert instance.id == registration.service_id
    assert (instance.address, instance.port) == ("127.0.0.1", health_server.port)
    assert instance.tags == ("v1",) and dict(instance.meta) == {"k": "v"}
    assert instance.status == "passing" and instance.datacenter == "dc1"
    check = next(c for c in instance.checks if c.service_id == registration.service_id)
    assert check.name == f"{unique_name} HTTP /health" and "GET http://127.0.0.1" in check.notes


async def test_change_reaches_subscribers(dcy: Dcy, consul: ConsulAgent, unique_name: str) -> None:
    """Registering a second instance wakes a subscriber with both instances."""
    seen: list[Snapshot[Any]] = []
    subscription = dcy.subscribe(unique_name, seen.append)
    await dcy.register(unique_name, 7001, service_id=f"{unique_name}-a", check="ttl")
    await dcy.register(unique_name, 7002, service_id=f"{unique_name}-b", check="ttl")
    await eventually(lambda: seen and len(seen[-1].value) == 2, what="two instances seen")
    assert {i.port for i in seen[-1].value} == {7001, 7002}
    await subscription.aclose()


async def test_failing_check_removes_instance_from_pick(
    dcy: Dcy, health_server: HealthServer, unique_name: str
) -> None:
    """An instance whose HTTP check fails is no longer picked; it comes back when it heals."""
    check = HttpCheck(interval=0.5, timeout=0.5)
    await dcy.register(unique_name, health_server.port, check=check)
    await eventually(lambda: _first(dcy, unique_name), what="passing")
    health_server.healthy = False
    await eventually(lambda: _raises(dcy.pick(unique_name), NoHealthyInstances), what="ejected")
    lookup = await dcy.lookup(f"{unique_name}|any")
    assert [i.status for i in lookup.instances] == ["critical"]
    health_server.healthy = True
    await eventually(lambda: _first(dcy, unique_name), what="back in rotation")


async def test_unknown_service_raises_service_not_found(dcy: Dcy, unique_name: str) -> None:
    """A name Consul has never heard of raises ServiceNotFound, not an empty answer."""
    with pytest.raises(ServiceNotFound, match=unique_name):
        await dcy.pick(unique_name)


async def test_agent_restart_reregisters_and_watches_resume(
    consul_factory: Callable[..., ConsulAgent], unique_name: str
) -> None:
    """After a dev agent restart (all state lost) the service is back and resolvable."""
    agent = consul_factory()
    async with Dcy(agent.http_addr, watch_options=FAST) as dcy:
        registration = await dcy.register(unique_name, 7100, check=TtlCheck(ttl=3))
        await eventually(lambda: _first(dcy, unique_name), what="registered")
        assert registration.registrations == 1
        agent.restart()
        await eventually(
            lambda: registration.service_id in agent.api("/v1/agent/services"),
            what="re-registration",
        )
        lookup = await eventually(lambda: _fresh_lookup(dcy, unique_name), what="fresh watch")
        assert [i.port for i in lookup.instances] == [7100]
        # The restarted dev agent forgot the service: it is back because dcy registered again.
        assert registration.registrations >= 2


async def test_consul_stopped_serves_stale_never_empty(
    consul_factory: Callable[..., ConsulAgent], unique_name: str
) -> None:
    """With the agent gone, lookups keep the last good answer, marked stale with its age."""
    agent = consul_factory()
    async with Dcy(agent.http_addr, watch_options=FAST) as dcy:
        await dcy.register(unique_name, 7200, check="ttl")
        await eventually(lambda: _first(dcy, unique_name), what="registered")
        agent.stop()
        lookup = await eventually(lambda: _stale_lookup(dcy, unique_name), what="stale mark")
        assert [i.port for i in lookup.instances] == [7200]
        assert lookup.age > 0
        assert (await dcy.pick(unique_name)).port == 7200
        await asyncio.sleep(FAST.backoff.cap * 2)  # several failed retries later: still there
        later = await dcy.lookup(unique_name)
        assert later.stale and later.instances == lookup.instances and later.age > lookup.age


async def test_first_lookup_without_consul_raises_after_bounded_wait(
    consul_factory: Callable[..., ConsulAgent], unique_name: str
) -> None:
    """A first lookup while the agent is away raises ConsulUnavailable, it does not hang."""
    agent = consul_factory()
    async with Dcy(agent.http_addr, watch_options=FAST) as dcy:
        agent.stop()
        with pytest.raises(ConsulUnavailable, match="no answer from Consul"):
            await dcy.lookup(unique_name, timeout=1.0)


async def test_connect_without_agent_raises_consul_unavailable(tmp_path: Path) -> None:
    """Opening a client with no agent at the address fails clearly after wait_for_agent."""
    from tests.harness import free_ports

    (port,) = free_ports(1)
    with pytest.raises(ConsulUnavailable, match=f"127.0.0.1:{port}"):
        async with Dcy(f"127.0.0.1:{port}", wait_for_agent=0.5):
            pass


class CountingConsul(HttpConsul):
    """The real seam, counting blocking health queries."""

    blocking = 0
    total = 0

    async def health_service(self, name: str, **kwargs: Any) -> QueryResult:
        self.total += 1
        index: Index = kwargs.get("index", 0)
        if index:
            self.blocking += 1
        return await super().health_service(name, **kwargs)


async def test_concurrent_lookups_share_one_query(consul: ConsulAgent, unique_name: str) -> None:
    """50 concurrent lookups of one name cause one query loop: one first query, one blocking."""
    from dcy import ConsulConfig

    api = CountingConsul(ConsulConfig.from_env(consul.http_addr))
    try:
        async with Dcy(api=api, watch_options=WatchOptions(wait=30)) as dcy:
            await dcy.register(unique_name, 7300, check="ttl")
            picks = await asyncio.gather(*(dcy.pick(unique_name) for _ in range(50)))
            assert {p.port for p in picks} == {7300}
            await eventually(lambda: api.blocking == 1, what="the blocking query")
            await asyncio.sleep(0.3)  # the window in which no second request may be sent
            assert (api.total, api.blocking) == (2, 1)
            assert len([w for w in dcy.engine.watches if "health" in str(w.spec)]) == 1
    finally:
        await api.aclose()


async def test_dns_and_http_paths_agree(dcy: Dcy, unique_name: str) -> None:
    """Consul DNS (A, SRV, tag and datacenter forms) returns the instances the HTTP path does."""
    for port, tags in ((7401, ["blue"]), (7402, ["green"]), (7403, ["blue"]), (7404, ["green"])):
        await dcy.register(
            unique_name, port, service_id=f"{unique_name}-{port}", tags=tags, check="ttl"
        )
    await eventually(lambda: _count(dcy, unique_name, 4), what="four instances")
    for name in (
        unique_name,
        f"blue.{unique_name}",
        f"{unique_name}.service.dc1.sd",
        f"green.{unique_name}.service.sd",
    ):
        http = {(i.address, i.port) for i in await dcy.instances(name)}
        dns = {(t.address, t.port) for t in await dcy.dns.srv(name)}
        assert dns == http and http, name
    assert await dcy.dns.addresses(unique_name) == ("127.0.0.1",)
    with pytest.raises(ServiceNotFound):
        await dcy.dns.srv(f"{unique_name}-missing")


ACL_HCL = (
    'acl { enabled = true\n default_policy = "deny"\n '
    'tokens { initial_management = "root-secret"\n agent = "root-secret" } }'
)


async def test_acl_agent_works_with_token_and_denies_without(
    consul_factory: Callable[..., ConsulAgent], unique_name: str
) -> None:
    """With default-deny ACLs, the token lets dcy register and resolve; no token → AclDenied."""
    agent = consul_factory(hcl=[ACL_HCL], token="root-secret")
    async with Dcy(agent.http_addr, token="root-secret", watch_options=FAST) as dcy:
        await dcy.register(unique_name, 7500, check="ttl")
        assert (await eventually(lambda: _first(dcy, unique_name))).port == 7500
    with pytest.raises(AclDenied, match="Permission denied"):
        async with Dcy(agent.http_addr, token="", watch_options=FAST):
            pass


async def test_acl_token_from_environment(
    consul_factory: Callable[..., ConsulAgent], unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN configure the client like Consul's CLI."""
    agent = consul_factory(hcl=[ACL_HCL], token="root-secret")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", agent.url)
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "root-secret")
    async with Dcy(watch_options=FAST) as dcy:
        await dcy.register(unique_name, 7501, check="ttl")
        assert (await eventually(lambda: _first(dcy, unique_name))).port == 7501


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """A CA and a server certificate for dc1/sd, made by `consul tls` for this test."""
    consul = str(require_binary("consul"))
    folder = tmp_path / "tls"
    folder.mkdir()

    def run(*args: str) -> None:
        subprocess.run([consul, "tls", *args], cwd=folder, check=True, capture_output=True)

    run("ca", "create", "-domain", "sd")
    run("cert", "create", "-server", "-dc", "dc1", "-domain", "sd")
    return {
        "ca": folder / "sd-agent-ca.pem",
        "cert": folder / "dc1-server-sd-0.pem",
        "key": folder / "dc1-server-sd-0-key.pem",
    }


async def test_tls_agent_with_cacert_works_and_fails_clearly_without(
    consul_factory: Callable[..., ConsulAgent],
    tls_files: dict[str, Path],
    unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over HTTPS, CONSUL_CACERT makes dcy trust the agent; without it, a TlsError says why."""
    hcl = (
        f'tls {{ defaults {{ ca_file = "{tls_files["ca"]}"\n cert_file = "{tls_files["cert"]}"\n'
        f' key_file = "{tls_files["key"]}"\n verify_incoming = false }} }}'
    )
    agent = consul_factory(hcl=[hcl], https=True)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", agent.https_url)
    monkeypatch.setenv("CONSUL_CACERT", str(tls_files["ca"]))
    async with Dcy(watch_options=FAST) as dcy:
        assert dcy.config.scheme == "https"
        await dcy.register(unique_name, 7600, check="ttl")
        assert (await eventually(lambda: _first(dcy, unique_name))).port == 7600
    monkeypatch.delenv("CONSUL_CACERT")
    with pytest.raises(TlsError, match="CONSUL_CACERT"):
        async with Dcy(watch_options=FAST, wait_for_agent=2):
            pass


# -- helpers ---------------------------------------------------------------------------------
async def _first(dcy: Dcy, name: str) -> Instance | None:
    instances = await dcy.instances(name)
    return instances[0] if instances else None


async def _count(dcy: Dcy, name: str, count: int) -> bool:
    return len(await dcy.instances(name)) == count


async def _fresh_lookup(dcy: Dcy, name: str) -> Any:
    lookup = await dcy.lookup(name)
    return lookup if not lookup.stale and lookup.instances else None


async def _stale_lookup(dcy: Dcy, name: str) -> Any:
    lookup = await dcy.lookup(name)
    return lookup if lookup.stale else None


async def _raises(awaitable: Any, error: type[BaseException]) -> bool:
    try:
        await awaitable
    except error:
        return True
    return False
