"""A template over every service, at 10, 200 and 1,000 services × 5 instances: dcy-template
against an agent with Consul's default limits, consul-template v0.42.1 beside it in the same
run (issue 16).

Two dev agents hold the same catalog. dcy-template's agent has Consul's defaults (no
``limits`` stanza: ``http_max_conns_per_client = 200``), as a user's agent does.
consul-template's agent has ``http_max_conns_per_client`` raised to 4,096, because with the
default it is refused past ~200 services (one connection per blocking query, 1,197 at 1,000
services here); the JSON line says so (``ct_agent_max_conns_per_client``). Both agents carry
a ``telemetry`` stanza (Prometheus retention) and nothing else of ours.

Services are registered through ``/v1/catalog/register`` as external nodes (50 nodes, the 5
instances of a service on 5 consecutive nodes, each with a passing service check), over 16
kept-alive connections: 5,000 instances take seconds. The bench's own traffic (registrations,
changes, metrics) comes from 127.0.0.2, an address of its own, so the agent counts it apart
from the watcher's 127.0.0.1 (its connection limit is per client address): a change is never
held up by the watcher's refusals, and the watcher shares its address with nothing but the
probe.

For each size and tool, one watcher process renders the template (``services`` then
``service`` for each, written the same in both tools' languages as in bench/template.py's case
2; both render byte-identical files, checked with ``-once`` at the smallest size) and:

* connections: the watcher's ESTABLISHED TCP sockets to the agent's port, counted from
  outside every 0.2 s (socket inodes of ``/proc/<pid>/fd`` matched in ``/proc/<pid>/net/tcp``)
  from spawn to stop → the most at once. The watcher talks to the agent directly: a proxy
  would change what the agent sees.
* probe refusals: a probe client on 127.0.0.1 (the watcher's address) sends a request every
  50 ms on a fresh connection, as the ``consul`` CLI or a health check does, alternating
  ``GET /v1/status/peers`` and ``PUT /v1/kv/<key>``; every answer other than 200 (the agent's
  ``429 Too Many Requests``), reset, refused connection or 2 s timeout is a refusal.
* first render: spawn → the complete file on disk (what a user waits for, the interpreter's
  start included). A watcher that has not written it within the timeout (60 s; 15 s with
  ``--quick``) reports ``null`` and a line in ``notes``; its changes are then not measured.
* propagation: an extra instance of one random service registered or deregistered, back to
  back (each as soon as the previous one is in the file); timed from the PUT being answered to
  the file holding the new content (inotify, as in bench/template.py). p50 and p99.
* requests per change: the agent's own per-path request counter (``consul.api.http`` from
  ``/v1/agent/metrics``) summed over every path but the bench's own (registrations, probe,
  metrics), over the counted changes. A counting proxy would count the same requests, but it
  would sit between watcher and agent in the connection count; the agent's counter needs no
  second run. A blocking query is counted when it answers, so each change counts the queries it
  woke, whatever they are (targeted, wide detectors, re-fetches).
* CPU: utime + stime of the watcher process (``/proc/<pid>/stat``) over the counted changes →
  CPU seconds per 100 changes. ``cpu_large_vs_small`` is dcy-template's at the largest size
  over its own at 10 services (the baseline of the ≤ 1.5× goal).

Floor, same run, on dcy-template's agent: bench/_floor.py (one aiohttp long poll of one
service, lines formatted by hand, the same fsynced atomic write) through the same changes of
its one service: ``floor_<n>_p50_ms`` / ``p99_ms``, what any Python watcher is bound by.

Ratios are dcy-template's ÷ consul-template's at the same size (below 1 is better for dcy).
``goals`` holds the issue's goals as met (true) or not (false); a goal whose figure could not
be measured is not met, and ``notes`` says why. Headline figures are at the largest size.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
import contextlib
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench._common import consul_agent, emit, note, parse_args, percentile, put, rounded
from bench.template import (
    CASE2_GO,
    CASE2_JINJA,
    HEADER,
    Run,
    Tool,
    floor_tool,
    running,
    same_output,
    tools,
)
from tests.harness import ConsulAgent

TELEMETRY = 'telemetry { prometheus_retention_time = "1h" disable_hostname = true }'
RAISED_LIMIT = 4096
DEFAULT_LIMIT = 200  # Consul's own default, checked against the agent's configuration
DEFAULT_HCL = [TELEMETRY]
RAISED_HCL = [TELEMETRY, f"limits {{ http_max_conns_per_client = {RAISED_LIMIT} }}"]
NODES, INSTANCES = 50, 5
BENCH_ADDRESS = "127.0.0.2"  # the bench's own requests: counted apart by the agent
WATCHER_ADDRESS = "127.0.0.1"
PROBE_EVERY, PROBE_TIMEOUT = 0.05, 2.0
SAMPLE_EVERY = 0.2
WARMUP = 3
PROBE_KEY = "dcy-bench-scale-probe"
# (method, path label) of the agent's request counter that are the bench's, not the watcher's.
BENCH_REQUESTS = frozenset(
    {
        ("PUT", "v1_catalog_register"),
        ("PUT", "v1_catalog_deregister"),
        ("GET", "v1_status_peers"),
        ("PUT", "v1_kv_"),
        ("GET", "v1_agent_metrics"),
        ("GET", "v1_agent_self"),
    }
)
TEMPLATES = {"dcy": CASE2_JINJA, "consul-template": CASE2_GO}
SHORT = {"dcy": "dcy", "consul-template": "ct", "floor": "floor"}


# -- the catalog, as registered with one agent, and what the template renders from it --------
def service_name(i: int) -> str:
    return f"bench-scale-{i:04d}"


def node_name(n: int) -> str:
    return f"bench-node-{n % NODES:02d}"


@dataclass(frozen=True, slots=True)
class Instance:
    service: int
    slot: int  # 0..INSTANCES-1, or INSTANCES for the extra instance changes add and remove

    @property
    def id(self) -> str:
        suffix = "x" if self.slot == INSTANCES else str(self.slot)
        return f"{service_name(self.service)}-{suffix}"

    @property
    def node(self) -> str:
        return node_name(self.service * INSTANCES + self.slot)

    @property
    def port(self) -> int:
        return 20000 + self.service * 10 + self.slot

    def line(self) -> str:
        return f"{service_name(self.service)} {self.id} 127.0.0.1:{self.port}\n"

    def registration(self) -> dict[str, Any]:
        n = (self.service * INSTANCES + self.slot) % NODES
        return {
            "Node": self.node,
            "Address": f"10.9.0.{n + 1}",
            "Service": {
                "Service": service_name(self.service),
                "ID": self.id,
                "Address": "127.0.0.1",
                "Port": self.port,
            },
            "Check": {
                "Node": self.node,
                "CheckID": f"check:{self.id}",
                "Name": "bench",
                "Status": "passing",
                "ServiceID": self.id,
            },
        }


@dataclass
class Catalog:
    """One agent's services; every change goes through here, so the expected file follows."""

    session: aiohttp.ClientSession
    consul_line: str  # the agent's own "consul" service is listed by `services` too
    size: int = 0
    extra: set[int] = field(default_factory=set)

    async def grow(self, size: int) -> None:
        limit = asyncio.Semaphore(16)

        async def one(instance: Instance) -> None:
            async with limit:
                await put(self.session, "/v1/catalog/register", instance.registration())

        await asyncio.gather(
            *(one(Instance(i, j)) for i in range(self.size, size) for j in range(INSTANCES))
        )
        self.size = size

    def instances(self, i: int, extra: set[int]) -> list[Instance]:
        slots = [*range(INSTANCES), *([INSTANCES] if i in extra else [])]
        # Consul and both tools list a service's instances by node name, then ID.
        return sorted((Instance(i, j) for j in slots), key=lambda x: (x.node, x.id))

    def content(self, extra: set[int] | None = None) -> str:
        extra = self.extra if extra is None else extra
        blocks = {
            service_name(i): "".join(x.line() for x in self.instances(i, extra))
            for i in range(self.size)
        }
        blocks["consul"] = self.consul_line
        return HEADER + "".join(blocks[name] for name in sorted(blocks))

    def floor_content(self, i: int, extra: set[int] | None = None) -> str:
        """bench/_floor.py's file for service ``i``: ``ID address:port`` lines, sorted."""
        extra = self.extra if extra is None else extra
        lines = sorted(f"{x.id} 127.0.0.1:{x.port}\n" for x in self.instances(i, extra))
        return HEADER + "".join(lines)

    async def toggle(self, i: int) -> None:
        """Register service ``i``'s extra instance, or deregister it; return once answered."""
        extra = Instance(i, INSTANCES)
        if i in self.extra:
            body = {"Node": extra.node, "ServiceID": extra.id}
            await put(self.session, "/v1/catalog/deregister", body)
            self.extra.discard(i)
        else:
            await put(self.session, "/v1/catalog/register", extra.registration())
            self.extra.add(i)


@contextlib.asynccontextmanager
async def bench_session(agent: ConsulAgent) -> AsyncIterator[aiohttp.ClientSession]:
    """Kept-alive connections to the agent from the bench's own address."""
    connector = aiohttp.TCPConnector(limit=16, local_addr=(BENCH_ADDRESS, 0))
    async with aiohttp.ClientSession(base_url=agent.url, connector=connector) as session:
        yield session


async def open_catalog(agent: ConsulAgent, session: aiohttp.ClientSession) -> Catalog:
    async with session.get("/v1/health/service/consul") as response:
        consul = (await response.json())[0]["Service"]
    return Catalog(session, f"consul {consul['ID']} 127.0.0.1:{consul['Port']}\n")


async def max_conns_per_client(session: aiohttp.ClientSession) -> int:
    async with session.get("/v1/agent/self") as response:
        return int((await response.json())["DebugConfig"]["HTTPMaxConnsPerClient"])


# -- what is measured from outside the watcher -----------------------------------------------
_COUNT_LINE = re.compile(r'^consul_api_http_count\{method="([A-Z]+)",path="([^"]*)"\} (\S+)$')


async def watcher_requests(session: aiohttp.ClientSession) -> tuple[int, dict[str, int]]:
    """The agent's count of answered requests that were not the bench's, and per path."""
    async with session.get("/v1/agent/metrics", params={"format": "prometheus"}) as response:
        text = await response.text()
    per_path: dict[str, int] = {}
    for line in text.splitlines():
        match = _COUNT_LINE.match(line)
        if match and (match[1], match[2]) not in BENCH_REQUESTS:
            key = f"{match[1]} {match[2]}"
            per_path[key] = per_path.get(key, 0) + int(float(match[3]))
    return sum(per_path.values()), per_path


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (not of its children)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_connections(pid: int, port: int) -> int:
    """``pid``'s ESTABLISHED TCP connections to ``port`` (the agent's), read from /proc."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):  # closed between listdir and readlink
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    remote = f":{port:04X} 01 "  # the remote address's port, then state 01 (ESTABLISHED)
    count = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            for line in lines:
                if remote in line and line.split()[9] in inodes:
                    count += 1
    return count


class ConnectionSampler:
    """Counts a process's connections to the agent every 0.2 s in a thread of its own (at
    1,000 sockets a sample takes milliseconds that the event loop timing changes must not
    wait for) and keeps the most seen."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid, self.port = pid, port
        self.max = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max = max(self.max, agent_connections(self.pid, self.port))
                self.samples += 1
            except (FileNotFoundError, ProcessLookupError):
                return  # the process is gone
            self._stop.wait(SAMPLE_EVERY)


@dataclass
class Probe:
    """A client on the watcher's address asking the agent something every 50 ms, each time on
    a new connection (the agent's limit is checked when it accepts one)."""

    port: int
    requests: int = 0
    refusals: dict[str, int] = field(default_factory=dict)

    @property
    def refused(self) -> int:
        return sum(self.refusals.values())

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            outcome = await self.once(write=self.requests % 2 == 1)
            self.requests += 1
            if outcome is not None:
                self.refusals[outcome] = self.refusals.get(outcome, 0) + 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROBE_EVERY)

    async def once(self, *, write: bool) -> str | None:
        """None if the agent answered 200, else what went wrong."""
        if write:
            head = f"PUT /v1/kv/{PROBE_KEY} HTTP/1.1\r\nContent-Length: 2\r\n"
            body = b"ok"
        else:
            head, body = "GET /v1/status/peers HTTP/1.1\r\n", b""
        request = f"{head}Host: 127.0.0.1\r\nConnection: close\r\n\r\n".encode() + body
        writer = None
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, local_addr=(WATCHER_ADDRESS, 0)
                )
                writer.write(request)
                status_line = await reader.readline()
                await reader.read()
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        except OSError:
            return "reset"
        finally:
            if writer is not None:
                writer.close()
        parts = status_line.split()
        if len(parts) < 2:
            return "closed without an answer"
        return None if parts[1] == b"200" else f"HTTP {parts[1].decode()}"


# -- one watcher at one size -----------------------------------------------------------------
@dataclass
class Figures:
    max_connections: int = 0
    probe_requests: int = 0
    probe_refusals: int = 0
    first_render: float | None = None  # seconds from spawn
    latencies: list[float] = field(default_factory=list)
    requests: int | None = None
    cpu: float | None = None  # seconds over the counted changes
    complete: bool = False  # every counted change was rendered

    def per_change(self, value: float | None) -> float | None:
        if value is None or not self.complete or not self.latencies:
            return None
        return value / len(self.latencies)


@dataclass
class Bench:
    workdir: Path
    changes: int
    first_render_timeout: float
    notes: list[str]
    rng: random.Random = field(default_factory=lambda: random.Random(16))

    async def measure(
        self, tool: Tool, template: str, agent: ConsulAgent, catalog: Catalog, floor: bool
    ) -> Figures:
        figures = Figures()
        probe = Probe(agent.http_port)
        stop = asyncio.Event()
        label = f"{tool.name} at {catalog.size} services"
        first_content = catalog.floor_content(0) if floor else catalog.content()
        async with running(tool, template, agent.http_addr, self.workdir, first_content) as (
            run,
            first,
        ):
            probing = asyncio.create_task(probe.run(stop))
            try:
                with ConnectionSampler(run.pid, agent.http_port) as sampler:
                    try:
                        done = await asyncio.wait_for(first, self.first_render_timeout)
                    except TimeoutError:
                        self.notes.append(
                            f"{label}: no complete first render within "
                            f"{self.first_render_timeout:g} s (first_render null, changes not "
                            f"measured); its log ends: {tail(run.log)}"
                        )
                    else:
                        figures.first_render = done - run.started
                        await self.changes_of(run, catalog, figures, label, floor)
                figures.max_connections = sampler.max
            finally:
                stop.set()
                await probing
        figures.probe_requests, figures.probe_refusals = probe.requests, probe.refused
        if probe.refused:
            self.notes.append(f"{label}: probe refused {probe.refusals} of {probe.requests}")
        return figures

    async def changes_of(
        self, run: Run, catalog: Catalog, figures: Figures, label: str, floor: bool
    ) -> None:
        session = catalog.session
        await quiet(session)
        counted_from: tuple[float, dict[str, int]] | None = None
        for number in range(WARMUP + self.changes):
            if number == WARMUP:
                counted_from = (cpu_seconds(run.pid), (await watcher_requests(session))[1])
            i = 0 if floor else self.rng.randrange(catalog.size)
            extra = catalog.extra ^ {i}
            expected = catalog.floor_content(i, extra) if floor else catalog.content(extra)
            arrived = run.detector.expect(expected)
            await catalog.toggle(i)
            answered = time.perf_counter()
            try:
                done = await run.arrival(arrived, f"change {number} (service {i})")
            except RuntimeError as error:
                self.notes.append(f"{label}: {str(error)[:300]} (changes not measured)")
                return
            if number >= WARMUP:
                figures.latencies.append(done - answered)
        assert counted_from is not None
        # Let the queries the last change woke be answered (consul-template asks again 100 ms
        # after an answer that brought nothing new) before the counters are read.
        await asyncio.sleep(0.3)
        _, per_path = await watcher_requests(session)
        figures.cpu = cpu_seconds(run.pid) - counted_from[0]
        during = {
            path: count - counted_from[1].get(path, 0)
            for path, count in per_path.items()
            if count != counted_from[1].get(path, 0)
        }
        figures.requests = sum(during.values())
        figures.complete = True
        note(f"  {label}: requests during {self.changes} changes, by path: {during}")


async def quiet(session: aiohttp.ClientSession, gap: float = 0.5, limit: float = 10.0) -> None:
    """Wait until the agent has answered no watcher request for ``gap`` seconds: start-up is
    over (or ``limit`` passed)."""
    deadline = time.perf_counter() + limit
    last = (await watcher_requests(session))[0]
    while time.perf_counter() < deadline:
        await asyncio.sleep(gap)
        now = (await watcher_requests(session))[0]
        if now == last:
            return
        last = now


def tail(log: Path, size: int = 300) -> str:
    text = log.read_text(errors="replace").strip() if log.exists() else ""
    return repr(text[-size:]) if text else "(empty)"


async def check_same_output(agent: ConsulAgent, workdir: Path, catalog: Catalog) -> None:
    """Both tools render the same file (-once), and it is the one the bench expects."""
    ours, theirs = tools()
    await same_output(agent, workdir, {ours: CASE2_JINJA, theirs: CASE2_GO})
    once = dcy_once_output(workdir)
    if once != catalog.content():
        raise RuntimeError(
            f"the bench's model differs from the rendered file:\n{once[:600]}\n---\n"
            f"{catalog.content()[:600]}"
        )


def dcy_once_output(workdir: Path) -> str:
    """The file dcy-template's -once run wrote (same_output's folder for it)."""
    return next(workdir.glob("dcy-once-*/rendered.txt")).read_text()


# -- figures ---------------------------------------------------------------------------------
def ms(value: float | None) -> float | None:
    return None if value is None else rounded(value * 1000)


def pct_ms(figures: Figures, pct: float) -> float | None:
    if not figures.complete or not figures.latencies:
        return None
    return ms(percentile(figures.latencies, pct))


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or not theirs:
        return None
    return rounded(ours / theirs)


def size_figures(size: int, tool: str, figures: Figures) -> dict[str, Any]:
    per_100 = figures.per_change(figures.cpu)
    per_change = figures.per_change(figures.requests)
    out: dict[str, Any] = {
        f"{tool}_{size}_p50_ms": pct_ms(figures, 50),
        f"{tool}_{size}_p99_ms": pct_ms(figures, 99),
        f"{tool}_{size}_max_connections": figures.max_connections,
        f"{tool}_{size}_probe_refusals": figures.probe_refusals,
        f"{tool}_{size}_probe_requests": figures.probe_requests,
    }
    if tool != "floor":
        out |= {
            f"{tool}_{size}_first_render_ms": ms(figures.first_render),
            f"{tool}_{size}_requests_per_change": None
            if per_change is None
            else rounded(per_change),
            f"{tool}_{size}_cpu_s_per_100_changes": None
            if per_100 is None
            else rounded(per_100 * 100),
        }
    return out


def all_figures(
    sizes: Sequence[int], measured: dict[tuple[str, int], Figures], notes: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in sizes:
        for tool in ("dcy", "ct", "floor"):
            out |= size_figures(size, tool, measured[tool, size])
        for what in ("p50_ms", "p99_ms", "first_render_ms", "cpu_s_per_100_changes"):
            out[f"ratio_{size}_{what.removesuffix('_ms')}"] = ratio(
                out[f"dcy_{size}_{what}"], out[f"ct_{size}_{what}"]
            )
    small, large = min(sizes), max(sizes)
    compared = [size for size in sizes if size >= 200] or [large]

    def cpu_growth(tool: str) -> float | None:
        return ratio(
            out[f"{tool}_{large}_cpu_s_per_100_changes"],
            out[f"{tool}_{small}_cpu_s_per_100_changes"],
        )

    headline = {
        "services_small": small,
        "services_large": large,
        "max_connections": out[f"dcy_{large}_max_connections"],
        "probe_refusals": out[f"dcy_{large}_probe_refusals"],
        "first_render_ms": out[f"dcy_{large}_first_render_ms"],
        "first_render_ratio": out[f"ratio_{large}_first_render"],
        "propagation_p50_ratio": out[f"ratio_{large}_p50"],
        "propagation_p99_ratio": out[f"ratio_{large}_p99"],
        "requests_per_change": out[f"dcy_{large}_requests_per_change"],
        "cpu_large_vs_small": cpu_growth("dcy"),
        "ct_cpu_large_vs_small": cpu_growth("ct"),
        "ct_max_connections": out[f"ct_{large}_max_connections"],
    }

    def at_most(limit: float, *values: float | None) -> bool:
        return all(value is not None and value <= limit for value in values)

    goals = {
        "max_connections_le_32": at_most(32, headline["max_connections"]),
        "no_probe_refusals": at_most(0, headline["probe_refusals"]),
        "propagation_p99_le_ct": at_most(1.0, *(out[f"ratio_{n}_p99"] for n in compared)),
        "first_render_le_ct": at_most(1.0, *(out[f"ratio_{n}_first_render"] for n in compared)),
        "requests_per_change_le_3": at_most(
            3, *(out[f"dcy_{n}_requests_per_change"] for n in sizes)
        ),
        "cpu_large_le_1_5x_small": at_most(1.5, headline["cpu_large_vs_small"]),
    }
    return {**headline, **out, "goals": goals, "goals_met": sum(goals.values()), "notes": notes}


async def main(quick: bool) -> None:
    sizes, changes, floor_changes, timeout = (
        ((10, 250), 10, 5, 15.0) if quick else ((10, 200, 1000), 200, 100, 60.0)
    )
    ours, theirs = tools()
    floor = floor_tool()
    notes: list[str] = []
    measured: dict[tuple[str, int], Figures] = {}
    load_start = os.getloadavg()[0]
    with (
        consul_agent(DEFAULT_HCL) as default_agent,
        consul_agent(RAISED_HCL) as raised_agent,
        tempfile.TemporaryDirectory(prefix="dcy-bench-scale-") as tmp,
    ):
        workdir = Path(tmp)
        async with bench_session(default_agent) as ds, bench_session(raised_agent) as rs:
            limits = (await max_conns_per_client(ds), await max_conns_per_client(rs))
            if limits != (DEFAULT_LIMIT, RAISED_LIMIT):
                raise RuntimeError(f"agents' http_max_conns_per_client are {limits}")
            catalogs = {
                "default": await open_catalog(default_agent, ds),
                "raised": await open_catalog(raised_agent, rs),
            }
            bench = Bench(workdir, changes, timeout, notes)
            for number, size in enumerate(sizes):
                started = time.perf_counter()
                for catalog in catalogs.values():
                    await catalog.grow(size)
                note(
                    f"{size} services × {INSTANCES} registered with both agents in "
                    f"{time.perf_counter() - started:.1f} s"
                )
                if number == 0:
                    await check_same_output(raised_agent, workdir, catalogs["raised"])
                    note("both tools render the same file")
                runs = [
                    ("dcy", ours, default_agent, catalogs["default"]),
                    ("ct", theirs, raised_agent, catalogs["raised"]),
                ]
                for short, tool, agent, catalog in runs if number % 2 else runs[::-1]:
                    measured[short, size] = await bench.measure(
                        tool, TEMPLATES[tool.name], agent, catalog, floor=False
                    )
                    note(f"{size} services: {tool.name} done")
                bench.changes = floor_changes
                measured["floor", size] = await bench.measure(
                    floor, service_name(0), default_agent, catalogs["default"], floor=True
                )
                bench.changes = changes
    figures = all_figures(sizes, measured, notes)
    emit(
        {
            "bench": "scale",
            "dcy_agent_max_conns_per_client": DEFAULT_LIMIT,
            "ct_agent_max_conns_per_client": RAISED_LIMIT,
            "load_1m_start": rounded(load_start),
            "load_1m_end": rounded(os.getloadavg()[0]),
            **figures,
        }
    )


if __name__ == "__main__":
    asyncio.run(main(parse_args(__doc__ or "").quick))
