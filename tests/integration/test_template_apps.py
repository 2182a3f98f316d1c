"""dcy-template reconfiguring real third-party software: nginx in front of real workers, and an
application's config.yml pointing at a statsd found through Consul.

Everything runs for real: Debian's nginx, aiohttp workers with HTTP checks, the
``dcy-template`` console script as a subprocess, a Consul agent on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.harness import ConsulAgent, bound_status_port, eventually, free_ports

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NGINX = "/usr/sbin/nginx"  # Debian's package (scripts/install)
DCY_TEMPLATE = str(Path(sys.executable).with_name("dcy-template"))
UPSTREAM_SERVER = re.compile(r"^\s*server (127\.0\.0\.1:\d+);", re.MULTILINE)


# -- Consul -------------------------------------------------------------------------------------
def consul_put(agent: ConsulAgent, path: str, body: Any = None) -> None:
    # A str is sent as it is (a KV value); anything else as JSON.
    data = (
        body.encode()
        if isinstance(body, str)
        else None
        if body is None
        else json.dumps(body).encode()
    )
    request = urllib.request.Request(f"{agent.url}{path}", data=data, method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200, f"PUT {path} answered {response.status}"


def passing_ids(agent: ConsulAgent, name: str) -> set[str]:
    entries = agent.api(f"/v1/health/service/{name}?passing=1")
    return {e["Service"]["ID"] for e in entries}


# -- workers ------------------------------------------------------------------------------------
@dataclass
class Worker:
    """A real HTTP worker answering its own name, so the test sees who served a request."""

    name: str
    port: int = 0
    runner: web.AppRunner | None = None

    async def start(self) -> Worker:
        async def hello(_: web.Request) -> web.Response:
            return web.Response(text=self.name)

        async def health(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/", hello)
        app.router.add_get("/health", health)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[-1][1])
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def register(self, agent: ConsulAgent, service: str) -> None:
        consul_put(
            agent,
            "/v1/agent/service/register",
            {
                "Name": service,
                "ID": self.name,
                "Address": "127.0.0.1",
                "Port": self.port,
                "Check": {
                    "HTTP": f"http://127.0.0.1:{self.port}/health",
                    "Interval": "1s",
                    "Status": "passing",
                },
            },
        )


@contextlib.asynccontextmanager
async def workers(count: int, prefix: str) -> AsyncIterator[list[Worker]]:
    started = [await Worker(f"{prefix}-w{i}").start() for i in range(1, count + 1)]
    try:
        yield started
    finally:
        for worker in started:
            await worker.stop()


# -- processes ----------------------------------------------------------------------------------
@dataclass
class Child:
    """A child process with its output in a log file; stopped (only it) by stop()."""

    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    cwd: Path = ROOT
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Child:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@dataclass
class NginxSetup:
    """Paths and environment for one nginx under a temporary prefix."""

    tmp: Path
    service: str
    port: int = field(default_factory=lambda: free_ports(1)[0])

    def __post_init__(self) -> None:
        (self.tmp / "temp").mkdir(parents=True, exist_ok=True)
        (self.tmp / "prefix").mkdir(exist_ok=True)

    @property
    def conf(self) -> Path:
        return self.tmp / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.tmp / "error.log"

    @property
    def pid_file(self) -> Path:
        return self.tmp / "nginx.pid"

    @property
    def template_env(self) -> dict[str, str]:
        env = {
            "NGINX_UPSTREAM_SERVICE": self.service,
            "NGINX_LISTEN": f"127.0.0.1:{self.port}",
            "NGINX_WORKER_PROCESSES": "1",
            "NGINX_PID": str(self.pid_file),
            "NGINX_ERROR_LOG": str(self.error_log),
            # notice: the master logs each reload ("reconfiguring") and each worker's exit.
            "NGINX_ERROR_LOG_LEVEL": "notice",
            "NGINX_ACCESS_LOG": str(self.tmp / "access.log"),
            "NGINX_TEMP_DIR": str(self.tmp / "temp"),
        }
        if os.geteuid() == 0:
            # Workers would otherwise run as nobody, who cannot enter pytest's 0700 folders.
            env["NGINX_USER"] = getpass.getuser()
        return env

    def argv(self, *extra: str) -> list[str]:
        """nginx with this setup's config, prefix and error log (before the config is read)."""
        return [NGINX, "-c", str(self.conf), "-p", f"{self.tmp / 'prefix'}/", "-e",
                str(self.error_log), *extra]  # fmt: skip

    @property
    def reload_command(self) -> str:
        return " ".join(self.argv("-s", "reload"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def upstream(self) -> list[str]:
        return UPSTREAM_SERVER.findall(self.conf.read_text()) if self.conf.exists() else []

    def log_count(self, pattern: str) -> int:
        if not self.error_log.exists():
            return 0
        return len(re.findall(pattern, self.error_log.read_text(errors="replace")))


def template_child(
    agent: ConsulAgent, tmp: Path, template: str, *flags: str, env: dict[str, str]
) -> Child:
    return Child(
        [DCY_TEMPLATE, "-template", template, "-log-level", "debug", *flags],
        tmp / "dcy-template.log",
        env={**os.environ, "CONSUL_HTTP_ADDR": agent.http_addr, **env},
    )


def rendered_nginx(agent: ConsulAgent, setup: NginxSetup) -> tuple[Child, Child]:
    """dcy-template rendering ``setup``'s nginx.conf, started (it reloads nginx on every
    change), and that nginx, not started yet (see start_nginx)."""
    renderer = template_child(
        agent,
        setup.tmp,
        f"templates/nginx.conf.j2:{setup.conf}:{setup.reload_command}",
        env=setup.template_env,
    ).start()
    return renderer, Child(setup.argv("-g", "daemon off;"), setup.tmp / "nginx.out")


@contextlib.contextmanager
def running(*children: Child) -> Iterator[None]:
    try:
        yield
    finally:
        for child in reversed(children):
            # nginx stops gracefully on SIGQUIT; dcy-template on SIGTERM.
            child.stop(signal.SIGQUIT if child.argv[0] == NGINX else signal.SIGTERM)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


# -- nginx ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Served:
    started: float
    status: int | None
    body: str


async def send_traffic(
    url: str, results: list[Served], stop: asyncio.Event, pause: float = 0.004
) -> None:
    """Requests one after another until told to stop; each on a new connection, so every one
    is accepted by whichever nginx worker is current (a kept-alive connection would belong
    to an old worker that closes it on reload)."""
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, body = await get(session, url)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, body = None, repr(exc)
            results.append(Served(started, status, body))
            await asyncio.sleep(pause)


class PortClash(Exception):
    """nginx could not listen on the port chosen for it: another process bound it first."""


async def start_nginx(nginx: Child, setup: NginxSetup) -> None:
    """Start nginx and wait for its pid file; PortClash if its port was taken meanwhile."""
    nginx.start()

    def up() -> bool:
        if setup.pid_file.exists():
            return True
        if nginx.alive:
            return False
        errors = setup.error_log.read_text(errors="replace") if setup.error_log.exists() else ""
        if "address already in use" in (errors + nginx.tail()).lower():
            raise PortClash(setup.port)
        raise AssertionError(f"nginx exited: {nginx.tail()}\n{errors[-2000:]}")

    await eventually(up, what="nginx pid file")


async def on_a_free_port(
    scenario: Callable[[Path, str], Awaitable[None]], tmp_path: Path, name: str
) -> None:
    """Run an nginx scenario; if nginx lost its free port to another process, run it again
    from the start with a new port (rendered into a new config), a new folder and a new
    service name (the first attempt's registrations may linger)."""
    attempts = 3
    for attempt in range(attempts):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        try:
            await scenario(folder, f"{name}-{attempt}")
            return
        except PortClash:
            if attempt == attempts - 1:
                raise


async def test_nginx_follows_a_removed_worker_without_a_failed_request(
    consul: ConsulAgent, unique_name: str, tmp_path: Path
) -> None:
    """A worker leaving Consul is dropped from nginx by a re-render and `nginx -s reload` while
    traffic flows: no request fails, and after the reload none reaches the removed worker."""

    async def scenario(tmp: Path, service: str) -> None:
        setup = NginxSetup(tmp, service)
        async with workers(3, service) as (w1, w2, w3):
            for worker in (w1, w2, w3):
                worker.register(consul, service)
            ids = {w1.name, w2.name, w3.name}
            await eventually(lambda: passing_ids(consul, service) == ids, what="3 passing")
            renderer, nginx = rendered_nginx(consul, setup)
            with running(renderer, nginx):
                expected = sorted(f"127.0.0.1:{w.port}" for w in (w1, w2, w3))
                await eventually(lambda: sorted(setup.upstream()) == expected, what="3 upstreams")
                # The first render's reload finds no nginx yet: logged, and the renderer lives on.
                # Waiting for that failure keeps it from reloading the nginx started next.
                await eventually(
                    lambda: "nginx.pid" in renderer.log.read_text(), what="first reload failed"
                )
                await start_nginx(nginx, setup)
                async with aiohttp.ClientSession() as session:
                    await eventually(
                        lambda: _status_is(session, setup.url, 200), what="nginx answering"
                    )
                reloads_before = setup.log_count(r"SIGHUP\) received")
                exits_before = setup.log_count(r"worker process \d+ exited")

                results: list[Served] = []
                stop = asyncio.Event()
                traffic = asyncio.create_task(send_traffic(setup.url, results, stop))
                try:
                    await eventually(lambda: len(results) >= 100, what="100 requests before")
                    removed_at = time.monotonic()
                    consul_put(consul, f"/v1/agent/service/deregister/{w3.name}")
                    remaining = sorted(f"127.0.0.1:{w.port}" for w in (w1, w2))
                    await eventually(
                        lambda: sorted(setup.upstream()) == remaining,
                        what="nginx.conf without the removed worker",
                    )
                    # The reload is over when the master says so and the old worker has left.
                    await eventually(
                        lambda: (
                            setup.log_count(r"SIGHUP\) received") > reloads_before
                            and setup.log_count(r"worker process \d+ exited") > exits_before
                        ),
                        what=f"nginx reloaded; error log:\n{setup.error_log.read_text()[-2000:]}",
                    )
                    reloaded_at = time.monotonic()
                    await w3.stop()  # the graceful path: only once nginx no longer sends it work
                    await eventually(
                        lambda: (
                            sum(r.started >= reloaded_at for r in results) >= 150
                            and len(results) >= 320
                        ),
                        what="150 requests after the reload",
                    )
                finally:
                    stop.set()
                    await traffic
                assert renderer.alive, renderer.tail()

            failed = [r for r in results if r.status != 200]
            assert not failed, f"{len(failed)} of {len(results)} failed, e.g. {failed[:3]}"
            before = _served_by([r for r in results if r.started < removed_at])
            after = _served_by([r for r in results if r.started >= reloaded_at])
            assert all(before.get(w.name, 0) > 0 for w in (w1, w2, w3)), before
            assert set(after) == {w1.name, w2.name}, after
            assert all(after[w.name] > 10 for w in (w1, w2)), after
            assert setup.log_count(r"SIGHUP\) received") == reloads_before + 1
            assert renderer.process is not None and renderer.process.returncode == 0, (
                renderer.tail()
            )

    await on_a_free_port(scenario, tmp_path, unique_name)


async def test_nginx_answers_503_when_no_worker_is_left(
    consul: ConsulAgent, unique_name: str, tmp_path: Path
) -> None:
    """With every worker gone the rendered nginx.conf has no upstream, passes `nginx -t`, and
    nginx answers 503 after the reload instead of failing on an empty upstream."""

    async def scenario(tmp: Path, service: str) -> None:
        setup = NginxSetup(tmp, service)
        async with workers(1, service) as (only,):
            only.register(consul, service)
            await eventually(lambda: passing_ids(consul, service) == {only.name}, what="passing")
            renderer, nginx = rendered_nginx(consul, setup)
            with running(renderer, nginx):
                await eventually(
                    lambda: setup.upstream() == [f"127.0.0.1:{only.port}"], what="conf"
                )
                await start_nginx(nginx, setup)
                async with aiohttp.ClientSession() as session:
                    await eventually(lambda: _status_is(session, setup.url, 200), what="200")
                    consul_put(consul, f"/v1/agent/service/deregister/{only.name}")
                    await eventually(
                        lambda: "upstream" not in setup.conf.read_text(),
                        what="conf without upstream",
                    )
                    checked = await asyncio.create_subprocess_exec(
                        *setup.argv("-t"), stderr=asyncio.subprocess.PIPE
                    )
                    _, errors = await asyncio.wait_for(checked.communicate(), 30)
                    assert checked.returncode == 0, errors.decode()
                    assert b"test is successful" in errors
                    await eventually(lambda: _status_is(session, setup.url, 503), what="503")
                    status, body = await get(session, setup.url)
                assert (status, body) == (503, f"no passing instance of {service}\n")
                assert renderer.alive, renderer.tail()

    await on_a_free_port(scenario, tmp_path, unique_name)


async def _status_is(session: aiohttp.ClientSession, url: str, expected: int) -> bool:
    try:
        status, _ = await get(session, url)
    except aiohttp.ClientError:
        return False
    return status == expected


def _served_by(results: list[Served]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.body] = counts.get(result.body, 0) + 1
    return counts


# -- config.yml and statsd ----------------------------------------------------------------------
class StatsdStandIn(asyncio.DatagramProtocol):
    """A statsd-shaped UDP listener: it keeps every datagram it receives."""

    def __init__(self) -> None:
        self.received: list[str] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data.decode(errors="replace"))


@contextlib.asynccontextmanager
async def statsd_stand_in() -> AsyncIterator[tuple[StatsdStandIn, int]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        StatsdStandIn, local_addr=("127.0.0.1", 0)
    )
    try:
        yield protocol, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


# The application's reload: re-read config.yml, note which statsd hosts it now reports to,
# and say hello to each of them.
RELOAD_SCRIPT = """\
import re, socket, sys
config, marker = sys.argv[1], sys.argv[2]
text = open(config).read()
hosts = re.findall(r"- host: (\\S+)\\n\\s+port: (\\d+)", text)
with open(marker, "a") as out:
    out.write(",".join(f"{h}:{p}" for h, p in hosts) + "\\n")
for host, port in hosts:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"app.reloaded:1|c", (host, int(port)))
"""


def expected_config(hosts: list[int], interval: str = "10s") -> str:
    lines = [
        "# Rendered by dcy-template from templates/config.yml.j2: edits here are overwritten.",
        "app:",
        "  name: sensor-app",
        "  log_level: debug",
        f"  report_interval: {interval}",
        "statsd:",
        "  prefix: dcy",
    ]
    if hosts:
        lines.append("  hosts:")
        for port in hosts:
            lines += ["    - host: 127.0.0.1", f"      port: {port}"]
    else:
        lines.append("  hosts: []")
    return "\n".join(lines) + "\n"


async def test_config_yml_follows_statsd_and_reloads_once_per_change(
    consul_factory: Callable[..., ConsulAgent], tmp_path: Path
) -> None:
    """config.yml lists every passing or warning statsd; each change of that list (and only a
    change of the output) runs the reload command exactly once."""
    agent = consul_factory()
    config, marker = tmp_path / "config.yml", tmp_path / "reloads.txt"
    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    status_url = ""

    def reloads() -> list[str]:
        return marker.read_text().splitlines() if marker.exists() else []

    def renders() -> int:
        return int(json.loads(_http_text(status_url))["templates"][0]["renders"])

    async with statsd_stand_in() as (statsd, port1), statsd_stand_in() as (_, port2):
        consul_put(
            agent,
            "/v1/agent/service/register",
            {
                "Name": "statsd",
                "ID": "statsd-1",
                "Address": "127.0.0.1",
                "Port": port1,
                "Check": {"CheckID": "statsd-1-ttl", "TTL": "10m", "Status": "warning"},
            },
        )
        renderer = template_child(
            agent,
            tmp_path,
            f"templates/config.yml.j2:{config}:{sys.executable} {script} {config} {marker}",
            "-status-addr",
            "127.0.0.1:0",
            env={"APP_NAME": "sensor-app", "APP_LOG_LEVEL": "debug"},
        ).start()
        with running(renderer):
            port = await eventually(
                lambda: bound_status_port(renderer.log.read_text()), what="status server"
            )
            status_url = f"http://127.0.0.1:{port}/health"
            await eventually(lambda: len(reloads()) == 1, what=f"first reload {renderer.tail()}")
            assert config.read_text() == expected_config([port1])
            await eventually(lambda: "app.reloaded:1|c" in statsd.received, what="statsd hello")

            # A flip the output does not show: rendered again, nothing written, nothing run.
            seen = renders()
            consul_put(agent, "/v1/agent/check/pass/statsd-1-ttl")
            await eventually(lambda: renders() > seen, what="render after the flip")

            consul_put(
                agent,
                "/v1/agent/service/register",
                {
                    "Name": "statsd",
                    "ID": "statsd-2",
                    "Address": "127.0.0.1",
                    "Port": port2,
                    "Check": {"CheckID": "statsd-2-ttl", "TTL": "10m", "Status": "passing"},
                },
            )
            await eventually(lambda: len(reloads()) >= 2, what="reload for the second statsd")
            assert config.read_text() == expected_config([port1, port2])

            consul_put(agent, "/v1/agent/check/fail/statsd-1-ttl")  # critical: dropped
            await eventually(lambda: len(reloads()) >= 3, what="reload for the failing statsd")
            assert config.read_text() == expected_config([port2])

            consul_put(agent, "/v1/kv/config/app/report_interval", "5s")
            await eventually(lambda: len(reloads()) >= 4, what="reload for the KV change")
            assert config.read_text() == expected_config([port2], interval="5s")

            consul_put(agent, "/v1/agent/service/deregister/statsd-2")
            await eventually(lambda: len(reloads()) >= 5, what="reload for no statsd at all")
            assert config.read_text() == expected_config([], interval="5s")
            assert renderer.alive, renderer.tail()

    one, both, two = (
        f"127.0.0.1:{port1}",
        f"127.0.0.1:{port1},127.0.0.1:{port2}",
        f"127.0.0.1:{port2}",
    )
    assert reloads() == [one, both, two, two, ""]


def _http_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:  # 503 while degraded still carries the report
        return str(exc.read().decode())
