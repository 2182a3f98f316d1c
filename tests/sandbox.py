"""A private network and mount namespace, for tests and benchmarks of the host's resolver.

glibc asks only port 53 of the nameservers in ``/etc/resolv.conf``, so resolving through it
needs a port 53 and a resolv.conf of one's own, without touching the machine's.
:class:`Sandbox` starts a holder process with ``unshare --mount --net`` (private mount
propagation) that brings up loopback, bind-mounts a private copy of resolv.conf over
``/etc/resolv.conf`` and sleeps; every command then enters its namespaces with ``nsenter``.
The network namespace holds nothing but what the test starts, so fixed ports are fine inside
(they clash with nothing on the host, the dev system included). Needs root, as CI has.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.harness import HarnessError, ManagedProcess
from tools.build import require_binary

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# Inside the sandbox's own network namespace: no clash with the host's 8500/8600.
CONSUL_HTTP_PORT = 18500
CONSUL_DNS_PORT = 18600

_HTTP_GET = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=2) as r:\n"
    "    sys.stdout.write(r.read().decode())\n"
)


class Sandbox:
    """One holder process owning a network and a mount namespace; ``stop`` ends everything
    that runs inside (all of it started by this sandbox) and then the holder."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.resolv_conf = workdir / "resolv.conf"
        self.holder: subprocess.Popen[bytes] | None = None
        self._processes: list[ManagedProcess] = []

    def start(self, resolv_text: str = "nameserver 192.0.2.53\n") -> Sandbox:
        """``resolv_text`` becomes the sandbox's /etc/resolv.conf (192.0.2.0/24 is TEST-NET:
        never a real resolver, and unreachable from an empty network namespace anyway)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.resolv_conf.write_text(resolv_text)
        script = (
            'set -e; ip link set lo up; mount --bind "$1" /etc/resolv.conf; echo ready; '
            "exec sleep 2147483647"
        )
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "--",
             "sh", "-c", script, "sh", str(self.resolv_conf)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        self.holder.stdout.close()
        if line.strip() != b"ready":
            self.stop()
            raise HarnessError("the sandbox namespace could not be set up (needs root)")
        return self

    @property
    def pid(self) -> int:
        if self.holder is None:
            raise RuntimeError("sandbox not started")
        return self.holder.pid

    def enter(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the sandbox, from the repository root (nsenter execs it: the pid
        is the command's)."""
        return ["nsenter", f"--target={self.pid}", "--mount", "--net", f"--wd={ROOT}", "--", *argv]

    def run(
        self, argv: list[str], *, timeout: float = 30.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.enter(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    def spawn(
        self, argv: list[str], name: str, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        """A long-running process inside, logging to ``workdir/<name>.log``."""
        process = ManagedProcess(self.enter(argv), self.workdir / f"{name}.log", env=env)
        process.spawn()
        self._processes.append(process)
        return process

    def http_json(self, url: str) -> Any:
        """GET ``url`` from inside the sandbox and decode the JSON answer."""
        result = self.run([sys.executable, "-c", _HTTP_GET, url], timeout=10)
        if result.returncode != 0:
            raise OSError(f"GET {url} failed in the sandbox: {result.stderr.strip()[-300:]}")
        return json.loads(result.stdout) if result.stdout else None

    def start_consul(self, timeout: float = 60.0) -> ManagedProcess:
        """The dev agent with the dev system's own config (consul/dev.hcl: domain sd and its
        dns_config), on the sandbox's ports."""
        argv = [
            str(require_binary("consul")),
            "agent",
            "-dev",
            "-config-file",
            str(ROOT / "consul" / "dev.hcl"),
            "-data-dir",
            str(self.workdir / "consul-data"),
            "-http-port",
            str(CONSUL_HTTP_PORT),
            "-dns-port",
            str(CONSUL_DNS_PORT),
        ]
        consul = self.spawn(argv, "consul")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not consul.running:
                raise HarnessError(f"sandbox consul exited; log tail:\n{consul.log_tail()}")
            try:
                if self.http_json(f"{self.consul_url}/v1/status/leader"):
                    return consul
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise HarnessError(f"sandbox consul not ready; log tail:\n{consul.log_tail()}")

    @property
    def consul_url(self) -> str:
        return f"http://127.0.0.1:{CONSUL_HTTP_PORT}"

    def stop(self) -> None:
        for process in reversed(self._processes):
            process.stop()
        self._processes.clear()
        if self.holder is None:
            return
        # Daemons that forked away inside (dnsmasq) are still in the namespace: end them too.
        # Everything in this network namespace was started by this sandbox.
        for pid in self._pids_inside():
            _terminate(pid)
        self.holder.kill()
        self.holder.wait(10)
        self.holder = None

    def _pids_inside(self) -> list[int]:
        assert self.holder is not None
        try:
            ours = os.readlink(f"/proc/{self.holder.pid}/ns/net")
        except OSError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.holder.pid:
                continue
            try:
                if os.readlink(entry / "ns" / "net") == ours:
                    found.append(int(entry.name))
            except OSError:
                continue
        return found


def _terminate(pid: int, timeout: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
