"""Issue 16's scenario, shared by the library and dcy-template tests: 300 services on an agent
with Consul's default limits (200 connections per client address), a series of changes every
watcher must see, and a probe client on the same address that must never be refused."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dcy._sockets import count_connections
from tests.harness import ConsulAgent, TlsFiles, eventually
from tools.build import require_binary

SERVICES = 300
# The most connections a watcher may hold to the agent (dcy's default budget).
BUDGET = 32

# One instance as a watcher shows it: ID, node, port, status, tags.
Row = tuple[str, str, int, str, tuple[str, ...]]
View = Callable[[], Mapping[str, Sequence[Row]]]


class Agent:
    """How the tests reach one agent: its URL (HTTP, or HTTPS with a client certificate)."""

    def __init__(self, consul: ConsulAgent, tls: TlsFiles | None = None) -> None:
        self.consul = consul
        self.tls = tls
        self.url = consul.https_url if tls is not None else consul.url
        self.context = tls.client_context() if tls is not None else None

    def connection(self) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection(
                "127.0.0.1", self.consul.ports["https"], timeout=10, context=self.context
            )
        return http.client.HTTPConnection("127.0.0.1", self.consul.http_port, timeout=10)

    def cli_flags(self) -> list[str]:
        flags = [f"-http-addr={self.url}"]
        if self.tls is not None:
            flags += [
                f"-ca-file={self.tls.ca}",
                f"-client-cert={self.tls.client_cert}",
                f"-client-key={self.tls.client_key}",
            ]
        return flags


def default_limits_agent(
    consul_factory: Callable[..., ConsulAgent], tls_folder: Path | None = None
) -> Agent:
    """An agent with Consul's default limits (the harness adds no ``limits`` stanza), HTTPS
    only with client certificates when ``tls_folder`` is given, every service registered."""
    tls = TlsFiles.create(tls_folder) if tls_folder is not None else None
    started = consul_factory(hcl=[tls.agent_hcl()], tls_client=tls) if tls else consul_factory()
    assert "limits" not in " ".join(started.hcl)
    reached = Agent(started, tls)
    register_all(reached)
    return reached


class Writer:
    """Catalog writes over one keep-alive connection (so that writing adds one at most)."""

    def __init__(self, agent: Agent) -> None:
        self._connection = agent.connection()

    def put(self, path: str, body: dict[str, Any]) -> None:
        self._connection.request("PUT", path, body=json.dumps(body).encode())
        response = self._connection.getresponse()
        response.read()
        assert response.status == 200, response.status

    def close(self) -> None:
        self._connection.close()


class Probe:
    """Another program on the same address: the Consul CLI and plain GETs, in a loop."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.failures: list[str] = []
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        consul = str(require_binary("consul"))
        context: ssl.SSLContext | None = self.agent.context
        while not self._stop.is_set():
            try:
                url = f"{self.agent.url}/v1/catalog/services"
                with urllib.request.urlopen(url, timeout=5, context=context):
                    pass
                for command in ("members", "catalog services"):
                    done = subprocess.run(
                        [consul, *command.split(), *self.agent.cli_flags()],
                        capture_output=True,
                        timeout=10,
                    )
                    if done.returncode != 0:
                        self.failures.append(f"consul {command}: {done.stderr[-300:]!r}")
                self.answers += 1
            except Exception as exc:
                self.failures.append(repr(exc))
            self._stop.wait(0.05)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


class ConnectionSampler:
    """The most TCP connections process ``pid`` (this one by default) held to the agent,
    counted from /proc every few milliseconds, from outside the watcher's own code."""

    def __init__(self, agent: Agent, pid: int | None = None) -> None:
        self.agent = agent
        self.pid = pid
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            count = count_connections(self.agent.url, self.pid)
            if count is not None:
                self.most = max(self.most, count)
                self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def registration(
    node: str, name: str, instance: int, *, status: str = "passing", tags: tuple[str, ...] = ()
) -> dict[str, Any]:
    service_id = f"{name}-{instance}"
    return {
        "Node": node,
        "Address": "10.0.0.1" if node == "host0" else "10.0.0.2",
        "Service": {"ID": service_id, "Service": name, "Port": 8000 + instance, "Tags": tags},
        "Checks": [
            {"CheckID": f"node-{node}", "Name": "node", "Status": "passing"},
            {
                "CheckID": f"check-{service_id}",
                "Name": "service",
                "Status": status,
                "ServiceID": service_id,
            },
        ],
    }


def register_all(agent: Agent) -> None:
    """300 services on two extra nodes (node checks passing): svcN on host(N % 2)."""
    writer = Writer(agent)
    try:
        for number in range(SERVICES):
            writer.put("/v1/catalog/register", registration(f"host{number % 2}", f"svc{number}", 0))
    finally:
        writer.close()


async def run_series(writer: Writer, view: View) -> None:
    """Make each change of the series and wait until ``view`` shows it."""

    def rows(name: str) -> Sequence[Row]:
        return view().get(name, ())

    def status(name: str) -> str | None:
        found = rows(name)
        return found[0][3] if found else None

    writer.put("/v1/catalog/register", registration("host1", "svc7", 1))
    await eventually(lambda: len(rows("svc7")) == 2, what="instance added")
    writer.put("/v1/catalog/deregister", {"Node": "host1", "ServiceID": "svc7-1"})
    await eventually(lambda: len(rows("svc7")) == 1, what="instance removed")
    writer.put("/v1/catalog/register", registration("host0", "svc10", 0, status="critical"))
    await eventually(lambda: status("svc10") == "critical", what="check critical")
    writer.put("/v1/catalog/register", registration("host0", "svc10", 0))
    await eventually(lambda: status("svc10") == "passing", what="check passing again")
    writer.put("/v1/catalog/register", registration("host1", "svc21", 0, tags=("blue",)))
    await eventually(lambda: any(r[4] == ("blue",) for r in rows("svc21")), what="tags changed")
    # A node check failing: every service on host1 (the odd ones), none of the others.
    failing = registration("host1", "svc1", 0)
    failing["Checks"][0]["Status"] = "critical"
    writer.put("/v1/catalog/register", failing)
    await eventually(
        lambda: all(status(f"svc{n}") == "critical" for n in range(1, SERVICES, 2)),
        what="node check failing",
    )
    assert all(status(f"svc{n}") == "passing" for n in range(0, SERVICES, 2))
