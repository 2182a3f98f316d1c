"""dcy-template against consul-template v0.42.1: both CLIs as subprocesses, on the same agent
in the same run, rendering templates that produce byte-for-byte the same output (checked once
per case before anything is measured).

Case 1, one watched service: changes applied one at a time, alternating between registering
and deregistering a second instance and flipping the first one's TTL check between passing
and critical (both change the output: ``service "name"`` lists passing instances only). A
sample is the time from just before the change's PUT to the destination file holding the new
content. Changes are paced (``IDLE`` after each one arrived), and the tools take turns in
blocks, never running together.

Case 2, a template ranging over 200 services × 5 instances (``services``, then ``service``
for each). Each tool talks to the agent through its own counting proxy (``_proxy.py``):
time from starting the process to the complete first render, requests until then, most
connections open at once, then single changes (an extra instance of one service registered
or deregistered) with their propagation and the requests per change.

Both tools' output is detected the same way: inotify on the destination's folder (both write
a temporary file and rename it into place), then the file is read and compared.

Ratios are ours ÷ consul-template's: below 1 is better for every one of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import random
import signal
import statistics
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from bench._common import (
    agent_session,
    consul_agent,
    emit,
    note,
    parse_args,
    percentile,
    put,
    rounded,
    ttl_check_id,
)
from bench._proxy import CountingProxy
from tests.harness import ConsulAgent
from tools.build import require_binary

ROOT = Path(__file__).resolve().parents[1]
DCY_TEMPLATE = Path(sys.executable).with_name("dcy-template")
# Case 2 holds ~200 blocking queries per tool, all from one address (the proxy's): Consul's
# default limits.http_max_conns_per_client of 200 would answer 429 to the rest of them.
AGENT_HCL = ["limits { http_max_conns_per_client = 1000 }"]
IDLE = 0.15  # after each change arrived: consul-template paces its own queries
CHANGE_TIMEOUT = 10.0
FIRST_RENDER_TIMEOUT = 60.0

ONE = "bench-tpl-one"
ONE_BASE, ONE_EXTRA = f"{ONE}-base", f"{ONE}-extra"
MANY_SERVICES, MANY_INSTANCES = 200, 5
HEADER = "# bench template\n"

# The same template twice: consul-template's Go syntax and ours.
CASE1_GO = HEADER + f'{{{{ range service "{ONE}" }}}}{{{{ .ID }}}} {{{{ .Address }}}}:{{{{ .Port }}}}\n{{{{ end }}}}'
CASE1_JINJA = HEADER + f'{{% for s in service("{ONE}") %}}{{{{ s.ID }}}} {{{{ s.Address }}}}:{{{{ s.Port }}}}\n{{% endfor %}}'
CASE2_GO = HEADER + (
    "{{ range services }}{{ $name := .Name }}{{ range service .Name }}"
    "{{ $name }} {{ .ID }} {{ .Address }}:{{ .Port }}\n{{ end }}{{ end }}"
)
CASE2_JINJA = HEADER + (
    "{% for svc in services() %}{% for s in service(svc.Name) %}"
    "{{ svc.Name }} {{ s.ID }} {{ s.Address }}:{{ s.Port }}\n{% endfor %}{% endfor %}"
)


# -- detecting a file's new content ------------------------------------------------------------
_IN_CLOSE_WRITE, _IN_MOVED_TO = 0x08, 0x80
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000


class ContentDetector:
    """Resolves a future at the moment ``path`` holds the expected bytes.

    inotify on the folder, read on the event loop (no thread hop); every event re-reads the
    file, so partial or unrelated writes simply do not match."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = _IN_CLOSE_WRITE | _IN_MOVED_TO
        if self._libc.inotify_add_watch(self._fd, str(path.parent).encode(), mask) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path.parent}")
        self._expected: bytes | None = None
        self._arrived: asyncio.Future[float] | None = None
        asyncio.get_running_loop().add_reader(self._fd, self._on_event)

    def expect(self, content: str) -> asyncio.Future[float]:
        self._expected = content.encode()
        self._arrived = asyncio.get_running_loop().create_future()
        self._check()  # already there (a first render that beat us)
        return self._arrived

    def _on_event(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._fd, 65536):
                pass
        self._check()

    def _check(self) -> None:
        if self._expected is None or self._arrived is None or self._arrived.done():
            return
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if data == self._expected:
            self._arrived.set_result(time.perf_counter())

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)


# -- the two tools ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    binary: Path
    template: Callable[[int], str]  # case number → template text
    stop_signal: signal.Signals  # consul-template ignores SIGTERM; SIGINT is its kill signal

    def argv(self, consul_addr: str, source: Path, destination: Path) -> list[str]:
        return [
            str(self.binary),
            "-consul-addr",
            consul_addr,
            "-template",
            f"{source}:{destination}",
            "-log-level",
            "warn",
        ]


def tools() -> tuple[Tool, Tool]:
    ours = Tool(
        "dcy",
        DCY_TEMPLATE,
        lambda case: CASE1_JINJA if case == 1 else CASE2_JINJA,
        signal.SIGTERM,
    )
    theirs = Tool(
        "consul-template",
        require_binary("consul-template"),
        lambda case: CASE1_GO if case == 1 else CASE2_GO,
        signal.SIGINT,
    )
    return ours, theirs


@dataclass
class Session:
    """One tool rendering one template to ``destination``, watched by a detector."""

    tool: Tool
    destination: Path
    detector: ContentDetector
    process: asyncio.subprocess.Process
    started: float  # perf_counter() just before the process was spawned
    log: Path


@contextlib.asynccontextmanager
async def running(
    tool: Tool, case: int, consul_addr: str, workdir: Path, first_content: str
) -> AsyncIterator[tuple[Session, asyncio.Future[float]]]:
    """Start ``tool`` on the case's template; yield it with the future of its first render
    holding ``first_content``. Stops the process (only it) on exit."""
    folder = Path(tempfile.mkdtemp(prefix=f"{tool.name}-case{case}-", dir=workdir))
    source = folder / "source.tpl"
    source.write_text(tool.template(case))
    out = folder / "out"
    out.mkdir()
    destination = out / "rendered.txt"
    detector = ContentDetector(destination)
    first = detector.expect(first_content)
    log = folder / "tool.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    with log.open("wb") as log_file:
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *tool.argv(consul_addr, source, destination),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        yield Session(tool, destination, detector, process, started, log), first
    finally:
        detector.close()
        if process.returncode is None:
            process.send_signal(tool.stop_signal)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def arrival(
    session: Session, future: Awaitable[float], what: str, timeout: float = CHANGE_TIMEOUT
) -> float:
    try:
        return await asyncio.wait_for(future, timeout)
    except TimeoutError:
        current = session.destination.read_text() if session.destination.exists() else None
        raise RuntimeError(
            f"{session.tool.name}: {what} not rendered within {timeout:g}s; file now:\n"
            f"{(current or '(missing)')[:600]}\nlog:\n{session.log.read_text()[-2000:]}"
        ) from None


# -- case 1: one watched service -------------------------------------------------------------
@dataclass
class OneService:
    """What the agent holds for the case-1 service, and the output that follows from it."""

    base_passing: bool = True
    extra: bool = False
    step: int = 0

    def content(self) -> str:
        lines = []
        if self.base_passing:
            lines.append(f"{ONE_BASE} 127.0.0.1:21000\n")
        if self.extra:
            lines.append(f"{ONE_EXTRA} 127.0.0.1:21001\n")
        return HEADER + "".join(sorted(lines))

    async def change(self, session: aiohttp.ClientSession) -> None:
        """The next change of a four-step cycle; the model follows once the PUT is answered."""
        step = self.step % 4
        self.step += 1
        if step == 0:
            await register_at(session, ONE, ONE_EXTRA, 21001)
            self.extra = True
        elif step == 1:
            await put(session, f"/v1/agent/check/fail/{ttl_check_id(ONE_BASE)}")
            self.base_passing = False
        elif step == 2:
            await put(session, f"/v1/agent/service/deregister/{ONE_EXTRA}")
            self.extra = False
        else:
            await put(session, f"/v1/agent/check/pass/{ttl_check_id(ONE_BASE)}")
            self.base_passing = True

    def next_content(self) -> str:
        probe = OneService(self.base_passing, self.extra, self.step)
        step = probe.step % 4
        if step == 0:
            probe.extra = True
        elif step == 1:
            probe.base_passing = False
        elif step == 2:
            probe.extra = False
        else:
            probe.base_passing = True
        return probe.content()


async def register_at(
    session: aiohttp.ClientSession, name: str, service_id: str, port: int, **extra: object
) -> None:
    await put(
        session,
        "/v1/agent/service/register",
        {"Name": name, "ID": service_id, "Address": "127.0.0.1", "Port": port, **extra},
    )


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)
    first_renders: list[float] = field(default_factory=list)


async def case1(
    agent: ConsulAgent, workdir: Path, ours: Tool, theirs: Tool, changes: int, block: int
) -> tuple[dict[str, Samples], OneService]:
    async with agent_session(agent) as session:
        model = OneService()
        samples = {ours.name: Samples(), theirs.name: Samples()}
        blocks = max(1, changes // block)
        for number in range(blocks):
            order = (ours, theirs) if number % 2 == 0 else (theirs, ours)
            for tool in order:
                async with running(tool, 1, agent.http_addr, workdir, model.content()) as (
                    run,
                    first,
                ):
                    done = await arrival(run, first, "first render")
                    samples[tool.name].first_renders.append(done - run.started)
                    await asyncio.sleep(IDLE)
                    for i in range(block + 1):  # the first change warms the new process up
                        arrived = run.detector.expect(model.next_content())
                        started = time.perf_counter()
                        await model.change(session)
                        done = await arrival(run, arrived, f"case 1 change {model.step}")
                        if i:
                            samples[tool.name].latencies.append(done - started)
                        await asyncio.sleep(IDLE)
            note(f"case 1: block {number + 1}/{blocks} done")
        return samples, model


# -- case 2: 200 services × 5 instances ------------------------------------------------------
def many_name(i: int) -> str:
    return f"bench-tpl-many-{i:03d}"


def many_port(i: int, j: int) -> int:
    return 30000 + i * 10 + j


@dataclass
class ManyServices:
    consul_line: str
    extra: set[int] = field(default_factory=set)

    def content(self, extra: set[int] | None = None) -> str:
        extra = self.extra if extra is None else extra
        blocks = {"consul": self.consul_line}
        for i in range(MANY_SERVICES):
            name = many_name(i)
            ids = [(f"{name}-{j}", many_port(i, j)) for j in range(MANY_INSTANCES)]
            if i in extra:
                ids.append((f"{name}-x", many_port(i, 9)))
            blocks[name] = "".join(f"{name} {sid} 127.0.0.1:{port}\n" for sid, port in sorted(ids))
        return HEADER + "".join(blocks[name] for name in sorted(blocks))


@dataclass
class Case2Figures:
    startup_s: float  # process spawned → its first request to Consul
    first_render_s: float  # first request → complete first render
    requests_to_first_render: int
    max_connections: int
    latencies: list[float]
    requests_per_change: float


async def register_many(session: aiohttp.ClientSession) -> None:
    limit = asyncio.Semaphore(16)

    async def one(i: int, j: int) -> None:
        async with limit:
            await register_at(session, many_name(i), f"{many_name(i)}-{j}", many_port(i, j))

    await asyncio.gather(
        *(one(i, j) for i in range(MANY_SERVICES) for j in range(MANY_INSTANCES))
    )


async def case2_run(
    agent: ConsulAgent,
    session: aiohttp.ClientSession,
    workdir: Path,
    tool: Tool,
    model: ManyServices,
    changes: int,
    rng: random.Random,
) -> Case2Figures:
    proxy = await CountingProxy("127.0.0.1", agent.http_port).start()
    try:
        async with running(tool, 2, proxy.address, workdir, model.content()) as (run, first):
            done = await arrival(run, first, "first render", FIRST_RENDER_TIMEOUT)
            first_request = proxy.requests[0].at
            startup = first_request - run.started
            first_render = done - first_request
            requests_first = proxy.count(until=done)
            await asyncio.sleep(IDLE * 2)
            latencies = []
            window_start = time.perf_counter()
            for _ in range(changes):
                i = rng.randrange(MANY_SERVICES)
                name = many_name(i)
                if i in model.extra:
                    expected = model.content(model.extra - {i})
                    arrived = run.detector.expect(expected)
                    started = time.perf_counter()
                    await put(session, f"/v1/agent/service/deregister/{name}-x")
                    model.extra.discard(i)
                else:
                    expected = model.content(model.extra | {i})
                    arrived = run.detector.expect(expected)
                    started = time.perf_counter()
                    await register_at(session, name, f"{name}-x", many_port(i, 9))
                    model.extra.add(i)
                done = await arrival(run, arrived, f"case 2 change of {name}")
                latencies.append(done - started)
                await asyncio.sleep(IDLE)
            requests_changes = proxy.count(since=window_start)
            return Case2Figures(
                startup,
                first_render,
                requests_first,
                proxy.max_connections,
                latencies,
                requests_changes / changes,
            )
    finally:
        await proxy.aclose()


async def case2(
    agent: ConsulAgent, workdir: Path, ours: Tool, theirs: Tool, changes: int
) -> dict[str, Case2Figures]:
    async with agent_session(agent) as session:
        consul = [e for e in agent.api("/v1/health/service/consul")][0]["Service"]
        model = ManyServices(f"consul {consul['ID']} 127.0.0.1:{consul['Port']}\n")
        rng = random.Random(7)
        figures = {}
        # consul-template first: a warm agent would otherwise favour whoever runs second.
        for tool in (theirs, ours):
            figures[tool.name] = await case2_run(
                agent, session, workdir, tool, model, changes, rng
            )
            note(f"case 2: {tool.name} done")
        return figures


# -- figures ---------------------------------------------------------------------------------
def ms(values: Sequence[float], pct: float) -> float:
    return rounded(percentile(values, pct) * 1000)


def ratio(ours: float, theirs: float) -> float:
    return rounded(ours / theirs) if theirs else float("inf")


async def check_same_output(
    agent: ConsulAgent, workdir: Path, ours: Tool, theirs: Tool, case: int
) -> None:
    """Both tools render the case's template once (-once) to byte-identical files."""
    outputs = []
    for tool in (ours, theirs):
        folder = Path(tempfile.mkdtemp(prefix=f"{tool.name}-once{case}-", dir=workdir))
        source, destination = folder / "source.tpl", folder / "rendered.txt"
        source.write_text(tool.template(case))
        process = await asyncio.create_subprocess_exec(
            *tool.argv(agent.http_addr, source, destination),
            "-once",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        output, _ = await asyncio.wait_for(process.communicate(), FIRST_RENDER_TIMEOUT)
        if process.returncode != 0:
            raise RuntimeError(f"{tool.name} -once failed: {output.decode()[-2000:]}")
        outputs.append(destination.read_text())
    if outputs[0] != outputs[1]:
        raise RuntimeError(
            f"case {case}: the templates render differently:\n--- dcy\n{outputs[0][:800]}\n"
            f"--- consul-template\n{outputs[1][:800]}"
        )


async def main(quick: bool) -> None:
    ours, theirs = tools()
    case1_changes, block = (20, 10) if quick else (120, 30)
    case2_changes = 10 if quick else 40
    with consul_agent(AGENT_HCL) as agent, tempfile.TemporaryDirectory(
        prefix="dcy-bench-template-"
    ) as tmp:
        workdir = Path(tmp)
        async with agent_session(agent) as session:
            await register_at(
                session,
                ONE,
                ONE_BASE,
                21000,
                Check={"CheckID": ttl_check_id(ONE_BASE), "TTL": "10m", "Status": "passing"},
            )
            await register_at(session, ONE, ONE_EXTRA, 21001)
        await check_same_output(agent, workdir, ours, theirs, 1)
        async with agent_session(agent) as session:
            await put(session, f"/v1/agent/service/deregister/{ONE_EXTRA}")
        note("case 1: outputs identical; measuring")
        one, one_state = await case1(agent, workdir, ours, theirs, case1_changes, block)
        async with agent_session(agent) as session:
            await put(session, f"/v1/agent/service/deregister/{ONE_BASE}")
            if one_state.extra:
                await put(session, f"/v1/agent/service/deregister/{ONE_EXTRA}")

        async with agent_session(agent) as session:
            await register_many(session)
        await check_same_output(agent, workdir, ours, theirs, 2)
        note("case 2: outputs identical; measuring")
        many = await case2(agent, workdir, ours, theirs, case2_changes)

    a, b = one[ours.name], one[theirs.name]
    c, d = many[ours.name], many[theirs.name]
    figures: dict[str, float | int] = {
        "propagation_p50_ratio": ratio(percentile(a.latencies, 50), percentile(b.latencies, 50)),
        "propagation_p99_ratio": ratio(percentile(a.latencies, 99), percentile(b.latencies, 99)),
        "first_render_ratio": ratio(c.first_render_s, d.first_render_s),
        "requests_per_change_ratio": ratio(c.requests_per_change, d.requests_per_change),
        "max_connections_ratio": ratio(c.max_connections, d.max_connections),
        "case1_changes": len(a.latencies),
        "case1_dcy_p50_ms": ms(a.latencies, 50),
        "case1_dcy_p99_ms": ms(a.latencies, 99),
        "case1_dcy_max_ms": ms(a.latencies, 100),
        "case1_ct_p50_ms": ms(b.latencies, 50),
        "case1_ct_p99_ms": ms(b.latencies, 99),
        "case1_ct_max_ms": ms(b.latencies, 100),
        "case1_dcy_first_render_from_spawn_ms": rounded(
            statistics.median(a.first_renders) * 1000
        ),
        "case1_ct_first_render_from_spawn_ms": rounded(statistics.median(b.first_renders) * 1000),
        "case2_changes": len(c.latencies),
        "case2_propagation_p50_ratio": ratio(
            percentile(c.latencies, 50), percentile(d.latencies, 50)
        ),
        "case2_propagation_p99_ratio": ratio(
            percentile(c.latencies, 99), percentile(d.latencies, 99)
        ),
        "case2_dcy_p50_ms": ms(c.latencies, 50),
        "case2_dcy_p99_ms": ms(c.latencies, 99),
        "case2_ct_p50_ms": ms(d.latencies, 50),
        "case2_ct_p99_ms": ms(d.latencies, 99),
        "case2_dcy_first_render_ms": rounded(c.first_render_s * 1000),
        "case2_ct_first_render_ms": rounded(d.first_render_s * 1000),
        "case2_dcy_startup_ms": rounded(c.startup_s * 1000),
        "case2_ct_startup_ms": rounded(d.startup_s * 1000),
        "case2_dcy_first_render_from_spawn_ms": rounded((c.startup_s + c.first_render_s) * 1000),
        "case2_ct_first_render_from_spawn_ms": rounded((d.startup_s + d.first_render_s) * 1000),
        "case2_dcy_requests_to_first_render": c.requests_to_first_render,
        "case2_ct_requests_to_first_render": d.requests_to_first_render,
        "case2_requests_to_first_render_ratio": ratio(
            c.requests_to_first_render, d.requests_to_first_render
        ),
        "case2_dcy_requests_per_change": rounded(c.requests_per_change),
        "case2_ct_requests_per_change": rounded(d.requests_per_change),
        "case2_dcy_max_connections": c.max_connections,
        "case2_ct_max_connections": d.max_connections,
    }
    emit("template", figures)


if __name__ == "__main__":
    asyncio.run(main(parse_args(__doc__ or "").quick))
