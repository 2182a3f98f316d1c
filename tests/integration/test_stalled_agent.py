"""An agent that accepts connections and never answers (OutageProxy.stall() in front of a
real agent): lookups keep answering from the cache and turn stale within a stated bound, and
every call returns or raises a transient error within its own bound. Nothing waits forever.

Bounds (defaults): a blocking query gets no answer within wait + wait/16 + 10 s (``wait`` is
60 s; 2 s here to keep the test short), a plain request within 10 s, a first lookup within
``first_answer_timeout`` (10 s), a held leadership ends within its validity (ttl - 1 s),
``Dcy.open`` within ``wait_for_agent``, ``Dcy.aclose`` within 5 s (CLOSE_BUDGET).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from dcy import ConsulUnavailable, Dcy, WatchOptions
from tests.harness import ConsulAgent, ManagedProcess, eventually, free_ports, template_health
from tests.outage_proxy import OutageProxy

pytestmark = pytest.mark.integration

T = TypeVar("T")
WAIT = 2.0
STALE_BOUND = WAIT * 17 / 16 + 10.0  # the seam's timeout of a blocking query
REQUEST_BOUND = 10.0  # the seam's timeout of a plain request
SLACK = 2.0  # a loaded 2-core machine
DCY_TEMPLATE = str(Path(sys.executable).with_name("dcy-template"))


@pytest.fixture
async def proxy(consul: ConsulAgent) -> AsyncIterator[OutageProxy]:
    started = await OutageProxy(consul.http_addr).start()
    try:
        yield started
    finally:
        await started.aclose()


async def timed(call: Awaitable[T]) -> tuple[float, T | BaseException]:
    """How long ``call`` took, and what it returned or raised."""
    started = time.monotonic()
    try:
        result: T | BaseException = await call
    except Exception as exc:
        result = exc
    return time.monotonic() - started, result


async def test_every_call_returns_or_raises_in_bounded_time(
    proxy: OutageProxy, unique_name: str
) -> None:
    """Stalled: a cached lookup answers at once and turns stale within wait·17/16 + 10 s; a
    registration, a KV read and a first lookup raise ConsulUnavailable within 10 s; a held
    leadership is lost within its validity; aclose returns within 5 s."""
    dcy = Dcy(proxy.address, watch_options=WatchOptions(wait=WAIT))
    await dcy.open()
    closed = False
    try:
        await dcy.register(unique_name, 7400, check="ttl")
        await eventually(lambda: dcy.instances(unique_name), what="registered")
        await dcy.kv.put(f"{unique_name}/key", b"value")
        leadership = dcy.leadership(unique_name, lock_delay=0)
        await leadership.__aenter__()
        await asyncio.sleep(WAIT)  # the watches are in blocking queries now

        proxy.stall()
        stalled = time.monotonic()

        async def turns_stale() -> float:
            while True:
                started = time.monotonic()
                lookup = await dcy.lookup(unique_name)
                assert time.monotonic() - started < 0.5, "a cached lookup waited"
                assert lookup.instances, "a lookup answered empty while Consul was stalled"
                if lookup.stale:
                    return time.monotonic() - stalled
                await asyncio.sleep(0.1)

        async def leadership_lost() -> None:
            await leadership.lost.wait()

        stale, register, kv, first, lost = await asyncio.wait_for(
            asyncio.gather(
                turns_stale(),
                timed(dcy.register(f"{unique_name}-late", 7401, check="ttl")),
                timed(dcy.kv.get(f"{unique_name}/key")),
                timed(dcy.lookup(f"{unique_name}-never-seen")),
                timed(leadership_lost()),
            ),
            timeout=60,
        )
        assert stale <= STALE_BOUND + SLACK, f"stale only after {stale:.1f}s"
        for name, (took, outcome) in (("register", register), ("kv get", kv), ("lookup", first)):
            assert isinstance(outcome, ConsulUnavailable), (name, outcome)
            assert took <= REQUEST_BOUND + SLACK, f"{name} took {took:.1f}s"
        assert lost[0] <= leadership.validity + SLACK, f"leadership lost after {lost[0]:.1f}s"
        assert "no renewal" in (leadership.lost_reason or "")
        assert proxy.stalled_connections > 0
        print(
            f"\nstalled agent: stale after {stale:.2f}s (bound {STALE_BOUND:.2f}s); register "
            f"{register[0]:.2f}s, kv {kv[0]:.2f}s, first lookup {first[0]:.2f}s, "
            f"leadership lost {lost[0]:.2f}s"
        )
        took, outcome = await timed(dcy.aclose())
        closed = True
        assert outcome is None and took <= 5.0 + SLACK, f"aclose took {took:.1f}s: {outcome!r}"
        print(f"stalled agent: aclose {took:.2f}s")
    finally:
        if not closed:
            await dcy.aclose()


async def test_opening_gives_up_within_wait_for_agent(proxy: OutageProxy) -> None:
    """Dcy.open against a stalled agent raises ConsulUnavailable after wait_for_agent (3 s),
    not after the request timeout (10 s) or that plus the retries."""
    proxy.stall()
    took, outcome = await timed(Dcy(proxy.address, wait_for_agent=3).open())
    assert isinstance(outcome, ConsulUnavailable), outcome
    assert took <= 3.0 + SLACK, f"open took {took:.1f}s"


async def test_template_once_exits_1_after_missing_key_timeout(
    proxy: OutageProxy, tmp_path: Path
) -> None:
    """dcy-template -once against a stalled agent exits 1 after -missing-key-timeout (3 s)
    and writes nothing; it used to wait for the agent for ever."""
    proxy.stall()
    src, out = tmp_path / "in.j2", tmp_path / "out"
    src.write_text("{% for i in service('consul') %}{{ i.Port }}{% endfor %}")
    process = await asyncio.create_subprocess_exec(
        DCY_TEMPLATE,
        "-template",
        f"{src}:{out}",
        "-once",
        "-missing-key-timeout",
        "3s",
        env={**os.environ, "CONSUL_HTTP_ADDR": proxy.address},
        stderr=asyncio.subprocess.PIPE,
    )
    started = time.monotonic()
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    took = time.monotonic() - started
    assert process.returncode == 1, stderr.decode()
    assert "within 3s" in stderr.decode()
    assert took <= 3.0 + SLACK + 1.0, f"-once took {took:.1f}s"  # + interpreter start-up
    assert not out.exists()


async def test_template_keeps_its_file_and_reports_stale(
    proxy: OutageProxy, tmp_path: Path
) -> None:
    """dcy-template watching through a stalled agent: its file keeps content, inode and
    mtime, the process stays up, and /health says stale within the stated bound."""
    src, out = tmp_path / "in.j2", tmp_path / "out"
    src.write_text("{% for i in service('consul') %}{{ i.Port }}{% endfor %}")
    (status_port,) = free_ports(1)
    renderer = ManagedProcess(
        [
            DCY_TEMPLATE,
            "-template",
            f"{src}:{out}",
            "-block-query-wait",
            f"{WAIT:g}s",
            "-status-addr",
            f"127.0.0.1:{status_port}",
        ],
        tmp_path / "dcy-template.log",
        env={**os.environ, "CONSUL_HTTP_ADDR": proxy.address},
    )
    renderer.spawn()
    try:
        await eventually(
            lambda: template_health(status_port)[0] == 200 and out.exists(),
            timeout=30,
            what="rendered",
        )
        stat = out.stat()
        content = out.read_bytes()
        await asyncio.sleep(WAIT)  # its watch sits in a blocking query now
        proxy.stall()
        stalled = time.monotonic()

        async def stale() -> bool:
            status, body = await asyncio.to_thread(template_health, status_port)
            return status == 503 and body.get("stale_seconds", 0) > 0

        await eventually(stale, timeout=STALE_BOUND + SLACK, what="stale reported")
        print(f"\ndcy-template: stale reported {time.monotonic() - stalled:.2f}s into a stall")
        now = out.stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
        assert out.read_bytes() == content and content
        assert renderer.running
    finally:
        renderer.stop()
