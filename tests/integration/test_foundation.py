"""The real parts under everything: pinned Consul and NSQ builds, agents on free ports."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncresolver
import dns.rdatatype
import nsq as pynsq
import pytest
from aiohttp import web

from tests.harness import ConsulAgent, NsqCluster
from tools.build import PROGRAMS, binary_path, pinned_version, require_binary

pytestmark = pytest.mark.integration


def test_binaries_report_pinned_versions() -> None:
    """`consul version` and `nsqd --version` print exactly the pinned releases."""
    consul_out = subprocess.run(
        [str(require_binary("consul")), "version"], capture_output=True, text=True, check=True
    ).stdout
    assert consul_out.splitlines()[0] == "Consul v1.14.11"
    for name in ("nsqd", "nsqlookupd", "nsqadmin"):
        out = subprocess.run(
            [str(require_binary(name)), "--version"], capture_output=True, text=True, check=True
        ).stdout
        assert out.startswith(f"{name} v1.3.0"), out


def test_binaries_are_cached_by_pinned_version() -> None:
    """Every program lives in the per-user cache under a name carrying its pinned version."""
    pins = {p.name: pinned_version(p) for p in PROGRAMS}
    assert pins == {
        "consul": "v1.14.11",
        "nsqd": "v1.3.0",
        "nsqlookupd": "v1.3.0",
        "nsqadmin": "v1.3.0",
        "consul-template": "v0.42.1",
        "dcy-ctmpl": "v0.42.1",  # our helper, on consul-template's template package
    }
    for name, version in pins.items():
        path = binary_path(name)
        assert path.is_file(), path
        if name == "dcy-ctmpl":
            # Built from our own source too: a hash of it tells a changed helper apart.
            assert re.fullmatch(rf"{name}-{version}-[0-9a-f]{{12}}", path.name), path.name
        else:
            assert path.name == f"{name}-{version}"


def test_agent_answers_the_catalog(consul: ConsulAgent) -> None:
    """A dev agent on free ports has a leader and lists itself and the consul service."""
    nodes = consul.api("/v1/catalog/nodes")
    assert [n["Node"] for n in nodes] == [consul.node_name]
    assert "consul" in consul.api("/v1/catalog/services")
    assert consul.api("/v1/agent/self")["DebugConfig"]["DNSDomain"] == "sd"


async def test_http_check_becomes_passing(consul: ConsulAgent, unique_name: str) -> None:
    """A service registered over Consul's HTTP API with an HTTP check turns passing."""

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[-1][1])
    check = {"HTTP": f"http://127.0.0.1:{port}/health", "Interval": "1s"}
    definition = {"Name": unique_name, "Port": port, "Check": check}
    try:
        async with aiohttp.ClientSession(consul.url) as session:
            async with session.put("/v1/agent/service/register", json=definition) as response:
                assert response.status == 200
            entries: list[dict[str, Any]] = []
            for _ in range(100):
                url = f"/v1/health/service/{unique_name}?passing=1"
                async with session.get(url) as response:
                    entries = await response.json()
                if entries:
                    break
                await asyncio.sleep(0.1)
        assert [e["Service"]["Port"] for e in entries] == [port]
        assert all(c["Status"] == "passing" for c in entries[0]["Checks"])
    finally:
        await runner.cleanup()


async def test_consul_dns_answers_a_and_srv(consul: ConsulAgent, unique_name: str) -> None:
    """Consul DNS on the `sd` domain answers consul.service.sd and SRV for a service."""
    definition = {"Name": unique_name, "Port": 7123, "Address": "127.0.0.1"}
    async with aiohttp.ClientSession() as session:
        url = f"{consul.url}/v1/agent/service/register"
        async with session.put(url, json=definition) as response:
            assert response.status == 200
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = consul.dns_port
    answer = await resolver.resolve("consul.service.sd", "A")
    assert [r.to_text() for r in answer] == ["127.0.0.1"]
    srv = await resolver.resolve(f"{unique_name}.service.sd", dns.rdatatype.SRV)
    assert [r.port for r in srv] == [7123]


def test_nsq_message_travels_through_lookupd(nsq: NsqCluster) -> None:
    """A message published to nsqd over HTTP reaches a pynsq Reader that found nsqd via
    nsqlookupd."""
    urllib.request.urlopen(
        urllib.request.Request(f"http://{nsq.nsqd_http}/pub?topic=found", data=b"hello"),
        timeout=5,
    ).close()
    received: list[bytes] = []
    done = threading.Event()

    def run_reader() -> None:
        import tornado.ioloop

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        def handler(message: pynsq.Message) -> bool:
            received.append(message.body)
            done.set()
            tornado.ioloop.IOLoop.current().stop()
            return True

        pynsq.Reader(
            topic="found",
            channel="test",
            message_handler=handler,
            lookupd_http_addresses=[f"http://{nsq.lookupd_http}"],
            lookupd_poll_interval=1,
        )
        io_loop = tornado.ioloop.IOLoop.current()
        io_loop.call_later(30, io_loop.stop)
        io_loop.start()

    thread = threading.Thread(target=run_reader, daemon=True)
    thread.start()
    assert done.wait(35), f"no message; nsqd log:\n{nsq.nsqd.log_tail() if nsq.nsqd else ''}"
    assert received == [b"hello"]


def test_missing_binary_error_says_how_to_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing binary fails with the command that builds it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python3 tools/build\.py"):
        ConsulAgent(tmp_path).start()
