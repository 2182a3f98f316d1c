"""Real Consul and NSQ processes on free ports, for integration tests and benchmarks.

Every process gets its own ports, data folder and node name, so any number run beside each
other and beside the dev system of ``scripts/up`` (which owns 8500, 8600, 4150, ...). Only
processes started here are ever stopped here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tools.build import require_binary

if TYPE_CHECKING:
    import aiohttp


class HarnessError(RuntimeError):
    """A real process could not be started or did not become ready."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free for both TCP and UDP on 127.0.0.1 right now."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            held += [tcp, udp]
            ports.append(port)
        return ports
    finally:
        for sock in held:
            sock.close()


def http_json(
    url: str,
    *,
    token: str | None = None,
    timeout: float = 2.0,
    method: str = "GET",
    data: bytes | None = None,
    context: ssl.SSLContext | None = None,
) -> Any:
    request = urllib.request.Request(url, method=method, data=data)
    if token:
        request.add_header("X-Consul-Token", token)
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        body = response.read()
    return json.loads(body) if body else None


@dataclass(frozen=True)
class TlsFiles:
    """A CA, an agent (server) certificate and a client certificate signed by it, PEM files
    made by ``consul tls`` offline. The agent's certificate names ``server.<dc>.sd``,
    ``localhost`` and ``127.0.0.1``."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, folder: Path, datacenter: str = "dc1") -> TlsFiles:
        folder.mkdir(parents=True, exist_ok=True)
        consul = str(require_binary("consul"))

        def run(*args: str) -> None:
            subprocess.run([consul, "tls", *args], cwd=folder, check=True, capture_output=True)

        run("ca", "create", "-domain", "sd")
        run("cert", "create", "-server", "-dc", datacenter, "-domain", "sd")
        run("cert", "create", "-client", "-dc", datacenter, "-domain", "sd")
        prefix = f"{datacenter}-"
        return cls(
            ca=folder / "sd-agent-ca.pem",
            server_cert=folder / f"{prefix}server-sd-0.pem",
            server_key=folder / f"{prefix}server-sd-0-key.pem",
            client_cert=folder / f"{prefix}client-sd-0.pem",
            client_key=folder / f"{prefix}client-sd-0-key.pem",
        )

    def agent_hcl(self, *, verify_incoming: bool = True) -> str:
        """The agent's ``tls`` block: its certificate, and (``verify_incoming``) client
        certificates required on HTTPS."""
        return (
            f'tls {{ defaults {{ ca_file = "{self.ca}"\n cert_file = "{self.server_cert}"\n'
            f' key_file = "{self.server_key}"\n'
            f" verify_incoming = {str(verify_incoming).lower()} }} }}"
        )

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


@dataclass
class ManagedProcess:
    """One child process with its log file; stop() ends it and only it."""

    argv: list[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(self.env) if self.env is not None else None,
                # Own process group: a Ctrl-C in the terminal must not reach it before the
                # test's own teardown does.
                start_new_session=True,
            )
        finally:
            log.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])


def _wait_until(ready: Any, proc: ManagedProcess, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if not proc.running:
            raise HarnessError(
                f"{what} exited early (code {proc.process.returncode if proc.process else '?'})"
                f"; log tail:\n{proc.log_tail()}"
            )
        try:
            if ready():
                return
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last_error = exc
        time.sleep(0.05)
    raise HarnessError(
        f"{what} not ready after {timeout:.0f}s (last error: {last_error}); log tail:\n"
        f"{proc.log_tail()}"
    )


def _looks_like_port_clash(log: str) -> bool:
    return "address already in use" in log.lower()


def bound_status_port(log: str) -> int | None:
    """The port a dcy-template started with ``-status-addr 127.0.0.1:0`` serves on, once it
    logged it (asking the system for the port leaves no window for a clash)."""
    found = re.search(r"status: /health and /metrics on http://127\.0\.0\.1:(\d+)", log)
    return int(found.group(1)) if found else None


def template_health(port: int) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of a dcy-template's /health on ``port``; ``(0, {})`` while
    nothing answers there (not listening yet, or gone)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def start_on_free_ports(
    count: int,
    launch: Callable[[list[int]], ManagedProcess],
    ready: Callable[[list[int]], Any],
    what: str,
    *,
    timeout: float = 30.0,
    attempts: int = 3,
) -> tuple[ManagedProcess, list[int]]:
    """Spawn a daemon on ``count`` free ports and wait until ``ready(ports)``; return it and
    its ports.

    free_ports() can only say a port was free a moment ago: another test (or the dev system)
    may bind it before the daemon does. A daemon that exits saying so is started again on
    other ports; any other failure is raised at once."""
    for attempt in range(attempts):
        ports = free_ports(count)
        proc = launch(ports)
        try:
            _wait_until(functools.partial(ready, ports), proc, what, timeout)
            return proc, ports
        except HarnessError:
            clash = _looks_like_port_clash(proc.log_tail(200))
            proc.stop()
            if not clash or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@dataclass
class ConsulAgent:
    """A real ``consul agent -dev`` on free ports: datacenter, node name and DNS domain ``sd``.

    ``hcl`` adds agent configuration (ACL, TLS, ...); ``token`` is what the harness itself uses
    to ask whether the agent is ready. A dev agent keeps its state in memory, so restart()
    gives an agent that forgot every registration, exactly like a restarted dev system.
    """

    workdir: Path
    datacenter: str = "dc1"
    node_name: str = ""
    hcl: list[str] = field(default_factory=list)
    token: str | None = None
    https: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    # Ports kept when a clash makes start() choose others: clients were told them already.
    kept_ports: frozenset[str] = frozenset()
    proc: ManagedProcess | None = None
    # HTTPS only (no plain HTTP listener): the harness talks to it with this client certificate.
    tls_client: TlsFiles | None = None
    # "dev" (one in-memory agent), or a member of a ConsulCluster: "server" or "client",
    # with its state in workdir and the serf LAN addresses it joins.
    role: str = "dev"
    join: list[str] = field(default_factory=list)
    bootstrap_expect: int = 0

    PORT_NAMES = ("http", "dns", "serf_lan", "serf_wan", "server", "grpc", "grpc_tls", "https")

    def __post_init__(self) -> None:
        if not self.node_name:
            self.node_name = f"node-{self.datacenter}-{os.getpid()}-{id(self) % 100000}"

    # -- addresses -------------------------------------------------------------------------
    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def dns_port(self) -> int:
        return self.ports["dns"]

    @property
    def http_addr(self) -> str:
        """``host:port`` as CONSUL_HTTP_ADDR takes it."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['https']}"

    @property
    def serf_wan_addr(self) -> str:
        return f"127.0.0.1:{self.ports['serf_wan']}"

    # -- lifecycle -------------------------------------------------------------------------
    def _argv(self) -> list[str]:
        p = self.ports
        argv = [str(require_binary("consul")), "agent"]
        if self.role == "dev":
            argv.append("-dev")
        else:
            argv += ["-data-dir", str(self.workdir / f"data-{self.node_name}")]
            # Production timings: raft_multiplier 1, as Consul recommends for servers with
            # the CPU they need (an election takes about 3 s here, not 10+).
            argv += ["-hcl", "performance { raft_multiplier = 1 }"]
            argv += [f"-retry-join={address}" for address in self.join]
        if self.role == "server":
            argv += ["-server", f"-bootstrap-expect={self.bootstrap_expect}"]
        argv += [
            "-node",
            self.node_name,
            "-datacenter",
            self.datacenter,
            "-domain",
            "sd",
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-http-port",
            "-1" if self.tls_client else str(p["http"]),
            "-dns-port",
            str(p["dns"]),
            "-serf-lan-port",
            str(p["serf_lan"]),
            "-serf-wan-port",
            str(p["serf_wan"]),
            "-server-port",
            str(p["server"]),
            "-grpc-port",
            str(p["grpc"]),
            "-grpc-tls-port",
            str(p["grpc_tls"]),
            "-log-level",
            "info",
        ]
        if self.https or self.tls_client:
            argv += ["-hcl", f"ports {{ https = {p['https']} }}"]
        for snippet in self.hcl:
            argv += ["-hcl", snippet]
        return argv

    def start(self, timeout: float = 60.0) -> ConsulAgent:
        """Start (or restart) the agent and wait until it has a leader and lists its node."""
        for attempt in range(3):
            if not self.ports or attempt:
                self.choose_ports()
            self.spawn()
            try:
                self.wait_ready(timeout)
                # Clients know these now: a restart that meets a clash keeps them.
                self.kept_ports |= {"http", "https", "dns"}
                return self
            except HarnessError:
                clash = self.port_clash()
                self.stop()
                if not clash or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def choose_ports(self) -> None:
        kept = {name: port for name, port in self.ports.items() if name in self.kept_ports}
        chosen = dict(zip(self.PORT_NAMES, free_ports(len(self.PORT_NAMES)), strict=True))
        taken = set(kept.values())
        if taken & set(chosen.values()):
            return self.choose_ports()  # a kept port came back among the new ones
        self.ports = {**chosen, **kept}

    def spawn(self) -> None:
        """Start the process without waiting (members of a cluster start together)."""
        self.proc = ManagedProcess(self._argv(), self.workdir / f"consul-{self.node_name}.log")
        self.proc.spawn()

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        _wait_until(self._ready, self.proc, f"consul agent {self.node_name}", timeout)

    def port_clash(self) -> bool:
        return self.proc is not None and _looks_like_port_clash(self.proc.log_tail(200))

    @property
    def serf_lan_addr(self) -> str:
        return f"127.0.0.1:{self.ports['serf_lan']}"

    @property
    def server_addr(self) -> str:
        """The server RPC address, as ``/v1/status/leader`` names the Raft leader."""
        return f"127.0.0.1:{self.ports['server']}"

    def _ready(self) -> bool:
        leader = self.api("/v1/status/leader")
        if not leader:
            return False
        nodes = self.api("/v1/catalog/nodes")
        return any(n.get("Node") == self.node_name for n in nodes or [])

    def restart(self, timeout: float = 60.0) -> ConsulAgent:
        """Stop and start on the same ports: a dev agent comes back with empty state."""
        self.stop()
        return self.start(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running

    def log_tail(self, lines: int = 30) -> str:
        return self.proc.log_tail(lines) if self.proc else "(never started)"

    def api(self, path: str, *, method: str = "GET", data: bytes | None = None) -> Any:
        """Send a Consul HTTP API request (``/v1/...``) with the harness's token (over HTTPS
        with the client certificate for a ``tls_client`` agent) and decode its JSON."""
        if self.tls_client is not None:
            return http_json(
                f"{self.https_url}{path}",
                token=self.token,
                method=method,
                data=data,
                context=self.tls_client.client_context(),
            )
        return http_json(f"{self.url}{path}", token=self.token, method=method, data=data)

    def create_token(self, name: str, rules: str) -> str:
        """A new ACL policy ``name`` with ``rules`` and a token holding only it (the
        harness's own token must be a management token): the token's secret."""
        policy = self.api(
            "/v1/acl/policy", method="PUT", data=json.dumps({"Name": name, "Rules": rules}).encode()
        )
        token = self.api(
            "/v1/acl/token",
            method="PUT",
            data=json.dumps({"Description": name, "Policies": [{"ID": policy["ID"]}]}).encode(),
        )
        return str(token["SecretID"])


@dataclass
class ConsulCluster:
    """``servers`` Consul servers and one client agent, each a real agent on its own free
    ports on loopback, joined over serf LAN: a datacenter as production runs it (Raft
    elections and all), on one machine. Clients of dcy talk to ``client``, the way services
    talk to their own host's agent."""

    workdir: Path
    servers: int = 3
    datacenter: str = "dc1"
    members: list[ConsulAgent] = field(default_factory=list)

    @property
    def client(self) -> ConsulAgent:
        return self.members[-1]

    @property
    def server_agents(self) -> list[ConsulAgent]:
        return self.members[:-1]

    def start(self, timeout: float = 90.0) -> ConsulCluster:
        for attempt in range(3):
            self._plan()
            for member in self.members:
                member.spawn()
            try:
                for member in self.members:
                    member.wait_ready(timeout)
                return self
            except HarnessError:
                clash = any(m.port_clash() for m in self.members)
                self.stop()
                if not clash or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _plan(self) -> None:
        tag = f"{os.getpid()}-{id(self) % 100000}"
        servers = [
            ConsulAgent(
                self.workdir,
                datacenter=self.datacenter,
                node_name=f"server{i}-{tag}",
                role="server",
                bootstrap_expect=self.servers,
            )
            for i in range(1, self.servers + 1)
        ]
        client = ConsulAgent(
            self.workdir, datacenter=self.datacenter, node_name=f"client-{tag}", role="client"
        )
        self.members = [*servers, client]
        for member in self.members:
            member.choose_ports()
        for member in self.members:
            member.join = [m.serf_lan_addr for m in servers if m is not member]

    def leader(self) -> ConsulAgent:
        """The server that is the Raft leader now, as the client agent sees it."""
        address = self.client.api("/v1/status/leader")
        for server in self.server_agents:
            if server.server_addr == address:
                return server
        raise HarnessError(f"no server of the cluster has the leader's address {address!r}")

    def stop(self) -> None:
        for member in reversed(self.members):
            member.stop()


@contextlib.contextmanager
def consul_cluster(workdir: Path, **kwargs: Any) -> Iterator[ConsulCluster]:
    cluster = ConsulCluster(workdir, **kwargs)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@dataclass
class NsqCluster:
    """One nsqlookupd and one nsqd pointing at it, on free ports, data in ``workdir``;
    ``nsqd_args`` are added to nsqd's command line."""

    workdir: Path
    nsqd_args: tuple[str, ...] = ()
    ports: dict[str, int] = field(default_factory=dict)
    lookupd: ManagedProcess | None = None
    nsqd: ManagedProcess | None = None

    @property
    def lookupd_http(self) -> str:
        return f"127.0.0.1:{self.ports['lookupd_http']}"

    @property
    def lookupd_tcp(self) -> str:
        return f"127.0.0.1:{self.ports['lookupd_tcp']}"

    @property
    def nsqd_http(self) -> str:
        return f"127.0.0.1:{self.ports['nsqd_http']}"

    @property
    def nsqd_tcp(self) -> str:
        return f"127.0.0.1:{self.ports['nsqd_tcp']}"

    def start(self, timeout: float = 30.0) -> NsqCluster:
        def lookupd(ports: list[int]) -> ManagedProcess:
            self.ports.update(lookupd_tcp=ports[0], lookupd_http=ports[1])
            proc = ManagedProcess(
                [
                    str(require_binary("nsqlookupd")),
                    f"--tcp-address={self.lookupd_tcp}",
                    f"--http-address={self.lookupd_http}",
                    "--broadcast-address=127.0.0.1",
                ],
                self.workdir / "nsqlookupd.log",
            )
            proc.spawn()
            return proc

        self.lookupd, _ = start_on_free_ports(
            2, lookupd, lambda _: _ping(self.lookupd_http), "nsqlookupd", timeout=timeout
        )

        def nsqd(ports: list[int]) -> ManagedProcess:
            self.ports.update(nsqd_tcp=ports[0], nsqd_http=ports[1])
            return self._spawn_nsqd()

        self.nsqd, _ = start_on_free_ports(
            2, nsqd, lambda _: _ping(self.nsqd_http), "nsqd", timeout=timeout
        )
        return self

    def start_nsqd(self, timeout: float = 30.0) -> None:
        """Start nsqd again on its ports (its clients know them) with its data folder kept."""
        self.nsqd = self._spawn_nsqd()
        _wait_until(lambda: _ping(self.nsqd_http), self.nsqd, "nsqd", timeout)

    def _spawn_nsqd(self) -> ManagedProcess:
        data = self.workdir / "nsqd-data"
        data.mkdir(parents=True, exist_ok=True)
        proc = ManagedProcess(
            [
                str(require_binary("nsqd")),
                f"--tcp-address={self.nsqd_tcp}",
                f"--http-address={self.nsqd_http}",
                f"--lookupd-tcp-address={self.lookupd_tcp}",
                "--broadcast-address=127.0.0.1",
                f"--data-path={data}",
                *self.nsqd_args,
            ],
            self.workdir / "nsqd.log",
        )
        proc.spawn()
        return proc

    async def create_channel(self, http: aiohttp.ClientSession, topic: str, channel: str) -> None:
        """Topic and channel on this nsqd up front: published messages then wait in the
        channel, and its lookupd names the nsqd as a producer of the topic at once."""
        for path, params in (
            ("/topic/create", {"topic": topic}),
            ("/channel/create", {"topic": topic, "channel": channel}),
        ):
            async with http.post(f"http://{self.nsqd_http}{path}", params=params) as response:
                assert response.status == 200, await response.text()

    def stop(self) -> None:
        for proc in (self.nsqd, self.lookupd):
            if proc is not None:
                proc.stop()


def _ping(hostport: str) -> bool:
    with urllib.request.urlopen(f"http://{hostport}/ping", timeout=1) as response:
        return bool(response.status == 200)


@contextlib.contextmanager
def consul_agent(workdir: Path, **kwargs: Any) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(workdir, **kwargs)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


@contextlib.contextmanager
def nsq_cluster(workdir: Path) -> Iterator[NsqCluster]:
    cluster = NsqCluster(workdir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that. The blocking twin
    of :func:`eventually`, for tests and benchmarks driving processes from plain code."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:.0f}s (last value: {last!r})")


async def eventually(
    predicate: Any, *, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that.

    Tests wait for conditions, never for fixed times; the timeout only bounds a failure."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:.0f}s (last value: {last!r})")


class HealthServer:
    """A real aiohttp server with a /health endpoint whose answer a test can flip."""

    def __init__(self) -> None:
        self.healthy = True
        self.port = 0
        self._runner: Any = None

    async def start(self) -> HealthServer:
        from aiohttp import web

        async def health(_: web.Request) -> web.Response:
            return web.Response(status=200 if self.healthy else 503, text="ok")

        app = web.Application()
        app.router.add_get("/health", health)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[-1][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
