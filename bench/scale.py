"""A template over every service, at 10, 200 and 1,000 services × 5 instances: dcy-template
against an agent with Consul's default limits, consul-template v0.42.1 beside it in the same
run (issue 16).

Three dev agents hold the same catalog, one per watcher, so a change made for one wakes no
other (and each agent's request counter is one watcher's). dcy-template's agent has Consul's
defaults (no ``limits`` stanza: ``http_max_conns_per_client = 200``, checked in
``/v1/agent/self``), as a user's agent does.
consul-template's agent has ``http_max_conns_per_client`` raised to 4,096, because with the
default it is refused past ~200 services (one connection per blocking query, 1,197 at 1,000
services here); the JSON line says so (``ct_agent_max_conns_per_client``). The floor's
agent (below) has the defaults. Every agent carries a ``telemetry`` stanza (Prometheus
retention) and nothing else of ours.

Services are registered through ``/v1/catalog/register`` as external nodes (50 nodes, the 5
instances of a service on 5 consecutive nodes, each with a passing service check), over 16
kept-alive connections: 5,000 instances take seconds. The bench's own traffic (registrations,
changes, metrics) comes from 127.0.0.2, an address of its own, so the agent counts it apart
from the watcher's 127.0.0.1 (its connection limit is per client address): a change is never
held up by the watcher's refusals, and the watcher shares its address with nothing but the
probe.

At each size the watchers are started one at a time (the others idle; consul-template and
dcy-template take turns going first), each rendering the template (``services`` then
``service`` for each, written the same in both tools' languages as in bench/template.py's case
2; both render byte-identical files, checked with ``-once`` at the smallest size). A watcher
with no complete first render in time is stopped at once: retrying refused queries, it would
load the others. Then changes go in shuffled rounds, one per running watcher a round, back to
back, so a load that drifts during the run (2 shared cores) hits all alike. Per watcher:

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
  the file holding the new content (inotify, as in bench/template.py). p50 and p99; also
  ``*_from_put_start_p50_ms`` (from just before the PUT). The agent wakes the watchers before
  its answer reaches the bench, so a fast watcher can have the file written first: a
  propagation of a few tenths of a millisecond below zero is a real measurement, not an
  error (and makes a p50 ratio meaningless when consul-template's p50 is near 0; the p99
  ratio is the goal).
* requests per change: the agent's own per-path request counter (``consul.api.http`` from
  ``/v1/agent/metrics``) summed over every path but the bench's own (registrations, probe,
  metrics), over the counted changes. A counting proxy would count the same requests, but it
  would sit between watcher and agent in the connection count; the agent's counter needs no
  second run. A blocking query is counted when it answers, so each change counts the queries it
  woke, whatever they are (targeted, wide detectors, re-fetches).
* CPU: utime + stime of the watcher process and its children (``/proc/<pid>/stat``; the Go
  helper that renders ``.ctmpl`` files for dcy-template) over the counted changes → CPU
  seconds per 100 changes. ``cpu_large_vs_small`` is dcy-template's at the largest size over
  its own at 10 services (the baseline of the ≤ 1.5× goal). Beside it, the render floor:
  jinja2 rendering the same file from data already in memory, without a sandbox
  (``render_floor_<n>_ms``), and ``cpu_large_vs_small_bound``, the least growth a watcher
  that renders the whole file again per change can show: its cost per change at the small
  size plus what the larger render adds, everything else held flat.

``--https``: dcy-template's and consul-template's agents get an HTTPS listener (server
certificate from a CA of the run) and both tools reach them over it; dcy-template speaks
HTTP/2 there, consul-template what Go's client picks (HTTP/1.1: it still opens a
connection per blocking query). The bench's own requests and the probe stay on HTTP (the
agent's per-address limit counts both listeners). ``--ctmpl``: dcy-template renders
consul-template's own Go template (``-syntax go``, through dcy-ctmpl; issue 18).

Floor, same run, on an agent of its own with the same catalog: bench/_floor.py (one aiohttp
long poll of one service, lines formatted by hand, the same fsynced atomic write), changes of
its one service in the same rounds: ``floor_<n>_p50_ms`` / ``p99_ms``, what any Python
watcher is bound by for one change.

Ratios are dcy-template's ÷ consul-template's at the same size (below 1 is better for dcy).
``goals`` holds the issue's goals as met (true) or not (false), judged at the largest size
(connections, refusals, the propagation p99 and first render ratios), at every size (requests
per change) or largest over smallest (CPU); a goal whose figure could not be measured is not
met, and ``notes`` says why. Headline figures are at the largest size.
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
from typing import Any, NamedTuple

import aiohttp
import jinja2

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
from tests.harness import ConsulAgent, TlsFiles

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
FLOOR_SERVICE = 0  # the one service bench/_floor.py watches
# (method, path label) of the agent's request counter that are the bench's, not the watcher's.
BENCH_REQUESTS = frozenset(
    {
        ("PUT", "v1_catalog_register"),
        ("PUT", "v1_catalog_deregister"),
        ("GET", "v1_status_peers"),
        ("PUT", "v1_kv_"),
        ("GET", "v1_agent_metrics"),
    }
)


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


async def open_catalog(session: aiohttp.ClientSession) -> Catalog:
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
    """utime + stime of ``pid`` and of the children it runs (dcy-template's dcy-ctmpl helper
    renders Go templates: its CPU is the watcher's)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for child in children(pid):
        with contextlib.suppress(OSError):  # ended meanwhile
            total += cpu_seconds(child)
    return total


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as listed:
                found += [int(child) for child in listed.read().split()]
    return found


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


# -- the watchers at one size ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Transport:
    """How a watcher reaches its agent: plain HTTP, or HTTPS with the run's CA (where each
    tool negotiates HTTP/2 or not by itself). The bench and the probe always use HTTP: the
    agent's per-address connection limit counts both listeners together."""

    ca: Path | None = None

    def port(self, agent: ConsulAgent) -> int:
        return agent.ports["https"] if self.ca is not None else agent.http_port

    def address(self, agent: ConsulAgent) -> str:
        return f"127.0.0.1:{self.port(agent)}"

    def args(self) -> tuple[str, ...]:
        return () if self.ca is None else ("-consul-ssl", "-consul-ssl-ca-cert", str(self.ca))


@dataclass(frozen=True, slots=True)
class Contender:
    short: str  # "dcy", "ct" or "floor": the prefix of its figures
    tool: Tool
    template: str
    agent: ConsulAgent
    catalog: Catalog
    transport: Transport = Transport()
    args: tuple[str, ...] = ()  # the tool's own flags beyond bench/template.py's

    @property
    def floor(self) -> bool:
        return not self.tool.template_tool

    def expected(self, extra: set[int] | None = None) -> str:
        if self.floor:
            return self.catalog.floor_content(FLOOR_SERVICE, extra)
        return self.catalog.content(extra)


@dataclass
class Figures:
    max_connections: int = 0
    probe_requests: int = 0
    probe_refusals: int = 0
    first_render: float | None = None  # seconds from spawn
    latencies: list[float] = field(default_factory=list)  # PUT answered → file holds it
    from_put_start: list[float] = field(default_factory=list)  # PUT sent → file holds it
    requests: int | None = None
    cpu: float | None = None  # seconds over the counted changes
    complete: bool = False  # every counted change was rendered

    def per_change(self, value: float | None) -> float | None:
        if value is None or not self.complete or not self.latencies:
            return None
        return value / len(self.latencies)


@dataclass
class Live:
    """A contender whose process rendered its first file and now takes changes."""

    contender: Contender
    run: Run
    figures: Figures
    stack: contextlib.AsyncExitStack
    changes: int = 0
    counted_from: tuple[float, dict[str, int]] = (0.0, {})


@dataclass
class Bench:
    workdir: Path
    changes: int
    first_render_timeout: float
    notes: list[str]
    rng: random.Random = field(default_factory=lambda: random.Random(16))

    async def size(self, contenders: Sequence[Contender]) -> dict[str, Figures]:
        """Start each contender in turn (the others idle), time its first render, then make
        changes in shuffled rounds, one change per live contender a round, back to back: a
        load that drifts during the run hits all alike. A contender that does not render
        is stopped at once (a watcher retrying refused queries would load the others)."""
        results = {c.short: Figures() for c in contenders}
        live: list[Live] = []
        try:
            for contender in contenders:
                started = await self.start(contender, results[contender.short])
                if started is not None:
                    live.append(started)
            await self.change_rounds(live)
        finally:
            for each in live:
                await each.stack.aclose()
        return results

    def label(self, contender: Contender) -> str:
        return f"{contender.tool.name} at {contender.catalog.size} services"

    async def start(self, contender: Contender, figures: Figures) -> Live | None:
        stack = contextlib.AsyncExitStack()
        run, first = await stack.enter_async_context(
            running(
                contender.tool,
                contender.template,
                contender.transport.address(contender.agent),
                self.workdir,
                contender.expected(),
                (*contender.transport.args(), *contender.args),
            )
        )
        await stack.enter_async_context(self.observed(contender, figures, run))
        try:
            done = await asyncio.wait_for(first, self.first_render_timeout)
        except TimeoutError:
            self.notes.append(
                f"{self.label(contender)}: no complete first render within "
                f"{self.first_render_timeout:g} s (first_render null, changes not measured); "
                f"its log ends: {tail(run.log)}"
            )
            await stack.aclose()
            return None
        except BaseException:
            await stack.aclose()
            raise
        figures.first_render = done - run.started
        return Live(contender, run, figures, stack)

    @contextlib.asynccontextmanager
    async def observed(
        self, contender: Contender, figures: Figures, run: Run
    ) -> AsyncIterator[None]:
        """The process's connections, and a probe on its address, for as long as it runs
        (the floor's one connection needs no probe)."""
        probe = Probe(contender.agent.http_port)
        stop = asyncio.Event()
        probing = None if contender.floor else asyncio.create_task(probe.run(stop))
        try:
            with ConnectionSampler(run.pid, contender.transport.port(contender.agent)) as sampler:
                try:
                    yield
                finally:
                    figures.max_connections = sampler.max
        finally:
            stop.set()
            if probing is not None:
                await probing
        figures.probe_requests, figures.probe_refusals = probe.requests, probe.refused
        if probe.refused:
            self.notes.append(
                f"{self.label(contender)}: probe refused {probe.refusals} of {probe.requests}"
            )

    async def change_rounds(self, live: list[Live]) -> None:
        for each in live:
            await quiet(each.contender.catalog.session)
        for number in range(WARMUP + self.changes):
            if number == WARMUP:
                for each in live:
                    each.counted_from = (
                        cpu_seconds(each.run.pid),
                        (await watcher_requests(each.contender.catalog.session))[1],
                    )
            for each in self.rng.sample(live, len(live)):
                if not await self.change(each, counted=number >= WARMUP):
                    live.remove(each)
                    await each.stack.aclose()
        # Let the queries the last change woke be answered (consul-template asks again 100 ms
        # after an answer that brought nothing new) before the counters are read.
        await asyncio.sleep(0.3)
        for each in live:
            await self.count(each)

    async def change(self, each: Live, *, counted: bool) -> bool:
        """One change to one random service (the floor's own service); False if the file
        did not follow."""
        contender = each.contender
        catalog = contender.catalog
        i = FLOOR_SERVICE if contender.floor else self.rng.randrange(catalog.size)
        arrived = each.run.detector.expect(contender.expected(catalog.extra ^ {i}))
        started = time.perf_counter()
        await catalog.toggle(i)
        answered = time.perf_counter()
        try:
            done = await each.run.arrival(arrived, f"change of service {i}")
        except RuntimeError as error:
            self.notes.append(f"{self.label(contender)}: {str(error)[:300]} (changes not measured)")
            return False
        if counted:
            each.figures.latencies.append(done - answered)
            each.figures.from_put_start.append(done - started)
        return True

    async def count(self, each: Live) -> None:
        cpu_before, requests_before = each.counted_from
        _, per_path = await watcher_requests(each.contender.catalog.session)
        each.figures.cpu = cpu_seconds(each.run.pid) - cpu_before
        during = {
            path: count - requests_before.get(path, 0)
            for path, count in per_path.items()
            if count != requests_before.get(path, 0)
        }
        each.figures.requests = sum(during.values())
        each.figures.complete = True
        note(f"  {self.label(each.contender)}: requests in {self.changes} changes: {during}")


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


def pct_ms(figures: Figures, pct: float, *, from_put_start: bool = False) -> float | None:
    samples = figures.from_put_start if from_put_start else figures.latencies
    if not figures.complete or not samples:
        return None
    return ms(percentile(samples, pct))


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
        f"{tool}_{size}_from_put_start_p50_ms": pct_ms(figures, 50, from_put_start=True),
        f"{tool}_{size}_max_connections": figures.max_connections,
    }
    if tool != "floor":
        out |= {
            f"{tool}_{size}_probe_refusals": figures.probe_refusals,
            f"{tool}_{size}_probe_requests": figures.probe_requests,
            f"{tool}_{size}_first_render_ms": ms(figures.first_render),
            f"{tool}_{size}_requests_per_change": None
            if per_change is None
            else rounded(per_change),
            f"{tool}_{size}_cpu_s_per_100_changes": None
            if per_100 is None
            else rounded(per_100 * 100),
        }
    return out


class _Entry(NamedTuple):
    Name: str
    ID: str
    Address: str
    Port: int


def cpu_bound(
    small_per_100: float | None, render_small: float, render_large: float
) -> float | None:
    """(cost per change at the small size + the render's growth) ÷ cost at the small size."""
    if not small_per_100:
        return None
    per_change_ms = small_per_100 * 10  # seconds per 100 changes → ms per change
    return rounded((per_change_ms + render_large - render_small) / per_change_ms)


def render_floor_ms(size: int, renders: int = 30) -> float:
    """CPU ms per render of the bench's template by jinja2 from data already in memory
    (``size`` services × 5, as tuples), without dcy-template's sandbox: the least a change
    costs any watcher that renders this file again with jinja2, before it has asked anything
    or written a byte."""
    catalog = {service_name(i): [Instance(i, j) for j in range(INSTANCES)] for i in range(size)}
    answers = {
        name: [_Entry(name, x.id, "127.0.0.1", x.port) for x in found]
        for name, found in catalog.items()
    }
    names = [_Entry(name, "", "", 0) for name in sorted(answers)]
    template = jinja2.Environment().from_string(CASE2_JINJA)
    functions = {"services": lambda: names, "service": answers.__getitem__}
    template.render(functions)
    started = time.process_time()
    for _ in range(renders):
        template.render(functions)
    return 1000 * (time.process_time() - started) / renders


def all_figures(
    sizes: Sequence[int], measured: dict[tuple[str, int], Figures], notes: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    render = {size: render_floor_ms(size) for size in (min(sizes), max(sizes))}
    for size in sizes:
        for tool in ("dcy", "ct", "floor"):
            out |= size_figures(size, tool, measured[tool, size])
        for what in (
            "p50_ms",
            "p99_ms",
            "from_put_start_p50_ms",
            "first_render_ms",
            "cpu_s_per_100_changes",
        ):
            out[f"ratio_{size}_{what.removesuffix('_ms')}"] = ratio(
                out[f"dcy_{size}_{what}"], out[f"ct_{size}_{what}"]
            )
    small, large = min(sizes), max(sizes)

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
        # The render alone, and the least cpu_large_vs_small a watcher that renders the file
        # again per change can reach: dcy's own cost per change at the small size, plus
        # what the larger render adds (everything else held flat).
        f"render_floor_{small}_ms": rounded(render[small]),
        f"render_floor_{large}_ms": rounded(render[large]),
        "cpu_large_vs_small_bound": cpu_bound(
            out[f"dcy_{small}_cpu_s_per_100_changes"], render[small], render[large]
        ),
    }

    def at_most(limit: float, *values: float | None) -> bool:
        return all(value is not None and value <= limit for value in values)

    goals = {
        "max_connections_le_32": at_most(32, headline["max_connections"]),
        "no_probe_refusals": at_most(0, headline["probe_refusals"]),
        "propagation_p99_le_ct": at_most(1.0, headline["propagation_p99_ratio"]),
        "first_render_le_ct": at_most(1.0, headline["first_render_ratio"]),
        "requests_per_change_le_3": at_most(
            3, *(out[f"dcy_{n}_requests_per_change"] for n in sizes)
        ),
        "cpu_large_le_1_5x_small": at_most(1.5, headline["cpu_large_vs_small"]),
    }
    return {**headline, **out, "goals": goals, "goals_met": sum(goals.values()), "notes": notes}


async def main(quick: bool, https: bool, ctmpl: bool) -> None:
    sizes, changes, timeout = ((10, 250), 10, 15.0) if quick else ((10, 200, 1000), 200, 60.0)
    ours, theirs = tools()
    notes: list[str] = []
    measured: dict[tuple[str, int], Figures] = {}
    load_start = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dcy-bench-scale-")))
        transport, tls_hcl = Transport(), []
        if https:
            # Server certificate only: clients need the CA, as with most HTTPS agents.
            tls = TlsFiles.create(workdir / "tls")
            transport, tls_hcl = Transport(tls.ca), [tls.agent_hcl(verify_incoming=False)]
        default_agent = stack.enter_context(consul_agent([*DEFAULT_HCL, *tls_hcl], https=https))
        raised_agent = stack.enter_context(consul_agent([*RAISED_HCL, *tls_hcl], https=https))
        floor_agent = stack.enter_context(consul_agent(DEFAULT_HCL))
        async with (
            bench_session(default_agent) as default_session,
            bench_session(raised_agent) as raised_session,
            bench_session(floor_agent) as floor_session,
        ):
            limits = (
                await max_conns_per_client(default_session),
                await max_conns_per_client(raised_session),
            )
            if limits != (DEFAULT_LIMIT, RAISED_LIMIT):
                raise RuntimeError(f"the agents' http_max_conns_per_client are {limits}")
            dcy = Contender(
                "dcy",
                ours,
                CASE2_GO if ctmpl else CASE2_JINJA,
                default_agent,
                await open_catalog(default_session),
                transport,
                ("-syntax", "go") if ctmpl else (),
            )
            ct = Contender(
                "ct", theirs, CASE2_GO, raised_agent, await open_catalog(raised_session), transport
            )
            floor = Contender(
                "floor",
                floor_tool(),
                service_name(FLOOR_SERVICE),
                floor_agent,
                await open_catalog(floor_session),
            )
            bench = Bench(workdir, changes, timeout, notes)
            for number, size in enumerate(sizes):
                started = time.perf_counter()
                for contender in (dcy, ct, floor):
                    await contender.catalog.grow(size)
                note(
                    f"{size} services × {INSTANCES} registered with each agent in "
                    f"{time.perf_counter() - started:.1f} s"
                )
                if number == 0:
                    await check_same_output(raised_agent, workdir, ct.catalog)
                    note("both tools render the same file")
                order = (floor, dcy, ct) if number % 2 else (floor, ct, dcy)
                for short, measured_here in (await bench.size(order)).items():
                    measured[short, size] = measured_here
                note(f"{size} services measured")
    figures = all_figures(sizes, measured, notes)
    emit(
        {
            "bench": "scale",
            # The watchers' protocol: "http" (HTTP/1.1), or "https" (`--https`: TLS, where
            # dcy-template speaks HTTP/2 and consul-template whatever Go's client chooses).
            "transport": "https" if https else "http",
            # dcy-template's template: "jinja", or consul-template's own ("go", `--ctmpl`,
            # rendered through dcy-ctmpl).
            "dcy_syntax": "go" if ctmpl else "jinja",
            "dcy_agent_max_conns_per_client": DEFAULT_LIMIT,
            "ct_agent_max_conns_per_client": RAISED_LIMIT,
            "load_1m_start": rounded(load_start),
            "load_1m_end": rounded(os.getloadavg()[0]),
            **figures,
        }
    )


if __name__ == "__main__":
    args = parse_args(
        __doc__ or "",
        {
            "--https": "the watchers reach their agents over HTTPS",
            "--ctmpl": "dcy-template renders consul-template's Go template (issue 18)",
        },
    )
    asyncio.run(main(args.quick, args.https, args.ctmpl))
