"""The inventory as a local cluster: one network namespace per host (``inv infra.up --local``).

Every host of the inventory becomes a namespace on a fabric (:mod:`tasks._netns`) with the
host's own address, and runs what its compose file would run, as processes: the Consul agent
with the configuration rendered from the same template (``consul-agent.hcl.j2``; only the data
directory is given apart), an nsqd, and what ``run:`` lists, each service registering with
its own host's agent at 127.0.0.1:8500 inside the namespace, as in the containers.

Everything a run creates carries its prefix (``dcy<hex>``): namespaces ``<prefix>-fabric``
and ``<prefix>-<dc>-<host>``. The state file (``<root>/state.json``, written before anything
is created) names the prefix, so :func:`down` finds everything after a crash too: it ends
every process in the run's namespaces (only what ``up`` started lives there: the machine's
other processes are in other namespaces) and deletes the namespaces. Logs are kept under
``<root>/<dc>/<host>/<process>.log``.

Consul's UI and nsqadmin are reached from the machine's loopback through forwarders
(:mod:`tasks._forward`): each runs inside a host's namespace holding a listening socket made
in the machine's namespace, so no network link joins the two.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import _netns
from tasks._infra_render import ROOT, render_agent, service_instances
from tasks._inventory import Datacenter, Host, Inventory, InventoryError, require_quorum

DATA = ROOT / ".data" / "cluster"
STATE_FILE = "state.json"
PYTHON = sys.executable
BIN = Path(sys.executable).parent  # the venv's scripts: dcy-sensor, dcy-template, ...
NGINX = "/usr/sbin/nginx"
CONSUL_HTTP = 8500
NSQ_PORTS = {"nsqd": 4151, "nsqlookupd": 4161, "nsqadmin": 4171}  # HTTP ports (/ping)
# What `down` stops last: services deregister from their agent while it is still there.
LAST = ("consul",)
STOP_WAIT = 8.0


class ClusterError(RuntimeError):
    """The local cluster cannot be started or inspected; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def require_root(euid: int) -> None:
    if euid != 0:
        raise ClusterError(
            "the local cluster needs root: it creates and removes network namespaces "
            "(run it as root, e.g. with sudo)",
            code=2,
        )


@dataclass(frozen=True, slots=True)
class Process:
    """One process of one host, as ``up`` starts it inside the host's namespace."""

    dc: str
    host: str
    name: str  # unique on the host: consul, nsqd, worker-2, ...
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    inventory: Inventory
    prefix: str
    root: Path
    mode: str
    links: Mapping[tuple[str, str], _netns.HostLink]
    processes: tuple[Process, ...]

    @property
    def fabric(self) -> str:
        return f"{self.prefix}-fabric"

    def link(self, dc: str, host: str) -> _netns.HostLink:
        return self.links[(dc, host)]

    def host_dir(self, dc: str, host: str) -> Path:
        return self.root / dc / host

    def process(self, dc: str, host: str, name: str) -> Process:
        for proc in self.processes:
            if (proc.dc, proc.host, proc.name) == (dc, host, name):
                return proc
        raise KeyError(f"{dc}/{host} runs no {name}")

    def expected_services(self, dc: Datacenter) -> Counter[str]:
        """Instances of each service Consul should list as passing in ``dc``."""
        counts: Counter[str] = Counter()
        for host in dc.hosts:
            counts["nsqd"] += 1
            for kind in ("nsqlookupd", "nsqadmin"):
                if host.count(kind):
                    counts[kind] += host.count(kind)
            for instance in service_instances(host):
                counts[instance.kind] += 1
        return counts


def new_prefix() -> str:
    return f"dcy{secrets.token_hex(3)}"


def make_plan(inventory: Inventory, root: Path, mode: str | None = None, prefix: str = "") -> Plan:
    """What ``up`` will create, or InventoryError before anything is: a datacenter without a
    quorum of servers, an address the fabric cannot give a host."""
    require_quorum(inventory)
    for host in inventory.hosts:
        if problem := _netns.subnet_problem(host.address):
            raise InventoryError(f"{host.datacenter}/{host.name}: {problem}")
    prefix = prefix or new_prefix()
    links = {}
    for index, host in enumerate(inventory.hosts):
        ns = f"{prefix}-{host.datacenter}-{host.name}"
        links[(host.datacenter, host.name)] = _netns.HostLink(ns, host.address, f"p{index}")
    mode = mode or inventory.mode
    processes: list[Process] = []
    for dc in inventory.datacenters:
        for host in dc.hosts:
            processes += host_processes(inventory, dc, host, root / dc.name / host.name, mode)
    return Plan(inventory, prefix, root, mode, links, tuple(processes))


def _after(*conditions: str) -> tuple[str, ...]:
    return (PYTHON, str(ROOT / "tasks" / "_after.py"), *conditions, "--")


def host_processes(
    inventory: Inventory, dc: Datacenter, host: Host, folder: Path, mode: str
) -> list[Process]:
    """What ``host`` runs: what its compose file runs, as processes."""
    from tasks._infra_check import pinned_binary as require_binary

    def proc(name: str, *argv: str, env: Mapping[str, str] | None = None) -> Process:
        return Process(dc.name, host.name, name, tuple(argv), tuple((env or {}).items()))

    address = host.address
    lookupds = dc.addresses_of("nsqlookupd")
    agent = f"http://127.0.0.1:{CONSUL_HTTP}/v1/agent/self"
    procs = [
        proc(
            "consul",
            str(require_binary("consul")),
            "agent",
            "-hcl",
            render_agent(inventory, dc, host),
            "-data-dir",
            str(folder / "consul-data"),
        )
    ]
    if host.count("nsqlookupd"):
        procs.append(proc(
            "nsqlookupd", str(require_binary("nsqlookupd")), "--log-level=warn",
            "--tcp-address=0.0.0.0:4160", "--http-address=0.0.0.0:4161",
            f"--broadcast-address={address}",
        ))  # fmt: skip
    procs.append(proc(
        "nsqd",
        *_after(*(arg for a in lookupds for arg in ("--url", f"http://{a}:4161/ping"))),
        str(require_binary("nsqd")), "--log-level=warn",
        "--tcp-address=0.0.0.0:4150", "--http-address=0.0.0.0:4151",
        f"--broadcast-address={address}",
        *(f"--lookupd-tcp-address={a}:4160" for a in lookupds),
        f"--data-path={folder / 'nsqd-data'}",
    ))  # fmt: skip
    if host.count("nsqadmin"):
        procs.append(proc(
            "nsqadmin", str(require_binary("nsqadmin")), "--log-level=warn",
            "--http-address=0.0.0.0:4171",
            *(f"--lookupd-http-address={a}:4161" for a in lookupds),
        ))  # fmt: skip
    for instance in service_instances(host):
        procs.append(proc(
            instance.name,
            *_after("--url", agent), str(BIN / f"dcy-{instance.kind}"),
            env={
                "CONSUL_HTTP_ADDR": f"127.0.0.1:{CONSUL_HTTP}",
                "SVC_MODE": mode,
                "SVC_HOST": "0.0.0.0",
                "SVC_PORT": str(instance.port),
                "SVC_ADVERTISE": address,
            },
        ))  # fmt: skip
    if host.count("nginx"):
        nginx_dir = folder / "nginx"
        conf = nginx_dir / "nginx.conf"
        nginx = (NGINX, "-c", str(conf), "-p", f"{nginx_dir}/", "-e", str(nginx_dir / "error.log"))
        template_env = {
            "CONSUL_HTTP_ADDR": f"127.0.0.1:{CONSUL_HTTP}",
            "NGINX_UPSTREAM_SERVICE": "worker",
            "NGINX_LISTEN": "8080",
            "NGINX_WORKER_PROCESSES": "1",
            "NGINX_USER": getpass.getuser(),
            "NGINX_PID": str(nginx_dir / "nginx.pid"),
            "NGINX_ERROR_LOG": str(nginx_dir / "error.log"),
            "NGINX_ACCESS_LOG": "off",
            "NGINX_TEMP_DIR": str(nginx_dir / "temp"),
        }
        reload = " ".join((*nginx, "-s", "reload"))
        procs.append(proc(
            "renderer",
            *_after("--url", agent), str(BIN / "dcy-template"),
            "-template", f"{ROOT / 'templates' / 'nginx.conf.j2'}:{conf}:{reload}",
            env=template_env,
        ))  # fmt: skip
        procs.append(proc("nginx", *_after("--file", str(conf)), *nginx, "-g", "daemon off;"))
    return procs


# -- state ------------------------------------------------------------------------------------


@dataclass
class State:
    """What ``down`` needs after anything: the prefix, and what ``up`` reported."""

    prefix: str
    root: Path
    pids: dict[str, int] = field(default_factory=dict)  # "dc/host/name" -> pid
    urls: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.root / STATE_FILE

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f".{STATE_FILE}.tmp")
        data = {"prefix": self.prefix, "pids": self.pids, "urls": self.urls}
        temp.write_text(json.dumps(data, indent=2) + "\n")
        temp.replace(self.path)

    @classmethod
    def load(cls, root: Path) -> State | None:
        try:
            data = json.loads((root / STATE_FILE).read_text())
            return cls(str(data["prefix"]), root, dict(data["pids"]), dict(data["urls"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClusterError(
                f"{root / STATE_FILE}: unreadable ({exc}); remove it by hand"
            ) from exc


# -- running ----------------------------------------------------------------------------------


class Cluster:
    """A started plan: its processes, forwarders, and the chaos a test or benchmark applies."""

    def __init__(self, plan: Plan, state: State) -> None:
        self.plan = plan
        self.state = state
        self.procs: dict[tuple[str, str, str], subprocess.Popen[bytes]] = {}
        self._forwards: dict[tuple[str, str, int], int] = {}

    # Processes.

    def log_path(self, dc: str, host: str, name: str) -> Path:
        return self.plan.host_dir(dc, host) / f"{name}.log"

    def log(self, dc: str, host: str, name: str) -> str:
        try:
            return self.log_path(dc, host, name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start_process(self, proc: Process) -> None:
        ns = self.plan.link(proc.dc, proc.host).namespace
        with self.log_path(proc.dc, proc.host, proc.name).open("ab") as log:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", ns, *proc.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **dict(proc.env)},
                cwd=ROOT,
                start_new_session=True,  # its own process group: a signal reaches all of it
            )
        self.procs[(proc.dc, proc.host, proc.name)] = popen
        self.state.pids[f"{proc.dc}/{proc.host}/{proc.name}"] = popen.pid
        self.state.save()

    def pid(self, dc: str, host: str, name: str) -> int:
        return self.procs[(dc, host, name)].pid

    def signal(self, dc: str, host: str, name: str, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid(dc, host, name), sig)

    def stop_process(self, dc: str, host: str, name: str, timeout: float = 15.0) -> int | None:
        """SIGTERM (SIGKILL after ``timeout``); the exit status."""
        popen = self.procs[(dc, host, name)]
        self.signal(dc, host, name, signal.SIGTERM)
        try:
            return popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(dc, host, name, signal.SIGKILL)
            return popen.wait(10)

    def kill(self, dc: str, host: str, name: str) -> None:
        self.signal(dc, host, name, signal.SIGKILL)
        self.procs[(dc, host, name)].wait(10)

    def start_again(self, dc: str, host: str, name: str) -> None:
        """Start a stopped or killed process of the plan again (same argv, same log)."""
        self.start_process(self.plan.process(dc, host, name))

    # Network.

    def partition(self, dc: str, host: str) -> None:
        _netns.disconnect(self.plan.link(dc, host))

    def heal(self, dc: str, host: str) -> None:
        _netns.connect(self.plan.link(dc, host))

    def forward(self, dc: str, host: str, port: int) -> int:
        """A port on the machine's 127.0.0.1 that reaches 127.0.0.1:``port`` inside the host."""
        key = (dc, host, port)
        if key in self._forwards:
            return self._forwards[key]
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        local = int(listener.getsockname()[1])
        ns = self.plan.link(dc, host).namespace
        name = f"forward-{port}"
        log = self.log_path(dc, host, name).open("ab")
        with listener, log:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", ns, PYTHON, str(ROOT / "tasks" / "_forward.py"),
                 str(listener.fileno()), f"127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=(listener.fileno(),), start_new_session=True,
            )  # fmt: skip
        self.procs[(dc, host, name)] = popen
        self.state.pids[f"{dc}/{host}/{name}"] = popen.pid
        self.state.save()
        self._forwards[key] = local
        return local

    def consul_url(self, dc: str, host: str) -> str:
        return f"http://127.0.0.1:{self.forward(dc, host, CONSUL_HTTP)}"

    def api(self, dc: str, host: str, path: str, timeout: float = 5.0) -> Any:
        with urllib.request.urlopen(self.consul_url(dc, host) + path, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def ui_host(self, dc: Datacenter) -> Host:
        return dc.servers[0]

    def leader(self, dc: str, via: str | None = None) -> Host | None:
        """The host whose server leads ``dc``'s Raft, as ``via`` (a host of dc) sees it."""
        datacenter = self.plan.inventory.datacenter(dc)
        asker = via or self.ui_host(datacenter).name
        try:
            address = str(self.api(dc, asker, "/v1/status/leader", timeout=3)).rsplit(":", 1)[0]
        except (OSError, ValueError):
            return None
        return next((h for h in datacenter.hosts if h.address == address), None)

    def health(self, dc: str, via: str | None = None) -> dict[str, tuple[int, int]]:
        """Every service of ``dc``: (passing instances, instances), as one of its agents sees
        them: an instance passes when its checks and its node's checks (serfHealth) pass."""
        datacenter = self.plan.inventory.datacenter(dc)
        checks = self.api(dc, via or self.ui_host(datacenter).name, "/v1/health/state/any")
        node_ok: dict[str, bool] = {}
        status: dict[tuple[str, str, str], bool] = {}
        for check in checks:
            ok = check["Status"] == "passing"
            if not check["ServiceName"]:
                node_ok[check["Node"]] = node_ok.get(check["Node"], True) and ok
                continue
            key = (check["ServiceName"], check["Node"], check["ServiceID"])
            status[key] = status.get(key, True) and ok
        result: dict[str, tuple[int, int]] = {}
        for (service, node, _), passing in sorted(status.items()):
            ok_count, total = result.get(service, (0, 0))
            passes = passing and node_ok.get(node, True)
            result[service] = (ok_count + passes, total + 1)
        return result

    def all_passing(self) -> bool:
        for dc in self.plan.inventory.datacenters:
            try:
                seen = self.health(dc.name)
            except (OSError, ValueError):
                return False
            for service, count in self.plan.expected_services(dc).items():
                if seen.get(service) != (count, count):
                    return False
        return True


def _run_folders(root: Path) -> Iterator[Path]:
    return (p for p in root.iterdir() if p.is_dir()) if root.is_dir() else iter(())


def up(
    inventory: Inventory,
    root: Path = DATA,
    mode: str | None = None,
    *,
    prefix: str = "",
    euid: int | None = None,
    timeout: float = 180.0,
    say: Callable[[str], None] = print,
) -> Cluster:
    """Start ``inventory`` as a local cluster under ``root``; return once every service of
    every datacenter passes. Nothing is left behind when it fails."""
    require_root(os.geteuid() if euid is None else euid)
    plan = make_plan(inventory, root, mode, prefix)  # refuses a bad inventory: nothing made yet
    previous = State.load(root)
    if previous is not None:
        raise ClusterError(
            f"a local cluster ({previous.prefix}) is already running from {root}: "
            "stop it first with `inv infra.down --local`"
        )
    for folder in _run_folders(root):  # a previous run's data and logs
        shutil.rmtree(folder)
    state = State(plan.prefix, root)
    state.save()  # before anything exists: `down` finds everything by this prefix
    cluster = Cluster(plan, state)
    try:
        _netns.create_fabric(plan.fabric, sorted({link.network for link in plan.links.values()}))
        for link in plan.links.values():
            _netns.create_host(plan.fabric, link)
        for host in inventory.hosts:
            folder = plan.host_dir(host.datacenter, host.name)
            for sub in ("nsqd-data", "nginx/temp"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
        hosts = ", ".join(f"{h.datacenter}/{h.name} {h.address}" for h in inventory.hosts)
        say(f"{len(plan.links)} hosts on the fabric {plan.fabric}: {hosts}")
        # Consul first everywhere; the rest waits for what it needs (tasks/_after.py).
        for proc in sorted(plan.processes, key=lambda p: p.name != "consul"):
            cluster.start_process(proc)
        logs = f"{root}/<dc>/<host>/<process>.log"
        say(f"{len(plan.processes)} processes started ({plan.mode} mode); logs in {logs}")
        _wait_passing(cluster, timeout, say)
        for dc in inventory.datacenters:
            ui = cluster.ui_host(dc)
            state.urls[f"{dc.name} Consul UI"] = (
                f"{cluster.consul_url(dc.name, ui.name)}/ui/{dc.name}/services"
            )
            for host in dc.hosts:
                if host.count("nsqadmin"):
                    port = cluster.forward(dc.name, host.name, NSQ_PORTS["nsqadmin"])
                    state.urls[f"{dc.name} nsqadmin"] = f"http://127.0.0.1:{port}/"
        state.save()
    except BaseException:
        down(root, say=say)
        raise
    return cluster


def _wait_passing(cluster: Cluster, timeout: float, say: Callable[[str], None]) -> None:
    """Until every service passes everywhere; a line when the picture changes, not per poll."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        lines = []
        done = True
        for dc in cluster.plan.inventory.datacenters:
            try:
                seen = cluster.health(dc.name)
            except (OSError, ValueError):
                seen = {}
            expected = cluster.plan.expected_services(dc)
            parts = []
            for service, count in sorted(expected.items()):
                ok, _ = seen.get(service, (0, 0))
                done = done and seen.get(service) == (count, count)
                parts.append(f"{service} {ok}/{count}")
            lines.append(f"  {dc.name}: {', '.join(parts)}")
        picture = "\n".join(lines)
        if picture != last:
            say(("all passing:\n" if done else "waiting for health checks:\n") + picture)
            last = picture
        if done:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"not every service passed within {timeout:g}s:\n{picture}")
        for (dc_name, host, name), popen in cluster.procs.items():
            if popen.poll() is not None and not name.startswith("forward"):
                log = cluster.log(dc_name, host, name)[-1500:]
                raise ClusterError(f"{dc_name}/{host} {name} exited ({popen.returncode}):\n{log}")
        time.sleep(0.5)


def down(root: Path = DATA, *, euid: int | None = None, say: Callable[[str], None] = print) -> bool:
    """Stop everything the run under ``root`` started and delete its namespaces; False when
    there was nothing to stop. Safe to repeat, and after a crashed ``up``."""
    require_root(os.geteuid() if euid is None else euid)
    state = State.load(root)
    if state is None:
        return False
    ours = [ns for ns in _netns.namespaces() if ns.startswith(f"{state.prefix}-")]
    pids = {ns: _netns.pids(ns) for ns in ours}
    everyone = [pid for ns_pids in pids.values() for pid in ns_pids]
    last = [pid for pid in everyone if _comm(pid) in LAST]
    _terminate([pid for pid in everyone if pid not in last])
    _terminate(last)
    for ns in ours:
        _netns.delete(ns)
    state.path.unlink(missing_ok=True)
    say(f"stopped {len(everyone)} processes, removed {len(ours)} namespaces ({state.prefix})")
    return True


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _terminate(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline and any(running(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline and any(running(pid) for pid in pids):
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not; one of our children is reaped here)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
