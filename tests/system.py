"""The whole system on free ports, for end-to-end tests and the pipeline benchmark.

A Consul agent, an NSQ pair registered in Consul under the same names and meta as the
Procfile registers them (``nsqd`` with meta ``http_port``, ``nsqlookupd`` announcing its HTTP
port), and any number of service processes (``python -m svc.<name>``), each with its own log.
Results the app logs are JSON lines on its stdout, parsed by :meth:`System.results`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import ConsulAgent, ManagedProcess, NsqCluster, start_on_free_ports, until
from tests.harness import _ping as ping
from tools.build import require_binary


@dataclass
class ServiceProcess:
    name: str
    proc: ManagedProcess

    @property
    def pid(self) -> int:
        assert self.proc.process is not None
        return self.proc.process.pid

    def log(self) -> str:
        try:
            return self.proc.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class System:
    workdir: Path
    consul: ConsulAgent | None = None
    nsq: NsqCluster | None = None
    services: list[ServiceProcess] = field(default_factory=list)

    def start_infrastructure(self, *, with_nsq: bool = True) -> System:
        self.consul = ConsulAgent(self.workdir / "consul").start()
        if with_nsq:
            self.nsq = NsqCluster(self.workdir / "nsq").start()
            self.register_nsq()
            # Services started before Consul saw NSQ pass would first have to wait for it.
            self.wait_passing("nsqd", 1)
            self.wait_passing("nsqlookupd", 1)
        return self

    def register_nsq(self) -> None:
        assert self.nsq is not None
        nsqd_tcp = int(self.nsq.nsqd_tcp.rsplit(":", 1)[1])
        nsqd_http = self.nsq.nsqd_http.rsplit(":", 1)[1]
        lookupd_http = int(self.nsq.lookupd_http.rsplit(":", 1)[1])
        lookupd_tcp = self.nsq.lookupd_tcp.rsplit(":", 1)[1]
        self.register(
            {
                "ID": "nsqd",
                "Name": "nsqd",
                "Address": "127.0.0.1",
                "Port": nsqd_tcp,
                "Tags": ["tcp"],
                "Meta": {"http_port": nsqd_http},
                "Check": {
                    "Name": "nsqd HTTP /ping",
                    "Notes": "GET /ping: 200 means nsqd is healthy and accepts /pub",
                    "HTTP": f"http://127.0.0.1:{nsqd_http}/ping",
                    "Interval": "1s",
                },
            }
        )
        self.register(
            {
                "ID": "nsqlookupd",
                "Name": "nsqlookupd",
                "Address": "127.0.0.1",
                "Port": lookupd_http,
                "Tags": ["http"],
                "Meta": {"tcp_port": lookupd_tcp},
                "Check": {
                    "Name": "nsqlookupd HTTP /ping",
                    "Notes": "GET /ping on the HTTP API consumers ask for producers",
                    "HTTP": f"http://127.0.0.1:{lookupd_http}/ping",
                    "Interval": "1s",
                },
            }
        )

    def start_nsqadmin(self) -> ServiceProcess:
        """Start nsqadmin on a free port against this system's nsqlookupd, registered as
        ``nsqadmin`` with a named HTTP /ping check as the Procfile registers it; stop() ends it
        with the services."""
        nsq = self.nsq
        assert nsq is not None

        def launch(ports: list[int]) -> ManagedProcess:
            proc = ManagedProcess(
                [
                    str(require_binary("nsqadmin")),
                    f"--http-address=127.0.0.1:{ports[0]}",
                    f"--lookupd-http-address={nsq.lookupd_http}",
                ],
                self.workdir / "nsqadmin.log",
            )
            proc.spawn()
            return proc

        proc, (port,) = start_on_free_ports(
            1, launch, lambda ports: ping(f"127.0.0.1:{ports[0]}"), "nsqadmin"
        )
        service = ServiceProcess("nsqadmin", proc)
        self.services.append(service)
        url = f"http://127.0.0.1:{port}/ping"
        self.register(
            {
                "ID": "nsqadmin",
                "Name": "nsqadmin",
                "Address": "127.0.0.1",
                "Port": port,
                "Tags": ["http", "ui"],
                "Check": {
                    "Name": f"nsqadmin HTTP {url}",
                    "Notes": f"GET {url} every 1s: 200 means nsqadmin serves its web UI",
                    "HTTP": url,
                    "Interval": "1s",
                },
            }
        )
        return service

    def register(self, definition: dict[str, Any]) -> None:
        assert self.consul is not None
        request = urllib.request.Request(
            f"{self.consul.url}/v1/agent/service/register",
            data=json.dumps(definition).encode(),
            method="PUT",
        )
        urllib.request.urlopen(request, timeout=5).close()

    def start(self, name: str, *args: str) -> ServiceProcess:
        """Start ``python -m svc.<name> --consul <agent> args...``."""
        assert self.consul is not None
        number = sum(1 for s in self.services if s.name == name)
        proc = ManagedProcess(
            [
                sys.executable,
                "-m",
                f"svc.{name}",
                "--consul",
                self.consul.http_addr,
                "--check-interval",
                "0.5",
                *args,
            ],
            self.workdir / f"{name}-{number}.log",
        )
        proc.spawn()
        service = ServiceProcess(name, proc)
        self.services.append(service)
        return service

    def passing(self, name: str) -> int:
        assert self.consul is not None
        entries = self.consul.api(f"/v1/health/service/{name}?passing=1") or []
        return len(entries)

    def wait_passing(self, name: str, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.passing(name) >= count:
                return
            time.sleep(0.1)
        logs = "\n".join(f"--- {s.name}:\n{s.proc.log_tail(15)}" for s in self.services)
        raise AssertionError(f"{count} passing {name} not reached in {timeout}s\n{logs}")

    @staticmethod
    def results(service: ServiceProcess) -> list[dict[str, Any]]:
        """The result lines an app logged."""
        lines = []
        for line in service.log().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return lines

    def stop(self) -> None:
        for service in reversed(self.services):
            service.proc.stop()
        if self.nsq is not None:
            self.nsq.stop()
        if self.consul is not None:
            self.consul.stop()


@contextlib.contextmanager
def running_system(workdir: Path, *, with_nsq: bool = True) -> Iterator[System]:
    """A System with its infrastructure started (see :meth:`System.start_infrastructure`);
    everything it started is stopped on the way out, a half-started one too."""
    system = System(workdir)
    try:
        yield system.start_infrastructure(with_nsq=with_nsq)
    finally:
        system.stop()


def wait(predicate: Any, timeout: float = 60, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; the timeout only
    bounds a failure (tests wait for conditions, not for fixed times)."""
    return until(predicate, timeout=timeout, interval=0.1, what=what)
